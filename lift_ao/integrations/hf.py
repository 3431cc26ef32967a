"""Hugging Face transformers: ``from_pretrained``/``save_pretrained`` through transformers' quantizer hooks.

    from lift_ao.integrations.hf import LiftQuantHfConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LiftQuantHfConfig(bits=2.4))
    model.save_pretrained(out_dir)                         # safetensors, quantization_config in config.json
    model = AutoModelForCausalLM.from_pretrained(out_dir)  # after ``import lift_ao``: identical outputs

Importing this module (``import lift_ao`` does) registers ``quant_method="liftquant"`` with
``transformers.quantizers.auto``: ``LiftQuantHfConfig`` is the ``QuantizationConfigMixin`` written to
``config.json``, ``LiftQuantHfQuantizer`` the ``HfQuantizer`` that transformers instantiates from it.

Checkpoint layout (plain tensors, no pickle): a LiftQuant weight ``<module>.weight`` is stored as
``<module>.weight_packed_codes``, ``<module>.weight_row_scale``, ``<module>.weight_mapping``,
``<module>.weight_input_signs``, ``<module>.weight_rotation_left``, ``<module>.weight_rotation_right``
(see :class:`~lift_ao.tensor.LiftQuantTensor` for their shapes). The suffix is joined with ``_``, as
transformers' own ``weight_scale_inv`` is, because transformers' key patterns treat ``weight.`` as the
end of a weight name and would rename ``weight.packed_codes`` to ``weight``. Every weight carries its
own lattice matrix, so checkpoints with per-layer lattices (``memory_budget``) load without the
shipped lattice files; the logical (out, in) shape and dtype come from the model being loaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from lift_ao.api import quantizable_linears
from lift_ao.config import LiftQuantConfig, liftquant
from lift_ao.io import CheckpointError, stored_weight
from lift_ao.lattice import Lattice
from lift_ao.packing import interleave_rows, packed_shape, words_per_row
from lift_ao.tensor import LiftQuantTensor, share_constants

if TYPE_CHECKING:  # importing modeling_utils costs a second at `import lift_ao`; only annotations need it
    from transformers import PreTrainedModel

__all__ = ["QUANT_METHOD", "LiftQuantHfConfig", "LiftQuantHfQuantizer", "enable_save_pretrained"]

QUANT_METHOD = "liftquant"
# Checkpoint names of a LiftQuant weight's tensors: "weight" -> "weight_packed_codes", ...
SERIALIZED_WEIGHT_NAMES = [f"weight_{name}" for name in LiftQuantTensor.tensor_data_names]


@register_quantization_config(QUANT_METHOD)
class LiftQuantHfConfig(QuantizationConfigMixin):
    """LiftQuant settings for ``from_pretrained(..., quantization_config=...)``; saved in ``config.json``.

    Give exactly one of ``bits``, ``lattice`` or ``memory_budget`` (the last only describes checkpoints
    made with ``lift_ao.quantize(model, liftquant(memory_budget=...))``: planning needs the whole model,
    so it cannot run while transformers loads one tensor at a time).

    Args:
        bits: target bits per weight (e.g. 2.4), resolved to a shipped lattice as :func:`lift_ao.liftquant` does.
        lattice: a shipped lattice name ``"D/d"`` (e.g. ``"24/10"``) instead of ``bits``.
        round: ``"down"`` or ``"nearest"``, how ``bits`` picks a lattice.
        seed: seed of the input rotations.
        include_lm_head: also quantize the output projection (not allowed when it is tied to the input embedding).
        modules_to_not_convert: module names (or name prefixes) to keep in high precision.
        memory_budget: bytes the checkpoint was planned for (informational, pre-quantized checkpoints only).
    """

    def __init__(
        self, bits: Optional[float] = None, lattice: Optional[str] = None, round: str = "down", seed: int = 0,
        include_lm_head: bool = False, modules_to_not_convert: Optional[list[str]] = None,
        memory_budget: Optional[int] = None, **kwargs,
    ):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LiftQuantHfConfig is for quant_method={QUANT_METHOD!r}, got {quant_method!r}")
        if kwargs:
            raise TypeError(
                f"LiftQuantHfConfig got unknown fields {sorted(kwargs)}; the checkpoint was written by a newer "
                "lift_ao: upgrade lift_ao, or remove the fields from config.json's quantization_config"
            )
        if sum(v is not None for v in (bits, lattice, memory_budget)) != 1:
            raise ValueError(
                "LiftQuantHfConfig needs exactly one of bits=... (e.g. 2.4), lattice=... (e.g. '24/10') "
                "or memory_budget=... (pre-quantized checkpoints only)"
            )
        if modules_to_not_convert is not None and not all(isinstance(m, str) for m in modules_to_not_convert):
            raise TypeError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}")
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.lattice = lattice
        self.round = round
        self.seed = seed
        self.include_lm_head = include_lm_head
        self.modules_to_not_convert = modules_to_not_convert
        self.memory_budget = memory_budget

    @classmethod
    def from_liftquant(cls, config: LiftQuantConfig) -> "LiftQuantHfConfig":
        """The Hugging Face record of a :func:`lift_ao.liftquant` config (what :func:`enable_save_pretrained` writes)."""
        if not isinstance(config, LiftQuantConfig):
            raise TypeError(f"config must come from lift_ao.liftquant(...), got {type(config).__name__}")
        return cls(
            lattice=config.lattice, seed=config.seed, include_lm_head=config.include_lm_head,
            memory_budget=config.memory_budget,
        )

    def to_liftquant(self) -> LiftQuantConfig:
        """The :class:`~lift_ao.config.LiftQuantConfig` that quantizes on load (needs the shipped lattices)."""
        if self.memory_budget is not None:
            raise ValueError(
                "a memory_budget is planned over the whole model and cannot be applied while transformers "
                "loads it tensor by tensor: load the model unquantized, run "
                "lift_ao.quantize(model, lift_ao.liftquant(memory_budget=...)), then model.save_pretrained(dir)"
            )
        return liftquant(
            self.bits, lattice=self.lattice, round=self.round, seed=self.seed, include_lm_head=self.include_lm_head,
        )


class _EncodeOnLoad(ConversionOps):
    """Quantizes one high-precision checkpoint weight as transformers loads it."""

    def __init__(self, hf_quantizer: "LiftQuantHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, **kwargs) -> dict[str, torch.nn.Parameter]:
        """``{full_layer_name: [weight (N, K)]}`` -> ``{full_layer_name: Parameter(LiftQuantTensor (N, K))}``."""
        (weight,) = input_dict.values()
        weight = weight[0] if isinstance(weight, list) else weight
        config = self.hf_quantizer.liftquant_config
        quantized = LiftQuantTensor.from_hp(
            weight, self.hf_quantizer.lattice, seed=config.seed, progress=config.progress, name=full_layer_name
        )
        return {full_layer_name: torch.nn.Parameter(quantized, requires_grad=False)}


class _Deserialize(ConversionOps):
    """Rebuilds a :class:`LiftQuantTensor` from its ``weight_*`` checkpoint tensors."""

    def __init__(self, hf_quantizer: "LiftQuantHfQuantizer"):
        # transformers looks for `hf_quantizer` on load ops to leave the tensors' dtypes alone
        # (codes are int32, scales and transforms float32 whatever the model's dtype).
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs) -> dict[str, torch.nn.Parameter]:
        """``{"weight_packed_codes": [t], ...}`` -> ``{full_layer_name: Parameter(LiftQuantTensor (N, K))}``."""
        missing = [name for name in SERIALIZED_WEIGHT_NAMES if name not in input_dict]
        if missing:
            raise CheckpointError(f"{full_layer_name}: the checkpoint lacks {missing}; save the model again")
        parts = [input_dict[name][0] for name in SERIALIZED_WEIGHT_NAMES]
        module = model.get_submodule(full_layer_name.rpartition(".")[0])
        if not isinstance(module, torch.nn.Linear):
            raise CheckpointError(
                f"{full_layer_name}: LiftQuant weights load into nn.Linear, this model has a "
                f"{type(module).__name__} there (GPT-2 Conv1D), which this path cannot load: quantize such a model "
                "with lift_ao.quantize and save it with lift_ao.save_quantized(model, dir), then lift_ao.load_quantized(dir)"
            )
        expected = module.weight  # on the meta device: gives the logical shape and dtype
        packed_codes, row_scale, mapping, input_signs = parts[:4]
        block, code_bits = mapping.shape
        padded_in = input_signs.shape[0]
        length = padded_in // block * code_bits
        if packed_codes.shape == (expected.shape[0], words_per_row(length)):
            # lift_ao's checkpoint format 2 (rows one after another): regrouped exactly into format 3.
            packed_codes = parts[0] = interleave_rows(packed_codes)
        if (packed_codes.shape != packed_shape(expected.shape[0], length)
                or row_scale.shape != (expected.shape[0],) or padded_in < expected.shape[1] or padded_in % block):
            raise CheckpointError(
                f"{full_layer_name}: stored codes {tuple(packed_codes.shape)} / scales {tuple(row_scale.shape)} "
                f"do not fit a weight of shape {tuple(expected.shape)}; load into the architecture that was saved"
            )
        weight = stored_weight(full_layer_name, parts, expected.shape, expected.dtype)
        return {full_layer_name: torch.nn.Parameter(weight, requires_grad=False)}


@register_quantizer(QUANT_METHOD)
class LiftQuantHfQuantizer(HfQuantizer):
    """transformers' side of LiftQuant: quantize on load, flatten for ``save_pretrained``, rebuild on load."""

    requires_calibration = False
    serialized_names = {"weight": SERIALIZED_WEIGHT_NAMES}

    def validate_environment(self, device_map=None, **kwargs):
        """Fail before any tensor is read: unknown lattice or budget on load, or disk offload."""
        if not self.pre_quantized:
            self.liftquant_config = self.quantization_config.to_liftquant()
            self.lattice = Lattice.load(self.liftquant_config.lattice)
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "LiftQuant weights cannot be offloaded to disk; give a device_map with GPU/CPU devices only"
            )

    @property
    def quantized_element_size(self) -> Optional[float]:
        """Bytes per weight quantized on load (D/d bits), for transformers' device-map planning."""
        # transformers asks only for weights that param_needs_quantization selects: quantize on load.
        return None if self.pre_quantized else self.lattice.bits / 8

    def _process_model_before_weight_loading(self, model: "PreTrainedModel", **kwargs):
        # Quantize on load: the same selection as lift_ao.quantize (output projection kept unless
        # include_lm_head), minus modules_to_not_convert and the model's fp32 modules; nn.Linear only,
        # because a GPT-2 Conv1D stores its weight transposed. A pre-quantized checkpoint says by its
        # keys which weights are LiftQuant, so nothing is selected then.
        self.quantized_modules = set()
        if self.pre_quantized:
            return
        config = self.quantization_config
        if config.include_lm_head and _ties_embeddings(model):
            raise ValueError(
                "include_lm_head=True but the output projection is tied to the input embedding; load with "
                "tie_word_embeddings=False or keep include_lm_head=False"
            )
        skipped = list(config.modules_to_not_convert or []) + list(model._keep_in_fp32_modules or [])
        self.quantized_modules = {
            name for name, module in quantizable_linears(model, self.liftquant_config)
            if isinstance(module, torch.nn.Linear) and should_convert_module(name, skipped)
        }
        if not self.quantized_modules:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear layer to quantize on load (GPT-2 style Conv1D "
                "layers are not); load it unquantized and call lift_ao.quantize(model, lift_ao.liftquant(...))"
            )

    def param_needs_quantization(self, model: "PreTrainedModel", param_name: str, **kwargs) -> bool:
        """Whether ``param_name`` (e.g. ``model.layers.0.mlp.up_proj.weight``) is a LiftQuant weight."""
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and module_name in self.quantized_modules

    def get_quantize_ops(self) -> ConversionOps:
        """The op transformers applies to each high-precision weight selected for quantization."""
        return _EncodeOnLoad(self)

    def get_load_operations(self) -> dict:
        """The op that rebuilds LiftQuant weights from a pre-quantized checkpoint."""
        return {"deserialize": _Deserialize}

    def _process_model_after_weight_loading(self, model: "PreTrainedModel", attached: bool = False, **kwargs):
        # Our converter only makes sense when loading; left in the model's conversion record,
        # save_pretrained would try to reverse it and rename every `.weight` key.
        if hasattr(model, "_weight_conversions"):
            model._weight_conversions = [
                conversion for conversion in model._weight_conversions
                if not any(isinstance(op, _Deserialize) for op in getattr(conversion, "operations", ()))
            ]
        # Loaded weights each hold their own M and rotation. A model this quantizer is attached to (`attached`,
        # _attach_quantizer) shares them already as lift_ao.quantize or load_quantized left them: merging equal
        # values further (one rotation for d = 8 and 16 at one K) would break plan.model_bytes == footprint.
        if not attached:
            share_constants(model)
        return model

    def get_state_dict_and_metadata(self, model: "PreTrainedModel"):
        """The state dict ``save_pretrained`` writes: each LiftQuant ``<m>.weight`` as ``<m>.weight_<tensor>``."""
        # Checked here, before save_pretrained writes anything: lift_ao.quantize attaches this quantizer to
        # any transformers model, GPT-2's too, which only lift_ao.save_quantized can write.
        _check_loadable(model)
        state_dict = {}
        for key, value in model.state_dict().items():
            if isinstance(value, LiftQuantTensor):
                prefix = key.removesuffix("weight")
                for name, serialized in zip(LiftQuantTensor.tensor_data_names, SERIALIZED_WEIGHT_NAMES):
                    # Clone: q/k/v share one rotation and mapping in memory, safetensors refuses shared storage.
                    state_dict[prefix + serialized] = getattr(value, name).detach().clone()
            else:
                state_dict[key] = value
        return state_dict, {}

    def is_serializable(self) -> bool:
        """LiftQuant models save with ``save_pretrained`` (safetensors)."""
        return True

    @property
    def is_trainable(self) -> bool:
        """Yes, with adapters (PEFT/LoRA): the ops pass gradients to their activation, so adapters around or
        beside LiftQuant layers train; the ±1 codes themselves have no gradient (transformers' Trainer refuses a
        quantized model without adapters)."""
        return True

    @property
    def is_compileable(self) -> bool:
        """Yes: the ops have fake implementations and the Inductor passes handle them."""
        return True


