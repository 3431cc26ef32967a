"""``lift_ao.quantize``: the name-aware way to quantize a whole model.

torchao's ``quantize_`` hands its module handler a module without its name, so it cannot tell the
output projection from any other ``nn.Linear``. This entry point walks the model by name, keeps
``lm_head``/``output`` (the model's output embeddings) in high precision unless the config says
``include_lm_head=True``, names the module in every error, and shows one progress bar for the model.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torchao.quantization import quantize_
from tqdm.auto import tqdm

from lift_ao.config import LiftQuantConfig
from lift_ao.tensor import LiftQuantTensor

__all__ = ["quantize", "quantizable_linears"]

# Names that torchtune / torchchat / gpt-fast give the output projection.
_OUTPUT_PROJECTION_NAMES = ("lm_head", "output")


def _output_projection(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    found = get() if callable(get) else None
    return found if isinstance(found, torch.nn.Linear) else None


def quantizable_linears(
    model: torch.nn.Module, config: LiftQuantConfig,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
) -> list[tuple[str, torch.nn.Linear]]:
    """The (name, module) pairs :func:`quantize` will code, in model order.

    A module qualifies when it is an ``nn.Linear`` with a plain (not yet quantized) weight, passes
    ``filter_fn(module, name)`` if given, and is not the output projection unless
    ``config.include_lm_head``.
    """
    output = _output_projection(model)
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or isinstance(module.weight, LiftQuantTensor):
            continue
        is_output = module is output or name.rsplit(".", 1)[-1] in _OUTPUT_PROJECTION_NAMES
        if is_output and not config.include_lm_head:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        selected.append((name, module))
    return selected


def quantize(
    model: torch.nn.Module, config: LiftQuantConfig,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None, *, progress: bool = True,
) -> torch.nn.Module:
    """Quantize a model's linear weights in place with ``config``.

    Args:
        model: any ``nn.Module`` (Hugging Face, torchtune, gpt-fast style models).
        config: from :func:`lift_ao.liftquant`.
        filter_fn: optional ``(module, name) -> bool`` to narrow the selection further.
        progress: one progress bar over the layers.
    Returns:
        ``model`` (modified in place).
    Raises:
        ValueError: no linear layer qualifies, or a weight cannot be coded (the message names it).
    """
    if not isinstance(config, LiftQuantConfig):
        raise TypeError(f"config must come from lift_ao.liftquant(...), got {type(config).__name__}")
    targets = quantizable_linears(model, config, filter_fn)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to quantize (after the filter and the "
            "lm_head rule); check filter_fn or pass include_lm_head=True"
        )
    for name, module in tqdm(targets, desc=f"liftquant {config.lattice}", unit="layer", disable=not progress):
        try:
            quantize_(module, config, filter_fn=lambda m, _: m is module)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from e
    return model
