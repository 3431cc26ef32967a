"""The LiftQuant ops, registered with ``torch.library``.

Two opaque custom ops, so ``torch.compile`` keeps each as one graph node that the passes in
``lift_ao.passes`` can recognise and rewrite:

- ``lift_ao::lift_activation(x, input_signs?, rotation_left, rotation_right, mapping) -> lifted``
  x (..., K) → x̃ (..., Kp·D/d): rotate then lift each d-block with Mᵀ. ``input_signs=None`` means
  x already carries the signs (the scale-folding pass multiplied them into the RMSNorm weight).
- ``lift_ao::lifted_matmul(lifted, packed_codes, row_scale, bias) -> y``
  x̃ (..., L), codes packed_shape(N, L) int32 (lift_ao.packing), r (N,) → y (..., N) = r ⊙ (Q x̃) + b;
  N is the row scales' length (the packed codes hold whole groups of 32 rows).

The default implementation of each is the pure-PyTorch reference (CPU and any device); faster
device kernels register themselves per device type with ``op.register_kernel(...)``. Both have fake
(meta) implementations for tracing and autograd formulas for the activation (weights are frozen).
"""

from __future__ import annotations

from typing import Optional

import torch

from lift_ao.packing import check_packed
from lift_ao.transform import check_rotation

from .reference import (
    lift_activation_backward_reference,
    lift_activation_reference,
    lifted_matmul_backward_reference,
    lifted_matmul_reference,
)

__all__ = ["lift_activation", "lifted_matmul"]


def _lifted_length(rotation_left: torch.Tensor, rotation_right: torch.Tensor, mapping: torch.Tensor) -> int:
    d, D = mapping.shape
    return rotation_left.shape[0] * rotation_right.shape[0] // d * D


def _check_lift_args(x, input_signs, rotation_left, rotation_right, mapping):
    check_rotation(input_signs, rotation_left, rotation_right)
    kp = rotation_left.shape[0] * rotation_right.shape[0]
    if kp % mapping.shape[0]:
        raise ValueError(f"inconsistent transform: Kp = {kp} (left {tuple(rotation_left.shape)}, right "
                         f"{tuple(rotation_right.shape)}) is not a multiple of the mapping's d, {tuple(mapping.shape)}")
    # The op sees Kp, not K: it pads any K ≤ Kp. No weight has K = 0 (quantizing refuses empty weights).
    if not 0 < x.shape[-1] <= kp:
        raise ValueError(f"activation has {x.shape[-1]} input features, the weight expects 1 to {kp}")
    if not x.is_floating_point():
        raise TypeError(f"activation must be floating point, got {x.dtype}")


@torch.library.custom_op("lift_ao::lift_activation", mutates_args=())
def lift_activation(
    x: torch.Tensor, input_signs: Optional[torch.Tensor], rotation_left: torch.Tensor,
    rotation_right: torch.Tensor, mapping: torch.Tensor,
) -> torch.Tensor:
    """Lifted activation x̃ = lift(Rᵀ pad(x)); (..., K) → (..., Kp·D/d), dtype of x."""
    _check_lift_args(x, input_signs, rotation_left, rotation_right, mapping)
    return lift_activation_reference(x, input_signs, rotation_left, rotation_right, mapping)


@lift_activation.register_fake
def _(x, input_signs, rotation_left, rotation_right, mapping):
    return x.new_empty(*x.shape[:-1], _lifted_length(rotation_left, rotation_right, mapping))


def _lift_setup_context(ctx, inputs, output):
    x, input_signs, rotation_left, rotation_right, mapping = inputs
    ctx.save_for_backward(input_signs, rotation_left, rotation_right, mapping)
    ctx.in_features = x.shape[-1]


def _lift_backward(ctx, grad_lifted):
    input_signs, rotation_left, rotation_right, mapping = ctx.saved_tensors
    grad_x = lift_activation_backward_reference(
        grad_lifted, input_signs, rotation_left, rotation_right, mapping, ctx.in_features
    )
    return grad_x, None, None, None, None


lift_activation.register_autograd(_lift_backward, setup_context=_lift_setup_context)


@torch.library.custom_op("lift_ao::lifted_matmul", mutates_args=())
def lifted_matmul(
    lifted: torch.Tensor, packed_codes: torch.Tensor, row_scale: torch.Tensor, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """y = r ⊙ (Q x̃) + b; x̃ (..., L), packed_codes packed_shape(N, L) int32, row_scale (N,) → (..., N),
    dtype of x̃."""
    _check_matmul_args(lifted, packed_codes, row_scale, bias)
    return lifted_matmul_reference(lifted, packed_codes, row_scale, bias)


def _check_matmul_args(lifted, packed_codes, row_scale, bias) -> None:
    """What the op's result relies on (the codes' padding hides a lifted length off by < 128)."""
    if not lifted.is_floating_point():
        raise ValueError(f"lifted_matmul: the lifted activation must be floating point, got {lifted.dtype}")
    _check_weight_args(packed_codes, row_scale, bias, lifted.shape[-1])


def _check_weight_args(packed_codes, row_scale, bias, length: int) -> None:
    """One ±1 matmul's weight arguments for a lifted length ``length``: (N,) row scales, an (N,) bias or
    None, codes of N rows × ``length`` bits. The CUDA kernels run these checks too: they would read a
    wrong-shaped scale or bias as if it were right (or past its end)."""
    if row_scale.dim() != 1:
        raise ValueError(f"lifted_matmul: row_scale must be (N,), got {tuple(row_scale.shape)}")
    if bias is not None and tuple(bias.shape) != tuple(row_scale.shape):
        raise ValueError(f"lifted_matmul: bias must be (N,) = {tuple(row_scale.shape)}, got {tuple(bias.shape)}")
    check_packed(packed_codes, row_scale.shape[0], length,
                 "lifted_matmul: the codes do not match the row scales and the lifted activation")


@lifted_matmul.register_fake
def _(lifted, packed_codes, row_scale, bias):
    _check_matmul_args(lifted, packed_codes, row_scale, bias)
    return lifted.new_empty(*lifted.shape[:-1], row_scale.shape[0])


def _matmul_setup_context(ctx, inputs, output):
    lifted, packed_codes, row_scale, bias = inputs
    ctx.save_for_backward(packed_codes, row_scale)
    ctx.code_length = lifted.shape[-1]


def _matmul_backward(ctx, grad_out):
    packed_codes, row_scale = ctx.saved_tensors
    grad_lifted = lifted_matmul_backward_reference(grad_out, packed_codes, row_scale, ctx.code_length)
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None  # 1-D too
    return grad_lifted, None, None, grad_bias


lifted_matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)
