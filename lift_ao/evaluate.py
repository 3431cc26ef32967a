"""Sliding-window perplexity of a causal language model on a token stream.

Independent of quantization: it only calls ``model(input_ids).logits``, so it measures a plain model
and one whose linear weights are tensor subclasses (``LiftQuantTensor``, torchao's) the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "format_change", "paired_nll_difference", "perplexity", "perplexity_ratio"]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per scored token, in nats.
        tokens: number of scored (predicted) tokens.
        windows: number of windows evaluated.
        context_length: tokens per window.
        stride: tokens between window starts.
        seconds: wall time of the evaluation.
        window_nll: mean negative log-likelihood of each window's scored tokens, in window order: two
            models evaluated on the same windows are compared window by window
            (:func:`paired_nll_difference`), which resolves far smaller differences than their
            perplexities' own spread.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    context_length: int
    stride: int
    seconds: float
    window_nll: tuple = ()

    def to_dict(self) -> dict:
        """The fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)


def _window_starts(num_tokens: int, context_length: int, stride: int, max_windows: Optional[int]) -> list:
    # Only full windows: every window has the same length (so they batch) and every scored token of a
    # window after the first sees at least context_length - stride tokens of context.
    starts = list(range(0, num_tokens - context_length + 1, stride))
    return starts[:max_windows] if max_windows else starts


