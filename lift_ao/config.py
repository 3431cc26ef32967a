"""``liftquant(...)``: the torchao config and its module handler.

``quantize_(model, liftquant(bits=2.4))`` swaps the weight of every ``nn.Linear`` that torchao's
filter selects for a :class:`~lift_ao.tensor.LiftQuantTensor`. Per-module choices use torchao's own
mechanisms: ``filter_fn=`` or ``FqnToConfig({"re:...": liftquant(bits=3.0), "_default": ...})``.
``lift_ao.quantize`` (see :mod:`lift_ao.api`) is the name-aware entry point that keeps ``lm_head``
in high precision unless asked and names the module in every error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from lift_ao.lattice import Lattice, LatticeError
from lift_ao.tensor import LiftQuantTensor

__all__ = ["LiftQuantConfig", "liftquant"]


@dataclass
class LiftQuantConfig(AOBaseConfig):
    """Weight-only LiftQuant configuration.

    Args:
        lattice: shipped lattice name, ``"D/d"`` (e.g. ``"24/10"`` for 2.4 bits).
        seed: seed of the input rotations (same K and seed → same rotation, shared by siblings).
        include_lm_head: let :func:`lift_ao.quantize` quantize the output projection too.
        progress: show a progress bar while encoding each weight.
    """

    lattice: str = "24/10"
    seed: int = 0
    include_lm_head: bool = False
    progress: bool = False

    def __post_init__(self):
        Lattice.load(self.lattice)  # fail at construction for an unknown lattice
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    @property
    def bits(self) -> float:
        return Lattice.load(self.lattice).bits


def liftquant(
    bits: Optional[float] = None, *, lattice: Optional[str] = None, round: str = "down", seed: int = 0,
    include_lm_head: bool = False, progress: bool = False,
) -> LiftQuantConfig:
    """Config for ``torchao.quantization.quantize_``.

    Args:
        bits: target bits per weight; picks a shipped lattice with :meth:`Lattice.for_bits`
            (largest rate ≤ bits, or the nearest with ``round="nearest"``).
        lattice: a lattice name ``"D/d"`` instead of ``bits``.
        round, seed, include_lm_head, progress: see :meth:`Lattice.for_bits` and :class:`LiftQuantConfig`.
    Returns:
        LiftQuantConfig.
    """
    if (bits is None) == (lattice is None):
        raise ValueError("liftquant needs exactly one of bits=... (e.g. 2.4) or lattice=... (e.g. '24/10')")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
            raise LatticeError(f"bits must be a finite number such as 2.4, got {bits!r}")
        lattice = Lattice.for_bits(bits, round=round).name
    return LiftQuantConfig(lattice=lattice, seed=seed, include_lm_head=include_lm_head, progress=progress)


@register_quantize_module_handler(LiftQuantConfig)
def _liftquant_module_handler(
    module: torch.nn.Module, config: LiftQuantConfig, *, parameter_name: str = "weight"
) -> torch.nn.Module:
    weight = getattr(module, parameter_name, None)
    if weight is None or isinstance(weight, LiftQuantTensor):
        # Nothing to code: a module that an FqnToConfig pattern matched but that holds no weight
        # (an activation under "mlp."), or a tied weight already quantized through another module.
        return module
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{parameter_name} is a {type(weight).__name__}, not a tensor")
    name = f"{type(module).__name__}.{parameter_name} {tuple(weight.shape)}"
    quantized = LiftQuantTensor.from_hp(
        weight, Lattice.load(config.lattice), seed=config.seed, progress=config.progress, name=name
    )
    setattr(module, parameter_name, torch.nn.Parameter(quantized, requires_grad=False))
    return module
