"""The graph rewrites behind :mod:`lift_ao.passes`, on post-grad FX graphs.

They walk nodes by op target (sturdier than traced patterns: post-grad graphs use ``reshape``,
dynamic shapes add ``sym_size`` nodes). After AOTAutograd a ``LiftQuantTensor`` weight is flattened
into its inner tensors: graph placeholders, or ``get_attr`` constants under
``torch._inductor.config.freezing=True``.

1. :func:`share_transforms` — CSE of ``lift_activation`` nodes whose inputs are the same nodes or
   equal frozen constants (counter ``shared_transform``).
2. :func:`fuse_lifts` — all ``lift_activation`` → ``lifted_matmul`` chains reading one activation
   into one ``lifted_linear`` (a single linear) or ``lifted_linear_group`` (siblings) (counter
   ``lift_fusion``: matmuls absorbed; siblings whose transforms are the same tensor at compile time
   add to ``shared_transform``: the group op computes their lift once, checked at run time).
3. :func:`fold_scales` — the input signs of a fused op multiplied into the per-channel weight of the
   op's producer (an RMSNorm's ``weight * normed``) (counter ``scale_folding``: folds done).

Nothing here assumes that two *different* placeholders hold equal values: with weights as graph
inputs (no freezing) a compiled graph is reused when a weight is swapped for another, so such an
assumption would silently compute wrong results. Equality is taken from node identity or frozen
constants' bytes; compile-time aliasing of placeholders only predicts the group op's run-time sharing.
"""

from __future__ import annotations

import hashlib
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from lift_ao.kernels import fused_ops  # noqa: F401  (registers the fused ops the rewrites emit)

__all__ = ["share_transforms", "fuse_lifts", "fold_scales", "COUNTER"]

# torch._dynamo.utils.counters[COUNTER][<rewrite name>] counts rewrites done.
COUNTER = "lift_ao"

# Ops are matched by name: re-importing the op definitions (e.g. transformers' hub-kernels import
# picking up the repository's ``kernels/`` folder as a top-level package) creates new OpOverloads.
_LIFT, _MATMUL = "lift_ao::lift_activation", "lift_ao::lifted_matmul"
_LINEAR, _GROUP = "lift_ao::lifted_linear", "lift_ao::lifted_linear_group"
_mul = torch.ops.aten.mul.Tensor

# Argument positions shared by lift_activation and the fused ops (x, input_signs, left, right, mapping).
_X, _SIGNS = 0, 1
# lifted_linear_group's (x, folded_signs, input_signs[], ...).
_FOLDED, _GROUP_SIGNS = 1, 2
_TRANSFORM_ARGS = slice(1, 5)
# Transform tensors (signs, rotations, mapping) are small; larger constants are compared by node.
_MAX_HASHED_NUMEL = 1 << 16


def _real_constant(node: fx.Node) -> Optional[torch.Tensor]:
    """The tensor behind a ``get_attr`` node (frozen parameter), else None."""
    if node.op != "get_attr":
        return None
    value = getattr(node.graph.owning_module, node.target, None)
    return value if isinstance(value, torch.Tensor) else None


