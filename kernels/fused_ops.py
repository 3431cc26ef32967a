"""Fused LiftQuant ops that the Inductor passes (:mod:`lift_ao.passes`) put in place of the two-op chain.

The model itself only ever emits ``lift_activation`` → ``lifted_matmul`` (see :mod:`lift_ao.tensor`);
these ops appear only in compiled graphs, after the passes rewrite them. Both are opaque
``torch.library.custom_op``s, so Inductor keeps each as one node / launch.

- ``lift_ao::lifted_linear(x, input_signs?, rotation_left, rotation_right, mapping, packed_codes,
  row_scale, bias?) -> y``: one linear, the lift in the matmul's prologue.
- ``lift_ao::lifted_linear_group(x, folded_signs?, input_signs[], rotation_left[], rotation_right[],
  mapping[], packed_codes[], row_scale[], bias?[]) -> y[]``: sibling linears (q/k/v, gate/up) that
  read the same activation; siblings whose transforms are the same tensors share one lift.

When the scale-folding pass has multiplied the signs into the producer of ``x`` (the RMSNorm
weight), ``lifted_linear`` gets ``input_signs=None`` and ``lifted_linear_group`` gets those signs as
``folded_signs``.

The default implementation (every device) composes the base ops through the dispatcher, so on a
device where they have kernels (Triton on CUDA) it already runs them, computing a shared lift once;
its outputs equal the unfused chain's exactly (x̃ is rounded to ``x.dtype`` as there). A fused
device kernel registers itself with ``lifted_linear.register_kernel("cuda")``; it may keep x̃ in
float32, which changes 16-bit outputs by at most that rounding.

Like the base ops, the fused ops get their inputs with the strides they have in eager (Inductor's
default for custom ops): kernels must take strides (the Kronecker factors of non-power-of-two sizes
come out of a QR column-major) or make their own contiguous copies.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["check_siblings", "compose_group", "lifted_linear", "lifted_linear_group", "shared_lifts"]

@torch.library.custom_op("lift_ao::lifted_linear", mutates_args=())
def lifted_linear(
    x: torch.Tensor, input_signs: Optional[torch.Tensor], rotation_left: torch.Tensor,
    rotation_right: torch.Tensor, mapping: torch.Tensor, packed_codes: torch.Tensor,
    row_scale: torch.Tensor, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y = r ⊙ (Q · lift(Rᵀ pad(x))) + b`` in one op.

    Args:
        x: (..., K) activation, K ≤ Kp = k1·k2.
        input_signs: (Kp,) float32 (±1, or ±1/s when calibrated), or None when already multiplied into
            x (scale folding).
        rotation_left: (k1, k1), rotation_right: (k2, k2) float32.
        mapping: (d, D) float32 lattice matrix M.
        packed_codes: packed_shape(N, L) int32, L = Kp·D/d (layout of :mod:`lift_ao.packing`).
        row_scale: (N,) float32 (N counts the rows).
        bias: (N,) or None.
    Returns:
        (..., N) in x.dtype.
    """
    lifted = torch.ops.lift_ao.lift_activation(x, input_signs, rotation_left, rotation_right, mapping)
    return torch.ops.lift_ao.lifted_matmul(lifted, packed_codes, row_scale, bias)


@lifted_linear.register_fake
def _(x, input_signs, rotation_left, rotation_right, mapping, packed_codes, row_scale, bias):
    return x.new_empty(*x.shape[:-1], row_scale.shape[0])


def _same_tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's data (address, layout): equal keys ⇒ equal values, no device work."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


