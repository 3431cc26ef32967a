"""Fused LiftQuant ops that the Inductor passes (:mod:`lift_ao.passes`) put in place of the two-op chain.

The model itself only ever emits ``lift_activation`` → ``lifted_matmul`` (see :mod:`lift_ao.tensor`);
these ops appear only in compiled graphs, after the passes rewrite them. Both are opaque
``torch.library.custom_op``s so Inductor keeps each as one launch. The default implementation is the
pure-PyTorch reference (any device); a device kernel registers itself with
``lifted_linear.register_kernel("cuda")`` like the base ops.

- ``lift_ao::lifted_linear(x, input_signs?, rotation_left, rotation_right, mapping, packed_codes,
  row_scale, bias?) -> y``: one linear, lift in the matmul's prologue.
- ``lift_ao::lifted_linear_group(x, folded_signs?, input_signs[], rotation_left[], rotation_right[],
  mapping[], packed_codes[], row_scale[], bias?[]) -> y[]``: sibling linears (q/k/v, gate/up) that
  read the same activation; siblings whose transforms are the same tensors share one lift.

When the scale-folding pass has multiplied the signs into the producer of ``x`` (the RMSNorm
weight), ``lifted_linear`` gets ``input_signs=None`` and ``lifted_linear_group`` gets the folded
signs as ``folded_signs``.
Unlike the unfused chain, the lifted activation x̃ is never rounded to ``x.dtype`` (it stays float32
between the lift and the matmul), so bf16 outputs may differ from the unfused path by that rounding;
float32 outputs are identical.

Like the base ops, the fused ops get their inputs with the strides they have in eager (Inductor's
default for custom ops): kernels must take strides (the Kronecker factors of non-power-of-two sizes
come out of a QR column-major) or make their own contiguous copies.
"""

from __future__ import annotations

from typing import Optional

import torch

from lift_ao.packing import words_per_row

from .reference import lift_activation_reference, lifted_matmul_reference

__all__ = ["lifted_linear", "lifted_linear_group"]


def _check_fused_args(x, input_signs, rotation_left, rotation_right, mapping, packed_codes):
    kp = rotation_left.shape[0] * rotation_right.shape[0]
    d, D = mapping.shape
    if kp % d or (input_signs is not None and input_signs.shape[0] != kp):
        raise ValueError(
            f"inconsistent transform: signs {None if input_signs is None else tuple(input_signs.shape)}, "
            f"left {tuple(rotation_left.shape)}, right {tuple(rotation_right.shape)}, mapping {tuple(mapping.shape)}"
        )
    if x.shape[-1] > kp or not x.is_floating_point():
        raise ValueError(f"activation {x.dtype} {tuple(x.shape)} does not fit a rotation of {kp} features")
    code_length = kp // d * D
    for codes in packed_codes:
        if codes.dtype != torch.int32 or codes.shape[1] != words_per_row(code_length):
            raise ValueError(
                f"packed codes {codes.dtype} {tuple(codes.shape)} do not match a lifted activation of "
                f"length {code_length} (expected int32 with {words_per_row(code_length)} words per row)"
            )


def _lift_float32(x, diagonal, rotation_left, rotation_right, mapping) -> torch.Tensor:
    """x̃ in float32, (..., K) → (..., Kp·D/d), with ``x ⊙ diagonal[:K]`` (None: no diagonal) rotated.

    Only the first K entries of a diagonal matter (the padding is zero), which lets siblings with
    different padded sizes (lattices with different d) share one folded diagonal.
    """
    x = x.to(torch.float32)
    if diagonal is not None:
        x = x * diagonal[: x.shape[-1]].to(torch.float32)
    kp = rotation_left.shape[0] * rotation_right.shape[0]
    no_signs = torch.ones(kp, dtype=torch.float32, device=x.device)
    return lift_activation_reference(x, no_signs, rotation_left, rotation_right, mapping)


