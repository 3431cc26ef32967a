"""Triton kernels for ``lift_ao::lifted_matmul``: y = r ⊙ (Q · x̃) + b with Q the packed ±1 codes.

One kernel serves decode (1–16 tokens) and prefill (≥ 64 tokens); it never depends on the lattice
(D, d): it only sees the L code bits of each row, in the layout of :mod:`lift_ao.packing` (no
repacking of the weights; :func:`_code_word_offset` is the one place that knows that layout). Each
program owns a tile of ``BLOCK_N`` weight rows × ``BLOCK_B`` tokens and walks the code words of its
(split-)K range:

1. load a ``BLOCK_N × BLOCK_W`` tile of int32 code words (pipelined async copies);
2. turn every word into 32 ±1 16-bit floats with two integer ops per *pair* of bits:
   ``((word << (15 − j)) & 0x80008000) ^ MINUS_ONE_PAIR`` moves bits j and j+16 onto the sign bits of
   a packed pair of −1s, so a set bit flips −1 into +1 (no int→float conversion, no multiply). Triton
   builds this tile directly in the register layout of the Hopper wgmma A operand;
3. ``tl.dot`` (wgmma, fp32 accumulation) against the activation tile from shared memory;
4. epilogue: scale by r, add the bias, store in x̃'s dtype — or, with split-K (short N or few
   tokens, to fill the GPU), write fp32 partials that :func:`_reduce_splits_kernel` sums.

The ±1 tile's column ``2j + h`` holds bit ``j + 16h`` of its word; the dot's reduction is order-free,
so :func:`_prepare_lifted_kernel` first writes x̃ in that order (a permutation inside each group of
32), zero-padded to whole tiles and in the operand dtype. That keeps the activation loads contiguous
and unmasked along K, so they pipeline like the code words; it costs one pass over x̃ (B·L elements,
~1/16 of the code bytes at batch 1). fp32 activations become a bf16 high and a bf16 low part (about
16 mantissa bits, ±1 exact) and the kernel runs two dots.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from lift_ao.packing import check_packed

__all__ = ["autotune", "check_launch_device", "dependent_launch", "lifted_matmul_triton", "prefetch_to_l2",
           "quick_bench", "reduce_splits", "sm_count", "token_block", "wait_for_previous_kernel"]


def _as_int32(value: int) -> int:
    """An unsigned 32-bit pattern as the signed int32 Triton constants must be."""
    return value - (1 << 32) if value >= 1 << 31 else value


_SIGN_BITS_PAIR = _as_int32(0x80008000)
# Two packed −1.0 values of each 16-bit operand type.
_MINUS_ONE_PAIR = {torch.float16: _as_int32(0xBC00BC00), torch.bfloat16: _as_int32(0xBF80BF80)}
# Split boundaries and the padded activation length are multiples of this many words, so every
# BLOCK_W below divides them and no K iteration straddles a split or runs past the padding.
_WORD_ALIGN = 16
_SM_COUNT_FALLBACK = 132
# Whether triton.jit makes lift_ao's kernels for Triton's interpreter: it reads TRITON_INTERPRET as each
# kernel is defined (at import), so setting it later changes nothing.
_INTERPRETED = triton.knobs.runtime.interpret


@triton.jit
def _code_word_offset(rows, word, quads):
    """Offset of word ``word`` of row ``rows`` in packed codes of ``quads`` quads per row (broadcast
    together): rows interleaved in groups of 32, quad-major inside a group (:mod:`lift_ao.packing`).

    Separable: ``offset(n, w) = offset(n, 0) + offset(0, w)``, so a kernel computes each row's base
    once, outside its K loop, and adds word offsets per step.
    """
    return ((rows // 32) * quads + word // 4) * 128 + (rows % 32) * 4 + word % 4


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
def _bit_of_column(column):
    """Code-bit index held by each ±1-tile column index (a permutation inside each 32-group)."""
    return (column // 32) * 32 + (column % 32) // 2 + (column % 2) * 16


@triton.jit
def _prepare_lifted_kernel(
    lifted_ptr, out_ptr, B, L, padded_length, stride_lifted, stride_lifted_k, stride_out,
    OPERAND: tl.constexpr, SPLIT_FP32: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[b, c] = x̃[b, bit(c)] (0 past L) in OPERAND dtype; for fp32 x̃, rows B.. hold the low parts.

    lifted (B, L) any float; out (B, padded_length) or (2B, padded_length) for SPLIT_FP32.
    """
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    bits = _bit_of_column(columns)
    values = tl.load(lifted_ptr + token.to(tl.int64) * stride_lifted + bits * stride_lifted_k, mask=bits < L, other=0.0).to(tl.float32)
    high = values.to(OPERAND)
    keep = columns < padded_length
    tl.store(out_ptr + token.to(tl.int64) * stride_out + columns, high, mask=keep)
    if SPLIT_FP32:
        low = (values - high.to(tl.float32)).to(OPERAND)
        tl.store(out_ptr + (token + B).to(tl.int64) * stride_out + columns, low, mask=keep)


