"""End-to-end fine-tuning of a quantized model's scales against its full-precision teacher.

After :func:`lift_ao.calibrate` (which tunes one decoder block at a time), the remaining error is the
sum of every block's: ``finetune_end_to_end(model, teacher, tokens)`` trains, for the whole model at
once, log-factors of every LiftQuant weight's row scales and of each shared input transform's input
scales (``input_signs``, which carry the activation-aware 1/s) so that the quantized model's next-token
distribution matches the teacher's (KL divergence on calibration tokens, as QuIP#'s and AQLM's
end-to-end fine-tuning do for their continuous parameters). The codes and the rotation stay; the
learned factors are folded into ``row_scale`` and ``input_signs``, so the format and the kernels are
unchanged, and so is the footprint of a model calibrated at ``alpha > 0``, whose groups of siblings each
have their own input signs already. Groups whose signs are one tensor because their values are equal
(data-free or ``alpha=0`` models: signs depend only on the padded size) are tuned apart and get their
own: a K-float vector per group more (~3.4 MB on Llama-3-8B), which a memory-budget plan made for
data-free coding did not count (:func:`lift_ao.calibrate` with ``tuned_later`` plans for it). With
``tune_mapping=True`` the lattice matrix M of each group of weights that read one activation is tuned
too (AQLM's end-to-end stage tunes its codebooks likewise) and stored per group, and with
``tune_rotation=True`` each input transform's rotation factors: same format and kernels, a few more
floats per group. With ``unquantized_lr`` the parameters that are not quantized
(embeddings, norms) are tuned as well, as PV-tuning does: same format and size.

Resume: with ``checkpoint_dir``, the factors, Adam's state and the best held-out factors so far are
written there (one checksummed shard) at a held-out check at most once a minute
(:data:`PROGRESS_SECONDS`) and after the last step; a restarted run with the same settings, tokens,
teacher and calibrated model continues from the last one and ends as an uninterrupted run would.

Memory: unlike calibration, the whole model runs at once (as dense weights rebuilt from the codes,
each step), next to the teacher: meant for models that fit the device twice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lift_ao.calibration import (_code_blocks, _code_signs, _decoder_blocks, _scaled_signs, _scaled_unit,
                                 _tuned_rotation, _tuned_weight, _unit_weight, adam_steps, sibling_groups)
from lift_ao.evaluate import evaluating
from lift_ao.io import (CheckpointError, _sha256, comparable_identity, load_shard, remove_shard, save_shard,
                        settings_sha256, state_sha256)
from lift_ao.tensor import LiftQuantTensor, share_constants
from lift_ao.transform import unrotate

__all__ = ["EndToEndResult", "finetune_end_to_end", "held_out_rows", "tuned_parts"]


class EndToEndResult(NamedTuple):
    """What :func:`finetune_end_to_end` measured on the held-out sequences, in nats per token."""

    before: float  # KL before tuning
    after: float  # KL of the factors kept (``before`` when no check beat it)
    checks: tuple  # ((step, KL), ...) at every check, (0, before) first: the learning curve


def held_out_rows(sequences: int, fraction: float) -> torch.Tensor:
    """Indices of the held-out sequences among ``sequences`` ≥ 2: ``round(fraction · sequences)`` of
    them (at least 1, at most sequences − 1), evenly spaced, the i-th at ⌊(i + ½)·sequences / held⌋.

    Returns:
        (held,) int64 indices, increasing.
    """
    held = min(sequences - 1, max(1, round(fraction * sequences)))
    return ((torch.arange(held, dtype=torch.float64) + 0.5) * sequences / held).floor().long()


# The shard that holds an unfinished run's progress in checkpoint_dir.
PROGRESS_SHARD = "end_to_end"
# It is rewritten at a held-out check only if the last write is this old (and after the last step): a
# write holds ~16 bytes per tuned number (value, best, Adam's two moments) and with SmolLM2's
# embeddings tuned (unquantized_lr) took ~2 s, 2 minutes over a 1024-step run's 64 checks.
PROGRESS_SECONDS = 60.0


def _run_identity(quantized: dict, unquantized: dict, tokens: torch.Tensor, **settings) -> dict:
    """What a run's progress may only be resumed under: its settings (``teacher_sha256``, the teacher's
    :func:`lift_ao.io.state_sha256`, and ``settings_sha256``, the model's
    :func:`lift_ao.io.settings_sha256`, among them), a SHA-256 of its tokens and one of the starting weights
    (names, shapes, row scales and input transforms: a different calibration changes them; the codes,
    possibly gigabytes, are not hashed; the ``unquantized`` parameters that are tuned too, whose steps
    would not fit other starting values)."""
    digest = hashlib.sha256()
    for name, w in quantized.items():
        digest.update(f"{name}{tuple(w.shape)}".encode())
        for t in (w.row_scale, w.input_signs):
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for name, p in unquantized.items():
        digest.update(name.encode() + p.detach().float().cpu().contiguous().numpy().tobytes())
    return dict(settings, tokens_sha256=_sha256(tokens.long()), weights_sha256=digest.hexdigest())


def _save_progress(directory, identity: dict, done: int, checks: list, factors: list, best_factors: Optional[list],
                   optimizer: torch.optim.Optimizer) -> None:
    """Write the state after ``done`` steps as the :data:`PROGRESS_SHARD` shard."""
    state = optimizer.state_dict()
    tensors = {f"factor.{i}": f.detach() for i, f in enumerate(factors)}
    tensors.update({f"best.{i}": f for i, f in enumerate(best_factors or [])})
    adam = {f"adam.{i}.{key}": value for i, entry in state["state"].items() for key, value in entry.items()}
    scalars = sorted(name for name, value in adam.items() if value.dim() == 0)  # Adam's step counts
    tensors.update({name: value.reshape(-1) if name in scalars else value for name, value in adam.items()})
    save_shard(directory, PROGRESS_SHARD, tensors, dict(identity=identity, done=done, checks=checks,
                                                         kept=best_factors is not None, scalars=scalars,
                                                         param_groups=state["param_groups"]))


def _load_progress(directory, identity: dict, factors: list, overwrite: bool):
    """``(done, checks, best_factors, optimizer_state)`` saved by :func:`_save_progress` under the
    same identity, with ``factors`` set to the saved ones; None when there is nothing to resume."""
    found = load_shard(directory, PROGRESS_SHARD)
    if found is None:
        return None
    info, tensors = found
    identity = comparable_identity(identity, info["identity"])
    if info["identity"] != identity or "checks" not in info:  # no "checks": written before the learning curve
        if overwrite:
            remove_shard(directory, PROGRESS_SHARD)
            return None
        differs = sorted(k for k in identity.keys() | info["identity"].keys() if identity.get(k) != info["identity"].get(k))
        raise CheckpointError(f"{directory} holds end-to-end fine-tuning progress of another run (differs in: "
                              f"{', '.join(differs) or 'format: an older lift_ao'}); use another directory, or "
                              "overwrite it (overwrite=True; lift-ao quantize --overwrite)")
    device = factors[0].device
    with torch.no_grad():
        for i, factor in enumerate(factors):
            factor.copy_(tensors[f"factor.{i}"])
    best_factors = [tensors[f"best.{i}"].to(device) for i in range(len(factors))] if info["kept"] else None
    state = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value.reshape(()) if name in info["scalars"] else value
    checks = [tuple(check) for check in info["checks"]]
    return info["done"], checks, best_factors, {"state": state, "param_groups": info["param_groups"]}


def _distillation_loss(model, weights: dict, teacher, batch: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ model) per token, averaged, on one batch of token ids (B, T)."""
    with torch.no_grad():  # no KV cache: nothing is generated, and its per-block state would split compiled blocks
        target = F.log_softmax(teacher(batch, use_cache=False).logits.float(), -1)
    logits = torch.func.functional_call(model, weights, (batch,), {"use_cache": False}).logits.float()
    return F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                    reduction="batchmean")


