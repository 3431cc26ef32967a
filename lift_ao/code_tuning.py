"""End-to-end tuning of the ±1 codes: a PV-tuning-style discrete step (prototype, under measurement).

The continuous end-to-end stage (:func:`lift_ao.finetune_end_to_end`) leaves every code as calibration
chose it. One bit's gradient is noise on one batch (a straight-through latent per bit moved by Adam
flipped one bit in 1024 steps), so here the gradient of the KL with respect to every weight's unit
blocks ``b = M q`` (rotated domain) is averaged over many batches first; then each block is re-coded
to the lattice point nearest to ``b − η·G`` (η per weight: a step of RMS ``step`` in unit coordinates),
and of the blocks that change, those with the largest first-order gain ``−G·(b' − b)`` are taken, a
fraction of all blocks at a time: kept when the held-out KL falls (the fraction then doubles),
undone otherwise (it quarters). This is PV-tuning's linearised V step (Malinovskii et al., 2024) with
this library's lattice search as the projection.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lift_ao.calibration import _code_blocks, _code_signs, _scaled_unit
from lift_ao.finetune import _distillation_loss, held_out_rows
from lift_ao.lattice import Lattice
from lift_ao.packing import pack_codes
from lift_ao.search import nearest_codes
from lift_ao.tensor import LiftQuantTensor, share_constants
from lift_ao.transform import rotate, unrotate

__all__ = ["CodeTuningResult", "tune_codes_end_to_end"]


class CodeTuningResult(NamedTuple):
    """What :func:`tune_codes_end_to_end` did, KLs in nats per token on the held-out sequences."""

    before: float
    after: float
    blocks_changed: int  # code blocks that differ from the start
    rounds: tuple  # ((fraction tried, blocks proposed, held-out KL, kept), ...)


def _dense(quantized: dict, blocks: dict) -> dict:
    """{name: (N, K) dense weight r · unrotate(blocks) · σ} (differentiable in the blocks)."""
    dense = {}
    for name, w in quantized.items():
        k = w.shape[1]
        unit = unrotate(blocks[name], None, w.rotation_left, w.rotation_right, k)
        dense[name] = _scaled_unit(unit, w.row_scale, w.input_signs[:k], w.dtype)
    return dense


def _gradient_and_curvature(model, teacher, quantized: dict, blocks: dict, batches: list) -> tuple[dict, dict]:
    """Over ``batches``: {name: (N, Kp) gradient of the mean KL with respect to ``blocks[name]``} and
    {name: (N, Kp) its curvature}, the diagonal of the Fisher of the model's own next-token
    distribution (the KL's Gauss-Newton matrix; labels sampled from the model, one per token),
    factorised per linear as ``r_n² · mean_t δ_tn² · mean_t x̃_tj²`` with δ the output gradient of
    one token's sampled-label loss and x̃ = rotate(σ ⊙ x) the input in the blocks' coordinates (the
    K-FAC diagonal). The empirical Fisher of the KL's own gradients would vanish where the model
    matches the teacher."""
    leaves = {name: b.detach().requires_grad_() for name, b in blocks.items()}
    grads = {name: torch.zeros_like(b) for name, b in blocks.items()}
    out_sq = {name: 0.0 for name in blocks}
    in_sq = {name: 0.0 for name in blocks}
    modules = {name: model.get_submodule(name.removesuffix(".weight")) for name in blocks}
    outputs = {}

    def record(name):
        def hook(module, args, output):
            w = quantized[name]
            x = args[0].detach().float().flatten(0, -2)
            rotated = rotate(x * w.input_signs[: w.shape[1]], None, w.rotation_left, w.rotation_right)
            per_block = rotated.view(rotated.shape[0], -1, w.block_size)
            in_sq[name] = in_sq[name] + torch.einsum("tbi,tbj->bij", per_block, per_block) / rotated.shape[0]
            outputs[name] = output
        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in blocks]
    generator = torch.Generator(device=next(iter(blocks.values())).device).manual_seed(0)
    try:
        with torch.enable_grad():
            for batch in batches:
                with torch.no_grad():
                    target = F.log_softmax(teacher(batch, use_cache=False).logits.float(), -1)
                logits = torch.func.functional_call(model, _dense(quantized, leaves), (batch,), {"use_cache": False}).logits
                log_p = F.log_softmax(logits.float(), -1).flatten(0, 1)
                kl = F.kl_div(log_p, target.flatten(0, 1), log_target=True, reduction="batchmean")
                for name, g in zip(leaves, torch.autograd.grad(kl, list(leaves.values()), retain_graph=True)):
                    grads[name] += g
                sampled = torch.multinomial(log_p.detach().exp(), 1, generator=generator)
                nll = -log_p.gather(1, sampled).sum()  # a sum: each token's own gradient
                names = list(outputs)
                for name, g in zip(names, torch.autograd.grad(nll, [outputs[n] for n in names])):
                    out_sq[name] = out_sq[name] + g.float().flatten(0, -2).pow(2).mean(0)
                outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    count = len(batches)
    curvature = {name: (quantized[name].row_scale ** 2 * out_sq[name] / count, in_sq[name] / count) for name in blocks}
    # The KL is a mean over tokens: its curvature is the per-token Fisher's mean (as above).
    return {name: g / count for name, g in grads.items()}, curvature


def tune_codes_end_to_end(
    model: torch.nn.Module, teacher: torch.nn.Module, tokens: torch.Tensor, *, rounds: int, step: float = 1.0, damping: float = 0.01,
    first_fraction: float = 0.01, gradient_batches: int = 64, batch_size: int = 4, held_out: float = 0.125,
    progress: bool = True,
) -> CodeTuningResult:
    """Re-code the blocks of every LiftQuant weight of ``model`` where the end-to-end gradient says so, in place.

    Args:
        model: a causal LM with LiftQuant weights (after :func:`lift_ao.finetune_end_to_end`).
        teacher: the full-precision model on the same device.
        tokens: (sequences, length) calibration token ids; the same ``held_out`` rows as the
            continuous stage are held out (:func:`lift_ao.finetune.held_out_rows`).
        rounds: proposals tried (each one held-out measurement).
        step: the fraction of the damped Newton step ``−G / (H + damping·mean H)`` whose nearest
            lattice point is proposed for each block.
        damping: added to the curvature, relative to its mean over the weight.
        first_fraction: fraction of all code blocks proposed in the first round.
        gradient_batches: training batches the gradient is averaged over (recomputed after a kept round).
        batch_size: sequences per batch.
        held_out: fraction of held-out sequences, in (0, 1).
        progress: a tqdm bar over rounds.
    Returns:
        :class:`CodeTuningResult`.
    """
    share_constants(model)
    names = [f"{name}.weight" for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), LiftQuantTensor)]
    quantized = {name: model.get_submodule(name.removesuffix(".weight")).weight for name in names}
    if not quantized:
        raise ValueError("the model has no LiftQuant weights; quantize or calibrate it first")
    device = next(iter(quantized.values())).packed_codes.device
    held = held_out_rows(tokens.shape[0], held_out)
    trained = torch.ones(tokens.shape[0], dtype=torch.bool)
    trained[held] = False
    batches = [b.to(device) for b in tokens[trained].long().split(batch_size)][:gradient_batches]
    held_batches = [b.to(device) for b in tokens[held].long().split(batch_size)]
    signs = {name: _code_signs(w) for name, w in quantized.items()}  # (N, blocks, D) ±1
    blocks = {name: _code_blocks(w, signs[name]) for name, w in quantized.items()}  # (N, Kp)
    lattices = {}

    def lattice_of(w: LiftQuantTensor) -> Lattice:
        return lattices.setdefault(id(w.mapping), Lattice(w.block_size, w.code_bits, w.mapping))

    @torch.no_grad()
    def held_out_kl(current: dict) -> float:
        dense = _dense(quantized, current)
        return sum(_distillation_loss(model, dense, teacher, b).item() * len(b) for b in held_batches) / len(held)

    was_training = model.training
    model.eval()
    before = current = held_out_kl(blocks)
    fraction, history, proposal = first_fraction, [], None
    total = sum(s.shape[0] * s.shape[1] for s in signs.values())
    bar = tqdm(range(rounds), desc="code tuning", unit="round", disable=not progress)
    try:
        for _ in bar:
            if proposal is None:  # after a kept round (or at the start): new gradient, new candidates
                grads, curvature = _gradient_and_curvature(model, teacher, quantized, blocks, batches)
                proposal = {}
                with torch.no_grad():
                    for name, w in quantized.items():
                        rows, second = curvature[name]  # (N,), (blocks, d, d)
                        diagonal = (rows[:, None, None] * second.diagonal(dim1=1, dim2=2)[None]).flatten(1)
                        g, h = grads[name], diagonal + damping * diagonal.mean()
                        target = blocks[name] - step * g / h  # the damped (diagonal) Newton step
                        codes = nearest_codes(target.view(-1, w.block_size), lattice_of(w)).view_as(signs[name])
                        new_signs = codes.to(torch.float32) * 2 - 1
                        delta = (new_signs @ w.mapping.T - blocks[name].view(*signs[name].shape[:2], -1))
                        # (N, blocks) the quadratic model's KL decrease
                        quadratic = torch.einsum("nbi,bij,nbj->nb", delta, second, delta) * rows[:, None]
                        gain = -(g.view_as(delta) * delta).sum(-1) - 0.5 * quadratic
                        # At most one block per row: moves in one row change the same output, so their
                        # gains do not add up (the quadratic model has no cross terms between blocks).
                        best = gain.max(-1, keepdim=True)
                        gain = torch.where(torch.arange(gain.shape[1], device=gain.device) == best.indices,
                                           gain, torch.zeros_like(gain))
                        proposal[name] = (new_signs, gain)
                gains = torch.cat([gain.flatten() for _, gain in proposal.values()])
            count = int(fraction * total)
            if count < 1:
                break
            values, _ = gains.topk(min(count, gains.numel()))
            threshold = values[-1].clamp_min(torch.finfo(values.dtype).tiny)  # only positive gains
            trial_signs, trial_blocks, proposed = dict(signs), dict(blocks), 0
            for name, (new_signs, gain) in proposal.items():
                take = gain >= threshold
                if take.any():
                    proposed += int(take.sum())
                    trial_signs[name] = torch.where(take[..., None], new_signs, signs[name])
                    trial_blocks[name] = (trial_signs[name] @ quantized[name].mapping.T).flatten(1)
            if not proposed:
                break
            kl = held_out_kl(trial_blocks)
            kept = kl < current
            history.append((fraction, proposed, kl, kept))
            if kept:
                signs, blocks, current, proposal = trial_signs, trial_blocks, kl, None
                fraction *= 2
            else:
                fraction /= 4
            bar.set_postfix(held_out=f"{current:.4f}", fraction=f"{fraction:.4g}")
        changed = 0
        with torch.no_grad():
            for name, w in quantized.items():
                start = _code_signs(w)
                changed += int((start != signs[name]).any(-1).sum())
                tuned = LiftQuantTensor(pack_codes((signs[name] > 0).flatten(1)), w.row_scale, w.mapping,
                                        w.input_signs, w.rotation_left, w.rotation_right, w.shape, w.dtype)
                model.get_submodule(name.removesuffix(".weight")).weight = torch.nn.Parameter(tuned, requires_grad=False)
        share_constants(model)
    finally:
        model.train(was_training)
    return CodeTuningResult(before, current, changed, tuple(history))
