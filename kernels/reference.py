"""Pure-PyTorch reference implementations of the LiftQuant ops (any device).

``lift_activation``: x̃ = lift(Rᵀ pad(x)): rotate the activation, then map each block of ``d``
coordinates to the lifted space with ``Mᵀ`` (length ``D``).
``lifted_matmul``: y = r ⊙ (Q · x̃) + b with Q the ±1 codes unpacked chunk by chunk, so the extra
memory is bounded by ``_ROWS_PER_CHUNK × L`` floats and no dense weight is ever built.
"""

from __future__ import annotations

from typing import Optional

import torch

from lift_ao.packing import GROUP_ROWS, unpack_codes
from lift_ao.transform import rotate, unrotate

# Rows of Q unpacked at a time: 1024 rows × L = 2.4·4096 floats ≈ 40 MB.
_ROWS_PER_CHUNK = 1024


def lift_activation_reference(
    x: torch.Tensor, input_signs: Optional[torch.Tensor], rotation_left: torch.Tensor,
    rotation_right: torch.Tensor, mapping: torch.Tensor,
) -> torch.Tensor:
    """Lifted activation.

    Args:
        x: (..., K) activation.
        input_signs: (Kp,) or None (x already carries them), rotation_left: (k1, k1),
            rotation_right: (k2, k2) — the rotation.
        mapping: (d, D) lattice matrix M.
    Returns:
        (..., Kp·D/d) in x.dtype (computed in float32).
    """
    f32 = torch.float32
    signs = None if input_signs is None else input_signs.to(f32)
    u = rotate(x.to(f32), signs, rotation_left.to(f32), rotation_right.to(f32))
    d = mapping.shape[0]
    lifted = u.unflatten(-1, (-1, d)) @ mapping.to(f32)
    return lifted.flatten(-2).to(x.dtype)


def lift_activation_backward_reference(
    grad_lifted: torch.Tensor, input_signs: Optional[torch.Tensor], rotation_left: torch.Tensor,
    rotation_right: torch.Tensor, mapping: torch.Tensor, in_features: int,
) -> torch.Tensor:
    """Adjoint of :func:`lift_activation_reference` (gradient w.r.t. x).

    Args:
        grad_lifted: (..., Kp·D/d).
    Returns:
        (..., in_features) in grad_lifted.dtype.
    """
    f32 = torch.float32
    D = mapping.shape[1]
    grad_u = (grad_lifted.to(f32).unflatten(-1, (-1, D)) @ mapping.to(f32).T).flatten(-2)
    signs = None if input_signs is None else input_signs.to(f32)
    grad_x = unrotate(grad_u, signs, rotation_left.to(f32), rotation_right.to(f32), in_features)
    return grad_x.to(grad_lifted.dtype)


def _unpacked_signs(packed_codes: torch.Tensor, code_length: int, rows: int, start: int) -> torch.Tensor:
    """±1 float32 codes of rows [start, start + _ROWS_PER_CHUNK) ∩ [0, rows); start a multiple of 32."""
    groups = packed_codes[start // GROUP_ROWS:(start + _ROWS_PER_CHUNK) // GROUP_ROWS]
    return unpack_codes(groups, code_length, min(rows - start, _ROWS_PER_CHUNK)).to(torch.float32) * 2 - 1


def lifted_matmul_reference(
    lifted: torch.Tensor, packed_codes: torch.Tensor, row_scale: torch.Tensor, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y = r ⊙ (Q · x̃) + b``.

    Args:
        lifted: (..., L) lifted activation x̃.
        packed_codes: packed_shape(N, L) int32, layout of :mod:`lift_ao.packing`.
        row_scale: (N,) row scales r (N counts the rows).
        bias: (N,) or None.
    Returns:
        (..., N) in lifted.dtype (accumulated in float32).
    """
    code_length = lifted.shape[-1]
    x = lifted.to(torch.float32)
    n = row_scale.shape[0]
    out = torch.cat(
        [x @ _unpacked_signs(packed_codes, code_length, n, s).T
         for s in range(0, n, _ROWS_PER_CHUNK)],
        dim=-1,
    ) if n else x.new_zeros(*x.shape[:-1], 0)
    out = out * row_scale.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(lifted.dtype)


def lifted_matmul_backward_reference(
    grad_out: torch.Tensor, packed_codes: torch.Tensor, row_scale: torch.Tensor, code_length: int,
) -> torch.Tensor:
    """Gradient of :func:`lifted_matmul_reference` w.r.t. the lifted activation: ``(g ⊙ r) · Q``.

    Args:
        grad_out: (..., N).
    Returns:
        (..., code_length) in grad_out.dtype.
    """
    g = grad_out.to(torch.float32) * row_scale.to(torch.float32)
    n = row_scale.shape[0]
    grad = g.new_zeros(*g.shape[:-1], code_length)
    for s in range(0, n, _ROWS_PER_CHUNK):
        grad += g[..., s : s + _ROWS_PER_CHUNK] @ _unpacked_signs(packed_codes, code_length, n, s)
    return grad.to(grad_out.dtype)
