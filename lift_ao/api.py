"""``lift_ao.quantize``: the name-aware way to quantize a whole model.

torchao's ``quantize_`` hands its module handler a module without its name, so it cannot tell the
output projection from any other ``nn.Linear``. This entry point walks the model by name, keeps
``lm_head``/``output`` (the model's output embeddings) in high precision unless the config says
``include_lm_head=True``, names the module in every error, and shows one progress bar for the model.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torchao.quantization import quantize_
from tqdm.auto import tqdm

from lift_ao.config import LiftQuantConfig
from lift_ao.io import _sha256, load_shard, open_partial, save_shard
from lift_ao.lattice import Lattice
from lift_ao.search import check_beam_width, default_beam_width
from lift_ao.tensor import LiftQuantTensor, check_weight

__all__ = ["quantize", "quantizable_linears", "resolve_device"]


def _output_projection(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    found = get() if callable(get) else None
    return found if isinstance(found, torch.nn.Linear) else None


def _named_as_output(model: torch.nn.Module, name: str) -> bool:
    """By name, where the model cannot say (no get_output_embeddings): any ``lm_head``, or torchtune's and
    torchchat's ``output``: at the top, or beside the ``tok_embeddings`` of their Transformer wrapped in
    another module (torchchat's Model holds it as ``model``, torchtune's DeepFusionModel as ``decoder``);
    not a block's own ``output`` linear."""
    parent, _, last = name.rpartition(".")
    return last == "lm_head" or (last == "output" and (not parent or hasattr(model.get_submodule(parent), "tok_embeddings")))


def _is_hf_conv1d(module: torch.nn.Module) -> bool:
    # GPT-2 style models use transformers' Conv1D: a linear layer with a transposed weight.
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _as_linear(conv1d: torch.nn.Module) -> torch.nn.Linear:
    weight = conv1d.weight.detach()  # (in, out)
    linear = torch.nn.Linear(weight.shape[0], weight.shape[1], bias=conv1d.bias is not None,
                             device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        if conv1d.bias is not None:
            linear.bias.copy_(conv1d.bias)
    return linear


def quantizable_linears(
    model: torch.nn.Module, config: LiftQuantConfig,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) pairs :func:`quantize` will code, in model order.

    A module qualifies when it is an ``nn.Linear`` (or a transformers ``Conv1D``) with a plain (not
    yet quantized: by LiftQuant or any torchao tensor subclass) weight, passes ``filter_fn(module, name)``
    if given, and is not the output projection unless ``config.include_lm_head``.
    """
    output = _output_projection(model)
    selected = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or _is_hf_conv1d(module)
        if not is_linear or is_traceable_wrapper_subclass(module.weight):
            continue
        is_output = module is output or (output is None and _named_as_output(model, name))
        if is_output and not config.include_lm_head:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        selected.append((name, module))
    return selected


def resolve_device(device) -> torch.device:
    """``torch.device(device)``, with a clear error when CUDA is asked for and absent."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but no CUDA GPU is available; use device='cpu' "
            "(the reference ops run anywhere) or run on a machine with a GPU"
        )
    return device