def _equal_value_key(node) -> object:
    """A key equal for two graph values that are certainly equal: the same node, or frozen constants
    (``get_attr``, fixed for the compiled graph's life) with the same bytes."""
    constant = _real_constant(node) if isinstance(node, fx.Node) else None
    if constant is None or constant.numel() > _MAX_HASHED_NUMEL:
        return node
    digest = hashlib.blake2b(constant.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return ("bytes", constant.dtype, tuple(constant.shape), digest.hexdigest())


def _aliasing_key(node) -> object:
    """A key equal for graph inputs that are the same tensor at compile time (fakification memoises
    storages, so q/k/v's shared rotation tensors have one fake storage); else the node itself."""
    val = node.meta.get("val") if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") else None
    if not isinstance(val, torch.Tensor):
        return _equal_value_key(node)
    return ("storage", val.untyped_storage()._cdata, val.storage_offset(), tuple(val.shape), val.stride(), val.dtype)


def _reads(node: fx.Node, value: fx.Node) -> int:
    """How many of ``node``'s arguments (nested ones too) are ``value``."""
    found: list = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return sum(n is value for n in found)


def _is_op(node, qualified_name: str) -> bool:
    """Whether ``node`` calls the default overload of the op ``namespace::name``."""
    target = getattr(node, "target", None)
    return isinstance(target, torch._ops.OpOverload) and target.name() == qualified_name


def _op(qualified_name: str) -> torch._ops.OpOverload:
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _count(name: str, amount: int) -> None:
    # Also in Inductor's own counters: on an FX-graph-cache hit the passes do not run, and Inductor
    # replays only counters["inductor"] deltas, so counters["inductor"]["lift_ao_<name>"] stays exact.
    if amount:
        counters[COUNTER][name] += amount
        counters["inductor"][f"{COUNTER}_{name}"] += amount


def share_transforms(graph: fx.Graph) -> int:
    """Compute ``lift_activation`` once per (activation, transform).

    Fires when two ``lift_activation`` nodes take the same activation node and transform inputs that
    are the same nodes or equal frozen constants (``freezing=True``: q/k/v and gate/up, whose
    ``LiftQuantTensor``s share rotations per (K, d, seed)). Later duplicates are replaced by the
    first, which precedes all their users.

    Returns:
        number of lift nodes removed.
    """
    first_by_key: dict[tuple, fx.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        if not _is_op(node, _LIFT):
            continue
        key = (node.args[_X],) + tuple(_equal_value_key(a) for a in node.args[_TRANSFORM_ARGS])
        first = first_by_key.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            removed += 1
    _count("shared_transform", removed)
    return removed


def _replace_by_fused(graph: fx.Graph, chains: list[tuple[fx.Node, fx.Node]]) -> fx.Node:
    """Insert the fused op for (lift, matmul) chains before the graph's current insertion point."""
    if len(chains) == 1:
        ((lift, matmul),) = chains
        fused = graph.call_function(_op(_LINEAR), (*lift.args, *matmul.args[1:]))
        fused.meta["val"] = matmul.meta["val"]
        matmul.replace_all_uses_with(fused)
        return fused
    transforms = [list(column) for column in zip(*(lift.args[_TRANSFORM_ARGS] for lift, _ in chains))]
    weights = [list(column) for column in zip(*(matmul.args[1:] for _, matmul in chains))]
    fused = graph.call_function(_op(_GROUP), (chains[0][0].args[_X], None, *transforms, *weights))
    fused.meta["val"] = [matmul.meta["val"] for _, matmul in chains]
    for index, (_, matmul) in enumerate(chains):
        with graph.inserting_after(fused):
            item = graph.call_function(operator.getitem, (fused, index))
        item.meta["val"] = matmul.meta["val"]
        matmul.replace_all_uses_with(item)
    return fused


def _run_time_shared(chains: list[tuple[fx.Node, fx.Node]]) -> int:
    """Siblings whose transform is, at compile time, the same tensors as an earlier sibling's."""
    keys = [tuple(_aliasing_key(a) for a in lift.args[_TRANSFORM_ARGS]) for lift, _ in chains]
    lifts = [lift for lift, _ in chains]
    return sum(1 for i, key in enumerate(keys) if key in keys[:i] and lifts[i] not in lifts[:i])


def fuse_lifts(graph: fx.Graph) -> int:
    """Replace the ``lift_activation`` → ``lifted_matmul`` chains reading one activation by one op.

    Fires per activation node read by ``lift_activation`` nodes whose users are all ``lifted_matmul``
    nodes taking them as activation: one chain → ``lifted_linear``; several (q/k/v, gate/up) →
    ``lifted_linear_group`` + ``getitem``s, placed at the first matmul, provided every chain's
    codes/scale/bias are defined before it (always true for placeholders and frozen constants).
    Siblings of which one lifts without signs (``input_signs=None``) become one ``lifted_linear`` each.

    Returns:
        number of ``lifted_matmul`` nodes absorbed.
    """
    order = {node: index for index, node in enumerate(graph.nodes)}  # numbered again after each fusion
    lifts_by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if _is_op(node, _LIFT):
            lifts_by_input.setdefault(node.args[_X], []).append(node)
    absorbed = shared = 0
    for lifts in lifts_by_input.values():
        fusable = [
            lift for lift in lifts
            if lift.users and all(_is_op(u, _MATMUL) and u.args[0] is lift and lift not in u.args[1:] for u in lift.users)
        ]
        chains = sorted(((lift, m) for lift in fusable for m in lift.users), key=lambda chain: order[chain[1]])
        if not chains:
            continue
        # The group op takes a list of signs tensors: lifts without signs (x carries them) fuse one by one.
        batches = [[chain] for chain in chains] if any(lift.args[1] is None for lift, _ in chains) else [chains]
        for batch in batches:
            first = batch[0][1]
            # The fused node takes every chain's transform and matmul operands: all must exist before it.
            operands = [a for lift, m in batch for a in (*lift.args[1:], *m.args[1:]) if isinstance(a, fx.Node)]
            if any(order[a] >= order[first] for a in operands):
                continue
            with graph.inserting_before(first):
                _replace_by_fused(graph, batch)
            shared += _run_time_shared(batch)
            for lift, matmul in batch:
                graph.erase_node(matmul)
                if not lift.users:
                    graph.erase_node(lift)
            absorbed += len(batch)
            # The fused node is new, and may be a later chain's operand (a bias computed by this linear).
            order = {node: index for index, node in enumerate(graph.nodes)}
    _count("lift_fusion", absorbed)
    _count("shared_transform", shared)
    return absorbed


def _per_channel_factor(mul: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(weight, other) when ``mul`` is ``weight * other`` with weight a (K,) parameter, K = last dim."""
    if mul.op != "call_function" or mul.target is not _mul or len(mul.args) != 2 or mul.kwargs:
        return None
    out = mul.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return None
    for weight, other in (mul.args, mul.args[::-1]):
        if not (isinstance(weight, fx.Node) and isinstance(other, fx.Node)):
            continue
        val = weight.meta.get("val")
        is_parameter = weight.op in ("placeholder", "get_attr") and isinstance(val, torch.Tensor)
        if is_parameter and val.dim() == 1 and val.shape[0] == out.shape[-1] and val.dtype == out.dtype:
            return weight, other
    return None


def _folded_weight(graph: fx.Graph, mul: fx.Node, weight: fx.Node, signs: fx.Node) -> fx.Node:
    """A node holding ``weight * signs[:K]`` (a new frozen constant when both are constants)."""
    weight_val = weight.meta["val"]
    k = weight_val.shape[0]
    weight_const, signs_const = _real_constant(weight), _real_constant(signs)
    # The product in float32 at least, rounded once to the weight's dtype: calibrated signs carry 1/s (not
    # ±1), and rounding them to a 16-bit weight's dtype first added a second rounding.
    wide = torch.promote_types(weight_val.dtype, torch.float32)
    if weight_const is not None and signs_const is not None:
        module = graph.owning_module
        value = (weight_const.to(wide) * signs_const[:k].to(wide)).to(weight_const.dtype)
        name = f"_lift_ao_folded_{mul.name}"
        module.register_buffer(name, value, persistent=False)
        with graph.inserting_before(mul):
            folded = graph.get_attr(name)
        folded.meta["val"] = weight_val
        return folded
    convert = torch.ops.prims.convert_element_type.default
    with graph.inserting_before(mul):
        sliced = graph.call_function(torch.ops.aten.slice.Tensor, (signs, 0, 0, k))
        widened = graph.call_function(convert, (weight, wide))
        product = graph.call_function(_mul, (widened, sliced))
        folded = graph.call_function(convert, (product, weight_val.dtype))
    sliced.meta["val"] = signs.meta["val"][:k]
    widened.meta["val"] = product.meta["val"] = weight_val.to(wide)
    folded.meta["val"] = weight_val
    return folded


def _signs_to_fold(fused: fx.Node, activation: fx.Node) -> Optional[fx.Node]:
    """The signs a fused node reading ``activation`` still applies itself, else None."""
    if not (_is_op(fused, _LINEAR) or _is_op(fused, _GROUP)) or fused.args[_X] is not activation:
        return None
    if _is_op(fused, _LINEAR):
        return fused.args[_SIGNS]
    if fused.args[_FOLDED] is None:
        return fused.args[_GROUP_SIGNS][0]
    return None


def fold_scales(graph: fx.Graph) -> int:
    """Fold a fused op's input signs into the per-channel weight that produces its activation.

    Fires when a fused node's activation is ``weight * normed`` (the RMSNorm's last op; ``weight`` a
    (K,) tensor of the activation's dtype) read by nothing else, so no other reader sees the
    sign-flipped activation, and the signs exist before it (or both are frozen constants). ``weight``
    becomes ``weight * signs[:K]`` (a new constant under freezing, else a K-element product Inductor
    fuses into the norm kernel); ``lifted_linear`` gets
    ``input_signs=None``, ``lifted_linear_group`` gets ``folded_signs`` = its first sibling's signs
    (the others skip their diagonal when, at run time, they hold the same tensor). Exact for ±1 signs
    (multiplying by ±1 rounds the same either way); calibrated signs carry 1/s, and in a 16-bit model
    the folded ``weight * signs`` is rounded once more than eager rounds (a bf16 layer of K = 512 with
    s ~ exp(N(0, 0.5²)): output error against float64 0.30 % eager, 0.35 % folded).

    Returns:
        number of folds (one per norm).
    """
    folds = 0
    order = {node: index for index, node in enumerate(graph.nodes)}  # of the nodes the folds read
    for mul in list(graph.nodes):
        factor = _per_channel_factor(mul)
        if factor is None or len(mul.users) != 1:
            continue
        (fused,) = mul.users
        if _reads(fused, mul) != 1:
            continue  # it also reads the norm's output elsewhere (e.g. as the bias), which must stay unfolded
        signs = _signs_to_fold(fused, mul)
        if signs is None:
            continue
        weight, other = factor
        if order[signs] > order[mul] and (_real_constant(weight) is None or _real_constant(signs) is None):
            continue  # signs computed after the norm: the folded weight could not be computed before it
        mul.args = (_folded_weight(graph, mul, weight, signs), other)
        if _is_op(fused, _LINEAR):
            fused.update_arg(_SIGNS, None)
        else:
            fused.update_arg(_FOLDED, signs)
        folds += 1
    _count("scale_folding", folds)
    return folds
