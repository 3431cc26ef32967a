"""Fit a memory budget: choose each linear layer's lattice so that the model fills the budget.

``plan(model_or_config, memory_budget="24GiB")`` returns a :class:`Plan` without touching weights:

1. **Byte model (exact).** What stays in high precision (embeddings, norms, biases, ``lm_head``
   unless quantized, buffers) is counted storage by storage as :func:`lift_ao.footprint` does. A
   quantized layer (N×K, lattice D/d, Kp from :func:`~lift_ao.transform.padded_in_features`) owns
   its packed codes, 32·⌈N/32⌉·words_per_row(Kp·D/d) int32 words (rows of whole 16-byte quads, in
   groups of 32 rows: :func:`~lift_ao.packing.packed_shape`), and its row scales, N float32. The lattice
   matrix M (d×D float32) and the rotation (Kp + k1² + k2² float32) are storages shared between
   layers exactly as :mod:`lift_ao.tensor` shares them: one rotation per (K, d, seed, device), one
   M per (lattice, device); those that layers already quantized hold count with them, once.
   So a layer's planned ``bytes`` equals ``LiftQuantTensor.storage_bytes()`` and the plan's
   ``model_bytes`` equals ``lift_ao.footprint(model)`` after ``lift_ao.quantize``. A model that
   :func:`lift_ao.calibrate` codes instead (``groups=``) stores input signs per group of siblings and
   block length (its input scales are folded into them), and what is tuned stores per group too
   (``tuned=``, :data:`TUNED_PARTS`); the plan's ``model_bytes`` is then the footprint of the
   calibrated and tuned model (or more, where equal values are merged).
2. **Reservations.** KV cache = layers × 2 × kv_heads × head_dim × context × batch × dtype bytes
   (from the model's config; a sliding-window layer holds its window, not the whole context:
   :func:`kv_cache_bytes`), plus a free-form ``reserve``.
3. **Sensitivity.** Quantizing layer i with lattice j adds about ``mse_j · ||W_i||²_F · E[x²]`` to
   the squared error of its output (rows are coded at unit RMS, and the rotation spreads the error
   evenly over the input coordinates, so E||ΔW x||² ≈ ||ΔW||²_F · E||x||²/K). ``E[x²]`` (the
   Hessian trace over K) comes from calibration batches when given, else 1; on a meta-device model
   ``||W||²_F`` is taken as N·K (every weight equally important).
4. **Solver.** Every layer starts at its cheapest lattice; upgrades along each layer's lower convex
   hull of (bytes, distortion) are taken in one fixed order, most distortion removed per byte
   first, until the next one does not fit (the Lagrangian solution of the multiple-choice
   knapsack), and the slack is filled with further hull moves, best gain per byte first. Shared
   M/rotation storages are reserved up front, so the plan's distortion never increases with the
   budget (see :func:`_solve_sensitivity`). ``allocation="uniform"`` instead gives every layer the
   lowest-distortion lattice for which the whole model fits.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

from lift_ao.footprint import plain_tensors
from lift_ao.lattice import Lattice
from lift_ao.packing import packed_shape
from lift_ao.transform import padded_in_features

__all__ = [
    "ALLOCATIONS", "BudgetError", "LayerPlan", "Plan", "PRESETS", "TUNED_PARTS", "code_bytes", "format_bytes", "kv_cache_bytes",
    "layer_storage_bytes", "normalize_kv_cache", "parse_bytes", "plan", "reserved_kv_bytes",
]

# packed_codes are int32 words; row scales, M and the rotation are float32.
_WORD_BYTES = 4
_FLOAT32_BYTES = 4

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-z]*)\s*$", re.IGNORECASE)

ALLOCATIONS = ("sensitivity", "uniform")

# plan's rate window: with sensitivity allocation, only lattices within this many bits of the uniform
# plan's rate. The built-in score (‖W‖² · E[x²]) is independent per layer, so without a window it sends
# some layers to ~1.5 bits, whose damage compounds: on SmolLM2-135M at 2.49 bits/weight the unbounded
# plan had perplexity 4525, ±0.4 bits 407, uniform 717 (benchmarks/results/accuracy.md). Measured
# scores (lift_ao.calibrated_sensitivity) tolerate a wider one: ±1.0 bits was -0.6 % [-1.1, -0.0]
# perplexity against ±0.4 in the best 2.4-bit GPU recipe (benchmarks/results/accuracy_w200_window_h200.md);
# on the CPU without the end-to-end stage ±1.0 was -1.1 % [-3.2, +1.1] (32 windows, unresolved;
# accuracy_measured_plan_w10_cpu.md).
DEFAULT_RATE_WINDOW = 0.4

# Real shapes of models to plan without downloading them (Hugging Face config fields).
PRESETS = {
    "llama3-70b": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16",
    ),
    "llama3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16",
    ),
    "qwen2.5-32b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False, dtype="bfloat16",
    ),
}


class BudgetError(ValueError):
    """A memory budget is malformed or cannot be met.

    Attributes:
        needed_bytes: for a budget that cannot be met, the smallest total that would fit (else None).
    """

    def __init__(self, message: str, needed_bytes: Optional[int] = None):
        super().__init__(message)
        self.needed_bytes = needed_bytes


def format_bytes(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it ≥ 1 (e.g. ``"23.999 GiB"``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.3f} {unit}"
    return f"{nbytes} B"


# ----- parsing --------------------------------------------------------------------------------


def parse_bytes(value: Union[int, str], what: str = "memory_budget", *, allow_zero: bool = False) -> int:
    """A byte count from an int or a string such as ``"24GiB"``, ``"24 GB"``, ``"512MiB"``, ``"1.5e9"``.

    Units (case-insensitive): B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB (powers of 2); no unit
    means bytes. Fractional results are rounded down to whole bytes.

    Args:
        value: int bytes or a size string.
        what: the argument's name, for error messages.
        allow_zero: accept 0 (for ``reserve``).
    Returns:
        bytes, an int ≥ 1 (≥ 0 with ``allow_zero``).
    Raises:
        BudgetError: negative, zero (unless allowed), NaN/inf, bool, float or unparseable input.
    """
    example = "an int number of bytes or a string such as '24GiB', '24 GB' or '512MiB'"
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise BudgetError(f"{what} must be {example}; got {value!r} ({type(value).__name__})")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None or match.group(4).lower() not in _UNITS:
            raise BudgetError(f"{what}={value!r} is not a size; write {example}")
        sign, number, exponent, unit = match.groups()
        if sign == "-":
            raise BudgetError(f"{what}={value!r} is negative; a size must be positive")
        if abs(int(exponent or 0)) > 30:  # 10**±huge, exactly, would take forever
            raise BudgetError(f"{what}={value!r}: the exponent is out of range; write {example}")
        # Exact arithmetic on the decimal string, so "1.1GB" is exactly 1_100_000_000 bytes.
        amount = Fraction(number) * Fraction(10) ** int(exponent or 0) * _UNITS[unit.lower()]
        value = math.floor(amount)
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        raise BudgetError(f"{what}={value} bytes: must be {'≥ 0' if allow_zero else 'positive'}")
    return value


def normalize_kv_cache(kv_cache: Optional[dict]) -> Optional[dict]:
    """Validated ``dict(context=int > 0, batch=int > 0 (default 1), dtype=torch.dtype | name | None,
    prefill=int > 0 | None)``.

    ``dtype=None`` means the model's own dtype; ``prefill`` (the longest prompt, :func:`kv_cache_bytes`) None
    means ``context``. Returns None for None.
    """
    if kv_cache is None:
        return None
    if not isinstance(kv_cache, dict):
        raise BudgetError(f"kv_cache must be a dict such as dict(context=8192, batch=1); got {kv_cache!r}")
    unknown = set(kv_cache) - {"context", "batch", "dtype", "prefill"}
    if unknown:
        raise BudgetError(f"kv_cache: unknown keys {sorted(unknown)}; use context=, batch= and optionally dtype=, "
                          "prefill=")
    out = {"context": kv_cache.get("context"), "batch": kv_cache.get("batch", 1), "dtype": kv_cache.get("dtype"),
           "prefill": kv_cache.get("prefill")}
    for key in ("context", "batch", "prefill"):
        v = out[key]
        if key == "prefill" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise BudgetError(f"kv_cache[{key!r}] must be a positive int (tokens / sequences), got {v!r}")
        out[key] = int(v)
    dtype = out["dtype"]
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise BudgetError(f"kv_cache['dtype']={dtype!r} is not a torch dtype; use e.g. 'bfloat16' or 'float8_e4m3fn'")
        dtype = resolved
    elif dtype is not None and not isinstance(dtype, torch.dtype):
        raise BudgetError(f"kv_cache['dtype'] must be a torch.dtype or its name, got {dtype!r}")
    out["dtype"] = dtype
    return out


# ----- byte model -----------------------------------------------------------------------------


def code_bytes(out_features: int, in_features: int, lattice: Lattice) -> int:
    """Bytes a quantized (out_features × in_features) layer owns: packed codes + row scales."""
    kp, _, _ = padded_in_features(in_features, lattice.d)
    code_words = math.prod(packed_shape(out_features, kp // lattice.d * lattice.D))
    return code_words * _WORD_BYTES + out_features * _FLOAT32_BYTES


# What lift_ao.calibrate's groups of siblings (linears that read one tensor) tune, and so store per group:
# "scales", the input scales of each run of siblings on one lattice (calibrate's finetune_steps: the
# group's input signs, 1/s folded in, then differ per lattice instead of per block length d);
# "rotation", the rotation factors (calibrate's finetune_rotation, finetune_end_to_end's tune_rotation);
# "mapping", M (finetune_end_to_end's tune_mapping).
TUNED_PARTS = ("scales", "rotation", "mapping")


def _group_of(key: tuple):
    """The sibling group that alone holds the storage ``key`` (:func:`_shared_storages`), None for a storage
    that layers of any group may share."""
    return key[1] if key[0] == "group" else None


def _shared_storages(in_features: int, lattice: Lattice, seed: int, device: torch.device, group=None,
                     tuned: frozenset = frozenset(), held: frozenset = frozenset()) -> dict:
    """{storage key: bytes} of the input signs, rotation factors and M a layer points to (see the module
    docstring), but those in ``held`` (:func:`_held_constants`: the model holds them already). With ``group``
    (the layer's sibling group, for a model ``lift_ao.calibrate`` codes) the signs are the group's own, per
    block length d (per lattice with ``"scales"`` in ``tuned``), and so are the rotation factors with
    ``"rotation"``; with ``"mapping"`` M is the group's own per lattice (:data:`TUNED_PARTS`): keys that
    :func:`_group_of` maps to ``group``."""
    kp, k1, k2 = padded_in_features(in_features, lattice.d)
    rotation = (in_features, lattice.d, seed, str(device))
    transform = lattice.name if "scales" in tuned else lattice.d  # what a group's own transform is per
    keys = {
        "signs": ("signs", *rotation) if group is None else ("group", group, "signs", transform),
        "factors": ("group", group, "factors", transform) if "rotation" in tuned else ("factors", *rotation),
        "mapping": ("group", group, "mapping", lattice.name) if "mapping" in tuned else ("mapping", lattice.name, str(device)),
    }
    sizes = {"signs": kp, "factors": k1 * k1 + k2 * k2, "mapping": lattice.d * lattice.D}
    return {key: sizes[part] * _FLOAT32_BYTES for part, key in keys.items() if key not in held}


def _held_constants(model: torch.nn.Module, lattices: list, in_features: set, seed: int,
                    device: torch.device) -> frozenset:
    """Keys of :func:`_shared_storages` whose tensors the model's LiftQuant weights (layers already quantized,
    not planned) hold: :mod:`lift_ao.tensor`'s one M per (lattice, device) and one rotation per (K, d, seed,
    device), which the planned layers will point to too. :func:`_high_precision_bytes` counts them with those
    weights, so the plan must not count them again (:func:`lift_ao.footprint` counts each storage once). A
    weight with copies of its own (loaded from a checkpoint, ``copy.deepcopy``-ed) holds none of them. Looking
    the constants up makes those missing, as quantizing the planned layers would.

    Args:
        lattices: the candidates; in_features: the K of the layers to plan (only those constants can be shared);
        seed, device: the plan's.
    """
    from lift_ao.tensor import LiftQuantTensor, _shared_mapping, _shared_rotation

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    by_name = {lattice.name: lattice for lattice in lattices}
    blocks = {lattice.d for lattice in lattices}
    index = device.index
    if device.type == "cuda" and index is None and torch.cuda.is_available():
        index = torch.cuda.current_device()  # where layers planned for "cuda" are encoded
    held = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        # Only constants on the planned layers' device can be theirs.
        if not isinstance(weight, LiftQuantTensor) or weight.device.type != device.type or index not in (
                None, weight.device.index):
            continue
        k, d = weight.shape[1], weight.block_size
        lattice = by_name.get(f"{weight.code_bits}/{d}")
        if lattice is not None and same(weight.mapping, _shared_mapping(lattice, weight.device)):
            held.add(("mapping", lattice.name, str(device)))
        if k in in_features and d in blocks:
            signs, left, right = _shared_rotation(k, d, seed, weight.device)
            if same(weight.input_signs, signs):
                held.add(("signs", k, d, seed, str(device)))
            if same(weight.rotation_left, left) and same(weight.rotation_right, right):
                held.add(("factors", k, d, seed, str(device)))
    return frozenset(held)


def layer_storage_bytes(out_features: int, in_features: int, lattice: Lattice) -> int:
    """``LiftQuantTensor.storage_bytes()`` of an (out_features × in_features) layer coded with ``lattice``:
    codes + row scales + M + rotation (shared storages counted in full)."""
    kp, k1, k2 = padded_in_features(in_features, lattice.d)
    shared = (kp + k1 * k1 + k2 * k2 + lattice.d * lattice.D) * _FLOAT32_BYTES
    return code_bytes(out_features, in_features, lattice) + shared


# transformers' layer types whose cache keeps a window of the last tokens (DynamicSlidingWindowLayer,
# StaticSlidingWindowLayer); its get_layer_types_and_kwargs gives each layer's window as "sliding_window".
_WINDOWED_LAYERS = ("sliding_attention", "chunked_attention")


def _cached_tokens(config, layers: int, context: int, prefill: int) -> int:
    """Tokens per sequence that transformers' cache holds at its peak, summed over the ``layers`` decoder layers:
    ``context`` in each, but ``min(context, max(window, prefill))`` in a sliding-window or chunked layer (after a
    prefill of P > window tokens, DynamicCache holds all P until the layer's next step; StaticCache, the window).
    Layer types and windows are transformers' own (``get_layer_types_and_kwargs``, per-layer configs included);
    a config without ``per_layer_config`` (transformers 4.x, or not a transformers config) is counted at full
    context in every layer, an upper bound."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        return layers * context
    if not hasattr(config, "per_layer_config"):
        return layers * context
    types, per_layer = get_layer_types_and_kwargs(config)
    windows = [kwargs.get("sliding_window") if kind in _WINDOWED_LAYERS else None
               for kind, kwargs in zip(types, per_layer)]
    windows = (windows + [None] * layers)[:layers]  # transformers caches num_hidden_layers layers
    return sum(context if window is None else min(context, max(int(window), prefill)) for window in windows)


def kv_cache_bytes(config, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                   prefill: Optional[int] = None) -> int:
    """KV cache bytes at their peak as transformers' cache holds them: layers × 2 (K and V) × kv_heads × head_dim ×
    context × batch × dtype bytes (DeepSeek's MLA: layers × (kv_lora_rank + qk_rope_head_dim) × context × batch ×
    dtype bytes), where a sliding-window (or chunked) layer holds at most max(window, prefill) tokens
    (:func:`_cached_tokens`).

    A window of w tokens: StaticCache allocates w; DynamicCache keeps the last w − 1 as a view of the w that
    its last step concatenated, but right after a prefill of P > w tokens it holds all P in each such layer
    until the layer's next step. So ``prefill`` (the longest prompt) defaults to ``context``: without a
    shorter one, sliding layers count at full context.

    Args:
        config: a Hugging Face config (``num_hidden_layers``, ``num_attention_heads``, optional
            ``num_key_value_heads`` and ``head_dim``; ``layer_types``, ``sliding_window``,
            ``attention_chunk_size`` as transformers reads them; a multimodal one's text config is used).
        context: tokens per sequence; batch: sequences; dtype: cache dtype; prefill: tokens of the longest
            prompt (1 for a StaticCache, which never holds more than the window).
    """
    config = getattr(config, "get_text_config", lambda: config)()  # a multimodal config's text model (Gemma 3)
    try:
        layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
        hidden = int(config.hidden_size)
    except (AttributeError, TypeError):
        raise BudgetError(
            "kv_cache= needs a model with a Hugging Face config (num_hidden_layers, num_attention_heads, "
            "hidden_size); for other models compute the cache size yourself and pass reserve=..."
        ) from None
    tokens = _cached_tokens(config, layers, context, context if prefill is None else prefill)
    if getattr(config, "kv_lora_rank", None):  # DeepSeek's MLA
        try:
            rope, nope, value = (int(getattr(config, n)) for n in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
        except (AttributeError, TypeError):
            raise BudgetError("kv_cache= on a config with kv_lora_rank (MLA) needs qk_rope_head_dim, qk_nope_head_dim "
                              "and v_head_dim; or compute the cache size yourself and pass reserve=...") from None
        import transformers

        # transformers 5 caches one latent (kv_lora_rank + rope) per token and layer; 4.x each head's K and V.
        per_token = (int(config.kv_lora_rank) + rope if int(transformers.__version__.split(".")[0]) >= 5
                     else heads * (nope + rope + value))
        return per_token * tokens * batch * dtype.itemsize
    kv_heads = getattr(config, "num_key_value_heads", None)
    if getattr(config, "new_decoder_architecture", False):  # Falcon-40B/180B: K and V cached for every query head
        kv_heads = heads
    elif kv_heads is None and getattr(config, "multi_query", False):  # Falcon-7B, GPT-BigCode: one K/V head
        kv_heads = 1
    kv_heads = int(kv_heads or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return 2 * kv_heads * head_dim * tokens * batch * dtype.itemsize


def reserved_kv_bytes(model: torch.nn.Module, kv_cache: Optional[dict]) -> int:
    """Bytes that :func:`plan` keeps in a budget for ``model``'s KV cache: :func:`kv_cache_bytes` of its config
    in ``kv_cache``'s dtype, else in the model's (its input embedding's, or its first floating-point
    parameter's); 0 without ``kv_cache`` (``dict(context=..., batch=..., dtype=...)``, as for :func:`plan`)."""
    kv_cache = normalize_kv_cache(kv_cache)
    if kv_cache is None:
        return 0
    dtype = kv_cache["dtype"]
    if dtype is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        dtype = (embeddings.weight.dtype if embeddings is not None
                 else next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16))
    return kv_cache_bytes(getattr(model, "config", None), kv_cache["context"], kv_cache["batch"], dtype,
                          kv_cache["prefill"])


def _storage_entries(t: torch.Tensor):
    """(key, bytes) of each storage behind ``t``, keyed as :func:`lift_ao.footprint` keys them.

    Meta tensors have no addresses; tied meta parameters are the same object, so identity stands in
    for the address. An already quantized weight (LiftQuant or any torchao tensor subclass) contributes
    its inner tensors."""
    for p in plain_tensors(t):
        if p.device.type == "meta":
            yield ("meta", id(p)), p.nbytes
        else:
            storage = p.untyped_storage()
            yield (storage.device.type, storage.data_ptr(), storage.nbytes()), storage.nbytes()


def _high_precision_bytes(model: torch.nn.Module, quantized: set) -> int:
    """Bytes of every parameter/buffer storage except the weights of the modules in ``quantized``
    (ids); a weight tied to a module that stays high precision is still counted."""
    seen = {}
    for module in model.modules():
        tensors = [("buffer", t) for t in module._buffers.values()]
        tensors += [(name, t) for name, t in module._parameters.items()]
        for name, t in tensors:
            if t is None or (name == "weight" and id(module) in quantized):
                continue
            seen.update(_storage_entries(t))
    return sum(seen.values())


# ----- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """One linear layer's choice.

    Attributes:
        name: module FQN; out_features, in_features: N, K of the (N, K) weight.
        lattice: ``"D/d"``; bits: D/d code bits per weight.
        bytes: ``LiftQuantTensor.storage_bytes()`` of the quantized layer (codes, row scales, M and
            rotation; M and rotation are shared with siblings and counted once in the totals).
        score: sensitivity weight; distortion: score × the lattice's MSE per coordinate (the
            solver's estimate of the squared output error this layer adds).
    """

    name: str
    out_features: int
    in_features: int
    lattice: str
    bits: float
    bytes: int
    score: float
    distortion: float

    @property
    def weights(self) -> int:
        """N·K."""
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Plan:
    """Per-layer lattices that fit a memory budget, and the exact byte accounting.

    Attributes (bytes are exact ints):
        budget_bytes: the budget.
        high_precision_bytes: parameters and buffers that stay unquantized.
        quantized_bytes: all quantized layers, shared M/rotation storages counted once.
        kv_cache_bytes, reserve_bytes: reservations.
        layers: one :class:`LayerPlan` per quantized layer, in model order.
        allocation: ``"sensitivity"`` or ``"uniform"``; seed: rotation seed; device: where the
            weights are encoded (decides which storages are shared).
        model_name: for reports; kv_cache: the normalized ``kv_cache`` argument (or None).
    """

    budget_bytes: int
    high_precision_bytes: int
    quantized_bytes: int
    kv_cache_bytes: int
    reserve_bytes: int
    layers: tuple
    allocation: str
    seed: int
    device: str
    model_name: str = ""
    kv_cache: Optional[dict] = field(default=None, compare=False)

    @property
    def model_bytes(self) -> int:
        """Weights after quantization: what ``lift_ao.footprint(model)`` reports."""
        return self.high_precision_bytes + self.quantized_bytes

    @property
    def total_bytes(self) -> int:
        """model_bytes + KV cache + reserve; never above ``budget_bytes``."""
        return self.model_bytes + self.kv_cache_bytes + self.reserve_bytes

    @property
    def headroom_bytes(self) -> int:
        """budget − total (≥ 0)."""
        return self.budget_bytes - self.total_bytes

    @property
    def distortion(self) -> float:
        """Σ over layers of score × lattice MSE: what the sensitivity solver minimises."""
        return sum(layer.distortion for layer in self.layers)

    @property
    def quantized_weights(self) -> int:
        """Number of weights in the quantized layers."""
        return sum(layer.weights for layer in self.layers)

    @property
    def code_bits(self) -> float:
        """Average D/d over the quantized weights (codes only)."""
        return sum(layer.weights * layer.bits for layer in self.layers) / self.quantized_weights

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per quantized weight, row scales and shared M/rotation included."""
        return 8 * self.quantized_bytes / self.quantized_weights

    def lattice_counts(self) -> dict:
        """{lattice: (layers, weights)}, by increasing rate."""
        counts: dict = {}
        for layer in sorted(self.layers, key=lambda l: (l.bits, l.lattice)):
            n, w = counts.get(layer.lattice, (0, 0))
            counts[layer.lattice] = (n + 1, w + layer.weights)
        return counts

    def lattices(self) -> dict:
        """{module FQN: lattice name}."""
        return {layer.name: layer.lattice for layer in self.layers}

    def to_fqn_config(self, progress: bool = False):
        """A torchao ``FqnToConfig`` mapping each layer's module FQN to its ``liftquant`` config.

        ``quantize_(model, plan.to_fqn_config(), filter_fn=None)`` applies the plan to ``nn.Linear``
        layers (for transformers ``Conv1D`` layers use ``lift_ao.quantize``, which transposes them).
        """
        from torchao.quantization import FqnToConfig

        from lift_ao.config import LiftQuantConfig

        return FqnToConfig(OrderedDict(
            (layer.name, LiftQuantConfig(lattice=layer.lattice, seed=self.seed, include_lm_head=True, progress=progress))
            for layer in self.layers
        ))

    def to_dict(self) -> dict:
        """JSON-ready summary and per-layer table."""
        kv = None
        if self.kv_cache is not None:
            kv = dict(self.kv_cache, dtype=str(self.kv_cache["dtype"]).removeprefix("torch.") if self.kv_cache["dtype"] else None)
        return {
            "model": self.model_name,
            "allocation": self.allocation,
            "device": self.device,
            "seed": self.seed,
            "budget_bytes": self.budget_bytes,
            "total_bytes": self.total_bytes,
            "headroom_bytes": self.headroom_bytes,
            "headroom_fraction": self.headroom_bytes / self.budget_bytes,
            "model_bytes": self.model_bytes,
            "high_precision_bytes": self.high_precision_bytes,
            "quantized_bytes": self.quantized_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_cache": kv,
            "reserve_bytes": self.reserve_bytes,
            "quantized_weights": self.quantized_weights,
            "code_bits": self.code_bits,
            "bits_per_weight": self.bits_per_weight,
            "distortion": self.distortion,
            "lattices": {name: {"layers": n, "weights": w} for name, (n, w) in self.lattice_counts().items()},
            "layers": [
                {"name": l.name, "shape": [l.out_features, l.in_features], "lattice": l.lattice, "bits": l.bits,
                 "bytes": l.bytes, "score": l.score, "distortion": l.distortion}
                for l in self.layers
            ],
        }

    def summary(self) -> str:
        """The totals, a few lines."""
        gib = 2**30
        mix = ", ".join(f"{name} × {n} ({100 * w / self.quantized_weights:.1f}% of weights)"
                        for name, (n, w) in self.lattice_counts().items())
        lines = [
            f"plan{' for ' + self.model_name if self.model_name else ''}: {len(self.layers)} layers, "
            f"allocation={self.allocation}, device={self.device}",
            f"  budget          {self.budget_bytes / gib:12.4f} GiB  ({self.budget_bytes} B)",
            f"  high precision  {self.high_precision_bytes / gib:12.4f} GiB",
            f"  quantized       {self.quantized_bytes / gib:12.4f} GiB  ({self.quantized_weights / 1e9:.3f} G weights, "
            f"{self.code_bits:.4f} code bits, {self.bits_per_weight:.4f} bits/weight with scales)",
            f"  kv cache        {self.kv_cache_bytes / gib:12.4f} GiB",
            f"  reserve         {self.reserve_bytes / gib:12.4f} GiB",
            f"  total           {self.total_bytes / gib:12.4f} GiB  ({self.total_bytes} B)",
            f"  headroom        {self.headroom_bytes / 2**20:12.3f} MiB  ({100 * self.headroom_bytes / self.budget_bytes:.4f}% of budget)",
            f"  lattices        {mix}",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max([len("layer")] + [len(l.name) for l in self.layers])
        rows = [f"{'layer':<{width}}  {'shape':>13}  {'lattice':>7}  {'bits':>5}  {'MiB':>10}"]
        rows += [
            f"{l.name:<{width}}  {f'{l.out_features}x{l.in_features}':>13}  {l.lattice:>7}  {l.bits:5.2f}  {l.bytes / 2**20:10.3f}"
            for l in self.layers
        ]
        return "\n".join(rows + [self.summary()])


# ----- sensitivity ----------------------------------------------------------------------------


def _given_scores(scores: dict, names: list, allocation: str) -> list[float]:
    """``scores`` (FQN → weight) as a list in the order of ``names``; refused unless it holds a finite
    weight ≥ 0 for exactly those layers."""
    if allocation != "sensitivity":
        raise BudgetError("scores= weigh the layers of allocation='sensitivity'; allocation='uniform' ignores them")
    known = set(names)
    missing, unknown = [n for n in names if n not in scores], [n for n in scores if n not in known]
    if missing or unknown:
        raise BudgetError(f"scores= must name exactly the layers to plan: missing {missing[:3]}"
                          f"{' …' if len(missing) > 3 else ''}, unknown {unknown[:3]}{' …' if len(unknown) > 3 else ''}")
    bad = [n for n in names if not (isinstance(scores[n], numbers.Real) and math.isfinite(scores[n]) and scores[n] >= 0)]
    if bad:
        raise BudgetError(f"scores= must be finite numbers >= 0; {bad[0]} has {scores[bad[0]]!r}")
    return [float(scores[n]) for n in names]


def _input_mean_squares(model: torch.nn.Module, modules: list, calibration) -> list[float]:
    """E[x²] over the input activations of each module, from running ``calibration`` batches."""
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches or not all(isinstance(b, torch.Tensor) and b.dtype in (torch.int32, torch.int64) for b in batches):
        raise BudgetError("calibration must be a LongTensor of token ids (batch, tokens) or a list of them")
    sums = [0.0] * len(modules)
    counts = [0] * len(modules)

    def hook(index):
        def record(module, args):
            x = args[0].detach()
            sums[index] += float(x.double().square().sum())
            counts[index] += x.numel()
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    if not all(counts):
        missing = [i for i, c in enumerate(counts) if not c]
        raise BudgetError(f"calibration never reached {len(missing)} of the layers to plan; pass batches the model runs end to end")
    return [s / c for s, c in zip(sums, counts)]


def _out_in(module: torch.nn.Module) -> tuple[int, int]:
    from lift_ao.api import _is_hf_conv1d

    # transformers' Conv1D stores (in, out); lift_ao.quantize turns it into an (out, in) Linear.
    n, k = module.weight.shape
    return (k, n) if _is_hf_conv1d(module) else (n, k)


def _lattice_mse(lattice: Lattice) -> float:
    # A lattice without a measured MSE is priced at the Gaussian distortion-rate bound 2^(−2b).
    return lattice.mse if math.isfinite(lattice.mse) else 2.0 ** (-2 * lattice.bits)


# ----- solver ---------------------------------------------------------------------------------


def _total_bytes(choice: list, own: list, shared: list, fixed: int) -> int:
    """Exact total of a choice (option index per layer): shared storages counted once."""
    storages = {key: nbytes for i, j in enumerate(choice) for key, nbytes in shared[i][j].items()}
    return fixed + sum(own[i][j] for i, j in enumerate(choice)) + sum(storages.values())


def _lower_hull(points: list, allowed: Iterable[int]) -> list:
    """Indices (among ``allowed``) of the lower convex hull of (bytes, distortion) points, by
    increasing bytes, keeping only points that lower the distortion."""
    order = sorted(allowed, key=lambda j: (points[j][0], points[j][1]))
    hull: list = []
    for j in order:
        b, d = points[j]
        if hull and (points[hull[-1]][0] == b or points[hull[-1]][1] <= d):
            continue  # same bytes with no less distortion, or more bytes for no gain
        while len(hull) >= 2:
            (b1, d1), (b2, d2) = points[hull[-2]], points[hull[-1]]
            # Drop the middle point when it lies on or above the chord from hull[-2] to j.
            if (d2 - d1) * (b - b1) >= (d - d1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _solve_separable(own: list, distortion: list, hulls: list, capacity: int) -> Optional[list]:
    """Least-distortion choice with Σ own bytes ≤ capacity, or None if even the cheapest exceeds it.

    Every layer starts at its cheapest option; the hull steps of all layers are taken in one fixed
    order, best distortion removed per byte first, stopping at the first that does not fit (so a
    larger capacity takes a longer prefix of the same sequence); the slack is then filled by moves
    to points further along a layer's hull, best gain per byte first. Hull slopes only decrease,
    so what the fill gains is less than the next hull step would have: the distortion of the
    result never increases with the capacity.
    """
    choice = [hull[0] for hull in hulls]
    used = sum(own[i][j] for i, j in enumerate(choice))
    if used > capacity:
        return None
    steps = sorted(
        ((distortion[i][b] - distortion[i][a]) / (own[i][b] - own[i][a]), i, b)
        for i, hull in enumerate(hulls) for a, b in zip(hull, hull[1:])
    )
    # Slopes decrease along each hull, so the sorted order keeps every layer's steps in sequence.
    for _, i, new in steps:
        cost = own[i][new] - own[i][choice[i]]
        if used + cost > capacity:
            break
        choice[i], used = new, used + cost
    while True:
        best = None
        for i, hull in enumerate(hulls):
            c = choice[i]
            for j in hull:
                cost = own[i][j] - own[i][c]
                if cost > 0 and used + cost <= capacity:
                    rate = (distortion[i][c] - distortion[i][j]) / cost
                    if best is None or rate > best[0]:
                        best = (rate, i, j, cost)
        if best is None:
            return choice
        _, i, j, cost = best
        choice[i], used = j, used + cost


def _solve_uniform(own, shared, distortion, fixed, budget) -> tuple[list, int]:
    """Every layer on one lattice: the lowest-distortion lattice whose total fits (when none fits,
    the smallest total, for the error message). Returns (choice, exact total)."""
    candidates = []
    for j in range(len(own[0])):
        total = _total_bytes([j] * len(own), own, shared, fixed)
        fits = total <= budget
        candidates.append((not fits, sum(d[j] for d in distortion) if fits else total, j, total))
    _, _, j, total = min(candidates)
    return [j] * len(own), total


def _largest_fitting(solve: Callable, capacity: int, total: Callable, budget: int) -> Optional[list]:
    """``solve(capacity)`` (a choice, or None when even the cheapest exceeds the capacity) if its exact
    ``total`` fits ``budget``, else the result at a lower capacity that fits, found by bisection; None
    when none is found. The choices only grow with the capacity but, with siblings split between
    lattices, their exact totals not always: the bisection may then miss a larger capacity that fits."""
    choice = solve(capacity)
    if choice is None or total(choice) <= budget:
        return choice
    best, low, high = None, 0, capacity - 1
    while low <= high:
        middle = (low + high) // 2
        choice = solve(middle)
        if choice is not None and total(choice) <= budget:
            best, low = choice, middle + 1
        elif choice is None:
            low = middle + 1
        else:
            high = middle - 1
    return best


def _solve_sensitivity(own, shared, distortion, fixed, budget, rates) -> tuple[list, int]:
    """Mixed widths: (option per layer, exact total); the total exceeds ``budget`` only when nothing fits.
    ``rates``: bits per weight of each option.

    The M and rotation storages a lattice brings are shared by its layers, so their cost is not
    per layer: :func:`_solve_separable` runs on a family of lattice sets (all lattices, and each
    pair of neighbours in rate among those on some layer's hull) with every storage the set could
    use reserved up front (a few KB per lattice and input size; it matters on small models, where
    two lattices fill a budget better than twenty). The plan is the least-distortion result among
    those, every layer's cheapest option and the best uniform plan, each that fits. The family does
    not depend on the budget and each member only improves as the budget grows, so the plan's
    distortion never increases with the budget (without sibling groups: see below).

    A sibling group's storages (:func:`_group_of`, ``plan(groups=...)``) serve its few
    members only: reserving each for every lattice on their hulls would hold back several copies per
    group. Instead each member's options carry an equal share of them, exact when the siblings pick
    one lattice; when they split, the exact total is higher, and the capacity is lowered until the
    result fits (:func:`_largest_fitting`). The same problem solved with each group as one unit on one
    lattice (exact) is a further candidate. Every plan still fits its budget, but a larger budget can
    then give a slightly higher distortion (+2 % at worst in a review's sweeps of a tiny model).
    """
    n_layers, n_options = len(own), len(own[0])
    users: dict = {}
    for i in range(n_layers):
        for key in {key for j in range(n_options) for key in shared[i][j] if _group_of(key) is not None}:
            users[key] = users.get(key, 0) + 1
    amortized = [[own[i][j] + sum(b / users[key] for key, b in shared[i][j].items() if key in users)
                  for j in range(n_options)] for i in range(n_layers)]
    points = [list(zip(amortized[i], distortion[i])) for i in range(n_layers)]
    full_hulls = [_lower_hull(p, range(n_options)) for p in points]
    on_hulls = sorted({j for hull in full_hulls for j in hull}, key=lambda j: rates[j])
    families = [full_hulls] + [[_lower_hull(p, pair) for p in points] for pair in zip(on_hulls, on_hulls[1:])]
    options = [[hull[0] for hull in full_hulls], _solve_uniform(own, shared, distortion, fixed, budget)[0]]

    def total(choice: list) -> int:
        return _total_bytes(choice, own, shared, fixed)

    for hulls in families:
        reserved = {key: b for i, hull in enumerate(hulls) for j in hull for key, b in shared[i][j].items()
                    if key not in users}
        options.append(_largest_fitting(lambda capacity: _solve_separable(amortized, distortion, hulls, capacity),
                                        budget - fixed - sum(reserved.values()), total, budget))
    if users:
        options.append(_solve_by_group(own, shared, distortion, fixed, budget, rates))
    scored = []
    for choice in filter(None, options):
        choice_bytes = total(choice)
        fits = choice_bytes <= budget
        scored.append((not fits, sum(distortion[i][j] for i, j in enumerate(choice)) if fits else choice_bytes,
                       choice_bytes, choice))
    _, _, choice_bytes, choice = min(scored, key=lambda item: item[:3])
    return choice, choice_bytes


def _solve_by_group(own, shared, distortion, fixed, budget, rates) -> list:
    """:func:`_solve_sensitivity` with each sibling group (layers whose storages carry one group key) as
    one unit on one lattice: its bytes and storages are its members' (the group's own counted once), its
    distortion their sum. Returns an option per layer."""
    unit_of = [next(_group_of(key) for key in shared[i][0] if _group_of(key) is not None) for i in range(len(own))]
    units = list(dict.fromkeys(unit_of))
    members = {u: [i for i in range(len(own)) if unit_of[i] == u] for u in units}
    unit_own, unit_shared, unit_distortion = [], [], []
    for u in units:
        own_u, shared_u = [], []
        for j in range(len(own[0])):
            storages = {key: b for i in members[u] for key, b in shared[i][j].items()}
            own_u.append(sum(own[i][j] for i in members[u]) + sum(b for key, b in storages.items() if _group_of(key) is not None))
            shared_u.append({key: b for key, b in storages.items() if _group_of(key) is None})
        unit_own.append(own_u)
        unit_shared.append(shared_u)
        unit_distortion.append([sum(distortion[i][j] for i in members[u]) for j in range(len(own[0]))])
    choice, _ = _solve_sensitivity(unit_own, unit_shared, unit_distortion, fixed, budget, rates)
    option_of = dict(zip(units, choice))
    return [option_of[u] for u in unit_of]


# ----- entry point ----------------------------------------------------------------------------


def _model_from_config(config, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """A meta-device causal LM from a Hugging Face config, a config dict, or a config.json path."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config, (str, Path)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{config}: no such config.json or model directory")
        config = json.loads(path.read_text())
    if isinstance(config, dict):
        if "model_type" not in config:
            raise BudgetError("a config dict needs 'model_type' (e.g. 'llama', 'qwen2') and the model's sizes")
        fields = dict(config)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            "plan() takes an nn.Module, a transformers config, a config dict or a config.json path; "
            f"got {type(config).__name__}"
        )
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def parse_rate_window(text: str) -> Optional[float]:
    """A command line's rate window: bits (``"1.0"``), or ``"none"`` for no window."""
    return None if text.strip().lower() == "none" else float(text)


def check_rate_window(rate_window, allocation: str = "sensitivity") -> None:
    """Raise :class:`BudgetError` unless ``rate_window`` is None or a finite number of bits ≥ 0, and left at
    its default with ``allocation="uniform"`` (which one window would silently not bound)."""
    if rate_window is not None and (isinstance(rate_window, bool) or not isinstance(rate_window, numbers.Real)
                                    or not math.isfinite(rate_window) or rate_window < 0):
        raise BudgetError(f"rate_window must be None (no window) or bits >= 0 such as 0.4, got {rate_window!r}")
    if allocation == "uniform" and rate_window != DEFAULT_RATE_WINDOW:
        raise BudgetError("rate_window bounds the lattices a sensitivity plan mixes; allocation='uniform' gives every "
                          "layer one lattice: drop rate_window (--rate-window)")


def plan(
    model_or_config,
    memory_budget: Union[int, str],
    *,
    reserve: Union[int, str] = 0,
    kv_cache: Optional[dict] = None,
    allocation: str = "sensitivity",
    calibration=None,
    include_lm_head: bool = False,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
    seed: int = 0,
    device=None,
    dtype: Optional[torch.dtype] = None,
    lattices: Optional[Iterable[Lattice]] = None,
    rate_window: Optional[float] = DEFAULT_RATE_WINDOW,
    scores: Optional[dict] = None,
    groups: Optional[list] = None,
    tuned: tuple = (),
) -> Plan:
    """Choose a shipped lattice per linear layer so the model fits ``memory_budget``; touches no weight.

    Args:
        model_or_config: an ``nn.Module`` (real or meta-device), or a Hugging Face config (object,
            dict with ``model_type``, or config.json path/directory), built on the meta device.
        memory_budget: bytes (int) or a size string (``"24GiB"``, ``"24 GB"``, ``"512MiB"``).
        reserve: extra bytes to keep free (activations, CUDA context), same formats.
        kv_cache: ``dict(context=tokens, batch=sequences, dtype=None, prefill=None)`` to reserve the KV cache
            at its peak (dtype default: the model's embedding dtype; prefill, the longest prompt, default: the
            context, which sliding-window layers then hold whole: :func:`kv_cache_bytes`).
        allocation: ``"sensitivity"`` (mixed widths, see the module docstring) or ``"uniform"``.
        calibration: token ids (batch, tokens) or a list of them, run through the model to
            measure each layer's E[x²] (sensitivity only; needs real weights).
        include_lm_head, filter_fn, seed: as in :func:`lift_ao.quantize`. Layers already quantized
            are not replanned; their storages count with the high-precision part (with the M and rotation
            that the planned layers will share with them).
        device: where the weights will be encoded (decides which M/rotation storages are shared);
            default: where the model's weights are, ``cuda`` for a meta-device model.
        dtype: dtype of the high-precision parts when building from a config (default: the
            config's dtype, else bfloat16).
        lattices: candidate lattices (default: all shipped).
        rate_window: sensitivity only: use only the candidates within this many bits (≥ 0) of the
            rate the uniform plan reaches (None: all); :data:`DEFAULT_RATE_WINDOW` says why 0.4, and
            that measured ``scores`` did better with 1.0.
        scores: sensitivity only: {layer FQN: weight ≥ 0} for every layer to plan, replacing the
            built-in score (‖W‖²_F · E[x²]): a layer's distortion at lattice j is score × MSE_j. For
            measured sensitivities: the loss increase the layer causes at lattice r, divided by MSE_r.
        groups: plan for :func:`lift_ao.calibrate`, whose groups of siblings (lists of layer FQNs that
            read one tensor: ``lift_ao.calibration.sibling_groups``; a layer in none is alone) each
            store their own input signs per block length d instead of sharing one rotation's. The plan's
            ``model_bytes`` is then the calibrated (and tuned) model's footprint, or more where
            ``share_constants`` finds equal values to merge (input signs with ``alpha=0``, equal
            rotation factors of two block lengths).
        tuned: with ``groups``, what is tuned and so stored per group (:data:`TUNED_PARTS`): ``"scales"``
            (calibrate's ``finetune_steps``: input signs per lattice), ``"rotation"`` (calibrate's
            ``finetune_rotation``, ``finetune_end_to_end``'s ``tune_rotation``), ``"mapping"``
            (``finetune_end_to_end``'s ``tune_mapping``).
    Returns:
        :class:`Plan` with ``total_bytes ≤ budget``.
    Raises:
        BudgetError: malformed sizes, or even the smallest lattice cannot fit (the message says by
            how much and what to change).
    """
    from lift_ao.api import quantizable_linears
    from lift_ao.config import LiftQuantConfig

    check_rate_window(rate_window, allocation)
    if isinstance(tuned, str) or not set(tuned) <= set(TUNED_PARTS) or (tuned and groups is None):
        raise BudgetError(f"tuned must be a tuple of {TUNED_PARTS}, given with groups=; got {tuned!r}")
    tuned = frozenset(tuned)
    budget = parse_bytes(memory_budget, "memory_budget")
    reserve = parse_bytes(reserve, "reserve", allow_zero=True)
    kv_cache = normalize_kv_cache(kv_cache)
    if allocation not in ALLOCATIONS:
        raise BudgetError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if isinstance(model_or_config, torch.nn.Module):
        if dtype is not None:
            raise BudgetError("dtype= applies when planning from a config; cast the model itself instead")
        model = model_or_config
    else:
        model = _model_from_config(model_or_config, dtype)
    candidates = sorted(Lattice.shipped() if lattices is None else list(lattices), key=lambda l: (l.bits, l.d))
    if not candidates:
        raise BudgetError("no lattices to choose from: none is shipped in lift_ao/lattices; train one with "
                          "`python -m lift_ao.lattice train --d 10 --D 24`")

    selection = LiftQuantConfig(lattice=None, seed=seed, include_lm_head=include_lm_head, memory_budget=budget)
    targets = quantizable_linears(model, selection, filter_fn)
    if not targets:
        raise BudgetError(f"{type(model).__name__} has no linear layer to quantize (after filter_fn and the lm_head rule)")
    on_meta = targets[0][1].weight.device.type == "meta"
    if device is None:
        device = torch.device("cuda") if on_meta else targets[0][1].weight.device
    device = torch.device(device)

    config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    kv_bytes = reserved_kv_bytes(model, kv_cache)
    high_precision = _high_precision_bytes(model, {id(m) for _, m in targets})
    fixed = high_precision + kv_bytes + reserve

    modules = [m for _, m in targets]
    shapes = [_out_in(m) for m in modules]
    if calibration is not None and (on_meta or allocation == "uniform" or scores is not None):
        raise BudgetError("calibration= only informs allocation='sensitivity' on a model with real weights, "
                          "without scores=")
    if scores is not None:
        scores = _given_scores(scores, [name for name, _ in targets], allocation)
    elif allocation == "sensitivity" and not on_meta:
        energy = [float(m.weight.detach().double().square().sum()) for m in modules]
        input_ms = _input_mean_squares(model, modules, calibration) if calibration is not None else [1.0] * len(modules)
        scores = [e * x for e, x in zip(energy, input_ms)]
        # One inf ties every plan (all go to the smallest lattice), a NaN scrambles it: refused here,
        # as quantizing the layer would refuse it.
        broken = [name for (name, m), score in zip(targets, scores)
                  if not m.weight.dtype.is_floating_point or not math.isfinite(score)]
        if broken:
            raise BudgetError(f"{broken[:3]}: weights that are not floating point or hold NaN/Inf (or whose calibration "
                              "activations overflow): fix the checkpoint, or leave those layers out")
    else:
        scores = [float(n * k) for n, k in shapes]

    group_of = {name: index for index, names in enumerate(groups or []) for name in names}
    held = _held_constants(model, candidates, {k for _, k in shapes}, seed, device)

    def tables(lattices: list[Lattice]):
        """Per layer × lattice: own bytes, shared storages, distortion (score × lattice MSE)."""
        mses = [_lattice_mse(l) for l in lattices]
        own = [[code_bytes(n, k, l) for l in lattices] for n, k in shapes]
        shared = [[_shared_storages(k, l, seed, device, group_of.get(name, name) if groups is not None else None, tuned,
                                    held) for l in lattices] for (name, _), (_, k) in zip(targets, shapes)]
        return own, shared, [[s * e for e in mses] for s in scores]

    own, shared, distortion = tables(candidates)
    choice, total = _solve_uniform(own, shared, distortion, fixed, budget)
    if allocation == "sensitivity":
        if rate_window is not None and total <= budget:
            rate = candidates[choice[0]].bits
            candidates = [l for l in candidates if abs(l.bits - rate) <= rate_window + 1e-9]
            own, shared, distortion = tables(candidates)
        choice, total = _solve_sensitivity(own, shared, distortion, fixed, budget, [l.bits for l in candidates])
    if total > budget:
        # Only the fixes that apply, each with its command-line forms.
        fixes = [f"raise the budget to at least {total} bytes"]
        if kv_bytes:
            fixes.append("shrink the KV cache's context or batch (lift-ao plan --context/--batch, lift-ao quantize "
                         "--kv-context/--kv-batch)")
        if reserve:
            fixes.append("shrink the reserve (lift-ao plan/quantize --reserve)")
        # Only an output projection the lm_head rule kept out, and not tied to the input embedding (quantized,
        # it would get codes of its own beside the embedding, which stays: more bytes, not fewer).
        with_head = LiftQuantConfig(lattice=None, seed=seed, include_lm_head=True, memory_budget=budget)
        planned = {id(m) for m in modules}
        kept_out = [m for _, m in quantizable_linears(model, with_head, filter_fn) if id(m) not in planned]
        if any(embeddings is None or m.weight is not embeddings.weight for m in kept_out):
            fixes.append("quantize the output projection too (include_lm_head=True, not with calibration, which keeps "
                         "it; lift-ao plan/quantize --lm-head)")
        fixes.append(f"ship a lower-rate lattice (smallest now: {candidates[0].name})")
        advice = "; or ".join(fixes)
        raise BudgetError(
            f"memory_budget {format_bytes(budget)} is too small: even the smallest "
            f"{'uniform ' if allocation == 'uniform' else ''}lattice choice needs {format_bytes(total)} "
            f"({format_bytes(total - budget)} over; high precision {format_bytes(high_precision)}, "
            f"KV cache {format_bytes(kv_bytes)}, reserve {format_bytes(reserve)}). {advice[0].upper()}{advice[1:]}",
            needed_bytes=total,
        )
    layers = tuple(
        LayerPlan(name, n, k, candidates[j].name, candidates[j].bits, layer_storage_bytes(n, k, candidates[j]),
                  score, distortion[i][j])
        for i, ((name, _), (n, k), j, score) in enumerate(zip(targets, shapes, choice, scores))
    )
    name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__
    return Plan(
        budget_bytes=budget, high_precision_bytes=high_precision, quantized_bytes=total - fixed,
        kv_cache_bytes=kv_bytes, reserve_bytes=reserve, layers=layers, allocation=allocation, seed=seed,
        device=str(device), model_name=name, kv_cache=kv_cache,
    )