@triton.jit
def _lifted_matmul_kernel(
    prepared_ptr, codes_ptr, scale_ptr, bias_ptr, out_ptr,
    B, N, words_total, words_per_split, quads,
    stride_prepared, stride_out_split, stride_out_b,
    HAS_BIAS: tl.constexpr, SPLIT_FP32: tl.constexpr,
    OPERAND: tl.constexpr, MINUS_ONE_PAIR: tl.constexpr, SIGN_BITS_PAIR: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr = False,
):
    """One (BLOCK_N rows × BLOCK_B tokens) output tile over one K split.

    prepared: the output of :func:`_prepare_lifted_kernel`; codes (⌈N/32⌉, quads, 32, 4) int32
    contiguous (:func:`_code_word_offset`), words_total = ⌈L/32⌉ ≤ 4·quads. One split (grid dim 2 of size 1):
    out = (B, N) in x̃'s dtype, r and bias applied. S splits: out = (S, B, N) fp32 partials of
    r ⊙ Q x̃ (bias added by split 0).
    """
    wait_for_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < N
    token_ok = tokens < B
    word_begin = pid_k * words_per_split
    word_end = tl.minimum(word_begin + words_per_split, words_total)
    code_row_ptrs = codes_ptr + _code_word_offset(rows[:, None].to(tl.int64), 0, quads)
    tile_ptrs = prepared_ptr + tokens[None, :].to(tl.int64) * stride_prepared + tl.arange(0, BLOCK_W * 32)[:, None]

    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for word0 in range(word_begin, word_end, BLOCK_W):
        word_idx = word0 + tl.arange(0, BLOCK_W)
        # Words past the end decode as −1; their activations are the zero padding.
        words = tl.load(code_row_ptrs + _code_word_offset(0, word_idx[None, :], quads),
                        mask=row_ok[:, None] & (word_idx < words_total)[None, :], other=0)
        signs = _signs_from_words(words, MINUS_ONE_PAIR, SIGN_BITS_PAIR, OPERAND, BLOCK_N, BLOCK_W)
        high = tl.load(tile_ptrs + word0 * 32, mask=token_ok[None, :], other=0.0)
        acc = tl.dot(signs, high, acc)
        if SPLIT_FP32:
            # int64: B · stride reaches 2**31 at tokens × padded L (e.g. 31k tokens at L ≈ 69k), as the rows do;
            # tl.cast, as B = 1 is a constant on CUDA (an int, without .to).
            low_rows = tl.cast(B, tl.int64) * stride_prepared
            low = tl.load(tile_ptrs + word0 * 32 + low_rows, mask=token_ok[None, :], other=0.0)
            acc = tl.dot(signs, low, acc)

    acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    # int64: tokens × N reaches 2**31 (a 128256-row head at 16745 tokens)
    out_ptrs = out_ptr + pid_k * stride_out_split + tokens[None, :].to(tl.int64) * stride_out_b + rows[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & token_ok[None, :])


