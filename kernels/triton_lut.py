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
   or, in the fused decode ops, :func:`_lift_tables_kernel` straight from the rotated activation
   (x̃ is never written);
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

from .triton_matmul import (_code_word_offset, autotune, check_launch_device, dependent_launch, sm_count,
                            wait_for_previous_kernel)

__all__ = ["MAX_TOKENS", "build_tables", "lift_tables", "lookup_matmul", "lookup_siblings", "split_counter_count",
           "token_block"]

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
def _lift_tables_kernel(rotated_ptr, mapping_ptr, table_ptr, counter_ptr, B, L, groups, d, D, stride_rotated,
                        n_counters, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, D_IN_PADDED: tl.constexpr,
                        PDL: tl.constexpr = False):
    """The tables of x̃ straight from the rotated activation u (the lift fused into the table build):
    x̃[b, p] = Σ_e u[b, d·blk + e] · M[e, f] with p = D·blk + f, so no x̃ is written or read.

    rotated (B, Kp) fp32; mapping (d, D) fp32; table as in :func:`_build_tables_kernel`. Each
    position is computed on its own (a gather of its block's d rotated values and one column of M),
    so D need not be a multiple of 4: a group of 4 positions may straddle two lattice blocks.
    The programs also zero ``n_counters`` int32 split counters for the lookup launch that follows
    (which saves it a memset launch).
    """
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    t = tl.arange(0, 4)
    e = tl.arange(0, D_IN_PADDED)
    i = tl.arange(0, 16)
    b = tl.arange(0, BLOCK_B)
    position = g[:, None] * 4 + t[None, :]                                                # (BLOCK_G, 4)
    block = position // D
    column = position - block * D
    inside = (position < L)[:, :, None] & (e < d)[None, None, :]                           # (BLOCK_G, 4, E)
    # M is a constant: loaded before the rotation (the previous launch) has finished.
    m = tl.load(mapping_ptr + e[None, None, :] * D + column[:, :, None], mask=inside, other=0.0)
    wait_for_previous_kernel(PDL)
    zero_at = tl.program_id(0) * 64 + tl.arange(0, 64)
    for start in range(0, n_counters, tl.num_programs(0) * 64):
        tl.store(counter_ptr + start + zero_at, 0, mask=start + zero_at < n_counters)
    u = tl.load(rotated_ptr + b[None, None, None, :].to(tl.int64) * stride_rotated
                + (block * d)[:, :, None, None] + e[None, None, :, None],
                mask=inside[:, :, :, None] & (b < B)[None, None, None, :], other=0.0)      # (BLOCK_G, 4, E, BLOCK_B)
    x = tl.sum(u * m[:, :, :, None], axis=2)                                              # (BLOCK_G, 4, BLOCK_B)
    signs = (((i[:, None] >> t[None, :]) & 1) * 2 - 1).to(tl.float32)                    # (16, 4)
    table = tl.sum(x[:, None, :, :] * signs[None, :, :, None], axis=2)                   # (BLOCK_G, 16, BLOCK_B)
    offsets = (g[:, None, None] * 16 + i[None, :, None]) * BLOCK_B + b[None, None, :]
    tl.store(table_ptr + offsets, table, mask=(g < groups)[:, None, None])


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
    the output: no reduction launch. The counters arrive zeroed (:func:`lift_tables` can do it).
    """
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
    # The codes are constants, so their first load may start before the previous kernel (the tables'
    # launch) has finished; under programmatic dependent launch that hides its DRAM latency.
    wait_for_previous_kernel(PDL)
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
            # 32 // BLOCK_B partials per round trip to L2 (unrolled, so their loads are all in flight
            # before the adds): the reduction is this launch's tail, up to 32 splits long.
            for first in range(0, splits, 32 // BLOCK_B):
                for k in tl.static_range(32 // BLOCK_B):
                    split = first + k
                    # .cg: read L2, where the other programs' partials are, never a stale L1 line. The
                    # mask is a tensor: the interpreter rejects a scalar one.
                    total += tl.load(partial_ptr + (split * programs_n + pid_n) * (BLOCK_N * BLOCK_B) + local,
                                     mask=tl.full(local.shape, split, tl.int32) < splits, other=0.0,
                                     cache_modifier=".cg")
            _finish_rows(total, scale_ptr, bias_ptr, out_ptr, rows, N, tokens, B, HAS_BIAS)


# Hopper candidates: 1, 2, 4 or 8 warps of one-row threads, for many resident programs per SM.
# maxnreg: for a block of ≥ 2 warps ptxas otherwise budgets 32 registers (full occupancy at 32 blocks
# per SM) and interleaves each table load with its add, so a warp waits on one load at a time: 2× slower
# than the 1-warp config (64 registers, all 32 loads of a quad in flight). H200, NOTES round 8.
# A 48-register candidate (40 resident warps instead of 32) was 5–11 % faster alone at 2 tokens and
# within ±2 % at 1, but the autotuner's standalone timing then chose it where it is slower inside the
# decode graph: Llama-3-8B shape at 3.0 bits 249.2 → 237.1 tokens/s (H100, NOTES round 17). Not kept.
_TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=1, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=2, num_stages=3, maxnreg=64),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3, maxnreg=64),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3, maxnreg=64),
]
_INTERPRETER_CONFIG = {"BLOCK_N": 32}

_lookup_tuned = autotune(_TUNING_CONFIGS, ["rows0", "rows1", "rows2", "words_total", "words_per_split", "BLOCK_B",
                                            "SIBLINGS"])(_lookup_kernel)

# The largest token count the lookup kernel takes (one power-of-two token block per program).
MAX_TOKENS = 8
_BUILD_GROUPS = 64
_LIFT_GROUPS = 32
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
    check_launch_device(lifted.device, "build_tables")
    tokens, length = lifted.shape
    groups = 8 * words
    tables = _empty_tables(groups, token_block, lifted.device)
    _build_tables_kernel[(triton.cdiv(groups, _BUILD_GROUPS),)](
        lifted, tables, tokens, length, groups, lifted.stride(0), BLOCK_B=token_block, BLOCK_G=_BUILD_GROUPS)
    return tables


def lift_tables(rotated: torch.Tensor, mapping: torch.Tensor, words: int, token_block: int,
                zero_counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Lookup tables of x̃ = lift(u) computed from the rotated activation u, x̃ never materialised.

    Args:
        rotated: (B, Kp) fp32 rotated activation (``triton_lift.rotate_triton``), B ≤ token_block.
        mapping: (d, D) fp32 contiguous lattice matrix M; Kp a multiple of d. The kernel reads it
            before waiting for the previous launch (programmatic dependent launch), so it must not be
            written by that launch: convert it before launching the rotation.
        words: code words per row (``words_per_row(Kp·D/d)``).
        token_block: tokens per table entry (power of two ≥ B).
        zero_counters: int32 split counters that this launch zeroes for the :func:`lookup_siblings`
            call that reads these tables (see :func:`split_counter_count`), or None.
    Returns:
        (8·words, 16, token_block) fp32, as :func:`build_tables` of x̃ kept in fp32.
    """
    check_launch_device(rotated.device, "lift_tables")
    tokens, padded = rotated.shape
    d, D = mapping.shape
    if mapping.dtype != torch.float32 or not mapping.is_contiguous():
        raise ValueError("lift_tables: the mapping must be fp32 and contiguous (converted before the rotation's "
                         f"launch), got {mapping.dtype}, strides {mapping.stride()}")
    groups = 8 * words
    tables = _empty_tables(groups, token_block, rotated.device)
    counters = tables if zero_counters is None else zero_counters
    launch = dependent_launch(rotated.device)
    _lift_tables_kernel[(triton.cdiv(groups, _LIFT_GROUPS),)](
        rotated, mapping, tables, counters, tokens, padded // d * D, groups, d, D,
        rotated.stride(0), 0 if zero_counters is None else zero_counters.numel(), BLOCK_B=token_block, BLOCK_G=_LIFT_GROUPS,
        D_IN_PADDED=triton.next_power_of_2(d), num_warps=4, PDL=bool(launch), **launch)
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
        tables: (8·words, 16, token_block(tokens)) fp32 (:func:`build_tables` / :func:`lift_tables`).
        tokens: activation rows B ≤ MAX_TOKENS.
        packed_codes: per sibling (⌈N_s/32⌉, words/4, 32, 4) int32, contiguous (layout of
            :mod:`lift_ao.packing`); the same words per row for all. The kernel reads their first
            words before waiting for the previous launch, so no copy making them may run just before.
        row_scale: per sibling (N_s,) float32 (N_s counts the rows); bias: per sibling (N_s,) or None.
        out_dtype: dtype of the outputs.
        splits: K splits (None: from the rows of the launch and the SM count).
        config: fixed launch options (``{"BLOCK_N", "num_warps", "num_stages"}``, optionally
            ``"maxnreg"``: one of ``_TUNING_CONFIGS``' ``all_kwargs()``) instead of autotuning.
        counters: ≥ ``split_counter_count(N_s…)`` zeroed int32 (e.g. by :func:`lift_tables`), used up
            by this call; None: allocated zeroed here.
    Returns:
        per sibling (B, N_s) in out_dtype, accumulated in fp32.
    """
    check_launch_device(tables.device, "lookup_siblings")
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
                         "make them with build_tables or lift_tables")
    scales = [scale.to(torch.float32).contiguous() for scale in row_scale]
    bias = [None if b is None else b.contiguous() for b in bias]  # read as bias_ptr + row
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
    check_launch_device(lifted.device, "lookup_matmul")
    length = lifted.shape[-1]
    x = lifted.reshape(-1, length).contiguous()  # the tables kernel reads a token's values one after another
    tokens = x.shape[0]
    if tokens > MAX_TOKENS:
        raise ValueError(f"lookup_matmul takes at most {MAX_TOKENS} tokens, got {tokens}; use lifted_matmul_triton")
    rows = row_scale.shape[0]
    if tokens == 0:
        return lifted.new_empty(*lifted.shape[:-1], rows)
    tables = build_tables(x, words_per_row(length), token_block(tokens))
    out, = lookup_siblings(tables, tokens, [packed_codes], [row_scale], [bias], lifted.dtype, splits, config)
    return out.reshape(*lifted.shape[:-1], rows)
