"""Exact storage accounting."""

from __future__ import annotations

from typing import Iterable, Union

import torch

from lift_ao.tensor import LiftQuantTensor

__all__ = ["footprint"]


def _storages(t: torch.Tensor):
    if isinstance(t, LiftQuantTensor):
        for name in t.tensor_data_names:
            yield from _storages(getattr(t, name))
    else:
        yield t.untyped_storage()


def footprint(model: Union[torch.nn.Module, Iterable[torch.Tensor]]) -> int:
    """Bytes held by a model's parameters and buffers (or by the given tensors), each storage once.

    Quantized weights count their codes, row scales, lattice and rotation; tensors shared between
    modules (tied embeddings, one rotation used by q/k/v) are counted once, as in memory.
    """
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else list(model)
    seen: dict[tuple, int] = {}
    for t in tensors:
        for storage in _storages(t):
            seen[(storage.device.type, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(seen.values())