def _ties_embeddings(model: "PreTrainedModel") -> bool:
    """Whether the model's config ties its output projection to its input embedding (from_pretrained ties them)."""
    return getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", False)


def enable_save_pretrained(model: "PreTrainedModel", config: LiftQuantConfig) -> "PreTrainedModel":
    """Let ``model.save_pretrained`` write a model quantized with torchao's ``quantize_``.

    transformers only serializes quantized weights through the model's ``hf_quantizer``, which
    ``from_pretrained(quantization_config=...)`` and :func:`lift_ao.quantize` attach; torchao's ``quantize_``
    shows lift_ao one module at a time, never the model, so after it this call attaches one and records
    ``config`` as ``quantization_config`` in ``config.json``.

    Args:
        model: a transformers ``PreTrainedModel`` whose linear weights are LiftQuant-coded.
        config: the :func:`lift_ao.liftquant` config it was quantized with.
    Returns:
        ``model`` (modified in place).
    Raises:
        ValueError: no LiftQuant weight, or weights that ``from_pretrained`` could not load (then save
            with ``lift_ao.save_quantized``).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"enable_save_pretrained needs a transformers PreTrainedModel, got {type(model).__name__}; "
            "save other models with lift_ao.save_quantized(model, dir)"
        )
    if not any(isinstance(p, LiftQuantTensor) for p in model.parameters()):
        raise ValueError("the model has no LiftQuant weight: run lift_ao.quantize(model, config) first")
    _check_loadable(model)  # refused now, while the model is in memory, rather than at save_pretrained
    return _attach_quantizer(model, LiftQuantHfConfig.from_liftquant(config))


def attach_after_quantize(model: torch.nn.Module, config: LiftQuantConfig) -> None:
    """After :func:`lift_ao.quantize`: a transformers model gets the ``hf_quantizer`` through which
    ``save_pretrained`` writes LiftQuant weights, recording ``config`` (the budget, for a planned model: the
    checkpoint's weights each carry their own lattice, so ``from_pretrained`` loads any mix). Where
    ``from_pretrained`` could not load the result (GPT-2's Conv1D, a quantized tied head), ``save_pretrained``
    then refuses, naming ``lift_ao.save_quantized``. Other models, and a model that another quantization
    method's ``hf_quantizer`` saves, are left alone."""
    from transformers import PreTrainedModel

    current = getattr(model, "hf_quantizer", None)
    if isinstance(model, PreTrainedModel) and (current is None or isinstance(current, LiftQuantHfQuantizer)):
        _attach_quantizer(model, LiftQuantHfConfig.from_liftquant(config))


def _check_loadable(model: "PreTrainedModel") -> None:
    """Raise unless ``from_pretrained`` can load what ``save_pretrained`` would write of ``model``."""
    head = model.get_output_embeddings()
    if _ties_embeddings(model) and head is not None and isinstance(head.weight, LiftQuantTensor):
        raise ValueError("the output projection is quantized but config.json ties it to the input embedding "
                         "(tie_word_embeddings=True), which from_pretrained would tie again and fail on: quantize "
                         "without it (lift_ao.quantize keeps it by default; with torchao's quantize_, pass a "
                         "filter_fn that skips it), or save with lift_ao.save_quantized(model, dir)")
    from accelerate import init_empty_weights

    from lift_ao.api import _is_hf_conv1d

    with init_empty_weights(include_buffers=True):  # module types are all it reads
        architecture = type(model)(model.config)  # what from_pretrained builds
    conv1d = [name for name, module in architecture.named_modules() if _is_hf_conv1d(module)
              and isinstance(getattr(model.get_submodule(name), "weight", None), LiftQuantTensor)]
    if conv1d:
        raise ValueError(f"{conv1d[:3]} are transformers Conv1D layers (GPT-2 style), which from_pretrained cannot "
                         "load as LiftQuant: save with lift_ao.save_quantized(model, dir), load with "
                         "lift_ao.load_quantized(dir)")


def _attach_quantizer(model: "PreTrainedModel", hf_config: LiftQuantHfConfig) -> "PreTrainedModel":
    """Give ``model`` the ``hf_quantizer`` that from_pretrained attaches (save_pretrained serializes LiftQuant
    weights only through it) and record ``hf_config`` as config.json's ``quantization_config``."""
    quantizer = LiftQuantHfQuantizer(hf_config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    quantizer.postprocess_model(model, attached=True)
    return model


def restore_save_pretrained(model: torch.nn.Module, directory=None) -> None:
    """After :func:`lift_ao.load_quantized`: a transformers model whose config (or ``directory``'s config.json,
    for a model given to load into) records a LiftQuant ``quantization_config`` (lift_ao.quantize,
    lift_ao.calibrate or from_pretrained quantized it) gets its ``hf_quantizer`` back, so ``save_pretrained``
    works as it did before saving (without it, safetensors failed on the LiftQuant weights with "invalid python
    storage"). Other models are left alone."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or getattr(model, "hf_quantizer", None) is not None:
        return
    record = getattr(model.config, "quantization_config", None)
    if record is None and directory is not None:
        # The load has changed the model already: an unreadable file only leaves save_pretrained unrestored.
        try:
            saved = json.loads((Path(directory) / "config.json").read_text())
        except (OSError, ValueError):
            saved = None
        record = saved.get("quantization_config") if isinstance(saved, dict) else None
    if record is None:
        return
    if isinstance(record, dict):
        if record.get("quant_method") != QUANT_METHOD:
            return
        try:
            record = LiftQuantHfConfig.from_dict(record)
        except (TypeError, ValueError) as e:  # the model is loaded; only save_pretrained is not restored
            warnings.warn(f"config.json's quantization_config is not one this lift_ao reads ({e}): the loaded model "
                          "saves with lift_ao.save_quantized, not save_pretrained", stacklevel=3)
            return
    if isinstance(record, LiftQuantHfConfig):
        _attach_quantizer(model, record)
