"""Triton kernel that rebuilds a LiftQuant weight in the rotated domain, for prefill.

For many tokens, ``y = W x`` is cheaper as a dense GEMM than as the ±1 GEMM over the lifted activation
(which has D/d times the MACs): with u = Rᵀ pad(x) the rotated activation (:func:`rotate_triton`),

    y = u · W_rotᵀ,   W_rot[n, b·d:(b+1)·d] = r_n · M q_{n,b}

where q_{n,b} ∈ {±1}^D is the code of block b of row n and M the (d, D) lattice matrix (W_rot is the
weight before the unrotation of :meth:`LiftQuantTensor.dequantize`). :func:`rebuild_rotated_weight`
writes W_rot in the activation dtype for cuBLAS, 2.4 code bits read and 16 bits written per weight at
2.4 bits. On the H100 it moves 1.5 TB/s at 24/10 (92 µs for 4096×14336), half the copy bandwidth:
the per-block integer work below bounds it, so 32/16 (1.6× fewer blocks per weight) reaches 2.4 TB/s.

Each program owns ``ROWS`` rows × ``BLOCKS`` lattice blocks, one block per row of a
(ROWS·BLOCKS, 32·CHUNKS) ±1 tile (steps 1–2 are :func:`_block_signs`):

1. per block and 32-bit chunk, two code words are loaded and funnel-shifted so that the chunk holds
   the block's bits from its first one (blocks start at any bit: D need not divide 32);
2. the chunks become ±1 fp16 with two integer ops per pair of bits (``_signs_from_words`` of the ±1
   GEMM, :mod:`lift_ao.kernels.triton_matmul`; column ``2j + h`` of a chunk holds bit ``j + 16h``);
3. one ``tl.dot`` with Mᵀ, whose rows are loaded in that column order (zero past D and past d), gives
   the (ROWS·BLOCKS, d) block values in fp32; scaled by r and stored, cropped from d padded to d.

M enters the dot in fp16 (11-bit mantissa: under the rounding of a bf16 result, about that of an fp16
one); fp32 results add a second dot with M's fp16 remainder (~22 bits). One code path serves every
(D, d): the chunk count (D padded to a power of two ≥ 32, over 32) and d padded to a power of two ≥ 16
are compile-time constants.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lift_ao.packing import check_packed

from .triton_matmul import (_MINUS_ONE_PAIR, _SIGN_BITS_PAIR, _bit_of_column, _code_word_offset, _signs_from_words,
                            autotune, check_launch_device)

__all__ = ["padded_columns", "rebuild_rotated_weight"]

# Rows of W_rot (and of the rotated activation it multiplies) are zero-padded to a multiple of this
# many columns: cuBLAS's fast bf16 kernels need 16-byte-aligned rows and K. H100, 4096 rows, batch 256:
# 131 µs at K = 14340 (Kp of 14336 at d = 10), 67.5 µs at 14400 with zeros (bf16 at 14336: 66.7).
COLUMN_ALIGN = 64


def padded_columns(padded_features: int) -> int:
    """Columns of the prefill GEMM's operands: Kp rounded up to a multiple of COLUMN_ALIGN."""
    return -(-padded_features // COLUMN_ALIGN) * COLUMN_ALIGN


@triton.jit
def _block_signs(code_row, blocks, in_range, words_total, D: tl.constexpr, CHUNKS: tl.constexpr,
                MINUS_ONE_PAIR: tl.constexpr, SIGN_BITS_PAIR: tl.constexpr):
    """(TILE, 32·CHUNKS) ±1 fp16 of lattice block ``blocks[i]`` of the row whose codes start at
    ``code_row[i]`` ((TILE, 1) pointers, ``_code_word_offset(row, 0, quads)``): column ``32c + 2j + h``
    holds the block's bit ``32c + j + 16h`` (bits past D belong to the next block; 0 where not
    ``in_range``)."""
    # Chunk c of a block: its bits [32c, 32c + 32), i.e. stream bits from b·D + 32c, spanning two words.
    first_bit = blocks[:, None] * D + 32 * tl.arange(0, CHUNKS)[None, :]
    word = first_bit // 32
    low = tl.load(code_row + _code_word_offset(0, word, words_total // 4),
                  mask=in_range[:, None] & (word < words_total), other=0)
    high = tl.load(code_row + _code_word_offset(0, word + 1, words_total // 4),
                   mask=in_range[:, None] & (word + 1 < words_total), other=0)
    pair = (high.to(tl.int64) << 32) | (low.to(tl.int64) & 0xFFFFFFFF)
    chunks = (pair >> (first_bit % 32).to(tl.int64)).to(tl.int32)
    return _signs_from_words(chunks, MINUS_ONE_PAIR, SIGN_BITS_PAIR, tl.float16, blocks.shape[0], CHUNKS)


@triton.jit
def _rebuild_kernel(
    codes_ptr, scale_ptr, mapping_ptr, out_ptr,
    N, n_blocks, words_total, columns, stride_out, d: tl.constexpr, D: tl.constexpr,
    SPLIT_MAPPING: tl.constexpr, MINUS_ONE_PAIR: tl.constexpr, SIGN_BITS_PAIR: tl.constexpr,
    CHUNKS: tl.constexpr, D_OUT_PADDED: tl.constexpr, COLUMN_ALIGN: tl.constexpr, ROWS: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """out[n, b·d + e] = r[n] · Σ_f M[e, f] q_{n,b}[f] for ROWS rows × BLOCKS blocks; the last
    column of programs also zeroes columns [n_blocks·d, columns) of its rows.

    codes (⌈N/32⌉, words_total/4, 32, 4) int32 contiguous (layout of :mod:`lift_ao.packing`), scale
    (N,) fp32, mapping (d, D) fp32 contiguous, out (N, columns) with unit column stride,
    columns - n_blocks·d ≤ COLUMN_ALIGN.
    """
    TILE: tl.constexpr = ROWS * BLOCKS
    tile = tl.arange(0, TILE)
    rows = tl.program_id(0) * ROWS + tile // BLOCKS
    blocks = tl.program_id(1) * BLOCKS + tile % BLOCKS
    in_range = (rows < N) & (blocks < n_blocks)

    code_row = codes_ptr + _code_word_offset(rows[:, None].to(tl.int64), 0, words_total // 4)
    # Bits past D (the next block's) meet zero rows of Mᵀ below.
    signs = _block_signs(code_row, blocks, in_range, words_total, D, CHUNKS, MINUS_ONE_PAIR, SIGN_BITS_PAIR)

    bit = _bit_of_column(tl.arange(0, 32 * CHUNKS))
    e = tl.arange(0, D_OUT_PADDED)
    mapping_t = tl.load(mapping_ptr + e[None, :] * D + bit[:, None], mask=(bit < D)[:, None] & (e < d)[None, :],
                        other=0.0)
    mapping_high = mapping_t.to(tl.float16)
    values = tl.dot(signs, mapping_high)
    if SPLIT_MAPPING:
        values = tl.dot(signs, (mapping_t - mapping_high.to(tl.float32)).to(tl.float16), values)

    values = values * tl.load(scale_ptr + rows, mask=rows < N, other=0.0)[:, None]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_out + blocks[:, None] * d + e[None, :]
    tl.store(out, values.to(out_ptr.dtype.element_ty), mask=in_range[:, None] & (e < d)[None, :])

    if tl.program_id(1) == tl.num_programs(1) - 1:
        pad_rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        pad = n_blocks * d + tl.arange(0, COLUMN_ALIGN)
        tl.store(out_ptr + pad_rows[:, None].to(tl.int64) * stride_out + pad[None, :],
                 tl.zeros((ROWS, COLUMN_ALIGN), out_ptr.dtype.element_ty),
                 mask=(pad_rows < N)[:, None] & (pad < columns)[None, :])


def _prune_configs(configs, named_args, **kwargs):
    """Keep the ±1 tile within ~64 fp16 values per thread (D = 72 has 4 chunks a block)."""
    chunks = kwargs.get("CHUNKS", named_args.get("CHUNKS"))
    kept = [c for c in configs if c.kwargs["ROWS"] * c.kwargs["BLOCKS"] * chunks <= 64 * c.num_warps]
    return kept or configs[:1]


# Tiles of 128–256 blocks; wide ones (many blocks of few rows) write longer contiguous runs of a row.
_TUNING_CONFIGS = [
    triton.Config({"ROWS": rows, "BLOCKS": blocks}, num_warps=warps, num_stages=1)
    for rows, blocks, warps in [(16, 8, 4), (4, 32, 4), (1, 128, 4), (8, 32, 8), (2, 128, 8), (32, 8, 8),
                                (4, 16, 2), (1, 64, 2)]
]
_INTERPRETER_CONFIG = {"ROWS": 4, "BLOCKS": 8}
_rebuild_tuned = autotune(_TUNING_CONFIGS, ["N", "n_blocks", "D", "d", "SPLIT_MAPPING"],
                          _prune_configs)(_rebuild_kernel)


def rebuild_rotated_weight(
    packed_codes: torch.Tensor, row_scale: torch.Tensor, mapping: torch.Tensor, padded_features: int,
    dtype: torch.dtype, config: Optional[dict] = None,
) -> torch.Tensor:
    """The weight in the rotated domain, W_rot = diag(r) · blocks(M q) (CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        packed_codes: packed_shape(N, L) int32, L = Kp·D/d (layout of :mod:`lift_ao.packing`).
        row_scale: (N,) row scales r (N counts the rows).
        mapping: (d, D) lattice matrix M.
        padded_features: Kp, the rotated input size (a multiple of d).
        dtype: fp16 / bf16 / fp32 / fp64 of the result (the activation's).
        config: fixed ``{"ROWS", "BLOCKS", "num_warps", "num_stages"}`` instead of autotuning.
    Returns:
        (N, padded_columns(Kp)) in ``dtype``, zero past column Kp: ``u @ W_rot.T`` with u the rotated
        activation (zero-padded alike) is the linear's output before the bias.
    """
    check_launch_device(packed_codes.device, "rebuild_rotated_weight")
    d, D = mapping.shape
    rows = row_scale.shape[0]
    n_blocks = padded_features // d
    if padded_features % d:
        raise ValueError(f"padded_features {padded_features} is not a multiple of the lattice's block length {d}")
    check_packed(packed_codes, rows, n_blocks * D, f"rebuild_rotated_weight: codes not those of {rows} rows of "
                 f"{padded_features} features at lattice {D}/{d}")
    words = 4 * packed_codes.shape[1]
    columns = padded_columns(padded_features)
    out = torch.empty(rows, columns, dtype=dtype, device=packed_codes.device)
    if rows == 0 or n_blocks == 0:
        return out.zero_()
    codes = packed_codes.contiguous()
    if config is None and packed_codes.device.type != "cuda":
        config = _INTERPRETER_CONFIG
    kernel = _rebuild_tuned if config is None else _rebuild_kernel
    grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]), triton.cdiv(n_blocks, meta["BLOCKS"]))  # noqa: E731
    kernel[grid](
        codes, row_scale.to(torch.float32).contiguous(), mapping.to(torch.float32).contiguous(), out,
        rows, n_blocks, words, columns, out.stride(0), d=d, D=D,
        SPLIT_MAPPING=dtype in (torch.float32, torch.float64), MINUS_ONE_PAIR=_MINUS_ONE_PAIR[torch.float16],
        SIGN_BITS_PAIR=_SIGN_BITS_PAIR, CHUNKS=max(32, triton.next_power_of_2(D)) // 32,
        D_OUT_PADDED=max(16, triton.next_power_of_2(d)), COLUMN_ALIGN=COLUMN_ALIGN, **(config or {}),
    )
    return out