# Hopper candidates. Decode (8- and 16-token blocks) is bound by latency per K step, not by
# tensor-core rate: two-warp programs run mma.sync with both operands in registers (no wgmma fence
# and wait per step) and many programs fit on an SM; four/eight-warp programs use wgmma with the ±1
# tile in registers at 16-token blocks (Triton 3.6 emits mma.sync for all at 8: offline sm_90 SASS).
# Prefill (≥ 64-token blocks) wants big wgmma tiles. Pruned per token block, then tuned.
_TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_W": 8}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_W": 4}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_W": 8}, num_warps=2, num_stages=4),
    # The fastest at 8-token blocks on the H100 (round 12): 28672×8192 and 4096×14336 at batch 4.
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 4}, num_warps=2, num_stages=3),
    triton.Config({"BLOCK_N": 32, "BLOCK_W": 16}, num_warps=1, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_W": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_W": 4}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 4}, num_warps=8, num_stages=4),
    # The only prefill tile whose fp32 (two-operand) pipeline fits shared memory: 196 KB at 128
    # tokens, against 262 KB for 4 stages (sm_90, Triton 3.6).
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 4}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_W": 2}, num_warps=8, num_stages=4),
]
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_W": 1}


def _prune_configs(configs, named_args, **kwargs):
    """Big wgmma tiles for prefill-sized token blocks (≥ 64), with K steps of ≥ 4 words: on an H200
    (Triton 3.6) 2-word steps at 128-token blocks returned NaN in some outputs, a few hundred per
    run at (128 rows, 8 warps) over fp32 split partials and most of them at (256 rows, 3 stages)
    into a 16-bit output (benchmarks/NOTES_kernels.md, round 11); every 4-word config was right."""
    block_b = kwargs.get("BLOCK_B", named_args.get("BLOCK_B"))
    if block_b >= 64:
        return [c for c in configs if c.num_warps >= 4 and c.kwargs["BLOCK_N"] >= 128 and c.kwargs["BLOCK_W"] >= 4]
    return configs


# GPU clock cycles of the spin before each timed launch of quick_bench (~150 µs at the H100's 1.98
# GHz): more than a Triton launch from Python takes on the host.
_HOST_LEAD_CYCLES = 300_000


def quick_bench(kernel_call, quantiles: tuple, budget_ms: float = 20.0) -> list[float]:
    """The autotuners' timer: the ``quantiles`` of ``kernel_call``'s time in ms, each repetition after
    an L2 flush, as ``triton.testing.do_bench`` measures, repeated for ~``budget_ms`` of GPU time (5 to
    100 times; ~100 shapes × 10 configs must tune inside one kernel_speed.py run).

    Unlike do_bench, a GPU spin is queued before each start event. do_bench records the start event
    and only then does the host launch the kernel: a Triton launch from Python takes tens of µs, longer
    than a decode kernel runs, so the GPU sat idle inside the timed interval and host jitter picked the
    config. On an H100 the lookup configs of the Llama-3-8B decode (12–28 µs each) were timed at
    36–150 µs, and the same code decoded at 272 or 279 tokens/s by which picks a process drew
    (reproduced by pinning each process's picks in a fresh one; NOTES_kernels.md, round 16)."""
    flush = triton.runtime.driver.active.get_empty_cache_for_benchmark()

    def timed(start: torch.cuda.Event, end: torch.cuda.Event):
        flush.zero_()
        torch.cuda._sleep(_HOST_LEAD_CYCLES)
        start.record()
        kernel_call()
        end.record()

    kernel_call()
    torch.cuda.synchronize()
    # One repetition, flush and spin included, sets how many fit the budget.
    before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    before.record()
    timed(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
    after.record()
    torch.cuda.synchronize()
    repeats = max(5, min(100, int(budget_ms / before.elapsed_time(after))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        timed(start, end)
    torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(end) for start, end in zip(starts, ends)])
    return torch.quantile(times, torch.tensor(quantiles, dtype=times.dtype)).tolist()


def autotune(configs: list, key: list[str], prune=None):
    """``triton.autotune`` as every lift_ao kernel uses it: candidates timed by :func:`quick_bench`
    (after ``prune(configs, named_args, **kwargs)``, if given), each key's timings cached on disk in
    Triton's cache directory (``TRITON_CACHE_DIR``, default ~/.triton/cache), so later processes on
    the machine run the same configs without re-timing them (the decode benchmark's processes then
    agree exactly, and start faster). The cache entry is keyed by the Triton version, the GPU
    architecture, the kernel's source, the candidates and the tuning key; to re-time, delete the
    directory's ``*.autotune.json`` files. The interpreter never tunes."""
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune and {"early_config_prune": prune},
                           do_bench=quick_bench, cache_results=True)


_lifted_matmul_tuned = autotune(_TUNING_CONFIGS, ["N", "words_total", "BLOCK_B", "words_per_split", "SPLIT_FP32"],
                                _prune_configs)(_lifted_matmul_kernel)


