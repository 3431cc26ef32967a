"""CUDA registrations of the Triton kernels for the ``lift_ao`` custom ops.

The ops keep their names and fake impls (``kernels/ops.py``, ``kernels/fused_ops.py``); this only adds
a CUDA kernel to each, so CPU keeps the reference and ``torch.compile(fullgraph=True)`` still sees one
opaque op node. ``lifted_matmul`` picks the table-lookup kernel for up to ``LOOKUP_MAX_TOKENS`` tokens
and the ±1 GEMM above; ``lifted_linear_group`` composes the base kernels like its default but builds
the lookup tables once per shared lift. ``lifted_linear`` keeps its composing default.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from lift_ao.packing import words_per_row

from .fused_ops import compose_group, lifted_linear_group
from .ops import _check_lift_args, lift_activation, lifted_matmul
from . import triton_lut
from .triton_lift import lift_activation_triton
from .triton_matmul import lifted_matmul_triton

__all__ = ["register_cuda_kernels"]

_registered = False
# Token counts up to this take the table-lookup kernel (kernels/triton_lut.py), larger ones the ±1
# GEMM (kernels/triton_matmul.py); set from benchmarks/results/kernels_h100.md.
LOOKUP_MAX_TOKENS = 2


def _lift_activation_cuda(x, input_signs, rotation_left, rotation_right, mapping):
    _check_lift_args(x, input_signs, rotation_left, rotation_right, mapping)
    return lift_activation_triton(x, input_signs, rotation_left, rotation_right, mapping)


def _matmul_cuda(lifted, packed_codes, row_scale, bias: Optional[torch.Tensor],
                 tables_of_lift: Optional[dict] = None):
    """The lookup kernel for up to LOOKUP_MAX_TOKENS tokens, else the ±1 GEMM. ``tables_of_lift``
    (id of x̃ → its lookup tables) lets siblings reading the same x̃ build the tables once; the
    caller keeps those x̃ alive while it holds the dict, so their ids stay unique."""
    length = lifted.shape[-1]
    if packed_codes.dtype != torch.int32 or packed_codes.shape[1] != words_per_row(length):
        raise ValueError(
            f"packed codes {packed_codes.dtype} {tuple(packed_codes.shape)} do not match a lifted "
            f"activation of length {length}"
        )
    tokens = lifted.numel() // max(length, 1)
    if tokens > LOOKUP_MAX_TOKENS:
        return lifted_matmul_triton(lifted, packed_codes, row_scale, bias)
    tables = None
    if tables_of_lift is not None and tokens > 0:
        if id(lifted) not in tables_of_lift:
            tables_of_lift[id(lifted)] = triton_lut.build_tables(
                lifted.reshape(tokens, length), packed_codes.shape[1], triton_lut.token_block(tokens))
        tables = tables_of_lift[id(lifted)]
    return triton_lut.lookup_matmul(lifted, packed_codes.contiguous(), row_scale, bias, tables=tables)


def _lifted_matmul_cuda(lifted, packed_codes, row_scale, bias: Optional[torch.Tensor]):
    return _matmul_cuda(lifted, packed_codes, row_scale, bias)


def _lifted_linear_group_cuda(x, folded_signs, input_signs, rotation_left, rotation_right, mapping,
                              packed_codes, row_scale, bias):
    """The group op's composition, with the decode kernel's lookup tables built once per shared lift
    (q/k/v, gate/up) instead of once per sibling (compose_group keeps each shared lift alive)."""
    return compose_group(x, folded_signs, input_signs, rotation_left, rotation_right, mapping, packed_codes,
                         row_scale, bias, matmul=functools.partial(_matmul_cuda, tables_of_lift={}))


def register_cuda_kernels() -> None:
    """Make the CUDA dispatch of the ops run the Triton kernels (idempotent)."""
    global _registered
    if _registered:
        return
    lift_activation.register_kernel("cuda")(_lift_activation_cuda)
    lifted_matmul.register_kernel("cuda")(_lifted_matmul_cuda)
    lifted_linear_group.register_kernel("cuda")(_lifted_linear_group_cuda)
    _registered = True
