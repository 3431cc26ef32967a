"""Saving and loading quantized models as safetensors (no pickle).

One file, ``<dir>/lift_ao.safetensors``: every plain parameter/buffer under its state-dict key, and
every LiftQuant weight as its plain tensors under ``<key>.<tensor name>`` (``packed_codes``,
``row_scale``, ``mapping``, ``input_signs``, ``rotation_left``, ``rotation_right``). The header's
``lift_ao`` entry is JSON with the format version, the library version, each quantized weight's
shape, dtype, lattice name, lattice and transform fingerprints, tied-parameter aliases, and a SHA-256 of every
tensor, so a truncated, tampered or mismatched file is refused with a message naming the problem.
Files are written to a temporary name and renamed, so a crash never leaves a half-written checkpoint
under the real name. When the model is a Hugging Face model its ``config.json`` is saved beside it,
so ``load_quantized(dir)`` can rebuild the architecture without downloads. Checkpoints of format 2
(code rows one after another, before the rows were interleaved in groups of 32) load too: their codes
are regrouped exactly (:func:`lift_ao.packing.interleave_rows`).

Resumable runs (``lift_ao.quantize(..., resume_dir=DIR)``) use the same format in small pieces: a
``manifest.json`` that identifies the run, and one *shard* per finished layer,
``<name>.shard.safetensors``, written atomically with its own SHA-256s. :func:`open_partial`,
:func:`save_shard` and :func:`load_shard` are generic (any named group of tensors), for any loop
that finishes work one unit at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lift_ao.footprint import plain_tensors
from lift_ao.packing import check_packed, interleave_rows
from lift_ao.tensor import LiftQuantTensor, share_constants

__all__ = [
    "save_quantized", "load_quantized", "CheckpointError", "FORMAT_VERSION", "CHECKPOINT_NAME",
    "open_partial", "save_shard", "load_shard", "MANIFEST_NAME", "SHARD_SUFFIX",
]

FORMAT_VERSION = 3  # 2: code rows padded to 16-byte quads; 3: rows interleaved in groups of 32 (lift_ao.packing)
# Older formats that load_quantized converts exactly on load (resume shards must match FORMAT_VERSION).
_CONVERTED_VERSIONS = (2,)
CHECKPOINT_NAME = "lift_ao.safetensors"
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".shard.safetensors"
_TMP_PREFIX = ".lift_ao-"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: truncated, tampered, wrong version or wrong model."""


def _sha256(t: torch.Tensor) -> str:
    if is_traceable_wrapper_subclass(t):  # a quantized weight (LiftQuant, torchao's): its inner tensors
        return hashlib.sha256(",".join(map(_sha256, plain_tensors(t))).encode()).hexdigest()
    # Flattened first: a 0-dim tensor cannot be viewed as bytes (the digest of others is unchanged).
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``model.state_dict()`` with its name: what a result computed from the
    model's values (not only its shapes) may be reused under."""
    return hashlib.sha256(b"".join(f"{name}:{_sha256(t)};".encode() for name, t in model.state_dict().items())).hexdigest()


# Keys of a transformers config that name the checkpoint, its tokens or steer a call, not what the forward computes.
_RUN_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                              "use_cache", "output_attentions", "output_hidden_states", "output_router_logits",
                              "return_dict", "quantization_config", "id2label", "label2id", "problem_type",
                              "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
                              "decoder_start_token_id", "tokenizer_class", "task_specific_params"})