def _input_device(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_arguments(tokens, context_length: int, stride: int, max_windows, batch_size: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a 1-D LongTensor (T,) holding one token stream, got {shape}; "
                         "flatten it with tokens.flatten() or use lift_ao.data.tokenize_text")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}; convert with tokens.long()")
    if context_length <= 1:
        raise ValueError(f"context_length must be >= 2 (a window needs a token to predict from), got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}] so that no token is skipped, "
                         f"got {stride}; leave it None for disjoint windows")
    if max_windows is not None and max_windows < 0:
        raise ValueError(f"max_windows must be >= 1, or None / 0 for all windows; got {max_windows}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokens.numel() < context_length:
        raise ValueError(f"too few tokens: {tokens.numel()} < context_length={context_length}; "
                         "give more text or lower context_length")


def _check_vocabulary(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    # An out-of-range id fails deep inside the embedding with an opaque IndexError; say what is wrong.
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        return
    lowest, highest = int(tokens.min()), int(tokens.max())
    if lowest < 0 or highest >= weight.shape[0]:
        raise ValueError(f"token ids span [{lowest}, {highest}] but the model's vocabulary is [0, {weight.shape[0]}); "
                         "tokenize the text with this model's tokenizer")


@contextlib.contextmanager
def evaluating(*models: torch.nn.Module):
    """Inside, every one of ``models`` is in eval mode (dropout would draw from the global generator and
    make what is measured or tuned vary); after, each of their modules is in the mode it was in, mixed
    modes included (``model.train(was_training)`` would set them all alike)."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    context_length: int = 512,
    stride: Optional[int] = None,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    progress: bool = True,
    device=None,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM on one token stream.

    Window ``i`` is ``tokens[i * stride : i * stride + context_length]``; only full windows are used
    (a tail shorter than a window is not scored). The first window scores its tokens 1..C-1 (C =
    ``context_length``); each later window scores only its last ``stride`` tokens, the ones no earlier
    window scored, as in the Hugging Face perplexity guide. ``stride == context_length`` (default) gives
    disjoint windows that each score C-1 tokens (a window's first token has no context). Scored tokens
    in all: ``(C - 1) + (windows - 1) * min(stride, C - 1)``.

    Args:
        model: a causal LM; ``model(input_ids)`` with ``input_ids`` LongTensor ``(B, C)`` must return an
            object whose ``.logits`` is ``(B, C, V)``. It is switched to eval mode for the call (so dropout
            cannot make the result random) and restored afterwards; it is never moved.
        tokens: LongTensor ``(T,)`` with ``T >= context_length``.
        context_length: tokens per window, >= 2.
        stride: tokens between window starts, in ``[1, context_length]``; None: ``context_length``.
        max_windows: evaluate only the first this many windows; None or 0: all.
        batch_size: windows per forward pass (all windows have the same length).
        progress: show a tqdm bar over windows.
        device: where the windows are sent; None: the device of the model's first parameter.

    Returns:
        :class:`PerplexityResult`. The loss is computed in float32 from the logits whatever the model's
        dtype, and summed over windows in float64; the result is deterministic for a deterministic model.
    """
    stride = context_length if stride is None else stride
    _check_arguments(tokens, context_length, stride, max_windows, batch_size)
    tokens = tokens.long()  # before min/max: torch has none for uint16/uint32
    _check_vocabulary(model, tokens)
    starts = _window_starts(tokens.numel(), context_length, stride, max_windows)
    input_device = _input_device(model, device)
    window_nll = []  # float64 sums, divided by their counts at the end
    window_tokens = []
    begin_time = time.perf_counter()
    with evaluating(model), torch.inference_mode(), tqdm(total=len(starts), desc="perplexity", unit="window",
                                                        disable=not progress) as bar:
        for first in range(0, len(starts), batch_size):
            batch_starts = starts[first : first + batch_size]
            windows = torch.stack([tokens[s : s + context_length] for s in batch_starts]).to(input_device)
            logits = getattr(model(windows), "logits", None)
            if logits is None:
                raise TypeError(f"{type(model).__name__}(input_ids) returned no .logits; pass a causal LM "
                                "such as a transformers *ForCausalLM model")
            # Position p's logits predict token p + 1. The first window of the stream scores targets
            # 1..C-1; later ones only their last `stride` targets (at most C-1: target 0 has no context).
            for row, start in enumerate(batch_starts):
                target_from = 1 if start == 0 else max(context_length - stride, 1)
                predicted = logits[row, target_from - 1 : context_length - 1].float()
                nll = torch.nn.functional.cross_entropy(predicted, windows[row, target_from:], reduction="sum")
                window_nll.append(nll.double().cpu())
                window_tokens.append(context_length - target_from)
            bar.update(len(batch_starts))
    scored = sum(window_tokens)
    mean_nll = torch.stack(window_nll).sum().item() / scored
    return PerplexityResult(
        # torch's exp gives inf / nan for a diverged model where math.exp would raise OverflowError.
        perplexity=torch.tensor(mean_nll, dtype=torch.float64).exp().item(),
        nll=mean_nll,
        tokens=scored,
        windows=len(starts),
        context_length=context_length,
        stride=stride,
        seconds=time.perf_counter() - begin_time,
        window_nll=tuple(nll.item() / count for nll, count in zip(window_nll, window_tokens)),
    )


def paired_nll_difference(result: PerplexityResult, baseline: PerplexityResult) -> tuple[float, float]:
    """(mean, standard error) over windows of ``result``'s window NLL minus ``baseline``'s, in nats,
    each window weighted by the tokens it scores (the first C − 1, later ones min(stride, C − 1)),
    so the mean is exactly ``result.nll − baseline.nll``.

    Both must come from the same windows (same tokens, context length, stride and window count). The
    perplexity ratio is ``exp(mean)``, and ``exp(mean ± 2·SE)`` its ~95 % interval over the text's
    windows: window-to-window differences between two models of one text vary far less than the
    windows' own NLLs, so this resolves differences that comparing two perplexities cannot.

    Raises:
        ValueError: different windows, fewer than 2, or a result without window NLLs (older JSON).
    """
    same = (result.windows, result.context_length, result.stride, result.tokens) == (
        baseline.windows, baseline.context_length, baseline.stride, baseline.tokens)
    if not same or len(result.window_nll) != result.windows or len(baseline.window_nll) != baseline.windows:
        raise ValueError("paired comparison needs two evaluations of the same windows, each with its window_nll "
                         f"(got {result.windows} and {baseline.windows} windows)")
    if result.windows < 2:
        raise ValueError("paired comparison needs at least 2 windows")
    difference = torch.tensor(result.window_nll, dtype=torch.float64) - torch.tensor(baseline.window_nll,
                                                                                       dtype=torch.float64)
    n, c = difference.numel(), result.context_length
    weights = torch.full((n,), float(min(result.stride, c - 1)), dtype=torch.float64)
    weights[0] = c - 1
    mean = (weights * difference).sum() / weights.sum()
    # The weighted mean's standard error (equal weights: the sample std / √n).
    error = (weights.square() * (difference - mean).square()).sum().mul(n / (n - 1)).sqrt() / weights.sum()
    return mean.item(), error.item()


def perplexity_ratio(result: PerplexityResult, baseline: PerplexityResult) -> tuple[float, float, float]:
    """(ratio, low, high): ``result``'s perplexity over ``baseline``'s from their paired window NLLs
    (:func:`paired_nll_difference`), ``exp(mean)``, with its ~95 % interval ``exp(mean ∓ 2·SE)``.

    Raises:
        ValueError: as :func:`paired_nll_difference`.
    """
    mean, error = paired_nll_difference(result, baseline)
    return math.exp(mean), math.exp(mean - 2 * error), math.exp(mean + 2 * error)


def format_change(ratio: float, low: float, high: float) -> str:
    """``+21.9 % [+20.9, +22.9]``: a :func:`perplexity_ratio` as a change in percent with its interval."""
    return "{:+.1f} % [{:+.1f}, {:+.1f}]".format(*(100 * (r - 1) for r in (ratio, low, high)))
