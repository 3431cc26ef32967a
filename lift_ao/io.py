"""Saving and loading quantized models as safetensors (no pickle).

One file, ``<dir>/lift_ao.safetensors``: every plain parameter/buffer under its state-dict key, and
every LiftQuant weight as its plain tensors under ``<key>.<tensor name>`` (``packed_codes``,
``row_scale``, ``mapping``, ``input_signs``, ``rotation_left``, ``rotation_right``). The header's
``lift_ao`` entry is JSON with the format version, the library version, each quantized weight's
shape, dtype, lattice name and lattice fingerprint, tied-parameter aliases, and a SHA-256 of every
tensor, so a truncated, tampered or mismatched file is refused with a message naming the problem.
Files are written to a temporary name and renamed, so a crash never leaves a half-written checkpoint
under the real name. When the model is a Hugging Face model its ``config.json`` is saved beside it,
so ``load_quantized(dir)`` can rebuild the architecture without downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lift_ao.lattice import Lattice
from lift_ao.tensor import LiftQuantTensor

__all__ = ["save_quantized", "load_quantized", "CheckpointError", "FORMAT_VERSION", "CHECKPOINT_NAME"]

FORMAT_VERSION = 1
CHECKPOINT_NAME = "lift_ao.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: truncated, tampered, wrong version or wrong model."""


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _library_version() -> str:
    from lift_ao import __version__

    return __version__


def save_quantized(model: torch.nn.Module, directory) -> Path:
    """Write ``model`` (quantized or partly quantized) to ``directory``.

    Returns:
        Path of the written ``lift_ao.safetensors``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    first_key_of: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in first_key_of:  # tied parameters are stored once
            aliases[key] = first_key_of[id(value)]
            continue
        first_key_of[id(value)] = key
        data = value.detach() if isinstance(value, torch.Tensor) else value
        if isinstance(data, LiftQuantTensor):
            quantized[key] = {
                "shape": list(data.shape),
                "dtype": str(data.dtype).removeprefix("torch."),
                "lattice": data.lattice.name,
                "lattice_fingerprint": data.lattice.fingerprint,
            }
            for name in data.tensor_data_names:
                # Clone: safetensors refuses tensors that share storage (one rotation for q/k/v).
                tensors[f"{key}.{name}"] = getattr(data, name).detach().cpu().contiguous().clone()
        else:
            tensors[key] = data.cpu().contiguous().clone()
    header = {
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "quantized": quantized,
        "aliases": aliases,
        "sha256": {k: _sha256(t) for k, t in tensors.items()},
    }
    target = directory / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".lift_ao-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"lift_ao": json.dumps(header)})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
    return target


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; write one with lift_ao.save_quantized(model, dir)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({e}); save the model again") from e
    if "lift_ao" not in meta:
        raise CheckpointError(f"{path} was not written by lift_ao.save_quantized (no 'lift_ao' header)")
    try:
        header = json.loads(meta["lift_ao"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the lift_ao header is corrupt ({e})") from e
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this lift_ao ({_library_version()}) reads format "
            f"{FORMAT_VERSION}; install the lift_ao version that wrote it ({header.get('library_version')})"
        )
    digests = header.get("sha256", {})
    if set(digests) != set(tensors):
        raise CheckpointError(f"{path}: tensors {sorted(set(digests) ^ set(tensors))[:5]} are missing or extra")
    for key, tensor in tensors.items():
        if _sha256(tensor) != digests[key]:
            raise CheckpointError(f"{path}: tensor {key!r} does not match its recorded SHA-256 (tampered or corrupt)")
    return header, tensors


def _model_from_hf_config(directory: Path) -> torch.nn.Module:
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json; pass the model to load into: load_quantized(dir, model)")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    # Parameters on the meta device (the checkpoint fills them); buffers that are computed rather
    # than saved (rotary frequencies) are built for real.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config).eval()


def load_quantized(directory, model: Optional[torch.nn.Module] = None, *, device=None) -> torch.nn.Module:
    """Load a checkpoint written by :func:`save_quantized`.

    Args:
        directory: the directory passed to :func:`save_quantized`.
        model: the un-quantized architecture to load into (any device, ``meta`` included); when
            omitted, a Hugging Face causal LM is built from the saved ``config.json``.
        device: where the loaded tensors go (default: CPU).
    Returns:
        The model with LiftQuant weights and every other tensor restored bit-exactly.
    Raises:
        CheckpointError: truncated/tampered file, unknown format version, lattice mismatch, or a
            model whose modules or shapes differ from the checkpoint's.
    """
    directory = Path(directory)
    path = directory / CHECKPOINT_NAME
    header, tensors = _read_checkpoint(path)
    if model is None:
        model = _model_from_hf_config(directory)
    device = torch.device(device or "cpu")
    for key, info in header["quantized"].items():
        module_name, _, param_name = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            current = getattr(module, param_name)
        except AttributeError as e:
            raise CheckpointError(f"{path}: the model has no {key!r}; load into the architecture that was saved") from e
        if list(current.shape) != info["shape"]:
            raise CheckpointError(f"{path}: {key} has shape {info['shape']}, the model expects {list(current.shape)}")
        parts = [tensors.pop(f"{key}.{name}").to(device) for name in LiftQuantTensor.tensor_data_names]
        weight = LiftQuantTensor(*parts, torch.Size(info["shape"]), getattr(torch, info["dtype"]))
        fingerprint = Lattice(weight.block_size, weight.code_bits, weight.mapping.cpu()).fingerprint
        if fingerprint != info["lattice_fingerprint"] or weight.lattice.name != info["lattice"]:
            raise CheckpointError(
                f"{path}: {key} was made with lattice {info['lattice']} ({info['lattice_fingerprint']}) "
                f"but stores {weight.lattice.name} ({fingerprint}); the file is inconsistent, re-quantize"
            )
        setattr(module, param_name, torch.nn.Parameter(weight, requires_grad=False))
    plain = {k: t.to(device) for k, t in tensors.items()}
    for alias, target in header["aliases"].items():
        if target in plain:
            plain[alias] = plain[target]
    expected = set(model.state_dict()) - set(header["quantized"])
    missing, unexpected = expected - set(plain), set(plain) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    # Aliases get the same tensor, so tied parameters share storage again after loading.
    model.load_state_dict(plain, strict=False, assign=True)
    return model
