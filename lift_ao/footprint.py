"""Exact storage accounting."""

from __future__ import annotations

from typing import Iterable, Union

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["footprint"]


def plain_tensors(t: torch.Tensor):
    """The plain tensors holding ``t``'s data: ``t`` itself, or, for a tensor subclass (LiftQuantTensor,
    torchao's int4/int8 tensors...), its inner tensors."""
    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from plain_tensors(getattr(t, name))
    else:
        yield t


def footprint(model: Union[torch.nn.Module, Iterable[torch.Tensor]]) -> int:
    """Bytes held by a model's parameters and buffers (or by the given tensors), each storage once.

    Quantized weights (any traceable tensor subclass) count their inner tensors: for LiftQuant the
    codes (whole groups of 32 rows, :func:`lift_ao.packing.packed_shape`), row scales, lattice and
    rotation; tensors shared between modules (tied embeddings, one rotation used by q/k/v) are
    counted once, as in memory.
    """
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else list(model)
    seen: dict[tuple, int] = {}
    for t in tensors:
        for storage in (p.untyped_storage() for p in plain_tensors(t)):
            seen[(storage.device.type, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(seen.values())