@triton.jit
def _reduce_splits_kernel(partial_ptr, out_ptr, total, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr = False):
    """out[i] = Σ_s partial[s, i] for i < total (partial fp32 (SPLITS, total), out any float dtype)."""
    wait_for_previous_kernel(PDL)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + s * total + offsets, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)


def reduce_splits(partials: torch.Tensor, out: torch.Tensor) -> None:
    """out = Σ_s partials[s] (partials (S, B, N) fp32, out (B, N) contiguous, any float dtype)."""
    check_launch_device(out.device, "reduce_splits")
    total = out.numel()
    block = 1024
    launch = dependent_launch(out.device)
    _reduce_splits_kernel[(triton.cdiv(total, block),)](partials, out, total, SPLITS=partials.shape[0], BLOCK=block,
                                                        PDL=bool(launch), **launch)


def token_block(tokens: int) -> int:
    """Tokens per program: 8 (the n of mma.sync m16n8k16: fewer tokens are padded to it inside the
    dot) up to 128 for prefill."""
    return min(128, max(8, triton.next_power_of_2(tokens)))


def check_launch_device(device: torch.device, where: str) -> None:
    """Raise ValueError unless the kernels can run on ``device``: a CUDA one, or any under Triton's
    interpreter. Every public function that launches a kernel calls this first: CPU tensors otherwise
    reach Triton's launcher, which fails with "0 active drivers" (no GPU) or a pointer error."""
    if device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"{where}: the tensors are on {device}; the Triton kernels need a CUDA device. Move them "
                         "there, or call the registered op (torch.ops.lift_ao.*: CPU tensors run the PyTorch "
                         "reference), or, to test the kernels on the CPU, set TRITON_INTERPRET=1 before "
                         "importing triton")


def dependent_launch(device: torch.device) -> dict:
    """Launch options of the kernels that wait with :func:`wait_for_previous_kernel` (all of lift_ao's
    CUDA kernels but the prefill rebuild and ``build_tables``, whose launches are not on the fused
    ops' paths): ``{"launch_pdl": True}`` on a Hopper or newer GPU unless
    the environment sets LIFT_AO_PDL=0, else none. With programmatic dependent launch a kernel's
    grid is put on the SMs before the previous kernel ends and waits there (``gdc_wait``), so the
    launch gap between the many µs-long decode kernels overlaps the previous kernel's tail."""
    if device.type != "cuda" or os.environ.get("LIFT_AO_PDL", "1") == "0":
        return {}
    return {"launch_pdl": True} if torch.cuda.get_device_capability(device)[0] >= 9 else {}


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the previous kernel's writes are visible,
    then allow the next kernel to launch. Nothing otherwise (and in the interpreter)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_to_l2(base, count, PDL: tl.constexpr):
    """Under programmatic dependent launch, before :func:`wait_for_previous_kernel`: start fetching this
    program's share of the ``count`` fp32 values at ``base`` into L2 (one PTX prefetch per 128-byte
    line, programs taking every P-th line), so that the loads after the wait hit L2 while the previous
    kernel is still running. Only for constants that no kernel writes (rotations, signs). Nothing
    otherwise (the interpreter has no inline PTX)."""
    if PDL:
        programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        program = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
        lines = tl.cdiv(count, 32)
        for first in range(program * 128, lines, programs * 128):
            line = tl.minimum(first + tl.arange(0, 128), lines - 1)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [base + line * 32], dtype=tl.int32,
                                      is_pure=False, pack=1)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the H100's count elsewhere, e.g. the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT_FALLBACK