def settings_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of what the forward computes with besides the state dict: a transformers model's config values
    (norm eps, activation, ``rope_theta`` and RoPE scaling) but :data:`_RUN_CONFIG_KEYS`; another model's
    buffers left out of the state dict (a torchtune RoPE table). What the model computes depends on them as on
    :func:`state_sha256`'s values, and the state dict of a model with another ``rope_theta`` is the same. A
    transformers model's buffers follow from its config, and some change with the last forward's length
    (LongRoPE's and dynamic RoPE's ``inv_freq``): they are not hashed."""
    def model_values(values: dict) -> dict:  # sub-configs (a multimodal model's text_config) carry run keys too
        return {k: model_values(v) if isinstance(v, dict) else v for k, v in values.items() if k not in _RUN_CONFIG_KEYS}

    digest = hashlib.sha256()
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "to_dict"):
        digest.update(json.dumps(model_values(model_config.to_dict()), sort_keys=True, default=str).encode())
        return digest.hexdigest()
    in_state = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in in_state:
            digest.update(f"{name}:{_sha256(buffer)};".encode())
    return digest.hexdigest()


# Hashes a run's identity records since a later lift_ao than the one that first wrote such identities.
LATER_HASHES = ("teacher_sha256", "settings_sha256")


def comparable_identity(identity: dict, saved: dict) -> dict:
    """``identity`` less the :data:`LATER_HASHES` that ``saved`` (the identity a run wrote) lacks: what must equal
    ``saved`` for the run to be resumed, so that one written before a hash existed is not checked by it."""
    return {k: v for k, v in identity.items() if k in saved or k not in LATER_HASHES}


def _library_version() -> str:
    from lift_ao import __version__

    return __version__


def _directory(directory, what: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{what} must be a directory path (str or pathlib.Path), got {type(directory).__name__}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; give a directory path")
    return path


def _module_of(model, what: str) -> torch.nn.Module:
    """The module whose state a checkpoint holds: ``model``, or the one a ``torch.compile`` wrapper holds (its
    state_dict's keys carry an ``_orig_mod.`` prefix that an uncompiled model does not have)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    return getattr(model, "_orig_mod", model) if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def _tensor_identity(value) -> tuple:
    """Equal for tied parameters: the same object, or (after a load, which wraps each in its own
    Parameter) the same elements of one storage. Empty tensors all have storage address 0: by object."""
    if not isinstance(value, torch.Tensor) or isinstance(value, LiftQuantTensor) or value.is_meta or not value.numel():
        return ("object", id(value))
    return ("storage", value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
            value.stride(), value.dtype, value.device)


def stored_weight(where: str, parts: list, shape: torch.Size, dtype: torch.dtype) -> LiftQuantTensor:
    """The LiftQuantTensor of a checkpoint's or shard's ``parts`` (in ``LiftQuantTensor.tensor_data_names``
    order), checked as only a tampered or foreign file could fail (the SHA-256s cover bytes, not the header's
    dtypes and shapes): rotation factors that are one (the constructor's check), codes int32 and the rest float32,
    one row scale per row and the codes of its rows. A failure is a CheckpointError naming ``where`` (file, key)."""
    try:
        weight = LiftQuantTensor(*parts, shape, dtype)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    rows = weight.shape[0]
    found = {name: (getattr(weight, name).dtype, tuple(getattr(weight, name).shape)) for name in weight.tensor_data_names}
    wrong = {name: dtype for name, (dtype, _) in found.items()
             if dtype != (torch.int32 if name == "packed_codes" else torch.float32)}
    if wrong or found["row_scale"][1] != (rows,):
        raise CheckpointError(f"{where} stores {found} (codes must be int32, the rest float32, {rows} row "
                              "scales); the file is inconsistent, re-quantize")
    try:
        check_packed(weight.packed_codes, rows, weight.code_length)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}; the file is inconsistent, re-quantize") from e
    return weight