@torch.library.custom_op("lift_ao::lifted_linear_group", mutates_args=())
def lifted_linear_group(
    x: torch.Tensor, folded_signs: Optional[torch.Tensor], input_signs: list[torch.Tensor],
    rotation_left: list[torch.Tensor], rotation_right: list[torch.Tensor], mapping: list[torch.Tensor],
    packed_codes: list[torch.Tensor], row_scale: list[torch.Tensor], bias: list[Optional[torch.Tensor]],
) -> list[torch.Tensor]:
    """G sibling linears reading the same activation: ``y_i = r_i ⊙ (Q_i · lift_i(R_iᵀ pad(x))) + b_i``.

    ``x`` arrives already multiplied by ``folded_signs[:K]`` = f (the scale-folding pass moved them
    into the RMSNorm weight), so sibling i applies the diagonal ``s_i[:K] / f`` instead of ``s_i``:
    nothing at all when ``s_i`` *is* f. Only the first K entries of any signs matter (the padding is
    zero), so siblings may have different Kp (lattices with different d).

    Siblings whose (diagonal, left, right, mapping) are the same tensors (same address and layout, as
    LiftQuantTensor's shared rotations are) share one lifted activation. The check is on the host, so
    the sharing stays correct if a weight is later swapped for one with another transform.

    Args:
        x: (..., K) activation.
        folded_signs: (Kp_f,) float32, Kp_f ≥ K, whose first K entries x was multiplied by; or None.
        input_signs: G × (Kp_i,) float32; rotation_left: G × (k1_i, k1_i); rotation_right: G × (k2_i, k2_i);
            mapping: G × (d_i, D_i) — each sibling's transform (see :func:`lifted_linear`).
        packed_codes: G × packed_shape(N_i, L_i) int32, L_i = Kp_i·D_i/d_i.
        row_scale: G × (N_i,) float32.
        bias: G entries, each (N_i,) or None.
    Returns:
        G tensors (..., N_i) in x.dtype.
    """
    return compose_group(x, folded_signs, input_signs, rotation_left, rotation_right, mapping, packed_codes,
                         row_scale, bias)


def check_siblings(*per_sibling: list) -> None:
    """Every per-sibling list of a group op has the same G ≥ 1 entries."""
    if not per_sibling[0] or len({len(column) for column in per_sibling}) != 1:
        raise ValueError("lifted_linear_group needs G ≥ 1 entries in every per-sibling list")


def shared_lifts(x, folded_signs, input_signs, rotation_left, rotation_right, mapping) -> list[tuple[tuple, list[int]]]:
    """The distinct lifts of a sibling group: ``[(lift_args, siblings)]`` where ``lift_args`` =
    (x', signs or None, left, right, mapping) are :func:`lift_activation`'s arguments and ``siblings``
    the indices of the linears that read that lift (same diagonal, rotation and M tensors).

    Args: as :func:`lifted_linear_group` (x, folded_signs and the per-sibling transform lists).
    """
    check_siblings(input_signs, rotation_left, rotation_right, mapping)
    k = x.shape[-1]
    lifts: dict[tuple, tuple[tuple, list[int]]] = {}
    for index, (signs, left, right, lattice_map) in enumerate(zip(input_signs, rotation_left, rotation_right, mapping)):
        same_as_folded = folded_signs is not None and _same_tensor_key(signs) == _same_tensor_key(folded_signs)
        key = (None if same_as_folded else _same_tensor_key(signs),) + tuple(
            _same_tensor_key(t) for t in (left, right, lattice_map)
        )
        if key not in lifts:
            if same_as_folded:
                lift_args = (x, None, left, right, lattice_map)
            elif folded_signs is None:
                lift_args = (x, signs, left, right, lattice_map)
            else:  # another transform than the folded one (a weight swapped after compiling)
                lift_args = (x * (signs[:k] / folded_signs[:k]).to(x.dtype), None, left, right, lattice_map)
            lifts[key] = (lift_args, [])
        lifts[key][1].append(index)
    return list(lifts.values())


def compose_group(x, folded_signs, input_signs, rotation_left, rotation_right, mapping, packed_codes, row_scale,
                  bias) -> list[torch.Tensor]:
    """:func:`lifted_linear_group` from the base ops, each shared lift computed once."""
    check_siblings(input_signs, packed_codes, row_scale, bias)
    outputs: list = [None] * len(packed_codes)
    for lift_args, siblings in shared_lifts(x, folded_signs, input_signs, rotation_left, rotation_right, mapping):
        lifted = torch.ops.lift_ao.lift_activation(*lift_args)
        for i in siblings:
            outputs[i] = torch.ops.lift_ao.lifted_matmul(lifted, packed_codes[i], row_scale[i], bias[i])
    return outputs


@lifted_linear_group.register_fake
def _(x, folded_signs, input_signs, rotation_left, rotation_right, mapping, packed_codes, row_scale, bias):
    return [x.new_empty(*x.shape[:-1], scale.shape[0]) for scale in row_scale]
