"""Decode kernel for ``lift_ao::lifted_matmul`` by table lookup (LUT-GEMV, T-MAC style).

For a few tokens the ±1 GEMM is latency-bound (see benchmarks/NOTES_kernels.md): the tensor cores
wait on the bit decode of every K step. Here no bit is ever turned into a number. Each group of 4
consecutive lifted activations has a 16-entry table of its signed sums,

    table[g, i] = Σ_{t<4} (bit t of i ? +1 : −1) · x̃[4g + t],

so a row's 4 code bits at positions 4g..4g+3 (one nibble of a code word) select one entry and the
row's dot product is the sum of L/4 looked-up values. Per nibble that is a shift, a mask, an
address and one cached load, about one integer instruction per weight bit.

Launches:

1. the tables, (G, 16, BLOCK_B) fp32 with G = 8 · words (zero past L, so the zero code bits past a
   row's end add nothing; the tokens of an entry contiguous): :func:`_build_tables_kernel` from x̃,
   or, in the fused decode ops, :func:`_rotate_tables_kernel` straight from the activation x (the
   rotation and the lift in the same launch; x̃ is never written);
2. :func:`_lookup_kernel` — each program owns ``BLOCK_N`` rows of one of up to 3 sibling weights that
   read the same x̃ (q/k/v, gate/up) and one K split; a thread owns one row and reads its 4 code
   words of a step with 4 loads whose warp-wide footprint is the same 512 contiguous bytes (rows
   interleaved in groups of 32, :mod:`lift_ao.packing`). The 32 lanes of a warp read the *same*
   table (one 64-byte group, one L1 wavefront) with different nibbles. Per nibble the SASS is a
   shift, one LOP3 (mask and carry-free address), a register move, the load and an add. The last
   split of a row block to finish adds the others' partials (per-row-block counters), so there is
   no reduction launch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lift_ao.packing import check_packed, words_per_row

from .triton_lift import _ROTATE_CONFIGS, _ROTATE_INTERPRETER_CONFIG, rotate_rows
from .triton_matmul import _code_word_offset, dependent_launch, quick_bench, sm_count, wait_for_previous_kernel

__all__ = ["MAX_TOKENS", "build_tables", "lookup_matmul", "lookup_siblings", "rotate_tables",
           "split_counter_count", "token_block"]

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
def _tables_from_rotated(rotated_ptr, stride_rotated, mapping_ptr, table_ptr, first_group, B, L, groups, d, D,
                         BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, D_IN_PADDED: tl.constexpr):
    """Tables of groups [first_group, +BLOCK_G) of x̃ = lift(u), x̃ never written: x̃[b, p] =
    Σ_e u[b, d·blk + e] · M[e, f] with p = D·blk + f, u[b, c] at ``rotated_ptr + b·stride_rotated + c``.

    Each position is computed on its own (a gather of its block's d rotated values and one column of
    M), so D need not be a multiple of 4: a group of 4 positions may straddle two lattice blocks.
    """
    g = first_group + tl.arange(0, BLOCK_G)
    t = tl.arange(0, 4)
    e = tl.arange(0, D_IN_PADDED)
    i = tl.arange(0, 16)
    b = tl.arange(0, BLOCK_B)
    position = g[:, None] * 4 + t[None, :]                                                # (BLOCK_G, 4)
    block = position // D
    column = position - block * D
    inside = (position < L)[:, :, None] & (e < d)[None, None, :]                           # (BLOCK_G, 4, E)
    m = tl.load(mapping_ptr + e[None, None, :] * D + column[:, :, None], mask=inside, other=0.0)
    u = tl.load(rotated_ptr + b[None, None, None, :].to(tl.int64) * stride_rotated
                + (block * d)[:, :, None, None] + e[None, None, :, None],
                mask=inside[:, :, :, None] & (b < B)[None, None, None, :], other=0.0)      # (BLOCK_G, 4, E, BLOCK_B)
    x = tl.sum(u * m[:, :, :, None], axis=2)                                              # (BLOCK_G, 4, BLOCK_B)
    signs = (((i[:, None] >> t[None, :]) & 1) * 2 - 1).to(tl.float32)                    # (16, 4)
    table = tl.sum(x[:, None, :, :] * signs[None, :, :, None], axis=2)                   # (BLOCK_G, 16, BLOCK_B)
    offsets = (g[:, None, None] * 16 + i[None, :, None]) * BLOCK_B + b[None, None, :]
    tl.store(table_ptr + offsets, table, mask=(g < groups)[:, None, None])


@triton.jit
def _rotate_tables_kernel(
    x_ptr, signs_ptr, left_ptr, right_ptr, mapping_ptr, scratch_ptr, table_ptr, counter_ptr,
    B, K, k1, k2, L, groups, d, D, stride_x, n_counters,
    K2_PADDED: tl.constexpr, ROWS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, CHUNKS: tl.constexpr, D_IN_PADDED: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SIGNS: tl.constexpr, PDL: tl.constexpr = False,
):
    """The tables of groups [pid·BLOCK_G·CHUNKS, +BLOCK_G·CHUNKS) of x̃ = lift(Rᵀ pad(signs ⊙ x)):
    the rotation and the lift in one launch.

    Each program first computes the ``ROWS`` rows of U = P1ᵀ V P2 (from row0, the row of its first
    lattice block) that its groups read (the host sizes ROWS to cover them), for every token, into
    its own scratch (BLOCK_B, ROWS, k2) fp32; after a barrier its threads gather from there. A row
    of U is computed by every program that needs it (each reads all of V and P2: a few tens of KB
    from L2), which costs less than a second launch and its round trip through memory at decode.
    The programs also zero ``n_counters`` int32 split counters for the lookup launch that follows
    (which saves it a memset launch).
    """
    wait_for_previous_kernel(PDL)
    zero_at = tl.program_id(0) * 64 + tl.arange(0, 64)
    for start in range(0, n_counters, tl.num_programs(0) * 64):
        tl.store(counter_ptr + start + zero_at, 0, mask=start + zero_at < n_counters)
    first_group = tl.program_id(0) * (BLOCK_G * CHUNKS)
    row0 = (4 * first_group // D) * d // k2
    token_stride = ROWS * k2
    # Pointer to where U's row 0 would be, so that U[i, j] of token b sits at b·token_stride + i·k2 + j.
    rotated = scratch_ptr + tl.program_id(0).to(tl.int64) * (BLOCK_B * token_stride) - row0 * k2
    for b in range(0, B):
        rotate_rows(x_ptr + b * stride_x, signs_ptr, left_ptr, right_ptr, rotated + b * token_stride,
                    row0 + tl.arange(0, ROWS), 0, K2_PADDED, K, k1, k2, K2_PADDED, BLOCK_A, BLOCK_J, PRECISION,
                    HAS_SIGNS)
    tl.debug_barrier()  # the gathers below read U values that other threads of this program stored
    for chunk in range(CHUNKS):
        _tables_from_rotated(rotated, token_stride, mapping_ptr, table_ptr, first_group + chunk * BLOCK_G, B, L,
                             groups, d, D, BLOCK_B, BLOCK_G, D_IN_PADDED)


@triton.jit
def _finish_rows(total, scale_ptr, bias_ptr, out_ptr, rows, N, tokens, B, HAS_BIAS: tl.constexpr):
    """out[b, n] = r[n] · total[n, b] (+ bias[n]) in out's dtype, for the BLOCK_N rows ``rows``;
    out (B, N) contiguous."""
    row_ok = rows < N
    total = total * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        total += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + tokens[None, :] * N + rows[:, None], total.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (tokens < B)[None, :])


@triton.jit
def _load_quad(code_ptrs, word0, quads_per_row, row_ok):
    """Words word0..word0+3 of each thread's row, (BLOCK_N,) uint32 each; word0 a multiple of 4.
    A warp's 4 loads hit the same 512 contiguous bytes (rows interleaved in groups of 32). Evict
    first: the codes are read once, the tables by every program, so the code stream should not push
    tables out of L1 (-10 % at 28672x8192, -24 % at 2 splits; NOTES round 10)."""
    quad_ptrs = code_ptrs + _code_word_offset(0, word0, quads_per_row)
    return (tl.load(quad_ptrs + 0, mask=row_ok, other=0, eviction_policy="evict_first").to(tl.uint32),
            tl.load(quad_ptrs + 1, mask=row_ok, other=0, eviction_policy="evict_first").to(tl.uint32),
            tl.load(quad_ptrs + 2, mask=row_ok, other=0, eviction_policy="evict_first").to(tl.uint32),
            tl.load(quad_ptrs + 3, mask=row_ok, other=0, eviction_policy="evict_first").to(tl.uint32))


@triton.jit
def _lookup_word(total, word, step_table, tokens, w: tl.constexpr, BLOCK_B: tl.constexpr):
    """total (BLOCK_N, BLOCK_B) += the 8 table entries that word ``w`` of the step selects: nibble j
    picks one of the 16 entries (BLOCK_B fp32 tokens each) of group 8w + j. Per nibble the SASS is a
    shift, one LOP3 (mask and carry-free address), a register move, the load and an add."""
    for j in tl.static_range(8):
        entry_bytes = ((word >> (4 * j)) & 15) * (4 * BLOCK_B)
        entry = (step_table | entry_bytes.to(tl.int64)).to(tl.pointer_type(tl.float32))
        entry = tl.multiple_of(entry, 4 * BLOCK_B)
        total += tl.load(entry[:, None] + (w * 8 + j) * 16 * BLOCK_B + tokens[None, :], eviction_policy="evict_last")
    return total


@triton.jit(do_not_specialize=["rows0", "rows1", "rows2", "splits"])
def _lookup_kernel(
    table_ptr, partial_ptr, counter_ptr,
    codes0, scale0, bias0, out0, rows0,
    codes1, scale1, bias1, out1, rows1,
    codes2, scale2, bias2, out2, rows2,
    B, words_total, words_per_split, quads_per_row, splits,
    SIBLINGS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out_s[b, n] = r_s[n] · Σ_words Σ_nibbles table[g, nibble, b] (+ bias_s[n]) for up to 3 siblings s
    that read the same x̃ (one launch for q/k/v or gate/up); their row blocks are laid end to end
    along program axis 0. codes_s (⌈N_s/32⌉, quads_per_row, 32, 4) int32 (lift_ao.packing); out_s
    (B, N_s) in the output dtype.

    With ``splits`` > 1 each program sums one K split, writes it to ``partial`` and counts itself in
    ``counter[pid_n]``; the last of a row block's splits to arrive adds the others' partials, writes
    the output: no reduction launch. The counters arrive zeroed (:func:`rotate_tables` can do it).
    """
    wait_for_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Which sibling's rows this program owns.
    codes_ptr, scale_ptr, bias_ptr, out_ptr, N, block = codes0, scale0, bias0, out0, rows0, pid_n
    next_first = tl.cdiv(rows0, BLOCK_N)
    if SIBLINGS > 1:
        if pid_n >= next_first:
            codes_ptr, scale_ptr, bias_ptr, out_ptr, N, block = codes1, scale1, bias1, out1, rows1, pid_n - next_first
        next_first += tl.cdiv(rows1, BLOCK_N)
    if SIBLINGS > 2:
        if pid_n >= next_first:
            codes_ptr, scale_ptr, bias_ptr, out_ptr, N, block = codes2, scale2, bias2, out2, rows2, pid_n - next_first
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tokens = tl.arange(0, BLOCK_B)
    word_begin = pid_k * words_per_split
    word_end = tl.minimum(word_begin + words_per_split, words_total)
    # Every tensor in the loop is (BLOCK_N,) or (BLOCK_N, BLOCK_B): one row per thread, so a nibble
    # costs a shift, a mask, an address, one cached load and an add, with no shuffle or layout change.
    # A 3-d (rows, words, nibbles) tile let Triton spread a row's nibbles over lanes: shuffles and a
    # shared-memory transpose of the code words each step, 3x the instructions (sm_90 SASS, NOTES).
    code_ptrs = codes_ptr + _code_word_offset(rows, 0, quads_per_row)
    total = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    # The next quad's code words are loaded before this quad's 32 lookups, so their latency overlaps
    # them (-10 % at 28672x8192; two quads ahead measured no faster: NOTES rounds 10-11). Past the
    # split's end a step re-reads its last quad instead of masking.
    last = word_end - 4
    upcoming = _load_quad(code_ptrs, word_begin, quads_per_row, row_ok)
    for step in range(word_begin, word_end, 4):
        word0 = tl.multiple_of(step, 4)
        words = upcoming
        upcoming = _load_quad(code_ptrs, tl.multiple_of(tl.minimum(word0 + 4, last), 4), quads_per_row, row_ok)
        # The step's tables start 64·BLOCK_B-byte aligned and an entry's byte offset inside a group
        # is below that, so OR-ing it into the address adds with no carry: one logic op, not a 64-bit add.
        step_table = (table_ptr + word0 * (128 * BLOCK_B)).to(tl.int64)
        for w in tl.static_range(4):
            total = _lookup_word(total, words[w], step_table, tokens, w, BLOCK_B)
    if splits == 1:
        _finish_rows(total, scale_ptr, bias_ptr, out_ptr, rows, N, tokens, B, HAS_BIAS)
    else:
        programs_n = tl.num_programs(0)
        local = tl.arange(0, BLOCK_N)[:, None] * BLOCK_B + tokens[None, :]
        tl.store(partial_ptr + (pid_k * programs_n + pid_n) * (BLOCK_N * BLOCK_B) + local, total)
        # Every thread's partial is written before one thread's release-ordered count.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        # Modulo: the autotuner launches each config several times on the same counters, and every
        # launch adds exactly ``splits`` to each counter it uses.
        if arrived % splits == splits - 1:
            tl.debug_barrier()
            total = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
            for split in range(0, splits):
                # .cg: read L2, where the other programs' partials are, never a stale L1 line.
                total += tl.load(partial_ptr + (split * programs_n + pid_n) * (BLOCK_N * BLOCK_B) + local,
                                 cache_modifier=".cg")
            _finish_rows(total, scale_ptr, bias_ptr, out_ptr, rows, N, tokens, B, HAS_BIAS)