def save_quantized(model: torch.nn.Module, directory) -> Path:
    """Write ``model`` (quantized or partly quantized; of a ``torch.compile`` wrapper, the module it wraps) to
    ``directory``.

    Returns:
        Path of the written ``lift_ao.safetensors``.
    """
    model = _module_of(model, "model")
    directory = _directory(directory, "directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    first_key_of: dict = {}
    for key, value in model.state_dict(keep_vars=True).items():
        identity = _tensor_identity(value)
        if identity in first_key_of:  # tied parameters are stored once
            aliases[key] = first_key_of[identity]
            continue
        first_key_of[identity] = key
        if not isinstance(value, torch.Tensor):  # e.g. a module's get_extra_state() dict
            raise TypeError(f"{key} is a {type(value).__name__}: save_quantized stores tensors only (safetensors); "
                            "store it as a tensor or save it separately")
        data = value.detach()
        if data.is_meta:
            raise ValueError(f"{key} is on the meta device (no values to save); load or quantize the real weights first")
        if isinstance(data, LiftQuantTensor):
            quantized[key] = {
                "shape": list(data.shape),
                "dtype": str(data.dtype).removeprefix("torch."),
                "lattice": data.lattice.name,
                "lattice_fingerprint": data.lattice.fingerprint,
                "transform_fingerprint": data.transform_fingerprint,
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
    _write_atomically(target, lambda tmp: save_file(tensors, tmp, metadata={"lift_ao": json.dumps(header)}))
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
    return target


def _write_atomically(target: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``target``: a crash leaves the old file or none, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # As a plainly created file: mkstemp's (and safetensors' writer's) 0600 would survive the rename.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:  # on disk before the rename, so a power cut cannot expose an empty file
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's header and tensors, verified; the header's fields (which no SHA-256 covers) are checked
    for the types :func:`save_quantized` writes."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; write one with lift_ao.save_quantized(model, dir)")
    header, tensors = _read_verified(path, readable=(FORMAT_VERSION, *_CONVERTED_VERSIONS))
    quantized, aliases = header.get("quantized"), header.get("aliases")

    def well_formed(info) -> bool:
        dtype = getattr(torch, str(info.get("dtype")), None) if isinstance(info, dict) else None
        return (isinstance(dtype, torch.dtype) and dtype.is_floating_point and isinstance(info.get("shape"), list)
                and len(info["shape"]) == 2 and all(isinstance(n, int) and n > 0 for n in info["shape"])
                and all(isinstance(info.get(k), str) for k in ("lattice", "lattice_fingerprint", "transform_fingerprint")))

    if not (isinstance(quantized, dict) and isinstance(aliases, dict) and all(map(well_formed, quantized.values()))
            and all(isinstance(v, str) for v in aliases.values())):
        raise CheckpointError(f"{path}: the lift_ao header is corrupt (its 'quantized' or 'aliases' entries are not "
                              "what save_quantized writes); save the model again")
    # Before save_quantized unwrapped a torch.compile'd model it wrote its wrapper's keys: read them as the
    # wrapped module's, the names load_quantized looks up.
    prefix = "_orig_mod."
    names = [*tensors, *quantized, *aliases, *aliases.values()]
    if names and all(name.startswith(prefix) for name in names):
        strip = lambda name: name.removeprefix(prefix)  # noqa: E731
        tensors = {strip(key): tensor for key, tensor in tensors.items()}
        header = dict(header, quantized={strip(key): info for key, info in quantized.items()},
                      aliases={strip(key): strip(target) for key, target in aliases.items()})
    return header, tensors


def _read_verified(path: Path, readable: tuple[int, ...] = (FORMAT_VERSION,)) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``lift_ao`` header and tensors of a file we wrote, after checking that its version is
    one of ``readable`` and its SHA-256s."""
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
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the lift_ao header is corrupt (a JSON {type(header).__name__}, not an object)")
    version = header.get("format_version")
    if version not in readable:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this lift_ao ({_library_version()}) reads format "
            f"{' and '.join(map(str, readable))}; install the lift_ao version that wrote it "
            f"({header.get('library_version')})"
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
        model: the un-quantized architecture to load into (any device; ``meta`` where its buffers that
            are computed rather than saved, such as rotary frequencies, are real, as under accelerate's
            ``init_empty_weights(include_buffers=False)``); when omitted, a Hugging Face causal LM is
            built from the saved ``config.json``. A ``torch.compile`` wrapper loads into the module it wraps.
        device: where the model's tensors go (default: CPU): the checkpoint's, and the buffers the model
            computes rather than saves (rotary tables), which no checkpoint holds.
    Returns:
        The model (as given) with LiftQuant weights and every other tensor restored bit-exactly.
    Raises:
        CheckpointError: truncated/tampered file, unknown format version, lattice mismatch, a model
            whose modules or shapes differ from the checkpoint's, or computed buffers left on ``meta``;
            the model is then left as it was.
    """
    from lift_ao.api import _is_hf_conv1d, resolve_device  # lift_ao.api imports this module

    directory = _directory(directory, "directory")
    given = model
    if model is not None:
        model = _module_of(model, "model")
    device = resolve_device(device or "cpu")
    path = directory / CHECKPOINT_NAME
    header, tensors = _read_checkpoint(path)
    if model is None:
        model = given = _model_from_hf_config(directory)

    def parameter(key: str) -> tuple:
        """(module, its tensor) named ``key``."""
        module_name, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            return module, getattr(module, name)
        except AttributeError as e:
            raise CheckpointError(f"{path}: the model has no {key!r}; load into the architecture that was saved") from e

    # Everything is checked before the model changes: a refused load leaves it as it was.
    weights = {}  # key: (module, Conv1D's (in, out) shape when it becomes an nn.Linear, else None, weight)
    for key, info in header["quantized"].items():
        module, current = parameter(key)
        # quantize made a GPT-2 Conv1D (weight (in, out)) an nn.Linear: so does the load.
        conv1d = tuple(current.shape) if _is_hf_conv1d(module) and list(current.shape) == info["shape"][::-1] else None
        if conv1d is None and list(current.shape) != info["shape"]:
            raise CheckpointError(f"{path}: {key} has shape {info['shape']}, the model expects {list(current.shape)}")
        if header["format_version"] == 2:  # rows one after another: regrouped exactly (lift_ao.packing)
            tensors[f"{key}.packed_codes"] = interleave_rows(tensors[f"{key}.packed_codes"])
        parts = [tensors.pop(f"{key}.{name}").to(device) for name in LiftQuantTensor.tensor_data_names]
        weight = stored_weight(f"{path}: {key}", parts, torch.Size(info["shape"]), getattr(torch, info["dtype"]))
        stored = weight.lattice
        if stored.fingerprint != info["lattice_fingerprint"] or stored.name != info["lattice"]:
            raise CheckpointError(
                f"{path}: {key} was made with lattice {info['lattice']} ({info['lattice_fingerprint']}) "
                f"but stores {stored.name} ({stored.fingerprint}); the file is inconsistent, re-quantize"
            )
        recorded = info["transform_fingerprint"]
        if recorded != weight.transform_fingerprint:
            raise CheckpointError(
                f"{path}: {key}'s input transform does not match its recorded fingerprint ({recorded}); "
                "the file is inconsistent, re-quantize"
            )
        weights[key] = (module, conv1d, weight)
    plain = {k: t.to(device) for k, t in tensors.items()}
    for alias, target in header["aliases"].items():
        if target in plain:
            plain[alias] = plain[target]
        else:
            parameter(alias)  # an alias of a quantized weight: tied below, like the others
    state = model.state_dict()
    expected = set(state) - set(header["quantized"]) - {
        alias for alias, target in header["aliases"].items() if target in header["quantized"]}
    missing, unexpected = expected - set(plain), set(plain) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    # Another floating dtype is the checkpoint's to choose (assign=True keeps it); integers for floats are not.
    differ = {k: (f"{list(t.shape)} {t.dtype}", f"{list(state[k].shape)} {state[k].dtype}") for k, t in plain.items()
              if t.shape != state[k].shape or t.dtype.is_floating_point != state[k].dtype.is_floating_point}
    if differ:
        raise CheckpointError(f"{path} does not match the model: (stored, model's) shapes or dtypes differ for "
                              f"{dict(list(differ.items())[:5])}; load into the architecture that was saved")
    # A buffer that is computed, not saved (rotary frequencies), is not in the checkpoint: on meta it stays there.
    unsaved = [name for name, b in model.named_buffers() if b.is_meta and name not in plain]
    if unsaved:
        raise CheckpointError(f"{path}: the model's buffers {unsaved[:5]} are on the meta device and not in the "
                              "checkpoint (computed, not saved), so the loaded model could not run: build the model "
                              "on a real device (e.g. under accelerate's init_empty_weights(include_buffers=False)), "
                              "or let load_quantized build it from config.json (model=None)")

    for key, (module, conv1d, weight) in weights.items():
        module_name, _, param_name = key.rpartition(".")
        if conv1d is not None:
            parent, _, child = module_name.rpartition(".")
            module = torch.nn.Linear(*conv1d, bias=module.bias is not None, device="meta")
            setattr(model.get_submodule(parent), child, module)
        setattr(module, param_name, torch.nn.Parameter(weight, requires_grad=False))
    model.load_state_dict(plain, strict=False, assign=True)
    # assign=True wraps each alias in a Parameter of its own: tie them again (the same object, as
    # before saving; a later save then still stores them once).
    for alias, target in header["aliases"].items():
        owner, _, name = target.rpartition(".")
        tied = model.get_submodule(owner)._parameters.get(name)
        if tied is not None:
            owner, _, name = alias.rpartition(".")
            setattr(model.get_submodule(owner), name, tied)
    # The buffers no checkpoint holds (a RoPE cos/sin table) are moved too, or a forward on `device` would mix
    # devices (the loaded ones are there: `.to` returns them as they are). Each tensor once, so a table that
    # several modules hold stays one.
    on_device = {}
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                if id(buffer) not in on_device:
                    on_device[id(buffer)] = buffer.to(device)
                module._buffers[name] = on_device[id(buffer)]
    share_constants(model)
    from lift_ao.integrations.hf import restore_save_pretrained  # hf imports lift_ao.io

    restore_save_pretrained(model, directory)
    return given


# ----- resumable runs: a manifest and one shard per finished unit ----------------------------------


def open_partial(directory, manifest: dict, *, overwrite: bool = False, earlier: tuple = ()) -> Path:
    """Start or continue a resumable run in ``directory``.

    Args:
        directory: where the manifest and shards live (created if needed).
        manifest: JSON-serialisable identity of the run (config, seed, layer names/shapes/lattices...).
            A run may continue only from shards written under an equal manifest.
        overwrite: delete the manifest and shards of a different run instead of refusing.
        earlier: manifests an older lift_ao wrote for this same run (before it recorded some setting):
            accepted too, as stored.
    Returns:
        ``directory`` as a Path.
    Raises:
        CheckpointError: ``directory`` holds a different run (the message names what differs).
    """
    directory = _directory(directory, "resume directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_NAME
    for stale in directory.glob(f"{_TMP_PREFIX}*.tmp"):  # left by a run killed mid-write (one run per directory)
        stale.unlink()
    def as_stored(entries: dict) -> dict:  # what the file holds (tuples → lists)
        return json.loads(json.dumps({"format_version": FORMAT_VERSION, "library_version": _library_version(), **entries}))

    manifest = as_stored(manifest)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {"manifest": "unreadable"}
        if stored == manifest or any(stored == as_stored(entries) for entries in earlier):
            return directory
        if not overwrite:
            differs = sorted(k for k in manifest.keys() | stored.keys() if manifest.get(k) != stored.get(k))
            raise CheckpointError(
                f"{directory} holds a partial run of another model, config, seed or lift_ao version (differs in: "
                f"{', '.join(differs)}); use another directory, or overwrite it (overwrite=True; lift-ao quantize --overwrite)"
            )
    for shard in directory.glob(f"*{SHARD_SUFFIX}"):
        shard.unlink()
    _write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1, sort_keys=True)))
    return directory


