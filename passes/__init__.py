"""Inductor passes for LiftQuant weights (installed as ``lift_ao.passes``).

Importing ``lift_ao`` calls :func:`install`, so a plain ``torch.compile(model)`` of a quantized model
gets, in its post-grad graph (see :mod:`lift_ao.passes.rewrites`):

- ``shared_transform``: q/k/v (and gate/up) compute the rotation + lift of their input once (CSE when
  the transform inputs are the same nodes or equal frozen constants; otherwise the group op below
  shares the lift after a run-time check that the siblings' transforms are the same tensors);
- ``lift_fusion``: the lift and the matmul(s) reading it become one fused op (``lifted_linear`` /
  ``lifted_linear_group`` from :mod:`lift_ao.kernels.fused_ops`), one launch;
- ``scale_folding``: the rotation's sign diagonal moves into the preceding RMSNorm weight.

Each rewrite adds to ``torch._dynamo.utils.counters["lift_ao"][<name>]`` (and to
``counters["inductor"]["lift_ao_<name>"]``, which Inductor replays on FX-graph-cache hits). The passes live in Inductor's
``post_grad_custom_post_pass`` slot inside one :class:`LiftAOPassManager`, which first runs whatever
pass(es) the slot held before, so user passes keep working; :func:`uninstall` puts the previous value
back. ``uuid()`` hashes this package's sources (and the chained passes' uuids), so Inductor's FX graph
cache stays on and is invalidated when the passes change.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor import custom_graph_pass

from .rewrites import COUNTER, fold_scales, fuse_lifts, share_transforms

__all__ = ["COUNTER", "REWRITES", "SLOT", "LiftAOPassManager", "install", "uninstall", "is_installed", "run_passes"]

SLOT = "post_grad_custom_post_pass"
# Counter names, one per rewrite (see the module docstring).
REWRITES = ("shared_transform", "lift_fusion", "scale_folding")

# Inference-aware passes (torch ≥ 2.13) get ``is_inference``; older Inductor has no such class.
_InferenceAware = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)
_ManagerBase = _InferenceAware or custom_graph_pass.CustomGraphPass

_SOURCES = tuple(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), *parts)
    for parts in (("__init__.py",), ("rewrites.py",), ("..", "kernels", "fused_ops.py"))
)


def run_passes(graph: fx.Graph) -> dict[str, int]:
    """Apply lift_ao's rewrites to a post-grad graph, in dependency order.

    Sharing first (so siblings meet at one lift), fusion next (siblings → one group op), folding last
    (it moves the signs of a fused op into its producer).

    Returns:
        rewrites done, by counter name (the increase of ``counters["lift_ao"]``).
    """
    before = dict(counters[COUNTER])
    share_transforms(graph)
    fuse_lifts(graph)
    fold_scales(graph)
    done = {name: counters[COUNTER][name] - before.get(name, 0) for name in REWRITES}
    if any(done.values()):
        graph.lint()
    return done


class LiftAOPassManager(_ManagerBase):
    """The pass installed in the Inductor slot: the slot's previous passes, then :func:`run_passes`.

    Args:
        chained: the passes the slot held before installation, run first and in order.
    """

    def __init__(self, chained: tuple = ()):
        self.chained = tuple(chained)

    def __call__(self, graph: fx.Graph, is_inference: bool = False) -> None:
        for chained_pass in self.chained:
            if _InferenceAware is not None and isinstance(chained_pass, _InferenceAware):
                chained_pass(graph, is_inference)
            else:
                chained_pass(graph)
        run_passes(graph)

    def uuid(self) -> Optional[Any]:
        """Cache key: hash of lift_ao's pass sources and the chained passes' uuids.

        None (Inductor bypasses its FX graph cache) when a chained pass cannot name itself, as Inductor
        would have done for that pass alone, and under ``freezing``: the passes then decide from frozen
        weights' values (equal transforms merged, norm weights folded into new constants), which the
        cache key does not hold, so another model of the same shapes would reuse this one's graph.
        """
        if inductor_config.freezing:
            return None
        chained_ids = []
        for chained_pass in self.chained:
            chained_id = chained_pass.uuid() if isinstance(chained_pass, custom_graph_pass.CustomGraphPass) else None
            if chained_id is None:
                return None
            chained_ids.append(repr(chained_id))
        digest = hashlib.sha256(custom_graph_pass.get_hash_for_files(_SOURCES))
        digest.update("|".join(chained_ids).encode())
        return digest.hexdigest()


def _manager_of(value: Any) -> Optional[LiftAOPassManager]:
    if isinstance(value, LiftAOPassManager):
        return value
    if isinstance(value, (list, tuple)):
        return next((p for p in value if isinstance(p, LiftAOPassManager)), None)
    return None


def install() -> LiftAOPassManager:
    """Put lift_ao's passes in Inductor's ``post_grad_custom_post_pass`` slot (idempotent).

    A pass already in the slot is kept and runs first: a list or tuple (torch ≥ 2.13) gets our manager
    appended; a single pass (any version) is chained inside our manager. Inductor reads the slot at
    the first call of a compiled function, so install before that call.

    Returns:
        the installed manager.
    """
    previous = getattr(inductor_config, SLOT)
    existing = _manager_of(previous)
    if existing is not None:
        return existing
    if isinstance(previous, (list, tuple)):
        manager = LiftAOPassManager()
        value = type(previous)([*previous, manager])
    else:
        manager = LiftAOPassManager(() if previous is None else (previous,))
        value = manager
    setattr(inductor_config, SLOT, value)
    return manager


def uninstall() -> bool:
    """Remove lift_ao's passes: our manager leaves the slot and the pass it chained (the slot's value
    before :func:`install`) takes its place, wherever it is now; passes added since stay.

    Returns:
        True if a lift_ao manager was removed.
    """
    current = getattr(inductor_config, SLOT)
    manager = _manager_of(current)
    if manager is None:
        return False
    if isinstance(current, (list, tuple)):  # appended to by install or by the user, or composed around us
        restored = type(current)(q for p in current for q in (manager.chained if p is manager else (p,)))
    else:
        restored = manager.chained[0] if manager.chained else None
    setattr(inductor_config, SLOT, restored)
    return True


def is_installed() -> bool:
    """Whether lift_ao's manager is in Inductor's slot now."""
    return _manager_of(getattr(inductor_config, SLOT)) is not None


# Installed when the package is imported (``import lift_ao`` imports it), so plain torch.compile works.
install()
