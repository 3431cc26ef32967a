"""Triton kernel for ``lift_ao::lifted_matmul``: y = r ⊙ (Q · x̃) + b with Q the packed ±1 codes.

One kernel serves decode (1–16 tokens) and prefill (≥ 64 tokens); it never depends on the lattice
(D, d): it only sees the L code bits of each row, in the layout of :mod:`lift_ao.packing` (no
repacking). Each program owns a tile of ``BLOCK_N`` weight rows × ``BLOCK_B`` tokens and walks the
code words of its (split-)K range:

1. load a ``BLOCK_N × BLOCK_W`` tile of int32 code words (each row reads ``4·BLOCK_W`` contiguous
   bytes);
2. turn every word into 32 ±1 16-bit floats with two integer ops per *pair* of bits:
   ``((word << (15 − j)) & 0x80008000) ^ MINUS_ONE_PAIR`` moves bits j and j+16 onto the sign bits of
   a packed pair of −1s, so a set bit flips −1 into +1 (no int→float conversion, no multiply);
3. feed the ±1 tile to ``tl.dot`` (tensor cores, fp32 accumulation) against the lifted activation,
   loaded in the matching order: the dot's reduction is order-free, so tile column 2j+h holds bit
   j+16h of its word and the activation is gathered with the same permutation;
4. epilogue: scale by r, add the bias, store in x̃'s dtype — or, with split-K (short N or few
   tokens, to fill the GPU), write fp32 partials that :func:`_reduce_splits_kernel` sums.

fp32 activations run as two bf16 dots (hi + lo split of x̃), about 16 mantissa bits, with ±1 exact.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["lifted_matmul_triton", "token_block"]


def _as_int32(value: int) -> int:
    """An unsigned 32-bit pattern as the signed int32 Triton constants must be."""
    return value - (1 << 32) if value >= 1 << 31 else value


_SIGN_BITS_PAIR = _as_int32(0x80008000)
# Two packed −1.0 values of each 16-bit operand type.
_MINUS_ONE_PAIR = {torch.float16: _as_int32(0xBC00BC00), torch.bfloat16: _as_int32(0xBF80BF80)}

_SM_COUNT_FALLBACK = 132


@triton.jit
def _signs_from_words(words, MINUS_ONE_PAIR: tl.constexpr, SIGN_BITS_PAIR: tl.constexpr,
                      OPERAND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """(BLOCK_N, BLOCK_W) int32 words → (BLOCK_N, 32·BLOCK_W) ±1 in OPERAND dtype.

    Column ``32·w + 2·j + h`` holds bit ``j + 16·h`` of word w (see :func:`_bit_of_column`).
    """
    shifts = 15 - tl.arange(0, 16)
    pairs = ((words[:, :, None] << shifts[None, None, :]) & SIGN_BITS_PAIR) ^ MINUS_ONE_PAIR
    low = pairs.to(tl.int16)
    high = (pairs >> 16).to(tl.int16)
    halves = tl.join(low, high)
    return halves.to(OPERAND, bitcast=True).reshape(BLOCK_N, BLOCK_W * 32)


@triton.jit
def _signs_per_bit(words, MINUS_ONE: tl.constexpr, OPERAND: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """(BLOCK_N, BLOCK_W) int32 words → (BLOCK_N, 32·BLOCK_W) ±1, column 32·w + j = bit j of word w.

    Variant under measurement: three integer ops per bit, no permutation of the activation.
    """
    bit = tl.arange(0, 32)
    sign = ((words[:, :, None] >> bit[None, None, :]) << 15).to(tl.int16)
    return (sign ^ MINUS_ONE).to(OPERAND, bitcast=True).reshape(BLOCK_N, BLOCK_W * 32)


@triton.jit
def _bit_of_column(BLOCK_W: tl.constexpr, PAIRED: tl.constexpr):
    """Code-bit offset (within the K tile) of each column of the ±1 tile."""
    column = tl.arange(0, BLOCK_W * 32)
    if PAIRED:
        column = (column // 32) * 32 + (column % 32) // 2 + (column % 2) * 16
    return column


@triton.jit
def _lifted_matmul_kernel(
    lifted_ptr, codes_ptr, scale_ptr, bias_ptr, out_ptr,
    B, N, L, words_per_split,
    stride_lifted_b, stride_codes_n, stride_out_split, stride_out_b,
    HAS_BIAS: tl.constexpr, SPLIT_FP32: tl.constexpr,
    OPERAND: tl.constexpr, MINUS_ONE_PAIR: tl.constexpr, SIGN_BITS_PAIR: tl.constexpr, PAIRED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One (BLOCK_N rows × BLOCK_B tokens) output tile over one K split.

    One split (grid dim 2 of size 1): out = (B, N) in x̃'s dtype, r and bias applied. S splits:
    out = (S, B, N) fp32 partials of r ⊙ Q x̃ (bias added by split 0).
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < N
    token_ok = tokens < B
    words_total = tl.cdiv(L, 32)
    word_begin = pid_k * words_per_split
    word_end = tl.minimum(word_begin + words_per_split, words_total)
    # Bits past the split or past L decode as −1: their activations load as 0 so they add nothing.
    bit_end = tl.minimum(word_end * 32, L)
    bit_in_tile = _bit_of_column(BLOCK_W, PAIRED)
    code_row_ptrs = codes_ptr + rows[:, None].to(tl.int64) * stride_codes_n
    lifted_token_ptrs = lifted_ptr + tokens[None, :].to(tl.int64) * stride_lifted_b

    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for word0 in range(word_begin, word_end, BLOCK_W):
        word_idx = word0 + tl.arange(0, BLOCK_W)
        words = tl.load(code_row_ptrs + word_idx[None, :],
                        mask=row_ok[:, None] & (word_idx < word_end)[None, :], other=0)
        if PAIRED:
            signs = _signs_from_words(words, MINUS_ONE_PAIR, SIGN_BITS_PAIR, OPERAND, BLOCK_N, BLOCK_W)
        else:
            signs = _signs_per_bit(words, MINUS_ONE_PAIR >> 16, OPERAND, BLOCK_N, BLOCK_W)
        bits = word0 * 32 + bit_in_tile
        lifted = tl.load(lifted_token_ptrs + bits[:, None],
                         mask=(bits < bit_end)[:, None] & token_ok[None, :], other=0.0)
        if SPLIT_FP32:
            high = lifted.to(OPERAND)
            low = (lifted - high.to(tl.float32)).to(OPERAND)
            acc = tl.dot(signs, high, acc)
            acc = tl.dot(signs, low, acc)
        else:
            acc = tl.dot(signs, lifted.to(OPERAND), acc)

    acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pid_k * stride_out_split + tokens[None, :] * stride_out_b + rows[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & token_ok[None, :])


# Hopper-oriented candidates: decode wants many rows per program (the ±1 tile is the only big
# operand), prefill wants a squarer tile; autotuning picks per (N, L, token block, split size).
_TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_W": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_W": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 4}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 2}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 256, "BLOCK_W": 2}, num_warps=8, num_stages=3),
]
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_W": 1}
_lifted_matmul_tuned = triton.autotune(configs=_TUNING_CONFIGS, key=["N", "L", "BLOCK_B", "words_per_split", "PAIRED"])(
    _lifted_matmul_kernel)


@triton.jit
def _reduce_splits_kernel(partial_ptr, out_ptr, total, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = Σ_s partial[s, i] for i < total (partial fp32 (SPLITS, total), out any float dtype)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + s * total + offsets, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)


def token_block(tokens: int) -> int:
    """Tokens per program: 16 (tl.dot's minimum) up to 128 for prefill."""
    return min(128, max(16, triton.next_power_of_2(tokens)))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT_FALLBACK


def _split_count(rows: int, token_blocks: int, words: int, sm_count: int) -> int:
    """K splits so that short-N / few-token problems still give every SM ~2 programs.

    Sized for 64-row programs; each split keeps ≥ 64 words (2048 bits) so partials stay cheap.
    """
    programs = triton.cdiv(rows, 64) * token_blocks
    wanted = triton.cdiv(2 * sm_count, programs)
    return max(1, min(wanted, words // 64, 16))


def lifted_matmul_triton(
    lifted: torch.Tensor, packed_codes: torch.Tensor, row_scale: torch.Tensor,
    bias: Optional[torch.Tensor], splits: Optional[int] = None, config: Optional[dict] = None,
    paired: bool = True,
) -> torch.Tensor:
    """``y = r ⊙ (Q · x̃) + b`` with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        lifted: (..., L) fp16 / bf16 / fp32 lifted activation x̃.
        packed_codes: (N, ceil(L/32)) int32 codes (layout of :mod:`lift_ao.packing`).
        row_scale: (N,) float32 row scales r.
        bias: (N,) or None.
        splits: K splits (None: chosen from the problem size and SM count).
        config: fixed launch parameters ``{"BLOCK_N", "BLOCK_W", "num_warps", "num_stages"}``
            instead of autotuning (the interpreter always uses one: autotuning there is pointless).
        paired: decode two bits per integer op pair (True) or one bit per three ops (variant).
    Returns:
        (..., N) in lifted.dtype, accumulated in fp32.
    """
    code_length = lifted.shape[-1]
    rows, words = packed_codes.shape
    x = lifted.reshape(-1, code_length)
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens = x.shape[0]
    codes = packed_codes if packed_codes.stride(-1) == 1 else packed_codes.contiguous()
    scale = row_scale.to(torch.float32).contiguous()
    out = torch.empty(tokens, rows, dtype=lifted.dtype, device=lifted.device)
    if tokens == 0 or rows == 0:
        return out.reshape(*lifted.shape[:-1], rows)

    block_b = token_block(tokens)
    token_blocks = triton.cdiv(tokens, block_b)
    if splits is None:
        splits = _split_count(rows, token_blocks, words, _sm_count(lifted.device))
    # Split boundaries on multiples of 16 words, so every BLOCK_W in the configs divides a split.
    words_per_split = triton.cdiv(triton.cdiv(words, splits), 16) * 16
    splits = triton.cdiv(words, words_per_split)
    target = out if splits == 1 else torch.empty(splits, tokens, rows, dtype=torch.float32, device=lifted.device)

    operand = torch.float16 if lifted.dtype == torch.float16 else torch.bfloat16
    if config is None and lifted.device.type != "cuda":
        config = _INTERPRETER_CONFIG
    kernel = _lifted_matmul_tuned if config is None else _lifted_matmul_kernel
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]), token_blocks, splits)
    kernel[grid](
        x, codes, scale, bias if bias is not None else scale, target,
        tokens, rows, code_length, words_per_split,
        x.stride(0), codes.stride(0), tokens * rows, rows,
        HAS_BIAS=bias is not None, SPLIT_FP32=lifted.dtype == torch.float32,
        OPERAND=tl.float16 if operand == torch.float16 else tl.bfloat16,
        MINUS_ONE_PAIR=_MINUS_ONE_PAIR[operand], SIGN_BITS_PAIR=_SIGN_BITS_PAIR, PAIRED=paired,
        BLOCK_B=block_b, **(config or {}),
    )
    if splits > 1:
        total = tokens * rows
        reduce_block = 1024
        _reduce_splits_kernel[(triton.cdiv(total, reduce_block),)](
            target, out, total, SPLITS=splits, BLOCK=reduce_block)
    return out.reshape(*lifted.shape[:-1], rows)
