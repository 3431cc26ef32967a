"""Triton kernels for ``lift_ao::lift_activation``: x̃ = lift(Rᵀ pad(x)).

Two launches, each a handful of small tensor-core products:

1. :func:`_rotate_kernel` — ``U = P1ᵀ · V · P2`` per token, with ``V`` the sign-flipped, zero-padded
   activation seen as a (k1, k2) matrix (the Kronecker identity of :mod:`lift_ao.transform`). One
   program computes ``BLOCK_I`` rows of U for one token (grid tokens × ⌈k1/BLOCK_I⌉), written to an
   fp32 scratch row of length Kp. Each program reads all of P2, so with many tokens (prefill) the
   autotuner may take 32 or 64 rows per program, which reads P2 from L2 2–4× less often. With few
   tokens (decode) the grid is too small to fill the GPU, so the columns of U are also split across
   programs, each recomputing its rows of ``P1ᵀ V``; the autotuner picks the split count with the row
   tile.
2. :func:`_lift_blocks_kernel` — each d-block of U times M (d × D), cast to the activation's dtype.

They are separate launches because a d-block may straddle rows of U (d need not divide k2), so a
program computing rows of U cannot own whole blocks. The decode path of the fused ops replaces the
second launch by :func:`lift_ao.kernels.triton_lut.lift_tables`, which reads U and writes the lookup
tables directly. Any (D, d) and any k1, k2 work: tile sizes
are d, D and k2 padded to powers of two (≥ 16, tl.dot's minimum), with masked loads and stores.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_matmul import autotune, check_launch_device, dependent_launch, prefetch_to_l2, wait_for_previous_kernel

__all__ = ["lift_activation_triton", "most_column_splits", "padded_columns_of_u", "rotate_triton"]

_ROWS_PER_PROGRAM = 16   # the fewest rows of U a program takes (tl.dot's minimum M)
_COLUMN_CHUNK = 32       # output columns of U per product with P2
_BLOCKS_PER_PROGRAM = 64


@triton.jit
def _rotate_kernel(
    x_ptr, signs_ptr, left_ptr, right_ptr, u_ptr,
    K, k1, k2, stride_x, stride_u, token_bucket, fixed_splits,
    K2_PADDED: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr,
    COLUMN_SPLITS: tl.constexpr, PRECISION: tl.constexpr, HAS_SIGNS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """U[i, j] = (P1ᵀ V P2)[i, j] for token pid_b, rows i in [pid_i·BLOCK_I, +BLOCK_I), columns j in
    the pid_j-th of COLUMN_SPLITS equal parts of [0, K2_PADDED); u (B, k1·k2) fp32, or 16-bit for the
    prefill GEMM. ``token_bucket`` and ``fixed_splits`` only key the autotuner (decode and prefill want
    different tiles; a caller may fix the split count)."""
    # The rotation and the signs are constants: their DRAM latency can overlap the previous kernel.
    prefetch_to_l2(left_ptr, k1 * k1, PDL)
    prefetch_to_l2(right_ptr, k2 * k2, PDL)
    if HAS_SIGNS:
        prefetch_to_l2(signs_ptr, k1 * k2, PDL)
    wait_for_previous_kernel(PDL)
    pid_b = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    columns = tl.arange(0, K2_PADDED)
    column_ok = columns < k2
    x_row = x_ptr + pid_b.to(tl.int64) * stride_x

    partial = tl.zeros((BLOCK_I, K2_PADDED), dtype=tl.float32)  # (P1ᵀ V)[i, :]
    for a0 in range(0, k1, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        a_ok = a < k1
        left_t = tl.load(left_ptr + a[None, :] * k1 + i[:, None], mask=a_ok[None, :] & (i < k1)[:, None], other=0.0)
        flat = a[:, None] * k2 + columns[None, :]
        in_grid = a_ok[:, None] & column_ok[None, :]
        v = tl.load(x_row + flat, mask=in_grid & (flat < K), other=0.0).to(tl.float32)
        if HAS_SIGNS:
            v = v * tl.load(signs_ptr + flat, mask=in_grid, other=0.0)
        partial = tl.dot(left_t, v, partial, input_precision=PRECISION)

    u_rows = u_ptr + pid_b.to(tl.int64) * stride_u + i[:, None] * k2
    columns_per_program: tl.constexpr = K2_PADDED // COLUMN_SPLITS
    for j0 in range(pid_j * columns_per_program, (pid_j + 1) * columns_per_program, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        right = tl.load(right_ptr + columns[:, None] * k2 + j[None, :],
                        mask=column_ok[:, None] & (j < k2)[None, :], other=0.0)
        u = tl.dot(partial, right, input_precision=PRECISION)
        tl.store(u_rows + j[None, :], u.to(u_ptr.dtype.element_ty), mask=(i < k1)[:, None] & (j < k2)[None, :])


# The chunk over P1's rows and the pipelining depth, tuned per (k1, k2, token bucket): on the H100
# at batch 1, Triton's default 3 stages with 32-row chunks took 11.0 µs at K = 4096 but 18.5 µs at
# K = 14336, where 1 stage with 16-row chunks took 15.6 (12.6 at 4096): the 3-deep pipeline of masked
# loads spills at K2_PADDED ≥ 128 (~250 registers, offline sm_90 compile; NOTES_kernels.md). 32 and 64
# rows of U per program (BLOCK_I, one stage): 256 tokens at K = 28672 (2.4 bits) 249.9 → 126.1 µs, at
# 1–32 tokens within 3 % of 16 rows or faster (H100, NOTES_kernels.md round 15, results/rotation_h100.md).
_ROW_TILES = [triton.Config({"BLOCK_I": _ROWS_PER_PROGRAM, "BLOCK_A": chunk}, num_warps=4, num_stages=stages)
              for chunk in (16, 32, 64) for stages in (1, 3)] + [
    triton.Config({"BLOCK_I": rows, "BLOCK_A": 32}, num_warps=warps, num_stages=1) for rows, warps in ((32, 4), (64, 8))]
# With few tokens the grid is too small to fill the GPU, so the columns of U may also be split over
# programs (COLUMN_SPLITS, each recomputing its rows of P1ᵀ V). The best count depends on the row tile
# the autotuner takes, so it is tuned with it, not set by a rule: a rule on 16-row program counts
# (≤ one program per SM) took 2 splits at 8 tokens, K = 28672 (2.4 bits): 23.9 µs, where 8 splits take
# 17.2; at 16 tokens, K = 14336: 18.0 vs 12.9 (H100, NOTES_kernels.md round 17). Above
# _MOST_SPLIT_TOKENS tokens one split was always the fastest, so larger buckets tune the row tile alone.
_MOST_SPLIT_TOKENS = 64
_SPLIT_COUNTS = (1, 2, 4, 8, 16)  # pruned per key to those ≤ most_column_splits(k2)
_ROTATE_CONFIGS = [triton.Config({**tile.kwargs, "COLUMN_SPLITS": splits}, num_warps=tile.num_warps,
                                 num_stages=tile.num_stages)
                   for splits in _SPLIT_COUNTS for tile in _ROW_TILES]
_ROTATE_INTERPRETER_CONFIG = {"BLOCK_I": _ROWS_PER_PROGRAM, "BLOCK_A": 16}


def _prune_rotate_configs(configs, named_args, **kwargs):
    """The split counts that tile this K2_PADDED in 32-column chunks (only the caller's, if it fixed
    one; only 1 above _MOST_SPLIT_TOKENS tokens)."""
    most = most_column_splits(named_args["k2"])
    fixed = named_args["fixed_splits"]
    if fixed:
        allowed = {fixed}
    elif named_args["token_bucket"] > _MOST_SPLIT_TOKENS:
        allowed = {1}
    else:
        allowed = {s for s in _SPLIT_COUNTS if s <= most}
    return [c for c in configs if c.kwargs["COLUMN_SPLITS"] in allowed]


_rotate_tuned = autotune(_ROTATE_CONFIGS, ["k1", "k2", "token_bucket", "fixed_splits", "PRECISION"],
                         _prune_rotate_configs)(_rotate_kernel)


@triton.jit
def _lift_blocks_kernel(
    u_ptr, mapping_ptr, out_ptr, n_blocks, d, D, stride_u, stride_out,
    BLOCKS: tl.constexpr, D_IN_PADDED: tl.constexpr, D_OUT_PADDED: tl.constexpr, PDL: tl.constexpr = False,
):
    """x̃[b, D·blk + f] = Σ_e u[b, d·blk + e] M[e, f] for BLOCKS blocks of token pid_b."""
    wait_for_previous_kernel(PDL)
    pid_b = tl.program_id(0)
    blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    e = tl.arange(0, D_IN_PADDED)
    f = tl.arange(0, D_OUT_PADDED)
    block_ok = blocks < n_blocks
    u = tl.load(u_ptr + pid_b.to(tl.int64) * stride_u + blocks[:, None] * d + e[None, :],
                mask=block_ok[:, None] & (e < d)[None, :], other=0.0)
    mapping = tl.load(mapping_ptr + e[:, None] * D + f[None, :], mask=(e < d)[:, None] & (f < D)[None, :], other=0.0)
    lifted = tl.dot(u, mapping, input_precision="ieee")
    tl.store(out_ptr + pid_b.to(tl.int64) * stride_out + blocks[:, None] * D + f[None, :],
             lifted.to(out_ptr.dtype.element_ty), mask=block_ok[:, None] & (f < D)[None, :])


def padded_columns_of_u(k2: int) -> int:
    """The rotation kernel's column tile (K2_PADDED): k2 padded to a power of two ≥ 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(k2))