# Hopper candidates: 1, 2, 4 or 8 warps of one-row threads, for many resident programs per SM.
# maxnreg: for a block of ≥ 2 warps ptxas otherwise budgets 32 registers (full occupancy at 32 blocks
# per SM) and interleaves each table load with its add, so a warp waits on one load at a time: 2× slower
# than the 1-warp config (64 registers, all 32 loads of a quad in flight). H200, NOTES round 8.
_TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=1, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=2, num_stages=3, maxnreg=64),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3, maxnreg=64),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3, maxnreg=64),
]
_INTERPRETER_CONFIG = {"BLOCK_N": 32}

_lookup_tuned = triton.autotune(
    configs=_TUNING_CONFIGS, key=["rows0", "rows1", "rows2", "words_total", "words_per_split", "BLOCK_B", "SIBLINGS"],
    do_bench=quick_bench)(_lookup_kernel)

# The largest token count the lookup kernel takes (one power-of-two token block per program).
MAX_TOKENS = 8
_BUILD_GROUPS = 64
_LIFT_GROUPS = 32
# The rotation's chunking is tuned as the rotation kernel's (its configs; the tables add no choice).
_rotate_tables_tuned = triton.autotune(
    configs=_ROTATE_CONFIGS, key=["k1", "k2", "ROWS", "CHUNKS", "BLOCK_B", "PRECISION"],
    do_bench=quick_bench)(_rotate_tables_kernel)