def _call_block(block: torch.nn.Module, *args, **kwargs):
    """``block(*args, **kwargs)``, hooks included: the function :func:`_compiled_blocks` compiles, so that
    its graphs live in a code cache of their own (``nn.Module.compile``'s is every module's)."""
    return block._call_impl(*args, **kwargs)


@contextlib.contextmanager
def _compiled_blocks(*models: torch.nn.Module):
    """Inside, every decoder block of ``models`` runs through ``torch.compile`` (regional compilation:
    Dynamo treats a block's tensors as inputs, so all blocks share a graph per batch shape and grad mode,
    and the compile time is that of one block, not of the whole model: on an H100, 25 s against 183 s
    for the whole loss, whose steps were no faster; benchmarks/results/e2e_speed_h100.md). The graphs
    stay for the next stage; inside, up to 64 may exist instead of torch's recompile limit (8), past
    which ``fullgraph`` fails: a stage compiles up to 8 (batch shapes × grad modes, the teacher's
    apart), and a process may tune models of several shapes."""
    blocks = [block for model in models for block in _decoder_blocks(model)]
    before = [block._compiled_call_impl for block in blocks]  # nn.Module.compile's slot, restored after
    call = torch.compile(_call_block, fullgraph=True, dynamic=False)
    for block in blocks:
        block._compiled_call_impl = functools.partial(call, block)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            yield
    finally:
        for block, previous in zip(blocks, before):
            block._compiled_call_impl = previous


