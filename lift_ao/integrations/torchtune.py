"""torchtune: a quantizer in torchtune's style, for recipe configs.

    quantizer:
      _component_: lift_ao.integrations.torchtune.LiftQuantQuantizer
      bits: 2.4

torchtune's ``quantize`` recipe calls ``quantizer.quantize(model)`` and saves the state dict; its
``generate`` and ``eleuther_eval`` recipes build the model, call ``quantizer.quantize(model)`` to give
it the quantized structure, then ``load_state_dict(checkpoint, assign=True)``. Those two recipes only
take the quantized path for quantizers listed in ``torchtune.training.quantization._quantizer_to_mode``;
importing this module registers :class:`LiftQuantQuantizer` there as ``"liftquant"`` when torchtune
imports (torchtune 0.6.1 does not import against torchao 0.18; see the README).
"""

from __future__ import annotations

from typing import Optional

import torch

from lift_ao.api import quantize
from lift_ao.config import liftquant

__all__ = ["LiftQuantQuantizer", "TORCHTUNE_MODE", "register_with_torchtune"]

TORCHTUNE_MODE = "liftquant"


class LiftQuantQuantizer:
    """``LiftQuantQuantizer(bits=2.4).quantize(model) -> model`` for torchtune models.

    Quantizes every ``nn.Linear`` (attention ``q_proj/k_proj/v_proj/output_proj``, MLP ``w1/w2/w3``)
    and keeps the ``output`` head in high precision unless ``include_lm_head``.

    Args:
        bits, lattice, round, seed, include_lm_head, memory_budget: as :func:`lift_ao.liftquant`
            (exactly one of bits, lattice, memory_budget).
        device: where to encode each layer (e.g. ``"cuda"``); default: where the layer is.
        progress: one progress bar over the layers.
    """

    def __init__(
        self, bits: Optional[float] = None, *, lattice: Optional[str] = None, round: str = "down", seed: int = 0,
        include_lm_head: bool = False, memory_budget=None, device=None, progress: bool = False,
    ):
        self.config = liftquant(
            bits, lattice=lattice, round=round, seed=seed, include_lm_head=include_lm_head, memory_budget=memory_budget,
        )
        self.device = device
        self.progress = progress

    def quantize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Quantize ``model``'s linear weights in place (each (out, in) weight becomes a LiftQuantTensor).

        Returns:
            ``model``.
        """
        return quantize(model, self.config, device=self.device, progress=self.progress)


def register_with_torchtune() -> bool:
    """Add :class:`LiftQuantQuantizer` to torchtune's quantizer table as ``"liftquant"``.

    Returns:
        True if torchtune imported and the quantizer is registered, False if torchtune is absent or
        does not import (e.g. torchtune 0.6.1 with torchao 0.18).
    """
    try:
        from torchtune.training import quantization
    except ImportError:
        return False
    quantization._quantizer_to_mode[LiftQuantQuantizer] = TORCHTUNE_MODE
    return True


# A recipe config names this module in `_component_`, so importing it is the moment to register.
register_with_torchtune()