def _split_count(rows: int, token_blocks: int, words: int, sms: int) -> int:
    """K splits: one token block (≤ 128 tokens: decode and short prefill) is latency-bound, so aim
    at ~16 programs per SM with at most 8 splits; more blocks only need ~2 programs per SM (up to
    16 splits).

    Measured on the H100 (2.4 bits; NOTES_kernels.md round 12): at 28672×8192, 4–8 splits took
    8-token blocks from 103 to 92 µs and 16-token blocks from 117 to 106 µs against 3 splits (8
    programs per SM); at 4096×14336, 4–8 splits beat 16. Sized for 64-row programs; each split
    keeps ≥ 32 words (1024 bits) so partials stay cheap.
    """
    programs = triton.cdiv(rows, 64) * token_blocks
    per_sm, most = (16, 8) if token_blocks == 1 else (2, 16)
    wanted = triton.cdiv(per_sm * sms, programs)
    return max(1, min(wanted, words // 32, most))


def lifted_matmul_triton(
    lifted: torch.Tensor, packed_codes: torch.Tensor, row_scale: torch.Tensor,
    bias: Optional[torch.Tensor], splits: Optional[int] = None, config: Optional[dict] = None,
) -> torch.Tensor:
    """``y = r ⊙ (Q · x̃) + b`` with the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        lifted: (..., L) fp16 / bf16 / fp32 lifted activation x̃.
        packed_codes: packed_shape(N, L) int32 codes (layout of :mod:`lift_ao.packing`).
        row_scale: (N,) float32 row scales r (N counts the rows).
        bias: (N,) or None.
        splits: K splits (None: chosen from the problem size and SM count).
        config: fixed launch parameters ``{"BLOCK_N", "BLOCK_W", "num_warps", "num_stages"}``
            instead of autotuning (the interpreter always uses one: autotuning there is pointless).
    Returns:
        (..., N) in lifted.dtype, accumulated in fp32.
    """
    check_launch_device(lifted.device, "lifted_matmul_triton")
    code_length = lifted.shape[-1]
    words = triton.cdiv(code_length, 32)
    x = lifted.reshape(-1, code_length)
    tokens = x.shape[0]
    rows = row_scale.shape[0]
    check_packed(packed_codes, rows, code_length, "lifted_matmul_triton")
    codes = packed_codes.contiguous()
    scale = row_scale.to(torch.float32).contiguous()
    bias = None if bias is None else bias.contiguous()  # read as bias_ptr + row
    out = torch.empty(tokens, rows, dtype=lifted.dtype, device=lifted.device)
    if tokens == 0 or rows == 0:
        return out.reshape(*lifted.shape[:-1], rows)

    operand = torch.float16 if lifted.dtype == torch.float16 else torch.bfloat16
    operand_tl = tl.float16 if operand == torch.float16 else tl.bfloat16
    split_fp32 = lifted.dtype in (torch.float32, torch.float64)  # fp64 at fp32's precision, not bf16's
    padded_length = triton.cdiv(words, _WORD_ALIGN) * _WORD_ALIGN * 32
    prepared = torch.empty((2 if split_fp32 else 1) * tokens, padded_length, dtype=operand, device=lifted.device)
    prepare_block = 1024
    launch = dependent_launch(lifted.device)
    _prepare_lifted_kernel[(tokens, triton.cdiv(padded_length, prepare_block))](
        x, prepared, tokens, code_length, padded_length, x.stride(0), x.stride(1), prepared.stride(0),
        OPERAND=operand_tl, SPLIT_FP32=split_fp32, BLOCK=prepare_block, PDL=bool(launch), **launch)

    block_b = token_block(tokens)
    token_blocks = triton.cdiv(tokens, block_b)
    if splits is None:
        splits = _split_count(rows, token_blocks, words, sm_count(lifted.device))
    words_per_split = triton.cdiv(triton.cdiv(words, splits), _WORD_ALIGN) * _WORD_ALIGN
    splits = triton.cdiv(words, words_per_split)
    target = out if splits == 1 else torch.empty(splits, tokens, rows, dtype=torch.float32, device=lifted.device)

    if config is None and lifted.device.type != "cuda":
        config = _INTERPRETER_CONFIG
    kernel = _lifted_matmul_tuned if config is None else _lifted_matmul_kernel
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]), token_blocks, splits)
    kernel[grid](
        prepared, codes, scale, bias if bias is not None else scale, target,
        tokens, rows, words, words_per_split, codes.shape[1],
        prepared.stride(0), tokens * rows, rows,
        HAS_BIAS=bias is not None, SPLIT_FP32=split_fp32,
        OPERAND=operand_tl, MINUS_ONE_PAIR=_MINUS_ONE_PAIR[operand], SIGN_BITS_PAIR=_SIGN_BITS_PAIR,
        BLOCK_B=block_b, PDL=bool(launch), **launch, **(config or {}),
    )
    if splits > 1:
        reduce_splits(target, out)
    return out.reshape(*lifted.shape[:-1], rows)