def quantize(
    model: torch.nn.Module, config: LiftQuantConfig,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None, *, device=None,
    progress: bool = True, calibration=None, resume_dir=None, overwrite: bool = False,
) -> torch.nn.Module:
    """Quantize a model's linear weights in place with ``config``.

    Args:
        model: any ``nn.Module`` (Hugging Face Llama/Qwen2/GPT-2, torchtune, gpt-fast style models).
        config: from :func:`lift_ao.liftquant`.
        filter_fn: optional ``(module, name) -> bool`` to narrow the selection further.
        device: where to encode each layer (e.g. ``"cuda"``); the quantized layer stays there.
            Default: where the layer is.
        progress: one progress bar over the layers.
        calibration: token ids (batch, tokens), or a list of them, to score layer sensitivity when
            ``config`` has a ``memory_budget`` (see :func:`lift_ao.plan`).
        resume_dir: a directory where each finished layer's codes are saved as it is done; run
            again with the same directory (after a crash or kill) and finished layers are loaded
            instead of encoded. Encoding is deterministic, so the result is bit-identical to an
            uninterrupted run. A directory holding another model's, config's or seed's layers is refused.
        overwrite: discard a ``resume_dir`` that holds a different run instead of refusing.
    Returns:
        ``model`` (modified in place; transformers ``Conv1D`` layers become ``nn.Linear``; a transformers
        model gets the ``hf_quantizer`` that ``save_pretrained`` writes it through, recording ``config``:
        :func:`lift_ao.integrations.hf.attach_after_quantize`).
    Raises:
        ValueError/TypeError: no linear layer qualifies, or a weight cannot be coded (the message
            names the module).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LiftQuantConfig):
        raise TypeError(f"config must come from lift_ao.liftquant(...), got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, name) -> bool, got {type(filter_fn).__name__}")
    device = resolve_device(device) if device is not None else None
    targets = quantizable_linears(model, config, filter_fn)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to quantize (after the filter and the "
            "lm_head rule); check filter_fn, or quantize the output projection too: liftquant(..., include_lm_head=True)"
        )
    layer_configs = {name: config for name, _ in targets}
    if config.memory_budget is not None:
        # A budget is resolved here, where the whole model is visible: one lattice per layer.
        from lift_ao.budget import plan

        budget_plan = plan(
            model, config.memory_budget, reserve=config.reserve, kv_cache=config.kv_cache,
            allocation=config.allocation, calibration=calibration, include_lm_head=config.include_lm_head,
            filter_fn=filter_fn, seed=config.seed, device=device, scores=config.scores, rate_window=config.rate_window,
        )
        layer_configs = {name: config.at_lattice(lattice) for name, lattice in budget_plan.lattices().items()}
    elif calibration is not None:
        raise ValueError("calibration= only informs a memory_budget config's per-layer plan")
    for name, module in targets:  # all before any is coded: a bad layer must not leave the model half quantized
        check_weight(module.weight, name)
    if resume_dir is not None:
        open_partial(resume_dir, _run_identity(targets, layer_configs, config, device), overwrite=overwrite)
    desc = f"liftquant {config.lattice or 'budget plan'}"
    for name, module in tqdm(targets, desc=desc, unit="layer", disable=not progress):
        if _is_hf_conv1d(module):
            linear = _as_linear(module)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
            module = linear
        source = _sha256(module.weight) if resume_dir is not None else None
        if source is not None and _resume_layer(resume_dir, name, module, layer_configs[name], source, device,
                                                overwrite):
            continue
        try:
            quantize_(module, layer_configs[name], filter_fn=lambda m, _: m is module, device=device)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from e
        if source is not None:
            weight = module.weight
            save_shard(resume_dir, name, {"packed_codes": weight.packed_codes, "row_scale": weight.row_scale},
                       {"source_sha256": source})
    from lift_ao.integrations.hf import attach_after_quantize  # hf imports this module

    attach_after_quantize(model, config)
    return model


def _run_identity(targets, layer_configs: dict, config: LiftQuantConfig, device) -> dict:
    """What a resumed run must share with the one that wrote the shards: seed and, per layer, the
    shape, dtype, lattice and encoding device type (CPU and GPU float sums may round differently);
    a hash of each layer's weight is checked per shard."""
    layers = {}
    for name, module in targets:
        shape = module.weight.shape if not _is_hf_conv1d(module) else module.weight.shape[::-1]
        lattice = Lattice.load(layer_configs[name].lattice)
        encode_on = (device or module.weight.device).type
        layers[name] = [list(shape), str(module.weight.dtype), lattice.name, lattice.fingerprint, encode_on]
        # Another beam width gives other codes: recorded per layer when it is not the default.
        beam_width = check_beam_width(layer_configs[name].beam_width, lattice)
        if beam_width != default_beam_width(lattice):
            layers[name].append(beam_width)
    return {"seed": config.seed, "layers": layers}


def _resume_layer(resume_dir, name: str, module: torch.nn.Module, config: LiftQuantConfig, source: str, device,
                  overwrite: bool) -> bool:
    """Put a finished layer's saved codes in place; False when the layer still has to be encoded (codes
    of another weight ``source`` are refused, or discarded with ``overwrite``: :func:`lift_ao.io.load_shard`)."""
    stored = load_shard(resume_dir, name, sources={"source_sha256": source}, overwrite=overwrite)
    if stored is None:
        return False
    _, tensors = stored
    if device is not None:
        module.to(device)  # as quantize_(..., device=device) does
    weight = module.weight
    quantized = LiftQuantTensor.from_codes(
        tensors["packed_codes"].to(weight.device), tensors["row_scale"].to(weight.device),
        Lattice.load(config.lattice), seed=config.seed, shape=weight.shape, dtype=weight.dtype,
    )
    module.weight = torch.nn.Parameter(quantized, requires_grad=False)
    return True