_MAX_SIBLINGS = 3          # sibling slots of _lookup_kernel
_LARGEST_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in _TUNING_CONFIGS)
_SMALLEST_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _TUNING_CONFIGS)


def _empty_tables(groups: int, token_block: int, device: torch.device) -> torch.Tensor:
    """An uninitialised (groups, 16, token_block) fp32 table whose start is aligned to one group
    (64·token_block bytes), as :func:`_lookup_kernel`'s carry-free addressing needs. CUDA's caching
    allocator aligns to 512 bytes, which covers every token block; the CPU one only to 64."""
    group_floats = 16 * token_block
    storage = torch.empty(groups * group_floats + group_floats, dtype=torch.float32, device=device)
    skip = (-storage.data_ptr() // 4) % group_floats
    return storage[skip:skip + groups * group_floats].view(groups, 16, token_block)


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
    tables = _empty_tables(groups, token_block, lifted.device)
    _build_tables_kernel[(triton.cdiv(groups, _BUILD_GROUPS),)](
        lifted, tables, tokens, length, groups, lifted.stride(0), BLOCK_B=token_block, BLOCK_G=_BUILD_GROUPS)
    return tables


def _rotate_tables_plan(groups: int, L: int, d: int, D: int, k2: int, sms: int) -> tuple[int, int]:
    """(CHUNKS, ROWS) of :func:`_rotate_tables_kernel`: chunks of _LIFT_GROUPS groups per program, the
    fewest that keep the programs within one per SM (each program re-reads V and P2), and the rows of
    U its groups span at most (a power of two ≥ 16, tl.dot's minimum)."""
    chunks = 1
    while triton.cdiv(groups, _LIFT_GROUPS * chunks) > sms:
        chunks *= 2
    per_program = _LIFT_GROUPS * chunks
    most_rows = 1
    for first in range(0, min(groups, triton.cdiv(L, 4)), per_program):
        last_position = min(4 * (first + per_program) - 1, L - 1)
        first_flat, last_flat = (4 * first // D) * d, (last_position // D) * d + d - 1
        most_rows = max(most_rows, last_flat // k2 - first_flat // k2 + 1)
    return chunks, max(16, triton.next_power_of_2(most_rows))


def rotate_tables(
    x: torch.Tensor, input_signs: Optional[torch.Tensor], rotation_left: torch.Tensor,
    rotation_right: torch.Tensor, mapping: torch.Tensor, words: int, token_block: int,
    zero_counters: Optional[torch.Tensor] = None, config: Optional[dict] = None,
) -> torch.Tensor:
    """Lookup tables of x̃ = lift(Rᵀ pad(signs ⊙ x)) in one launch: the rotation, the lift and the
    signed sums, with neither u nor x̃ written beyond a per-program scratch of a few rows of u.

    Args:
        x: (B, K) fp16 / bf16 / fp32 activation, B ≤ token_block; K ≤ Kp = k1·k2.
        input_signs: (Kp,) or None (x already carries them); rotation_left: (k1, k1), rotation_right:
            (k2, k2) float32 rotation; mapping: (d, D) lattice matrix M, Kp a multiple of d.
        words: code words per row (``words_per_row(Kp·D/d)``).
        token_block: tokens per table entry (power of two ≥ B).
        zero_counters: int32 split counters that this launch zeroes for the :func:`lookup_siblings`
            call that reads these tables (see :func:`split_counter_count`), or None.
        config: fixed ``{"BLOCK_A", "num_warps", "num_stages"}`` instead of autotuning.
    Returns:
        (8·words, 16, token_block) fp32, as :func:`build_tables` of x̃ kept in fp32. The rotation's
        products run in tf32 for 16-bit activations and in fp32 for fp32 ones (as ``rotate_triton``).
    """
    tokens, features = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    k1, k2 = rotation_left.shape[0], rotation_right.shape[0]
    d, D = mapping.shape
    length = k1 * k2 // d * D
    groups = 8 * words
    tables = _empty_tables(groups, token_block, x.device)
    f32 = torch.float32
    left, right = (t.to(f32).contiguous() for t in (rotation_left, rotation_right))
    # Without signs the pointer is never read; pass any fp32 tensor.
    signs = left if input_signs is None else input_signs.to(f32).contiguous()
    chunks, rows = _rotate_tables_plan(groups, length, d, D, k2, sm_count(x.device))
    programs = triton.cdiv(groups, _LIFT_GROUPS * chunks)
    scratch = torch.empty(programs * token_block * rows * k2, dtype=f32, device=x.device)
    counters = tables if zero_counters is None else zero_counters
    k2_padded = max(16, triton.next_power_of_2(k2))
    if config is None and x.device.type != "cuda":
        config = _ROTATE_INTERPRETER_CONFIG
    kernel = _rotate_tables_tuned if config is None else _rotate_tables_kernel
    launch = dependent_launch(x.device)
    kernel[(programs,)](
        x, signs, left, right, mapping.to(f32).contiguous(), scratch, tables, counters,
        tokens, features, k1, k2, length, groups, d, D, x.stride(0),
        0 if zero_counters is None else zero_counters.numel(),
        K2_PADDED=k2_padded, ROWS=rows, BLOCK_J=min(32, k2_padded), BLOCK_B=token_block, BLOCK_G=_LIFT_GROUPS,
        CHUNKS=chunks, D_IN_PADDED=triton.next_power_of_2(d), PRECISION="ieee" if x.dtype == f32 else "tf32",
        HAS_SIGNS=input_signs is not None, PDL=bool(launch), **launch, **(config or {}))
    return tables


def token_block(tokens: int) -> int:
    """Tokens per table entry for ``tokens`` tokens: the next power of two."""
    return triton.next_power_of_2(tokens)


def _split_count(rows: int, words: int, sms: int) -> int:
    """K splits: the largest power of two (≤ 32, each split ≥ 8 words) whose 32-row programs fit one
    wave of 32 resident blocks per SM. A split count that spills a few programs into a second wave
    cost 1.3× (28672×8192: 5 splits 68 µs, 4 splits 53 µs); this rule picked the best measured count
    of every 8B/70B shape at batch 1 within 4 % (H200, benchmarks/NOTES_kernels.md round 8)."""
    programs = triton.cdiv(rows, 32)
    wanted = max(1, min(32 * sms // programs, words // 8, 32))
    return 1 << (wanted.bit_length() - 1)


def split_counter_count(rows: list[int]) -> int:
    """Split counters a :func:`lookup_siblings` call over siblings of ``rows`` output rows needs."""
    return sum(triton.cdiv(n, _SMALLEST_BLOCK_N) for n in rows)


def lookup_siblings(
    tables: torch.Tensor, tokens: int, packed_codes: list[torch.Tensor], row_scale: list[torch.Tensor],
    bias: list[Optional[torch.Tensor]], out_dtype: torch.dtype, splits: Optional[int] = None,
    config: Optional[dict] = None, counters: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """``y_s = r_s ⊙ (Q_s · x̃) + b_s`` for siblings that read the same x̃, from its lookup tables.

    Siblings go up to three per launch (one launch for q/k/v, another only where bias presence
    differs); split-K partials are reduced inside the launch.

    Args:
        tables: (8·words, 16, token_block(tokens)) fp32 (:func:`build_tables` / :func:`rotate_tables`).
        tokens: activation rows B ≤ MAX_TOKENS.
        packed_codes: per sibling (⌈N_s/32⌉, words/4, 32, 4) int32, contiguous (layout of
            :mod:`lift_ao.packing`); the same words per row for all.
        row_scale: per sibling (N_s,) float32 (N_s counts the rows); bias: per sibling (N_s,) or None.
        out_dtype: dtype of the outputs.
        splits: K splits (None: from the rows of the launch and the SM count).
        config: fixed launch options (``{"BLOCK_N", "num_warps", "num_stages"}``, optionally
            ``"maxnreg"``: one of ``_TUNING_CONFIGS``' ``all_kwargs()``) instead of autotuning.
        counters: ≥ ``split_counter_count(N_s…)`` zeroed int32 (e.g. by :func:`rotate_tables`), used up
            by this call; None: allocated zeroed here.
    Returns:
        per sibling (B, N_s) in out_dtype, accumulated in fp32.
    """
    if tokens > MAX_TOKENS:
        raise ValueError(f"lookup kernel takes at most {MAX_TOKENS} tokens, got {tokens}; use lifted_matmul_triton")
    quads = packed_codes[0].shape[1] if packed_codes[0].dim() == 4 else 0
    words = 4 * quads
    rows_of = [scale.shape[0] for scale in row_scale]
    for codes, n in zip(packed_codes, rows_of):
        check_packed(codes, n, 128 * quads, "lookup_siblings (every sibling with the first one's quads per row)")
        if not codes.is_contiguous():
            raise ValueError("lookup_siblings: packed codes must be contiguous")
    device = tables.device
    outs = [torch.empty(tokens, n, dtype=out_dtype, device=device) for n in rows_of]
    if tokens == 0:
        return outs
    block_b = token_block(tokens)
    if tables.shape != (8 * words, 16, block_b):
        raise ValueError(f"tables {tuple(tables.shape)} are not those of {tokens} tokens × {words} words per row")
    if not tables.is_contiguous() or tables.data_ptr() % (64 * block_b):
        raise ValueError(f"tables must be contiguous and start {64 * block_b}-byte aligned (one table group); "
                         "make them with build_tables or rotate_tables")
    scales = [scale.to(torch.float32).contiguous() for scale in row_scale]
    if config is None and device.type != "cuda":
        config = _INTERPRETER_CONFIG
    kernel = _lookup_tuned if config is None else _lookup_kernel
    launch = dependent_launch(device)
    launches: list[list[int]] = []
    for with_bias in (False, True):
        members = [i for i, b in enumerate(bias) if (b is not None) == with_bias and rows_of[i] > 0]
        launches += [members[at:at + _MAX_SIBLINGS] for at in range(0, len(members), _MAX_SIBLINGS)]
    needed = split_counter_count(rows_of)
    if counters is None:
        counters = torch.zeros(needed, dtype=torch.int32, device=device)
    elif counters.dtype != torch.int32 or counters.numel() < needed:
        raise ValueError(f"split counters must be ≥ {needed} int32, got {counters.dtype} × {counters.numel()}")
    counter_offset = 0
    for members in launches:
        rows = [rows_of[i] for i in members]
        launch_splits = splits or _split_count(sum(rows), words, sm_count(device))
        words_per_split = triton.cdiv(triton.cdiv(words, launch_splits), 4) * 4
        launch_splits = triton.cdiv(words, words_per_split)
        most_rows = sum(triton.cdiv(n, _LARGEST_BLOCK_N) * _LARGEST_BLOCK_N for n in rows)
        partials = (torch.empty(launch_splits * most_rows * block_b, dtype=torch.float32, device=device)
                    if launch_splits > 1 else scales[members[0]])
        used = split_counter_count(rows)
        launch_counters = counters[counter_offset:counter_offset + used]
        counter_offset += used
        slots = []
        for slot in range(_MAX_SIBLINGS):
            i = members[min(slot, len(members) - 1)]   # unused slots repeat a real sibling (never read)
            slots += [packed_codes[i], scales[i], bias[i] if bias[i] is not None else scales[i], outs[i],
                      rows_of[i]]
        grid = lambda meta, rows=rows, launch_splits=launch_splits: (  # noqa: E731
            sum(triton.cdiv(n, meta["BLOCK_N"]) for n in rows), launch_splits)
        kernel[grid](tables, partials, launch_counters, *slots, tokens, words, words_per_split, quads, launch_splits,
                     SIBLINGS=len(members), HAS_BIAS=bias[members[0]] is not None, BLOCK_B=block_b,
                     PDL=bool(launch), **launch, **(config or {}))
    return outs


def lookup_matmul(
    lifted: torch.Tensor, packed_codes: torch.Tensor, row_scale: torch.Tensor,
    bias: Optional[torch.Tensor], splits: Optional[int] = None, config: Optional[dict] = None,
) -> torch.Tensor:
    """``y = r ⊙ (Q · x̃) + b`` for up to :data:`MAX_TOKENS` tokens by table lookup.

    Args:
        lifted: (..., L) float lifted activation x̃ with at most MAX_TOKENS rows.
        packed_codes: packed_shape(N, L) int32 codes (layout of :mod:`lift_ao.packing`), contiguous.
        row_scale: (N,) float32 row scales r (N counts the rows).
        bias: (N,) or None.
        splits, config: as in :func:`lookup_siblings`.
    Returns:
        (..., N) in lifted.dtype, accumulated in fp32.
    """
    length = lifted.shape[-1]
    x = lifted.reshape(-1, length)
    tokens = x.shape[0]
    if tokens > MAX_TOKENS:
        raise ValueError(f"lookup_matmul takes at most {MAX_TOKENS} tokens, got {tokens}; use lifted_matmul_triton")
    rows = row_scale.shape[0]
    if tokens == 0:
        return lifted.new_empty(*lifted.shape[:-1], rows)
    tables = build_tables(x, words_per_row(length), token_block(tokens))
    out, = lookup_siblings(tables, tokens, [packed_codes], [row_scale], [bias], lifted.dtype, splits, config)
    return out.reshape(*lifted.shape[:-1], rows)