# Tuned lattice matrices are M + _MAPPING_STEP · Δ with Δ at the scales' learning rate: M's entries are
# ~1/√D (0.1–0.2), so Adam's ~lr steps on them directly would be large (as calibration._ROTATION_STEP).
_MAPPING_STEP = 0.1


def _tuned_mapping(weight: LiftQuantTensor, delta: torch.Tensor) -> torch.Tensor:
    """(d, D) the lattice matrix M + _MAPPING_STEP·Δ of ``weight`` for the tuned Δ."""
    return weight.mapping + _MAPPING_STEP * delta


def _dense_weights_by_shape(quantized: dict, log_r: dict, log_s: dict, mapping_delta: dict, rotation_delta: dict):
    """A function of no arguments returning {name: (N, K) dense weight diag(r·exp(log_r)) C diag(σ·exp(log_s))}
    for every LiftQuantTensor in ``quantized`` (calibration._dense_weight's values, differentiable in the
    (N,) ``log_r[name]`` and the (≥ K,) ``log_s[name]``), computed per group of weights of one shape,
    dtype, lattice size and rotation as one (L, N, K) product: a few kernels per group instead of per
    weight (a 30-block model's 210 weights come in 5 groups), and nothing to compile: compiled as one
    graph, the 210 products took ~90 s to compile on an H100 (benchmarks/results/e2e_speed_h100.md).

    C (calibration._unit_weight: the codes' blocks M q, unrotated) is fixed, except with
    ``mapping_delta`` ({name: (d, D) Δ} for every weight: :func:`_tuned_mapping`) or ``rotation_delta``
    ({name: (ΔL, ΔR)} for every weight: :func:`_tuned_rotation`); then it is rebuilt at each call,
    differentiable in them."""
    by_kind = {}
    for name, w in quantized.items():
        key = (tuple(w.shape), w.dtype, tuple(w.mapping.shape), id(w.rotation_left), id(w.rotation_right))
        by_kind.setdefault(key, []).append(name)
    stacks = []  # (names, codes (L, N, blocks, D), blocks (L, N, Kp) or C (L, N, K), r, σ, log_r, log_s cropped to K)
    for names in by_kind.values():
        group = [quantized[name] for name in names]
        k = group[0].shape[1]
        # Per weight, then stacked: the unpacked codes (4 bytes per bit) of a whole group at once only
        # when they are what is kept.
        if mapping_delta:
            fixed = torch.stack([_code_signs(w) for w in group])
        elif rotation_delta:
            fixed = torch.stack([_code_blocks(w, _code_signs(w)) for w in group])
        else:
            fixed = torch.stack([_unit_weight(w, _code_signs(w)) for w in group])
        stacks.append((names, fixed, torch.stack([w.row_scale for w in group]), torch.stack([w.input_signs[:k] for w in group]),
                       [log_r[name] for name in names], [log_s[name][:k] for name in names]))

    def weights() -> dict:
        dense = {}
        for names, fixed, row_scale, sigma, log_r_rows, log_s_rows in stacks:
            first = quantized[names[0]]
            unit = fixed
            if mapping_delta:  # (L, N, blocks, D) @ (L, 1, D, d): calibration._code_blocks per weight
                mapping = torch.stack([_tuned_mapping(quantized[n], mapping_delta[n]) for n in names])
                unit = (fixed @ mapping.transpose(1, 2)[:, None]).flatten(2)
            if mapping_delta or rotation_delta:  # blocks, unrotated as calibration._unit_weight does
                left, right = first.rotation_left, first.rotation_right
                if rotation_delta:  # one (left, right) pair per weight, broadcast over its rows
                    left, right = (torch.stack(f)[:, None] for f in zip(*(_tuned_rotation(quantized[n], rotation_delta[n])
                                                                          for n in names)))
                unit = unrotate(unit, None, left, right, first.shape[1])
            r = row_scale * torch.stack(log_r_rows).exp()
            s = sigma * torch.stack(log_s_rows).exp()
            dense.update(zip(names, _scaled_unit(unit, r, s, first.dtype).unbind()))
        return dense

    return weights


