"""torchchat: a quantization handler for torchchat's ``--quantize`` JSON.

    --quantize '{"linear:liftquant": {"bits": 2.4}}'

torchchat's ``quantize_model`` looks each JSON key up in ``torchchat.utils.quantize.quantizer_class_dict``,
builds ``handler_class(device=..., precision=..., **options)`` and calls ``handler.quantize(model)``.
:func:`register_with_torchchat` adds :class:`LiftQuantHandler` to that table under ``"linear:liftquant"``
(torchchat names entries by the module kind they quantize, as in ``"linear:int4"``). torchchat has no
plugin mechanism, so the registration must run in the torchchat process before ``quantize_model``.
"""

from __future__ import annotations

from typing import Optional

import torch

from lift_ao.api import quantize
from lift_ao.config import liftquant

__all__ = ["LiftQuantHandler", "TORCHCHAT_KEY", "register_with_torchchat"]

TORCHCHAT_KEY = "linear:liftquant"


class LiftQuantHandler:
    """torchchat quantization handler: ``LiftQuantHandler(device="cuda", bits=2.4).quantize(model)``.

    Quantizes the ``nn.Linear`` layers of torchchat's ``Transformer`` (``attention.wq/wk/wv/wo``,
    ``feed_forward.w1/w2/w3``); ``tok_embeddings`` and the ``output`` head stay in high precision
    unless ``include_lm_head``.

    Args:
        device: torchchat's device string; each layer is encoded there.
        precision: torchchat's model dtype. Accepted because torchchat passes it to every handler; the
            quantized weights keep the dtype the model already has, which torchchat set to it.
        bits, lattice, round, seed, include_lm_head, memory_budget: as :func:`lift_ao.liftquant`.
    """

    def __init__(
        self, device: str = "cpu", precision: Optional[torch.dtype] = None, *, bits: Optional[float] = None,
        lattice: Optional[str] = None, round: str = "down", seed: int = 0, include_lm_head: bool = False,
        memory_budget=None,
    ):
        self.config = liftquant(
            bits, lattice=lattice, round=round, seed=seed, include_lm_head=include_lm_head, memory_budget=memory_budget,
        )
        self.device = device
        self.precision = precision

    def quantize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Quantize ``model``'s linear weights in place on ``self.device``.

        Returns:
            ``model`` (torchchat assigns the result).
        """
        return quantize(model, self.config, device=self.device, progress=True)


def register_with_torchchat(quantizer_class_dict: Optional[dict] = None) -> dict:
    """Add :class:`LiftQuantHandler` to torchchat's handler table as ``"linear:liftquant"``.

    Args:
        quantizer_class_dict: the table to extend; default: ``torchchat.utils.quantize.quantizer_class_dict``.
    Returns:
        The extended table.
    Raises:
        ImportError: torchchat is not importable (it pins a May-2025 torchao; against torchao 0.18 its
            ``torchchat/utils/quantize.py`` fails on ``from torchao.quantization.quant_api import int4_weight_only``).
    """
    if quantizer_class_dict is None:
        try:
            from torchchat.utils.quantize import quantizer_class_dict
        except ImportError as e:
            raise ImportError(
                f"torchchat is not importable here ({e}); run this inside a torchchat checkout with the torchao "
                "version it pins, or pass the table: register_with_torchchat(quantizer_class_dict)"
            ) from e
    quantizer_class_dict[TORCHCHAT_KEY] = LiftQuantHandler
    return quantizer_class_dict
