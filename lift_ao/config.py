"""``liftquant(...)``: the torchao config and its module handler.

``quantize_(model, liftquant(bits=2.4))`` swaps the weight of every ``nn.Linear`` that torchao's
filter selects for a :class:`~lift_ao.tensor.LiftQuantTensor`. Per-module choices use torchao's own
mechanisms: ``filter_fn=`` or ``FqnToConfig({"re:...": liftquant(bits=3.0), "_default": ...})``.
``lift_ao.quantize`` (see :mod:`lift_ao.api`) is the name-aware entry point that keeps ``lm_head``
in high precision unless asked and names the module in every error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from lift_ao.budget import DEFAULT_RATE_WINDOW
from lift_ao.lattice import Lattice, LatticeError
from lift_ao.search import check_beam_width
from lift_ao.tensor import LiftQuantTensor
from lift_ao.transform import check_seed

__all__ = ["LiftQuantConfig", "liftquant"]

# Fields that shape a memory budget's plan: only a budget config may set them away from their defaults.
_BUDGET_ONLY = ("reserve", "kv_cache", "allocation", "scores", "rate_window")


@dataclass
class LiftQuantConfig(AOBaseConfig):
    """Weight-only LiftQuant configuration.

    Args:
        lattice: shipped lattice name, ``"D/d"`` (e.g. ``"24/10"`` for 2.4 bits); None with a budget.
        seed: seed of the input rotations (same K and seed → same rotation, shared by siblings).
        include_lm_head: let :func:`lift_ao.quantize` quantize the output projection too.
        progress: show a progress bar while encoding each weight.
        memory_budget: bytes the model must fit (parsed by :func:`lift_ao.budget.parse_bytes`);
            when set, :func:`lift_ao.quantize` plans a lattice per layer (:func:`lift_ao.plan`).
        reserve, kv_cache, allocation, scores, rate_window: see :func:`lift_ao.plan` (budget configs
            only; scores, e.g. from :func:`lift_ao.measure_sensitivity`, and rate_window with
            allocation="sensitivity").
        beam_width: beam width of the nearest-code search (positive int); None = each lattice's
            default (:func:`lift_ao.search.default_beam_width`). Wider: lower error, slower encode.
    """

    lattice: Optional[str] = "24/10"
    seed: int = 0
    include_lm_head: bool = False
    progress: bool = False
    memory_budget: Optional[int] = None
    reserve: int = 0
    kv_cache: Optional[dict] = None
    allocation: str = "sensitivity"
    beam_width: Optional[int] = None
    scores: Optional[dict] = None
    rate_window: Optional[float] = DEFAULT_RATE_WINDOW

    def __post_init__(self):
        check_seed(self.seed)
        for flag in ("include_lm_head", "progress"):  # "no" would be truthy
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        check_beam_width(self.beam_width)
        if self.memory_budget is None:
            if any(getattr(self, name) != default for name, default in _budget_only_defaults().items()):
                raise ValueError("reserve=, kv_cache=, allocation=, scores= and rate_window= only apply with "
                                 "memory_budget=...")
            Lattice.load(self.lattice)  # fail at construction for an unknown lattice
            return
        from lift_ao.budget import ALLOCATIONS, BudgetError, check_rate_window, normalize_kv_cache, parse_bytes

        if self.lattice is not None:
            raise ValueError("give either lattice=... or memory_budget=..., not both (LiftQuantConfig's lattice "
                             "defaults to '24/10': pass lattice=None, or use liftquant(memory_budget=...))")
        self.memory_budget = parse_bytes(self.memory_budget, "memory_budget")
        self.reserve = parse_bytes(self.reserve, "reserve", allow_zero=True)
        self.kv_cache = normalize_kv_cache(self.kv_cache)
        if self.allocation not in ALLOCATIONS:
            raise BudgetError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.scores is not None and (self.allocation != "sensitivity" or not isinstance(self.scores, dict)):
            raise BudgetError("scores= must be a dict {layer FQN: weight} and weighs allocation='sensitivity' only")
        check_rate_window(self.rate_window, self.allocation)

    def at_lattice(self, lattice: str) -> LiftQuantConfig:
        """This budget config's settings for one planned layer at ``lattice``: no budget, and the fields
        that shaped the plan back at their defaults."""
        return replace(self, lattice=lattice, memory_budget=None, **_budget_only_defaults())

    @property
    def bits(self) -> float:
        return Lattice.load(self.lattice).bits


def _budget_only_defaults() -> dict:
    return {f.name: f.default for f in fields(LiftQuantConfig) if f.name in _BUDGET_ONLY}


def liftquant(
    bits: Optional[float] = None, *, lattice: Optional[str] = None, round: str = "down", seed: int = 0,
    include_lm_head: bool = False, progress: bool = False, memory_budget=None, reserve=0,
    kv_cache: Optional[dict] = None, allocation: str = "sensitivity", beam_width: Optional[int] = None,
    scores: Optional[dict] = None, rate_window: Optional[float] = DEFAULT_RATE_WINDOW,
) -> LiftQuantConfig:
    """Config for ``torchao.quantization.quantize_``.

    Args:
        bits: target bits per weight; picks a shipped lattice with :meth:`Lattice.for_bits`
            (largest rate ≤ bits, or the nearest with ``round="nearest"``).
        lattice: a lattice name ``"D/d"`` instead of ``bits``.
        memory_budget: instead of bits/lattice, bytes (int) or a size such as ``"24GiB"`` the whole
            model must fit; apply with :func:`lift_ao.quantize` (it needs the whole model to plan).
        reserve: bytes to keep free besides the model (budget only), int or size string.
        kv_cache: ``dict(context=..., batch=...)`` (optionally ``dtype=``, ``prefill=``): reserve the KV cache
            (budget only; :func:`lift_ao.plan`).
        allocation: ``"sensitivity"`` (mixed per-layer widths) or ``"uniform"`` (budget only).
        scores: {layer FQN: sensitivity weight} replacing the planner's built-in score, e.g. from
            :func:`lift_ao.measure_sensitivity` (budget with allocation="sensitivity" only).
        rate_window: bits around the uniform plan's rate the per-layer lattices may take, None for
            any (budget with allocation="sensitivity" only; :func:`lift_ao.plan`).
        round, seed, include_lm_head, progress, beam_width: see :meth:`Lattice.for_bits` and
            :class:`LiftQuantConfig`.
    Returns:
        LiftQuantConfig.
    """
    if sum(v is not None for v in (bits, lattice, memory_budget)) != 1:
        raise ValueError(
            "liftquant needs exactly one of bits=... (e.g. 2.4), lattice=... (e.g. '24/10') or "
            "memory_budget=... (e.g. '24GiB')"
        )
    if round != "down" and bits is None:
        raise ValueError(f"round= picks the lattice for bits=...; with lattice= or memory_budget= drop it (got {round!r})")
    if memory_budget is None and (reserve or kv_cache is not None or allocation != "sensitivity" or scores is not None
                                  or rate_window != DEFAULT_RATE_WINDOW):
        raise ValueError("reserve=, kv_cache=, allocation=, scores= and rate_window= only apply with memory_budget=...")
    if memory_budget is not None:
        return LiftQuantConfig(
            lattice=None, seed=seed, include_lm_head=include_lm_head, progress=progress,
            memory_budget=memory_budget, reserve=reserve, kv_cache=kv_cache, allocation=allocation,
            beam_width=beam_width, scores=scores, rate_window=rate_window,
        )
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
            raise LatticeError(f"bits must be a finite number such as 2.4, got {bits!r}")
        lattice = Lattice.for_bits(bits, round=round).name
    return LiftQuantConfig(
        lattice=lattice, seed=seed, include_lm_head=include_lm_head, progress=progress, beam_width=beam_width
    )


@register_quantize_module_handler(LiftQuantConfig)
def _liftquant_module_handler(
    module: torch.nn.Module, config: LiftQuantConfig, *, parameter_name: str = "weight"
) -> torch.nn.Module:
    if config.memory_budget is not None:
        raise ValueError(
            "liftquant(memory_budget=...) is planned over the whole model, which torchao's quantize_ does "
            "not show the handler: call lift_ao.quantize(model, config), or apply a plan with "
            "quantize_(model, lift_ao.plan(model, memory_budget=...).to_fqn_config(), filter_fn=None)"
        )
    from lift_ao.api import _is_hf_conv1d  # lift_ao.api imports this module

    if _is_hf_conv1d(module):
        raise TypeError(f"{type(module).__name__} stores its weight transposed (in, out), which this handler would code "
                        "as (out, in): quantize GPT-2-style models with lift_ao.quantize(model, config), which "
                        "converts these layers to nn.Linear first")
    weight = getattr(module, parameter_name, None)
    if weight is None or isinstance(weight, LiftQuantTensor):
        # Nothing to code: a module that an FqnToConfig pattern matched but that holds no weight
        # (an activation under "mlp."), or a tied weight already quantized through another module.
        return module
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{parameter_name} is a {type(weight).__name__}, not a tensor")
    name = f"{type(module).__name__}.{parameter_name} {tuple(weight.shape)}"
    quantized = LiftQuantTensor.from_hp(
        weight, Lattice.load(config.lattice), seed=config.seed, progress=config.progress, name=name,
        beam_width=config.beam_width,
    )
    setattr(module, parameter_name, torch.nn.Parameter(quantized, requires_grad=False))
    return module