def most_column_splits(k2: int) -> int:
    """The most programs that may share a row block of U for a (·, k2) rotation: one 32-column chunk each."""
    k2_padded = padded_columns_of_u(k2)
    return k2_padded // min(_COLUMN_CHUNK, k2_padded)


def rotate_triton(
    x: torch.Tensor, input_signs: Optional[torch.Tensor], rotation_left: torch.Tensor,
    rotation_right: torch.Tensor, column_splits: Optional[int] = None, config: Optional[dict] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The rotated activation u = Rᵀ pad(signs ⊙ x) of every token (first launch of the lift).

    Args:
        x: (..., K) fp16 / bf16 / fp32 activation, K ≤ Kp = k1·k2.
        input_signs: (Kp,) or None (x already carries them), rotation_left: (k1, k1),
            rotation_right: (k2, k2) float32 rotation.
        column_splits: programs per row block of U along its columns, a power of two ≤
            :func:`most_column_splits` (None: autotuned with the row tile on CUDA, 1 elsewhere).
        config: fixed ``{"BLOCK_I", "BLOCK_A", "num_warps", "num_stages"}`` instead of autotuning.
        out: (B, Kp) tensor to write into, any float dtype and row stride (the prefill GEMM's
            16-bit operand, rows padded for cuBLAS); None: a new fp32 one.
    Returns:
        ``out`` or a new (B, Kp) fp32 tensor, B = x.numel() / K. The products run in tf32 for 16-bit
        activations (their error, 1.1e-3 relative to float64 at the 8B/70B K on an H100, is about one
        bf16 rounding of the activation itself, ~4 fp16 ones: benchmarks/results/rotation_h100.md) and in
        fp32 for fp32 activations.
    """
    check_launch_device(x.device, "rotate_triton")
    k1, k2 = rotation_left.shape[0], rotation_right.shape[0]
    features = x.shape[-1]
    rows = x.reshape(-1, features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    tokens = rows.shape[0]
    rotated = torch.empty(tokens, k1 * k2, dtype=torch.float32, device=x.device) if out is None else out
    if rotated.shape != (tokens, k1 * k2) or rotated.stride(-1) != 1:
        raise ValueError(f"out {tuple(rotated.shape)} stride {rotated.stride()} is not a ({tokens}, {k1 * k2}) "
                         "tensor with unit column stride")
    if tokens == 0:
        return rotated
    f32 = torch.float32
    left, right = (t.to(f32).contiguous() for t in (rotation_left, rotation_right))
    # Without signs the pointer is never read; pass any fp32 tensor.
    signs = left if input_signs is None else input_signs.to(f32).contiguous()
    k2_padded = padded_columns_of_u(k2)
    most = most_column_splits(k2)
    if column_splits is not None and (column_splits < 1 or column_splits & (column_splits - 1) or column_splits > most):
        raise ValueError(f"column_splits={column_splits}: need a power of two from 1 to {most}")
    if config is None and x.device.type != "cuda":
        config = _ROTATE_INTERPRETER_CONFIG
    if config is None:
        kernel, tile = _rotate_tuned, {}
    else:
        kernel, tile = _rotate_kernel, {**config, "COLUMN_SPLITS": column_splits or 1}
    launch = dependent_launch(x.device)
    kernel[lambda meta: (tokens, triton.cdiv(k1, meta["BLOCK_I"]), meta["COLUMN_SPLITS"])](
        rows, signs, left, right, rotated, features, k1, k2, rows.stride(0), rotated.stride(0),
        min(triton.next_power_of_2(tokens), 256), column_splits or 0,
        K2_PADDED=k2_padded, BLOCK_J=min(_COLUMN_CHUNK, k2_padded),
        PRECISION="ieee" if x.dtype in (f32, torch.float64) else "tf32", HAS_SIGNS=input_signs is not None, PDL=bool(launch),
        **launch, **tile,
    )
    return rotated


def lift_activation_triton(
    x: torch.Tensor, input_signs: Optional[torch.Tensor], rotation_left: torch.Tensor,
    rotation_right: torch.Tensor, mapping: torch.Tensor, column_splits: Optional[int] = None,
) -> torch.Tensor:
    """Lifted activation with the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        x, input_signs, rotation_left, rotation_right, column_splits: as in :func:`rotate_triton`.
        mapping: (d, D) float32 lattice matrix M.
    Returns:
        (..., Kp·D/d) in x.dtype.
    """
    rotated = rotate_triton(x, input_signs, rotation_left, rotation_right, column_splits)  # checks the device first
    tokens, padded = rotated.shape
    d, D = mapping.shape
    n_blocks = padded // d
    out = torch.empty(tokens, n_blocks * D, dtype=x.dtype, device=x.device)
    launch = dependent_launch(x.device)
    if tokens > 0:
        _lift_blocks_kernel[(tokens, triton.cdiv(n_blocks, _BLOCKS_PER_PROGRAM))](
            rotated, mapping.to(torch.float32).contiguous(), out, n_blocks, d, D, rotated.stride(0), out.stride(0),
            BLOCKS=_BLOCKS_PER_PROGRAM, D_IN_PADDED=max(16, triton.next_power_of_2(d)),
            D_OUT_PADDED=max(16, triton.next_power_of_2(D)), num_warps=4, PDL=bool(launch), **launch,
        )
    return out.reshape(*x.shape[:-1], n_blocks * D)
