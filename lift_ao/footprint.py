"""Exact storage accounting."""

from __future__ import annotations

from typing import Iterable, Union

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["footprint"]


def _storages(t: torch.Tensor):
    # Tensor subclasses (LiftQuantTensor, torchao's int4 tensors...) hold their data in inner tensors.
    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _storages(getattr(t, name))
    else:
        yield t.untyped_storage()


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
        for storage in _storages(t):
            seen[(storage.device.type, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(seen.values())
