"""Decode kernel for ``lift_ao::lifted_matmul`` by table lookup (LUT-GEMV, T-MAC style).

For a few tokens the ±1 GEMM is latency-bound (see benchmarks/NOTES_kernels.md): the tensor cores
wait on the bit decode of every K step. Here no bit is ever turned into a number. Each group of 4
consecutive lifted activations has a 16-entry table of its signed sums,

    table[g, i] = Σ_{t<4} (bit t of i ? +1 : −1) · x̃[4g + t],

so a row's 4 code bits at positions 4g..4g+3 (one nibble of a code word) select one entry and the
row's dot product is the sum of L/4 looked-up values. Per nibble that is a shift, a mask, an
address and one cached load, about one integer instruction per weight bit.

Two launches (plus the split reduction of :mod:`.triton_matmul`):

1. :func:`_build_tables_kernel` — (B, L) x̃ → (G, 16, BLOCK_B) fp32 tables, G = 8 · words (zero
   past L, so the zero code bits past a row's end add nothing; the tokens of an entry contiguous).
2. :func:`_lookup_kernel` — each program owns ``BLOCK_N`` rows and one K split; a thread owns one
   row and loads 4 consecutive code words (16 bytes) per step, so the 32 lanes of a warp read the
   *same* table (one 64-byte segment, one L1 wavefront) with different nibbles.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_matmul import quick_bench, reduce_splits, sm_count

__all__ = ["MAX_TOKENS", "build_tables", "lookup_matmul", "token_block"]

@triton.jit
def _build_tables_kernel(lifted_ptr, table_ptr, B, L, groups, stride_lifted,
                         BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    """table[g, i, b] = Σ_t (2·bit_t(i) − 1) · x̃[b, 4g + t] (0 past L or B).

    lifted (B, L) any float; table (groups, 16, BLOCK_B) fp32: the tokens of one entry are
    contiguous, so the lookup kernel reads all of them with one vector load.
    """
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    t = tl.arange(0, 4)
    i = tl.arange(0, 16)
    b = tl.arange(0, BLOCK_B)
    position = g[:, None, None] * 4 + t[None, :, None]                                  # (BLOCK_G, 4, 1)
    x = tl.load(lifted_ptr + b[None, None, :].to(tl.int64) * stride_lifted + position,
                mask=(position < L) & (b < B)[None, None, :], other=0.0).to(tl.float32)  # (BLOCK_G, 4, BLOCK_B)
    signs = (((i[:, None] >> t[None, :]) & 1) * 2 - 1).to(tl.float32)                  # (16, 4)
    table = tl.sum(x[:, None, :, :] * signs[None, :, :, None], axis=2)                 # (BLOCK_G, 16, BLOCK_B)
    offsets = (g[:, None, None] * 16 + i[None, :, None]) * BLOCK_B + b[None, None, :]
    tl.store(table_ptr + offsets, table, mask=(g < groups)[:, None, None])


@triton.jit
def _lookup_kernel(
    table_ptr, codes_ptr, scale_ptr, bias_ptr, out_ptr,
    B, N, words_total, words_per_split, quads_per_row, stride_out_split, stride_out_b,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[split, b, n] = r[n] · Σ_{words of this split} Σ_nibbles table[g, nibble, b] (+ bias by split 0).

    codes (N, 4·quads_per_row) int32; one split: out (B, N) in the output dtype; several: (S, B, N)
    fp32 partials. BLOCK_B ≥ B tokens (a power of two) share each code word and table address.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tokens = tl.arange(0, BLOCK_B)
    word_begin = pid_k * words_per_split
    word_end = tl.minimum(word_begin + words_per_split, words_total)
    w = tl.arange(0, 4)
    nibble_shift = tl.arange(0, 8) * 4
    # Table offset of (word w, nibble j, token): group 8w + j, 16 entries of BLOCK_B tokens each.
    table_offset = ((w[:, None] * 8 + tl.arange(0, 8)[None, :]) * 16 * BLOCK_B)[None, :, :, None] \
        + tokens[None, None, None, :]                                                      # (1, 4, 8, BLOCK_B)
    # Rows are padded to whole 16-byte quads of words, so each thread's 4 words are one vector load.
    code_ptrs = codes_ptr + (rows * quads_per_row * 4)[:, None] + w[None, :]

    acc = tl.zeros((BLOCK_N, 4, BLOCK_B), dtype=tl.float32)
    for word0 in range(word_begin, word_end, 4):
        words = tl.load(code_ptrs + tl.multiple_of(word0, 4), mask=row_ok[:, None], other=0)
        nibbles = (words[:, :, None] >> nibble_shift[None, None, :]) & 15                   # (BLOCK_N, 4, 8)
        values = tl.load(table_ptr + word0 * (128 * BLOCK_B) + table_offset
                         + (nibbles * BLOCK_B)[:, :, :, None])                              # (BLOCK_N, 4, 8, BLOCK_B)
        acc += tl.sum(values, axis=2)
    total = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]   # (BLOCK_N, BLOCK_B)
    if HAS_BIAS:
        if pid_k == 0:
            total += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + pid_k * stride_out_split + tokens[None, :] * stride_out_b + rows[:, None],
             total.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (tokens < B)[None, :])


# Hopper candidates: 1, 2 or 4 warps of one-row threads, for many resident programs per SM.
_TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=1, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=2, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
]
_INTERPRETER_CONFIG = {"BLOCK_N": 32}

_lookup_tuned = triton.autotune(configs=_TUNING_CONFIGS, key=["N", "words_total", "words_per_split", "BLOCK_B"],
                                do_bench=quick_bench)(_lookup_kernel)

# The largest token count the lookup kernel takes (one power-of-two token block per program).
MAX_TOKENS = 8
_BUILD_GROUPS = 64


def build_tables(lifted: torch.Tensor, words: int, token_block: int) -> torch.Tensor:
    """Lookup tables of a lifted activation.

    Args:
        lifted: (B, L) float, B ≤ token_block.
        words: code words per row (``words_per_row(L)``); the tables cover 32·words positions.
        token_block: tokens per table entry (power of two ≥ B).
    Returns:
        (8·words, 16, token_block) fp32: entry [g, i, b] = Σ_t (2·bit_t(i) − 1) · x̃[b, 4g + t].
    """
    tokens, length = lifted.shape
    groups = 8 * words
    tables = torch.empty(groups, 16, token_block, dtype=torch.float32, device=lifted.device)
    _build_tables_kernel[(triton.cdiv(groups, _BUILD_GROUPS),)](
        lifted, tables, tokens, length, groups, lifted.stride(0), BLOCK_B=token_block, BLOCK_G=_BUILD_GROUPS)
    return tables


def token_block(tokens: int) -> int:
    """Tokens per table entry for ``tokens`` tokens: the next power of two."""
    return triton.next_power_of_2(tokens)


def _split_count(rows: int, words: int, sms: int) -> int:
    """K splits for ~32 resident 32-row programs per SM: on the H100 the 1-warp config won every
    shape, at 8–16 splits (benchmarks/NOTES_kernels.md); each split keeps ≥ 16 words."""
    programs = triton.cdiv(rows, 32)
    wanted = triton.cdiv(32 * sms, programs)
    return max(1, min(wanted, words // 16, 16))


def lookup_matmul(
    lifted: torch.Tensor, packed_codes: torch.Tensor, row_scale: torch.Tensor,
    bias: Optional[torch.Tensor], splits: Optional[int] = None, config: Optional[dict] = None,
    tables: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = r ⊙ (Q · x̃) + b`` for up to :data:`MAX_TOKENS` tokens by table lookup.

    Args:
        lifted: (..., L) float lifted activation x̃ with at most MAX_TOKENS rows.
        packed_codes: (N, words_per_row(L)) int32 codes (layout of :mod:`lift_ao.packing`), rows contiguous.
        row_scale: (N,) float32 row scales r.
        bias: (N,) or None.
        splits: K splits (None: chosen from the problem size and SM count).
        config: fixed ``{"BLOCK_N", "num_warps", "num_stages"}`` instead of autotuning.
        tables: :func:`build_tables` of this x̃ (computed here when None; siblings reading the same
            x̃ can share them).
    Returns:
        (..., N) in lifted.dtype, accumulated in fp32.
    """
    length = lifted.shape[-1]
    x = lifted.reshape(-1, length)
    tokens = x.shape[0]
    if tokens > MAX_TOKENS:
        raise ValueError(f"lookup_matmul takes at most {MAX_TOKENS} tokens, got {tokens}; use lifted_matmul_triton")
    rows, words = packed_codes.shape
    if not packed_codes.is_contiguous() or words % 4:
        raise ValueError(f"packed codes must be contiguous rows of whole 4-word quads, got shape {tuple(packed_codes.shape)}")
    out = torch.empty(tokens, rows, dtype=lifted.dtype, device=lifted.device)
    if tokens == 0 or rows == 0:
        return out.reshape(*lifted.shape[:-1], rows)
    block_b = token_block(tokens)
    if tables is None:
        tables = build_tables(x, words, block_b)
    elif tables.shape != (8 * words, 16, block_b):
        raise ValueError(f"tables {tuple(tables.shape)} are not those of {tokens} tokens × {words} words per row")
    if splits is None:
        splits = _split_count(rows, words, sm_count(lifted.device))
    words_per_split = triton.cdiv(triton.cdiv(words, splits), 4) * 4
    splits = triton.cdiv(words, words_per_split)
    target = out if splits == 1 else torch.empty(splits, tokens, rows, dtype=torch.float32, device=lifted.device)
    if config is None and lifted.device.type != "cuda":
        config = _INTERPRETER_CONFIG
    kernel = _lookup_tuned if config is None else _lookup_kernel
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]), splits)
    kernel[grid](
        tables, packed_codes, row_scale.to(torch.float32).contiguous(), bias if bias is not None else row_scale,
        target, tokens, rows, words, words_per_split, words // 4, tokens * rows, rows,
        HAS_BIAS=bias is not None, BLOCK_B=block_b, **(config or {}),
    )
    if splits > 1:
        reduce_splits(target, out)
    return out.reshape(*lifted.shape[:-1], rows)