@torch.library.custom_op("lift_ao::lifted_linear", mutates_args=())
def lifted_linear(
    x: torch.Tensor, input_signs: Optional[torch.Tensor], rotation_left: torch.Tensor,
    rotation_right: torch.Tensor, mapping: torch.Tensor, packed_codes: torch.Tensor,
    row_scale: torch.Tensor, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y = r ⊙ (Q · lift(Rᵀ pad(x))) + b`` in one op.

    Args:
        x: (..., K) activation, K ≤ Kp = k1·k2.
        input_signs: (Kp,) float32 ±1, or None when folded into the producer of x.
        rotation_left: (k1, k1), rotation_right: (k2, k2) float32.
        mapping: (d, D) float32 lattice matrix M.
        packed_codes: (N, ceil(L/32)) int32, L = Kp·D/d (layout of :mod:`lift_ao.packing`).
        row_scale: (N,) float32.
        bias: (N,) or None.
    Returns:
        (..., N) in x.dtype (float32 accumulation).
    """
    _check_fused_args(x, input_signs, rotation_left, rotation_right, mapping, [packed_codes])
    lifted = _lift_float32(x, input_signs, rotation_left, rotation_right, mapping)
    return lifted_matmul_reference(lifted, packed_codes, row_scale, bias).to(x.dtype)


@lifted_linear.register_fake
def _(x, input_signs, rotation_left, rotation_right, mapping, packed_codes, row_scale, bias):
    return x.new_empty(*x.shape[:-1], packed_codes.shape[0])


def _same_tensor_key(t: Optional[torch.Tensor]) -> tuple:
    """Identity of a tensor's data (address, layout): equal keys ⇒ equal values, no device work."""
    if t is None:
        return (None,)
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


@torch.library.custom_op("lift_ao::lifted_linear_group", mutates_args=())
def lifted_linear_group(
    x: torch.Tensor, folded_signs: Optional[torch.Tensor], input_signs: list[torch.Tensor],
    rotation_left: list[torch.Tensor], rotation_right: list[torch.Tensor], mapping: list[torch.Tensor],
    packed_codes: list[torch.Tensor], row_scale: list[torch.Tensor], bias: list[Optional[torch.Tensor]],
) -> list[torch.Tensor]:
    """G sibling linears reading the same activation: ``y_i = r_i ⊙ (Q_i · lift_i(R_iᵀ pad(x_i))) + b_i``.

    ``x`` arrives already multiplied by ``folded_signs[:K]`` = f (the scale-folding pass moved them
    into the RMSNorm weight), so sibling i applies the diagonal ``s_i[:K] / f`` (``s_i`` without f):
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
        packed_codes: G × (N_i, ceil(L_i/32)) int32, L_i = Kp_i·D_i/d_i.
        row_scale: G × (N_i,) float32.
        bias: G entries, each (N_i,) or None.
    Returns:
        G tensors (..., N_i) in x.dtype.
    """
    siblings = list(zip(input_signs, rotation_left, rotation_right, mapping, packed_codes, row_scale, bias))
    if not siblings or len({len(input_signs), len(rotation_left), len(rotation_right), len(mapping),
                            len(packed_codes), len(row_scale), len(bias)}) != 1:
        raise ValueError("lifted_linear_group needs G ≥ 1 entries in every per-sibling list")
    lifted_by_transform: dict[tuple, torch.Tensor] = {}
    outputs = []
    for signs, left, right, lattice_map, codes, scale, b in siblings:
        _check_fused_args(x, signs, left, right, lattice_map, [codes])
        same_as_folded = folded_signs is not None and _same_tensor_key(signs) == _same_tensor_key(folded_signs)
        key = (None if same_as_folded else _same_tensor_key(signs),) + tuple(
            _same_tensor_key(t) for t in (left, right, lattice_map)
        )
        if key not in lifted_by_transform:
            if same_as_folded or folded_signs is None:
                diagonal = None if same_as_folded else signs
            else:
                diagonal = signs[: x.shape[-1]] / folded_signs[: x.shape[-1]]
            lifted_by_transform[key] = _lift_float32(x, diagonal, left, right, lattice_map)
        outputs.append(lifted_matmul_reference(lifted_by_transform[key], codes, scale, b).to(x.dtype))
    return outputs


@lifted_linear_group.register_fake
def _(x, folded_signs, input_signs, rotation_left, rotation_right, mapping, packed_codes, row_scale, bias):
    return [x.new_empty(*x.shape[:-1], codes.shape[0]) for codes in packed_codes]
