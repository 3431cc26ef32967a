"""Measured layer sensitivities for the memory-budget planner: leave one group of siblings out.

The planner's built-in score (‖W‖²_F · E[x²] × lattice MSE) is the data-free coding error; after
calibration it moved bits to the wrong layers (on SmolLM2-135M a mixed plan was 4 % worse than one
lattice, benchmarks/results/accuracy_cal_plan_cpu.md). ``measure_sensitivity(model, reference,
tokens)`` measures instead, in a model quantized at one lattice (e.g. calibrated), how much
KL(reference ‖ model) per token falls when one group of sibling linears (those reading one tensor:
q/k/v, o, gate/up, down of a Llama block) is put back at full precision, and turns each group's gain
into per-layer scores for ``lift_ao.plan(..., scores=...)`` or ``liftquant(memory_budget=...,
scores=...)``. On SmolLM2-135M at 2.4 bits the gains per parameter span ~100× (the first blocks' MLPs
weigh most, benchmarks/results/sensitivity_loo_cpu.md); at the same bytes a plan from them scored 19.29
against 19.98 for one lattice with block fine-tuning on the CPU (accuracy_measured_plan_cpu.md), and
15.72 against 15.67 with the full GPU recipe on 8 evaluation windows, whose held-out KL it lowered by
4 % (accuracy_fte1024_e2e917k_mplan_2bit4_h100.md), and on 200 windows 17.11 against 17.36, −1.4 %
[−2.0, −0.8] (accuracy_w200_h100.md). :func:`calibrated_sensitivity` measures them that way.

Cost: one evaluation of the model on ``tokens`` per group (4 per Llama block) plus the reference's
once; the weights run dense (dequantized: the same values, and on a CPU far faster than the LiftQuant
op), so the device holds both models' dense weights and the reference's log-probabilities of all
tokens (tokens × vocabulary float32).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lift_ao.budget import _lattice_mse, plan
from lift_ao.calibration import DEFAULT_ALPHA, calibrate, sibling_groups
from lift_ao.config import liftquant
from lift_ao.evaluate import evaluating
from lift_ao.io import _sha256, _write_atomically, comparable_identity, settings_sha256, state_sha256
from lift_ao.lattice import Lattice
from lift_ao.tensor import LiftQuantTensor

__all__ = ["calibrated_sensitivity", "measure_sensitivity"]

# Where calibrated_sensitivity keeps its scores in its checkpoint directory.
SCORES_FILE = "sensitivity_scores.json"
# Tokens to measure on by default (the command line's, accuracy.py's): 32 sequences of 512, as in the
# studies (benchmarks/results/accuracy_w200_h100.md).
SENSITIVITY_TOKENS = 16384

# A group's gain below this fraction of the mean gain per group is raised to it: such gains are within
# the measurement's noise (SmolLM2-135M, 8192 tokens: gains down to −0.0035 nats against a mean of
# 0.0048), and a zero score would send the layer to the cheapest lattice whatever its real damage.
_FLOOR_OF_MEAN_GAIN = 0.2


def measure_sensitivity(
    model: torch.nn.Module, reference: torch.nn.Module, tokens: torch.Tensor, *, batch_size: int = 4,
    progress: bool = True,
) -> dict[str, float]:
    """Per-layer planner scores from leave-one-group-out KL gains.

    Args:
        model: a causal LM (``model(ids).logits``) whose linears hold LiftQuantTensor weights, on the
            device to measure on.
        reference: the same model in full precision, on the same device.
        tokens: LongTensor (sequences, length) of token ids (never the evaluation text).
        batch_size: sequences per forward.
        progress: a tqdm bar over the groups.
    Returns:
        {linear FQN: score} for every LiftQuant linear, for :func:`lift_ao.plan`'s ``scores``: the
        group's KL gain g (nats per token; raised to a fifth of the mean gain per group) × the layer's
        share of the group's parameters / the MSE of the layer's lattice, so that score × MSE of a
        lattice prices the layer at that lattice.
    Raises:
        ValueError: no LiftQuant weights, a reference without the same linears, malformed tokens, or
            no group whose full-precision weights lower the KL.
    """
    quantized = {name: m.weight for name, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), LiftQuantTensor)}
    if not quantized:
        raise ValueError("the model has no LiftQuant weights; quantize or calibrate it first")
    full = {name: getattr(m, "weight", None) for name, m in reference.named_modules()}
    mismatched = [n for n, w in quantized.items() if not isinstance(full.get(n), torch.Tensor)
                  or isinstance(full[n], LiftQuantTensor) or full[n].shape != w.shape]
    if mismatched:
        raise ValueError(f"the reference lacks full-precision linears of the quantized model's shapes: "
                         f"{mismatched[:3]}; pass the full-precision model the quantized one was made from")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError("tokens must be a LongTensor (sequences, length) of token ids")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(iter(quantized.values())).packed_codes.device
    batches = [b.to(device) for b in tokens.long().split(batch_size)]
    dense = {f"{n}.weight": w.dequantize() for n, w in quantized.items()}

    with torch.no_grad(), evaluating(model, reference):  # no dropout: the same scores each run
        targets = [F.log_softmax(reference(b, use_cache=False).logits.float(), -1).flatten(0, 1) for b in batches]

        def kl(weights: dict) -> float:
            total = 0.0
            for batch, target in zip(batches, targets):
                logits = torch.func.functional_call(model, weights, (batch,), {"use_cache": False}).logits.float()
                total += F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), target, log_target=True,
                                  reduction="sum").item()
            return total / tokens.numel()

        groups = sibling_groups(model, list(quantized), batches[0], dense)
        base = kl(dense)
        gains = [base - kl(dense | {f"{n}.weight": full[n] for n in names})
                 for names in tqdm(groups, desc="sensitivity", unit="group", disable=not progress)]
    if sum(gains) <= 0:
        raise ValueError(f"no group's full-precision weights lower the KL ({base:.3g} nats per token) on these tokens: "
                         "nothing to plan on; measure a quantized model against the model it was made from")
    floor = _FLOOR_OF_MEAN_GAIN * sum(gains) / len(gains)
    scores = {}
    for names, gain in zip(groups, gains):
        params = sum(quantized[n].numel() for n in names)
        for n in names:
            mse = _lattice_mse(Lattice.load(quantized[n].lattice.name))
            scores[n] = max(gain, floor) * quantized[n].numel() / params / mse
    return scores


def calibrated_sensitivity(
    model: torch.nn.Module, memory_budget, tokens: torch.Tensor, score_tokens: torch.Tensor, *, reserve=0,
    kv_cache=None, alpha: float = DEFAULT_ALPHA, seed: int = 0, device=None, checkpoint_dir=None,
    overwrite: bool = False, progress: bool = True,
) -> dict[str, float]:
    """Scores for ``liftquant(memory_budget=..., scores=...)`` measured as they paid off on SmolLM2
    (module docstring): a copy of ``model`` calibrated (block LDLQ, no fine-tuning) at the one lattice that
    a uniform plan of ``memory_budget`` (less ``reserve`` and ``kv_cache``) gives every linear, then
    :func:`measure_sensitivity` of that copy against ``model`` on ``score_tokens``.

    Args:
        model: the full-precision Hugging Face Llama-style causal LM (left unchanged), on the device to
            measure on.
        memory_budget, reserve, kv_cache: as for :func:`lift_ao.plan`; give the reserve and KV cache that the
            plan of the scores will be given (``liftquant(..., reserve=..., kv_cache=...)``): the copy's
            lattice is the one the budget leaves room for beside them.
        tokens: LongTensor (sequences, length) of calibration token ids for the copy's calibration.
        score_tokens: LongTensor (sequences, length) to measure on: text no later stage trains on (the
            studies used 32 sequences of 512 after the calibration text), never the evaluation text.
        alpha, seed, device: the copy's :func:`lift_ao.calibrate` settings (seed also of the plan).
        checkpoint_dir: the copy's calibration resumes from here, and the scores are kept here
            (``sensitivity_scores.json``): a restarted run with the same model, lattice, seed, alpha and
            tokens reads them instead of measuring again, so its plan is the one the interrupted run made.
        overwrite, progress: as for :func:`lift_ao.calibrate`.
    Returns:
        {linear FQN: score}, as :func:`measure_sensitivity` returns.
    Raises:
        BudgetError: no single lattice fits ``memory_budget`` beside the reserve and KV cache.
        CheckpointError: ``checkpoint_dir`` holds another calibration (and not ``overwrite``).
    """
    (lattice,) = set(plan(model, memory_budget, reserve=reserve, kv_cache=kv_cache, allocation="uniform",
                          seed=seed).lattices().values())
    stored = None if checkpoint_dir is None else Path(checkpoint_dir) / SCORES_FILE
    if stored is not None:  # hashed only where the scores are kept
        # The model's values too: another model of the same shapes has other scores.
        identity = dict(lattice=lattice, seed=seed, alpha=alpha, tokens_sha256=_sha256(tokens.long()),
                        score_tokens_sha256=_sha256(score_tokens.long()), model_sha256=state_sha256(model),
                        settings_sha256=settings_sha256(model))
        found = json.loads(stored.read_text()) if stored.is_file() else None
        if found is not None and found["identity"] == comparable_identity(identity, found["identity"]):
            return found["scores"]
    # Block LDLQ alone (refine_passes=0), as when these scores were measured to pay off: a probe only
    # ranks the layers, and so scores stored before the refinement passes existed stay valid.
    probe = calibrate(copy.deepcopy(model), liftquant(lattice=lattice, seed=seed), tokens, device=device,
                      alpha=alpha, refine_passes=0, checkpoint_dir=checkpoint_dir,
                      overwrite=overwrite, progress=progress)
    scores = measure_sensitivity(probe, model, score_tokens, progress=progress)
    if stored is not None:
        _write_atomically(stored, lambda tmp: Path(tmp).write_text(json.dumps(dict(identity=identity, scores=scores))))
    return scores