def save_shard(directory, name: str, tensors: dict[str, torch.Tensor], info: Optional[dict] = None) -> Path:
    """Atomically write one finished unit's tensors as ``<directory>/<name>.shard.safetensors``.

    Args:
        name: the unit's name (e.g. a module name); must be a valid file name.
        tensors: plain tensors (copied to CPU).
        info: JSON-serialisable facts to check on resume (e.g. a hash of the input weight).
    """
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    header = {"format_version": FORMAT_VERSION, "info": info or {}, "sha256": {k: _sha256(t) for k, t in tensors.items()}}
    target = Path(directory) / f"{name}{SHARD_SUFFIX}"
    _write_atomically(target, lambda tmp: save_file(tensors, tmp, metadata={"lift_ao": json.dumps(header)}))
    return target


def remove_shard(directory, name: str) -> None:
    """Delete the shard :func:`save_shard` wrote as ``name`` in ``directory``, if there is one."""
    (Path(directory) / f"{name}{SHARD_SUFFIX}").unlink(missing_ok=True)


def load_shard(directory, name: str, *, sources: Optional[dict] = None,
               overwrite: bool = False) -> Optional[tuple[dict, dict[str, torch.Tensor]]]:
    """``(info, tensors)`` of a shard written by :func:`save_shard`, or None when the unit must be done.

    A missing shard returns None. So does a truncated or corrupt one (only possible from disk faults
    or hand edits, since shards are renamed into place whole): it is deleted with a warning, because
    redoing a unit is always safe while loading a bad one never is.

    Args:
        sources: {info key: hash} of what the unit is made from (e.g. its weights), as its writer recorded
            them in ``info``: the manifest records shapes, not values, so a shard of another model of the
            same shapes is found here. Each key the shard records must match; one it lacks (written
            before that hash existed) is not checked.
        overwrite: a shard of other sources is deleted (the unit is redone) instead of refused, as
            ``open_partial``'s ``overwrite`` discards a run of other settings.
    Raises:
        CheckpointError: the shard was made from other ``sources`` (and not ``overwrite``).
    """
    path = Path(directory) / f"{name}{SHARD_SUFFIX}"
    if not path.is_file():
        return None
    try:
        header, tensors = _read_verified(path)
    except CheckpointError as e:
        warnings.warn(f"{e}; redoing {name}", stacklevel=2)
        path.unlink()
        return None
    info = header["info"]
    differs = [key for key, value in (sources or {}).items() if info.get(key, value) != value]
    if differs:
        if not overwrite:
            raise CheckpointError(
                f"{path} was made from other weights than this run's, or another model's settings ({', '.join(differs)} "
                "differ; same shapes: another model?); use another directory, or overwrite it (overwrite=True; "
                "lift-ao quantize --overwrite)")
        path.unlink()
        return None
    return header["info"], tensors
