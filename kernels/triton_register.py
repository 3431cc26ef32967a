"""CUDA registrations of the Triton kernels for the ``lift_ao`` custom ops.

The ops keep their names and fake impls (``kernels/ops.py``, ``kernels/fused_ops.py``); this only adds
a CUDA kernel to each, so CPU keeps the reference and ``torch.compile(fullgraph=True)`` still sees one
opaque op node. Up to ``LOOKUP_MAX_TOKENS`` tokens (decode) take the table-lookup kernel, more the ±1
GEMM. The fused ops (``lifted_linear``, ``lifted_linear_group``, put in place by the passes) decode
in three launches per shared lift: the rotation, the lift written straight into lookup tables, and
one lookup launch for all siblings reading that lift (q/k/v, gate/up) with its split-K reduction
inside; x̃ stays in fp32 there (the composition rounds it to the activation dtype). On Hopper and
newer the three launch with programmatic dependent launch (``triton_matmul.dependent_launch``), so
each one's launch overlaps the previous kernel's tail.

From ``REBUILD_MIN_TOKENS`` tokens (prefill) the fused ops skip the lift: per shared lift the rotation
writes u = Rᵀ pad(x) in the activation dtype, and per sibling the weight is rebuilt in the rotated
domain (:func:`~lift_ao.kernels.triton_dequant.rebuild_rotated_weight`, one pass over its codes)
for a cuBLAS GEMM ``u · W_rotᵀ + b`` (addmm): D/d times fewer MACs than the ±1 GEMM over
x̃, for a fixed cost per weight. Between the two thresholds the ±1 GEMM stays: on the H100 at 2.4 bits
the rebuild plus the rotation cost more than it below ~256 tokens (NOTES_kernels.md, round 5). There
the fused ops lift once per shared lift and run the ±1 GEMM per sibling. ``lifted_matmul`` itself
(given x̃, not x) always takes the lookup kernel or the ±1 GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch

from lift_ao.packing import words_per_row

from .fused_ops import check_siblings, lifted_linear, lifted_linear_group, shared_lifts
from .ops import (_check_lift_args, _check_matmul_args, _check_weight_args, _lifted_length, lift_activation,
                  lifted_matmul)
from . import triton_lut
from .triton_dequant import padded_columns, rebuild_rotated_weight
from .triton_lift import lift_activation_triton, rotate_triton
from .triton_matmul import lifted_matmul_triton

__all__ = ["register_cuda_kernels"]

_registered = False
# Token counts up to this take the table-lookup kernel (kernels/triton_lut.py), larger ones the ±1
# GEMM (kernels/triton_matmul.py). H200, 2.4 bits, lookup (with its tables) vs GEMM, µs: 28672×8192
# 67 vs 120 at 2 tokens, 156 vs 120 at 4; 4096×4096 18 vs 19, 25 vs 19 (kernels_lookup_r11_h200.json).
LOOKUP_MAX_TOKENS = 2
# From this many tokens the fused ops rebuild the weight in the rotated domain and run cuBLAS. H100,
# 2.4 bits (benchmarks/results/kernels_prefill_h100.md), rebuilt vs lift + ±1 GEMM, µs: 4096×14336
# 176 vs 96 at 64 tokens, 262 vs 298 at 256, 644 vs 1004 at 1024; 14336×4096 162 vs 76, 188 vs 188,
# 368 vs 612. The rebuild costs ~95 µs per call whatever the tokens; the ±1 GEMM grows ~1 µs a token.
# Re-measure with ``kernel_speed.py --prefill-study`` when either side changes.
REBUILD_MIN_TOKENS = 256


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _is_decode(x: torch.Tensor) -> bool:
    """1 to LOOKUP_MAX_TOKENS rows of activations: the table-lookup path."""
    return 0 < _tokens(x) <= LOOKUP_MAX_TOKENS


def _is_prefill(x: torch.Tensor) -> bool:
    """At least REBUILD_MIN_TOKENS rows of activations: the rebuilt-weight path of the fused ops."""
    return _tokens(x) >= REBUILD_MIN_TOKENS


def _lift_activation_cuda(x, input_signs, rotation_left, rotation_right, mapping):
    _check_lift_args(x, input_signs, rotation_left, rotation_right, mapping)
    return lift_activation_triton(x, input_signs, rotation_left, rotation_right, mapping)


def _lifted_matmul_cuda(lifted, packed_codes, row_scale, bias: Optional[torch.Tensor]):
    """The lookup kernel for up to LOOKUP_MAX_TOKENS tokens, else the ±1 GEMM."""
    _check_matmul_args(lifted, packed_codes, row_scale, bias)
    if not _is_decode(lifted):
        return lifted_matmul_triton(lifted, packed_codes, row_scale, bias)
    return triton_lut.lookup_matmul(lifted, packed_codes.contiguous(), row_scale, bias)


def _check_siblings_of_lift(lift_args: tuple, packed_codes: list, row_scale: list, bias: list) -> None:
    """Check one shared lift's arguments and its siblings' codes, scales and biases. The fused entries run it
    for every lift before any launch; the paths below take their arguments as checked."""
    _check_lift_args(*lift_args)
    length = _lifted_length(*lift_args[2:])
    for codes, scale, b in zip(packed_codes, row_scale, bias):
        _check_weight_args(codes, scale, b, length)


def _decode_siblings(lift_args: tuple, packed_codes: list, row_scale: list, bias: list) -> list[torch.Tensor]:
    """Siblings reading one lift, at most LOOKUP_MAX_TOKENS tokens: rotation, tables built from the
    rotated activation, one lookup launch (per ≤ 3 siblings of equal bias presence)."""
    x, signs, left, right, mapping = lift_args
    length = _lifted_length(left, right, mapping)
    tokens = _tokens(x)
    # The tables and lookup kernels read M and the codes before waiting for the launch before them,
    # so any copy that makes these (fp32, contiguous) must run before the rotation, not between.
    mapping = mapping.to(torch.float32).contiguous()
    codes = [c.contiguous() for c in packed_codes]
    rotated = rotate_triton(x, signs, left, right)
    counters = torch.empty(triton_lut.split_counter_count([s.shape[0] for s in row_scale]), dtype=torch.int32,
                           device=x.device)
    tables = triton_lut.lift_tables(rotated, mapping, words_per_row(length), triton_lut.token_block(tokens),
                                    zero_counters=counters)
    outs = triton_lut.lookup_siblings(tables, tokens, codes, row_scale, bias, x.dtype, counters=counters)
    return [out.reshape(*x.shape[:-1], out.shape[-1]) for out in outs]


def _prefill_siblings(lift_args: tuple, packed_codes: list, row_scale: list, bias: list) -> list[torch.Tensor]:
    """Siblings reading one lift, at least REBUILD_MIN_TOKENS tokens: the rotation once, then per
    sibling its rotated-domain weight and one cuBLAS GEMM with the bias.

    Both GEMM operands have rows zero-padded to ``padded_columns(Kp)`` (cuBLAS's fast kernels need
    aligned rows). One GEMM per sibling: a GEMM over siblings concatenated along N would return
    column slices of one tensor, and a custom op's outputs may not alias each other.
    """
    x, signs, left, right, mapping = lift_args
    kp = left.shape[0] * right.shape[0]
    columns = padded_columns(kp)
    rotated = x.new_empty(_tokens(x), columns)
    rotated[:, kp:].zero_()
    rotate_triton(x, signs, left, right, out=rotated[:, :kp])
    outs = []
    for codes, scale, b in zip(packed_codes, row_scale, bias):
        weight_t = rebuild_rotated_weight(codes, scale, mapping, kp, x.dtype).T
        out = torch.mm(rotated, weight_t) if b is None else torch.addmm(b.to(x.dtype), rotated, weight_t)
        outs.append(out.reshape(*x.shape[:-1], out.shape[-1]))
    return outs


def _gemm_siblings(lift_args: tuple, packed_codes: list, row_scale: list, bias: list) -> list[torch.Tensor]:
    """Siblings reading one lift, between the decode and prefill thresholds: the lift once, then per
    sibling the ±1 GEMM (which prepares its own operand from x̃).

    Sharing the prepared operand too, or writing the lift straight in the operand's permuted layout,
    saves launches but measured no faster under programmatic dependent launch on an H100 (one 8B
    layer at 4-16 tokens; NOTES_kernels.md, round 14)."""
    lifted = lift_activation_triton(*lift_args)
    return [lifted_matmul_triton(lifted, codes, scale, b) for codes, scale, b in zip(packed_codes, row_scale, bias)]


def _siblings_path(x: torch.Tensor):
    """The fused ops' path for x's token count: lookup, ±1 GEMM or rebuilt weight."""
    return _decode_siblings if _is_decode(x) else _prefill_siblings if _is_prefill(x) else _gemm_siblings


def _lifted_linear_cuda(x, input_signs, rotation_left, rotation_right, mapping, packed_codes, row_scale, bias):
    """Decode: three launches (rotation, tables, lookup); prefill: rotation, rebuilt weight, cuBLAS;
    in between the lift then the ±1 GEMM."""
    lift_args = (x, input_signs, rotation_left, rotation_right, mapping)
    _check_siblings_of_lift(lift_args, [packed_codes], [row_scale], [bias])
    return _siblings_path(x)(lift_args, [packed_codes], [row_scale], [bias])[0]


def _lifted_linear_group_cuda(x, folded_signs, input_signs, rotation_left, rotation_right, mapping,
                              packed_codes, row_scale, bias):
    """Per shared lift: decode, the rotation, its tables and one lookup launch for its siblings;
    prefill, the rotation and per sibling its rebuilt weight and a cuBLAS GEMM; in between the lift
    and per sibling a ±1 GEMM on it."""
    siblings_path = _siblings_path(x)
    check_siblings(input_signs, packed_codes, row_scale, bias)
    lifts = shared_lifts(x, folded_signs, input_signs, rotation_left, rotation_right, mapping)
    for lift_args, siblings in lifts:  # every sibling before any launch
        _check_siblings_of_lift(lift_args, [packed_codes[i] for i in siblings], [row_scale[i] for i in siblings],
                                [bias[i] for i in siblings])
    outputs: list = [None] * len(packed_codes)
    for lift_args, siblings in lifts:
        outs = siblings_path(lift_args, [packed_codes[i] for i in siblings], [row_scale[i] for i in siblings],
                             [bias[i] for i in siblings])
        for i, out in zip(siblings, outs):
            outputs[i] = out
    return outputs


def register_cuda_kernels() -> None:
    """Make the CUDA dispatch of the ops run the Triton kernels (idempotent)."""
    global _registered
    if _registered:
        return
    lift_activation.register_kernel("cuda")(_lift_activation_cuda)
    lifted_matmul.register_kernel("cuda")(_lifted_matmul_cuda)
    lifted_linear.register_kernel("cuda")(_lifted_linear_cuda)
    lifted_linear_group.register_kernel("cuda")(_lifted_linear_group_cuda)
    _registered = True