def tuned_parts(tune_mapping: bool, tune_rotation: bool) -> tuple:
    """What :func:`finetune_end_to_end` with these settings stores per group of siblings: the
    ``tuned_later`` that :func:`lift_ao.calibrate` needs to plan a memory budget with room for it."""
    return tuple(part for part, on in (("mapping", tune_mapping), ("rotation", tune_rotation)) if on)


def finetune_end_to_end(
    model: torch.nn.Module, teacher: torch.nn.Module, tokens: torch.Tensor, *, steps: int, lr: float = 3e-3,
    batch_size: int = 4, held_out: float = 0.125, check_every: int = 16, tune_mapping: bool = False,
    tune_rotation: bool = False, unquantized_lr: Optional[float] = None, checkpoint_dir=None, overwrite: bool = False,
    progress: bool = True, compiled: Optional[bool] = None,
) -> EndToEndResult:
    """Tune the row and input scales (and, with ``tune_mapping`` / ``tune_rotation``, the lattice
    matrices / rotation factors) of every LiftQuant weight of ``model`` end to end, in place.

    Adam (cosine-decayed ``lr``) learns ``r ← r·exp(a)`` per row of each weight and ``σ ← σ·exp(b)``
    per input channel of each input transform (the ``input_signs`` of a group of siblings, the linears
    that read one activation, such as q/k/v; siblings that share one tensor keep sharing it, and groups
    whose signs are one tensor because their values are equal get a vector each) to minimise
    KL(teacher ‖ model) of the next-token distributions, one batch of ``batch_size`` training sequences
    per step in turn.

    A ``held_out`` fraction of the sequences, spread evenly over them (:func:`held_out_rows`: text
    order is not random, so the last ones may be atypical), is never trained on: the KL there is measured
    every ``check_every`` steps and after the last, and the factors of the lowest held-out KL are the
    ones folded in, only if it is below the held-out KL before tuning. Without this, many steps over
    few sequences overfit: on SmolLM2 at 2.4 bits, 1024 steps over all 32 calibration sequences
    lowered the training KL (0.093 after 256 steps → 0.065) while the evaluation perplexity rose
    (19.46 → 21.20, benchmarks/results/accuracy_fte1024_h200.md).

    Args:
        model: a causal LM (``model(ids).logits``) whose quantized linears hold LiftQuantTensor weights.
        teacher: the same model in full precision, on the same device (its outputs are the targets).
        tokens: LongTensor (sequences, length) of calibration token ids (never the evaluation text),
            at least 2 sequences.
        steps: Adam steps (0: nothing changes).
        lr: peak learning rate of the log-factors. 3e-3 beat 1e-2 at both rates measured (1024 steps,
            SmolLM2: 2.4 bits 17.95 → 17.45, 3.0 bits 15.20 → 14.42; accuracy_fte1024_64k_lr003_*).
        batch_size: sequences per step.
        held_out: fraction of the sequences (at least one) kept for model selection, in (0, 1).
        check_every: steps between held-out measurements (≥ 1).
        tune_mapping: also tune the lattice matrix M of each group of weights that share an input
            transform (q/k/v, gate/up: they keep sharing it, so the lift stays one per activation), as
            AQLM's end-to-end stage tunes its codebooks. Each group then stores its own d×D M (fp32):
            on SmolLM2-135M +0.027 bits/weight at 2.4 bits (perplexity −1.1 % [−1.2, −0.9]) and +0.062
            at 3.0 bits (−0.8 % [−0.9, −0.6]); spent on rate instead, those bits would buy ~−0.5 % and
            ~−1.2 %. On an 8B model the same matrices cost < 0.001 bits/weight
            (benchmarks/results/accuracy_w200_mapping_h100.md). Memory: the codes are then held
            unpacked, a float32 per code bit (~1 GB for SmolLM2-135M at 2.4 bits), and the recipe took
            8–18 % longer on an H100.
        tune_rotation: also tune the Kronecker rotation factors (L, R) of each input transform, freely
            (the forward applies whatever (L ⊗ R)ᵀ is stored, as :func:`lift_ao.calibrate`'s
            ``finetune_rotation`` does block by block); siblings keep one pair. Each transform then
            stores its own k1² + k2² floats: ~0.06 bits/weight on SmolLM2-135M, ~0.008 on an 8B
            model. Measured on SmolLM2-135M beside ``tune_mapping`` (200 windows): perplexity −1.1 %
            at 2.4 bits, about what its 0.06 bits would buy as rate, and −0.1 % at 3.0 bits, less:
            it does not pay on a model this small, and may where its bits are few
            (benchmarks/results/accuracy_w200_mapping_h100.md).
        unquantized_lr: also tune the model's floating-point parameters that are not LiftQuant weights
            (embeddings and a tied output head, norm weights, biases), at this peak learning rate
            (None: they stay), as PV-tuning's end-to-end stage does (``update_non_quantized_parameters``).
            They are tuned as additive steps Δ and added in only if a held-out check improved, like
            the factors; the model's size and format do not change. On SmolLM2-135M (200 windows, the
            best recipes) 1e-4 lowered perplexity −1.5 % [−1.6, −1.4] at 2.4 bits and −0.9 % [−1.3, −0.5]
            at 3.0 (3e-4: within 0.1 % of 1e-4; benchmarks/results/accuracy_w200_unquantized_h100.md).
            Memory: Δ, its best copy and Adam's two moments, 16 bytes per tuned number on the device
            (SmolLM2-135M: 0.45 GB; Llama-3-8B's untied embeddings and head: ~17 GB), hence off by default.
        checkpoint_dir: where the run's progress is written (at held-out checks, at most once a minute) and resumed from
            (a directory; e.g. the one :func:`lift_ao.calibrate` resumes from). A finished run's
            progress stays there: calling again returns its result without steps.
        overwrite: discard progress there of a different run (settings, tokens, teacher or weights) instead
            of refusing.
        progress: a tqdm bar over steps (postfix: the current training loss and the best held-out loss).
        compiled: run every decoder block (the model's and the teacher's) through ``torch.compile``
            while tuning (None: on CUDA). Eager, a step issues thousands of small kernels and on an
            H100 the host issuing them takes ~2.4× the GPU's time (``benchmarks/results/e2e_profile_h100.md``);
            compiled blocks ran the best recipe's steps and checks 1.5× faster after a 25 s compilation
            (``e2e_speed_h100.md``). A graph per batch shape and grad mode, shared by all blocks and
            kept for later stages; the model is left uncompiled after.
            The losses match eager's to rounding (a run resumed with the other setting continues it).
    Returns:
        :class:`EndToEndResult`: the held-out KL before, that of the kept factors, and every check's
        ``(step, KL)``.
    Raises:
        ValueError: no LiftQuant weights, bad ``steps``/``lr``/``batch_size``/``held_out``/``check_every``,
            or malformed tokens.
        CheckpointError: ``checkpoint_dir`` holds another run's progress (and not ``overwrite``).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0 or not lr > 0 or batch_size < 1:
        raise ValueError(f"steps must be an int >= 0, lr > 0 and batch_size >= 1, got {steps!r}, {lr!r}, {batch_size!r}")
    if unquantized_lr is not None and not unquantized_lr > 0:
        raise ValueError(f"unquantized_lr must be None or > 0, got {unquantized_lr!r}")
    if not 0 < held_out < 1 or isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"held_out must be in (0, 1) and check_every an int >= 1, got {held_out!r}, {check_every!r}")
    if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point
            or tokens.shape[0] < 2):
        raise ValueError("tokens must be a LongTensor (sequences, length) of token ids with at least 2 sequences "
                         "(training and held out), e.g. from lift_ao.calibration.builtin_calibration_tokens")
    # Siblings' equal input transforms become one tensor again (a deepcopy or a load separates them),
    # so that they get one factor vector and keep sharing after the fold.
    share_constants(model)
    quantized = {f"{name}.weight": module.weight for name, module in model.named_modules()
                 if isinstance(getattr(module, "weight", None), LiftQuantTensor)}
    if not quantized:
        raise ValueError("the model has no LiftQuant weights; quantize or calibrate it first")
    device = next(iter(quantized.values())).packed_codes.device
    held = held_out_rows(tokens.shape[0], held_out)
    trained = torch.ones(tokens.shape[0], dtype=torch.bool)
    trained[held] = False
    batches = [b.to(device) for b in tokens[trained].long().split(batch_size)]
    held_batches = [b.to(device) for b in tokens[held].long().split(batch_size)]
    log_r = {name: torch.zeros(w.shape[0], device=device, requires_grad=True) for name, w in quantized.items()}
    # What is tuned is keyed by the weight's group of siblings (the linears that read one activation) and
    # by the tensors it stores: equal constants of different groups are one tensor after share_constants
    # (data-free input signs depend only on the padded size; all of them with alpha=0), and tuned as one
    # they would move every such group together. The grouping forward runs on dense weights: the stage
    # never runs the LiftQuant kernels.
    sibling_of = {f"{module}.weight": g for g, group in enumerate(sibling_groups(
        model, [name.removesuffix(".weight") for name in quantized], batches[0][:1, :8],
        {name: w.dequantize() for name, w in quantized.items()})) for module in group}

    def signs_of(name: str) -> tuple:  # an input transform's signs: a group's (per block length or lattice)
        return sibling_of.get(name), id(quantized[name].input_signs)  # not run by the batch: by tensor alone

    def rotation_of(name: str) -> tuple:
        return *signs_of(name), id(quantized[name].rotation_left), id(quantized[name].rotation_right)

    def lattice_of(name: str) -> tuple:
        return *signs_of(name), id(quantized[name].mapping)

    # One factor vector per input transform: siblings that share input_signs share it.
    transforms = {signs_of(name): w for name, w in quantized.items()}
    groups = {key: torch.zeros(w.input_signs.shape[0], device=device, requires_grad=True) for key, w in transforms.items()}
    # One Δ per input transform and lattice: siblings of one lattice keep one M (siblings of several
    # lattices can share input_signs: equal values, merged by share_constants).
    leaders = {lattice_of(name): w for name, w in quantized.items()}
    deltas = {key: torch.zeros_like(w.mapping, requires_grad=True) for key, w in leaders.items()} if tune_mapping else {}
    # One (ΔL, ΔR) per input transform and rotation.
    rotated = {rotation_of(name): w for name, w in quantized.items()}
    turns = {key: tuple(torch.zeros_like(f, requires_grad=True) for f in (w.rotation_left, w.rotation_right))
             for key, w in rotated.items()} if tune_rotation else {}
    weights = _dense_weights_by_shape(quantized, log_r, {name: groups[signs_of(name)] for name in quantized},
                                      {name: deltas[lattice_of(name)] for name in quantized if deltas},
                                      {name: turns[rotation_of(name)] for name in quantized if turns})
    # named_parameters() lists a tied embedding / output head once; functional_call ties it back.
    unquantized = {name: p for name, p in model.named_parameters() if p.is_floating_point()
                   and not isinstance(p, LiftQuantTensor)} if unquantized_lr is not None else {}
    steps_of = {name: torch.zeros_like(p, requires_grad=True) for name, p in unquantized.items()}
    # What the LiftQuant weights store, tuned at ``lr``: log-factors of the scales, Δ of M and of the rotations.
    weight_factors = [*log_r.values(), *groups.values(), *deltas.values(), *(f for pair in turns.values() for f in pair)]
    factors = weight_factors + list(steps_of.values())  # everything tuned: saved, resumed and kept together

    def parameters_now() -> dict:
        """{name: tensor} of everything tuned, as the forward takes it (functional_call's overrides)."""
        return {**weights(), **{name: p + steps_of[name] for name, p in unquantized.items()}}

    @torch.no_grad()
    def held_out_loss() -> float:
        tuned = parameters_now()
        return sum(_distillation_loss(model, tuned, teacher, b).item() * len(b) for b in held_batches) / len(held)

    identity = None  # hashed only for a run that checkpoints steps
    if checkpoint_dir is not None and steps:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        identity = _run_identity(quantized, unquantized, tokens, teacher_sha256=state_sha256(teacher),
                                 settings_sha256=settings_sha256(model),
                                 steps=steps, lr=lr, batch_size=batch_size, held_out=held_out,
                                 check_every=check_every, **({"tune_mapping": True} if tune_mapping else {}),
                                 **({"tune_rotation": True} if tune_rotation else {}),
                                 **({"unquantized_lr": unquantized_lr} if unquantized else {}),
                                 # Absent where each input_signs tensor is one group's (calibrated at alpha > 0):
                                 # their progress, written before groups were told apart, stays resumable.
                                 **({"factors_per_group": True}
                                    if len(transforms) != len({id(w.input_signs) for w in quantized.values()}) else {}))
    # The teacher too: its dropout would make the targets noise.
    with evaluating(model, teacher), contextlib.ExitStack() as blocks_compiled:
        if compiled or (compiled is None and device.type == "cuda"):
            blocks_compiled.enter_context(_compiled_blocks(model, teacher))
        resumed = None if checkpoint_dir is None or not steps else _load_progress(checkpoint_dir, identity, factors,
                                                                                  overwrite)
        if resumed is None:
            done, checks, best_factors, optimizer_state = 0, [(0, held_out_loss())], None, None
        else:
            done, checks, best_factors, optimizer_state = resumed
        before, best = checks[0][1], min(kl for _, kl in checks)  # best_factors are those of the lowest check
        if not steps:
            return EndToEndResult(before, before, tuple(checks))
        bar = tqdm(total=steps, initial=done, desc="end-to-end fine-tuning", unit="step", disable=not progress)

        written = time.monotonic()

        def advance(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
            nonlocal best, best_factors, done, written
            done += 1  # not bar.n: a disabled bar does not count
            bar.update()
            if done % check_every == 0 or done == steps:
                current = held_out_loss()
                checks.append((done, current))
                if current < best:
                    best, best_factors = current, [f.detach().clone() for f in factors]
                if checkpoint_dir is not None and (done == steps or time.monotonic() - written >= PROGRESS_SECONDS):
                    _save_progress(checkpoint_dir, identity, done, checks, factors, best_factors, optimizer)
                    written = time.monotonic()
            if progress:  # loss.item() waits for the GPU: not on every step of a run nobody watches
                bar.set_postfix(kl=f"{loss.item():.4f}", held_out=f"{best:.4f}")

        adam_steps([{"params": weight_factors}] + ([{"params": list(steps_of.values()), "lr": unquantized_lr}] if steps_of else []),
                   lr, steps, lambda step: _distillation_loss(model, parameters_now(), teacher, batches[step % len(batches)]),
                   advance, first_step=done, optimizer_state=optimizer_state)
        bar.close()
        if best_factors is None:
            return EndToEndResult(before, before, tuple(checks))
        with torch.no_grad():
            for factor, kept in zip(factors, best_factors):
                factor.copy_(kept)
            folded = {key: _scaled_signs(transforms[key].input_signs, log_s) for key, log_s in groups.items()}
            mappings = {key: _tuned_mapping(leaders[key], delta) for key, delta in deltas.items()}
            rotations = {key: _tuned_rotation(rotated[key], turn) for key, turn in turns.items()}
            for name, w in quantized.items():
                model.get_submodule(name.removesuffix(".weight")).weight = _tuned_weight(
                    w, log_r[name], folded[signs_of(name)], rotation=rotations.get(rotation_of(name)),
                    mapping=mappings.get(lattice_of(name)))
            share_constants(model)  # wrapping in a Parameter copied the shared tensors apart
            for name, p in unquantized.items():
                p.add_(steps_of[name])
    return EndToEndResult(before, best, tuple(checks))
