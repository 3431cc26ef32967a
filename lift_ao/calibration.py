"""Calibrated LiftQuant: activation-aware input scales and Hessian-aware rounding, block by block.

``lift_ao.calibrate(model, liftquant(bits=2.4), tokens)`` quantizes the linear layers of every
decoder block using the activations that calibration tokens produce at their inputs. With
``liftquant(memory_budget=...)`` the lattice of each linear is first planned (:func:`lift_ao.plan`,
sensitivities from the same tokens), then every layer is calibrated at its planned rate:

* **Input scales (AWQ-like).** Each input channel k is scaled by ``s_k = E[x_k²]^(α/2)`` (geometric
  mean 1): the weight is coded as ``W diag(s)`` and the activation enters as ``x / s``, so channels
  with large activations get finer effective resolution. ``1/s`` is multiplied into the tensor's
  ``input_signs`` (the per-input ±1 of the rotation), which the lift already applies: inference cost
  and the stored format are unchanged, and ``dequantize`` still returns W.
* **Hessian-aware rounding** (:mod:`lift_ao.rounding`). Block LDLQ in the rotated domain, each block's
  error fed back to the columns not yet coded through ``H⁻¹``, then ``refine_passes`` Gauss-Seidel
  passes over the blocks (default 2; :func:`lift_ao.rounding.default_refine_passes`).
* **Streaming.** One decoder block at a time is moved to ``device`` with its calibration inputs;
  block i+1's inputs are the outputs of the *quantized* block i. Linears that read the same tensor
  (q/k/v, gate/up) share one Hessian, and those of them with the same lattice one set of scales and
  one rotation (the rotation's size depends on the lattice's block length).
* **Resume.** With ``checkpoint_dir``, each finished block's codes are written there as one shard
  (:func:`lift_ao.io.save_shard`: atomic, checksummed, under a manifest of the run's settings and
  calibration tokens); a restarted run loads finished blocks instead of re-encoding them and
  recomputes their outputs up to the last block still to code, so it ends bit-identical to an
  uninterrupted run. A guided run keeps its output sensitivity there too until every block is coded,
  so a resume does not compute it again. A run whose blocks are all finished (stopped in a later
  stage) only loads them: no guided sensitivity pass, no block runs (a memory-budget plan is still
  made again: the run's identity includes it).
* **Intra-block fine-tuning** (``finetune_steps > 0``). After a block's linears are coded, the
  continuous parameters of its quantized weights are tuned with Adam to bring the block's output on
  the calibration activations closer to the full-precision model's: each linear's row scales r and
  each group's input scales (the real-valued ``input_signs``, which carry 1/s) are multiplied by
  learned factors ``exp(a)``, so a learned block-constant scale (s2) is one of the directions they
  cover and the stored format is unchanged. Inputs are the quantized model's activations (as for
  coding); the target is the full-precision model's output of the block (a second, unquantized
  stream of activations is kept), so a block also corrects some of the error its predecessors left.
  With ``finetune_rotation=True`` each group's Kronecker rotation factors (L, R) are tuned in the
  same steps, freely rather than kept orthogonal: the forward applies whatever ``(L ⊗ R)ᵀ`` is
  stored, and ``dequantize`` returns the weight it computes, so only accuracy, not the format or
  the kernels, depends on it. The group then stores its own factors (k1² + k2² floats).

* **Code fine-tuning** (``code_rounds > 0``, before the scales). The paper's straight-through
  estimator, made to work by a flip criterion: the gradient of the block's output error with
  respect to the ±1 codes (relaxed to reals) and a Gauss-Newton estimate of each flip's curvature
  predict what flipping one bit of a code does; the codes with the largest predicted gains are
  flipped together and kept if the error over the calibration batches drops (:func:`_flip_codes`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
from tqdm.auto import tqdm

from lift_ao.api import quantizable_linears, resolve_device
from lift_ao.budget import TUNED_PARTS
from lift_ao.config import LiftQuantConfig
from lift_ao.evaluate import evaluating
from lift_ao.integrations.hf import attach_after_quantize
from lift_ao.io import (CheckpointError, _sha256, load_shard, open_partial, remove_shard, save_shard,
                        settings_sha256, stored_weight)
from lift_ao.lattice import Lattice
from lift_ao.packing import pack_codes, unpack_codes
from lift_ao.rounding import DEFAULT_REFINE_PASSES, _check_count, hessian_encode_rows
from lift_ao.tensor import SHARED_DATA_NAMES, LiftQuantTensor, _shared_mapping, _shared_rotation, share_constants
from lift_ao.transform import rotate, unrotate

__all__ = ["adam_steps", "builtin_calibration_tokens", "builtin_calibration_tokens_after", "calibrate", "finetune_block", "input_scales"]


# Input-scale strength of calibrate. Block LDLQ already weights the error by H, so strong AWQ-style
# scaling mostly pulls the rows away from the Gaussian the lattice was trained for: on SmolLM2 at 48/20
# 0.25 had the lowest H-weighted coding error in 10 of 12 groups, 0.5 was 2-30 % above the best (2.2× on
# a down_proj), and with block fine-tuning perplexity went 21.63 (0.5) → 19.98 (0.25) / 19.84 (0)
# (benchmarks/results/input_scale_strength_cpu.md, accuracy_alpha_cpu.md). It was 0.5 until then.
DEFAULT_ALPHA = 0.25

def input_scales(second_moments: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ-like per-input-channel scales ``s = m^(α/2)``, normalised to geometric mean 1.

    Args:
        second_moments: (K,) E[x_k²] of the layer input.
        alpha: 0 (no scaling) to 1 (s = RMS of the channel).
    Returns:
        (K,) float64 positive scales. Dead channels (m = 0) get the smallest live channel's scale.
    """
    m = second_moments.double()
    floor = m[m > 0].min() if (m > 0).any() else torch.ones((), dtype=torch.float64)
    log_s = 0.5 * alpha * m.clamp_min(floor).log()
    return (log_s - log_s.mean()).exp()


def builtin_calibration_tokens(tokenizer, count: int, length: int = 512) -> torch.Tensor:
    """The first ``count`` tokens of the built-in calibration text (never evaluated on) as sequences.

    Returns:
        LongTensor (count // length, length); at least one sequence (``length`` is capped at ``count``).
    """
    from lift_ao.data import builtin_text, tokenize_text

    if count < 1 or length < 2:
        raise ValueError(f"need count >= 1 calibration tokens in sequences of length >= 2, got {count}, {length}")
    tokens = tokenize_text(tokenizer, builtin_text("calibration"), max_tokens=count)
    length = min(length, tokens.numel())
    return tokens[: tokens.numel() // length * length].view(-1, length)


def builtin_calibration_tokens_after(tokenizer, skip: int, count: int) -> torch.Tensor:
    """The sequences of :func:`builtin_calibration_tokens` that start after its first ``skip`` tokens,
    ``count`` tokens' worth: text that stages which read the first ``skip`` tokens never trained on
    (e.g. for :func:`lift_ao.measure_sensitivity`).

    Returns:
        LongTensor (sequences, 512), at most ``count`` tokens.
    Raises:
        ValueError: the calibration text ends before any such sequence.
    """
    text = builtin_calibration_tokens(tokenizer, skip + count)
    after = text[math.ceil(skip / text.shape[1]):]
    if not after.numel():
        raise ValueError(f"the built-in calibration text has no sequence after its first {skip} tokens; read fewer "
                         "(e.g. lower the calibration or end-to-end tokens)")
    return after


def _decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    # Hugging Face decoder-only models with the Llama layout (Llama, Qwen2, Mistral, ...).
    try:
        blocks = model.get_submodule("model.layers")
    except AttributeError:
        blocks = None
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise ValueError(f"{type(model).__name__}: no decoder blocks at model.layers; calibration streams a Hugging "
                         "Face Llama-style causal LM block by block (use lift_ao.quantize for other models)")
    return blocks


def _check_tokens(tokens, vocabulary: int) -> torch.Tensor:
    if tokens is None:
        raise ValueError("calibration needs token ids: pass tokens as a LongTensor (batch, length), e.g. from "
                         "lift_ao.data.tokenize_text(tokenizer, lift_ao.data.builtin_text('calibration'))")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (1, 2):
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"calibration tokens must be a LongTensor (batch, length) or (length,), got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"calibration tokens must be integer token ids, got dtype {tokens.dtype}; "
                        "tokenize the text (token ids, not embeddings or probabilities)")
    if tokens.numel() == 0:
        raise ValueError("calibration tokens are empty; give at least one sequence of token ids")
    tokens = tokens.long().view(-1, tokens.shape[-1])
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocabulary:
        raise ValueError(f"calibration token ids span [{int(tokens.min())}, {int(tokens.max())}] but the "
                         f"vocabulary is [0, {vocabulary}); tokenize with this model's tokenizer")
    return tokens


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class _Stop(Exception):
    pass


def _block_inputs(model, blocks, tokens, batch_size: int, device) -> list:
    """[(hidden (B, T, H) on CPU, other keyword arguments)] that the first block receives per batch."""
    captured = []

    def capture(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach().cpu(), _to(kwargs, "cpu")))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in tokens.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block, inputs: list, device) -> list:
    """Each batch of ``inputs`` through ``block``; returns the next block's inputs (CPU)."""
    out = []
    for hidden, kwargs in inputs:
        result = block(hidden.to(device), **_to(kwargs, device))
        result = result[0] if isinstance(result, (tuple, list)) else result
        out.append((result.detach().cpu(), kwargs))
    return out


def _output_sensitivity(model, linears: list, tokens: torch.Tensor, batch_size: int, device,
                        progress: bool = True) -> dict:
    """{name: [(B, T) float32 per batch of ``tokens``]} for each (name, module) of ``linears`` (the
    model's linears to code): w_t = Σ_n g_tn² per position t, with g_t the gradient of ℓ, the negative
    log-likelihood of labels sampled from the model's own next-token distributions (one per position),
    with respect to the linear's output at t; each linear's weights normalised to mean 1 over all tokens.

    Σ_t w_t x_t x_tᵀ is then a Fisher estimate (the Hessian of the KL to this model, whose gradient
    with respect to the weight is Σ_t g_t x_tᵀ) summed over the linear's outputs, positions taken
    apart: GuidedQuant's end-loss-guided Hessian (Kim et al., 2025) with one group of outputs. Tokens
    whose outputs the loss hardly feels weigh less than the plain XᵀX says. Costs one forward and
    backward pass of the whole model over ``tokens`` on ``device`` (on a 2-core CPU ~3× a forward),
    shown as a tqdm bar over sequences unless ``progress`` is False.
    """
    energy = {name: [] for name, _ in linears}
    outputs = {}

    def record(name):
        def hook(module, args, output):
            outputs[name] = output
        return hook

    def differentiable(module, args, output):  # frozen weights: let gradients reach the activations
        return output.detach().requires_grad_()

    handles = [m.register_forward_hook(record(name)) for name, m in linears]
    handles.append(model.get_input_embeddings().register_forward_hook(differentiable))
    generator = torch.Generator(device=device).manual_seed(0)
    bar = tqdm(total=len(tokens), desc="output sensitivity", unit="seq", disable=not progress)
    try:
        with torch.enable_grad():
            for batch in tokens.split(batch_size):
                per_sequence = {name: [] for name in energy}
                # One sequence at a time: the logits and their gradient are (T, vocabulary) each, not
                # batch_size times that (on the 2-core CPU, batches of 8 peaked at 7.6 GB for 135M).
                for sequence in batch.split(1):
                    logits = model(sequence.to(device), use_cache=False).logits
                    with torch.no_grad():  # d/dlogits of -Σ_t log p(y_t), y_t ~ p: softmax - one-hot
                        grad = torch.softmax(logits.float(), -1)
                        sampled = torch.multinomial(grad.flatten(0, 1), 1, generator=generator).view(*grad.shape[:-1], 1)
                        grad.scatter_add_(-1, sampled, torch.full(sampled.shape, -1.0, device=grad.device))
                    order = list(outputs)
                    for name, g in zip(order, torch.autograd.grad(logits, [outputs[n] for n in order],
                                                                  grad_outputs=grad.to(logits.dtype))):
                        per_sequence[name].append(g.float().pow(2).sum(-1))
                    outputs.clear()
                    bar.update(1)
                for name, rows in per_sequence.items():
                    energy[name].append(torch.cat(rows))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    for name, per_batch in energy.items():  # kept on the device until all batches ran: no sync per linear
        mean = torch.cat([e.flatten() for e in per_batch]).mean().clamp_min(1e-30)
        energy[name] = [(e / mean).cpu() for e in per_batch]
    return energy


def _group_reading(read: list, x: torch.Tensor) -> int:
    """Index of the group whose input is ``x`` in ``read`` (each group's input tensor, in the order the
    groups first ran), ``x`` appended as a new group's if none. Identity, not equal values, makes siblings:
    q/k/v read the very tensor the norm returned, two layers that read equal activations are not siblings."""
    index = next((i for i, t in enumerate(read) if t is x), None)
    if index is None:
        read.append(x)
        return len(read) - 1
    return index


def _hessians(block, linears: list, inputs: list, device, token_weights: Optional[dict] = None) -> list:
    """Group the block's linears by the tensor they read and accumulate each group's X̃ᵀX̃.

    Args:
        token_weights: {name in ``linears``: [(B, T) per batch]} (:func:`_output_sensitivity`): then
            each linear accumulates Σ w_t x_t x_tᵀ with its own weights and a group's Hessian is the
            mean of its members'.
    Returns [(names, H (K, K) float64 = Σ x xᵀ / tokens, on the block's device)] in the order the
    groups first run.
    """
    groups: list = []  # [names, H, tokens]
    group_of: dict = {}
    seen: list = []  # this batch's input tensor of each group (identity decides siblings)
    batch = 0

    def hook(name):
        def record(module, args):
            x = args[0]
            if name not in group_of:  # first batch: join the group whose tensor this is, or open one
                index = _group_reading(seen, x)
                if index == len(groups):
                    groups.append([[], torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device), 0])
                group_of[name] = index
                groups[index][0].append(name)
            group = groups[group_of[name]]
            first = group[0][0] == name
            # Unweighted, the first member accumulates for the group; weighted, every member with its
            # own outputs' sensitivity.
            if first or token_weights is not None:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                weighted = flat if token_weights is None else flat * token_weights[name][batch].to(flat.device).reshape(-1, 1)
                group[1] += (flat.T @ weighted).double()
                group[2] += flat.shape[0] if first else 0
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears]
    try:
        for hidden, kwargs in inputs:
            block(hidden.to(device), **_to(kwargs, device))
            seen.clear()  # tensors of the next batch are new objects
            batch += 1
    finally:
        for handle in handles:
            handle.remove()
    # Accumulated and left where the block runs (its coding uses them there): not copied to the host
    # and added there in float64 per batch and group.
    return [(names, h / max(count, 1) / (len(names) if token_weights is not None else 1)) for names, h, count in groups]


def _quantize_group(modules: list, hessian: torch.Tensor, lattice: Lattice, config: LiftQuantConfig,
                    alpha: float, damping: float, device, refine_passes: int = 0) -> None:
    """Code linears that read one input with a shared Hessian (K, K), scales and rotation
    (:func:`lift_ao.rounding.hessian_encode_rows` with ``damping`` and ``refine_passes``)."""
    weight = torch.cat([m.weight.detach().to(device, torch.float32) for m in modules])
    k = weight.shape[1]
    scales = input_scales(hessian.diagonal(), alpha).to(device)
    hessian = hessian.to(device) / (scales[:, None] * scales[None, :])
    signs, left, right = _shared_rotation(k, lattice.d, config.seed, device)
    rotated = rotate(weight * scales.to(torch.float32), signs, left, right)
    rotated_hessian = rotate(rotate(hessian, signs.double(), left.double(), right.double()).T,
                             signs.double(), left.double(), right.double())
    codes, row_scale = hessian_encode_rows(rotated, rotated_hessian, lattice.to(device), damping=damping,
                                           refine_passes=refine_passes, beam_width=config.beam_width)
    # x/s enters the rotation through its per-input signs; the padding keeps its ±1.
    folded_signs = signs.clone()
    folded_signs[:k] /= scales.to(torch.float32)
    mapping, first = _shared_mapping(lattice, torch.device(device)), 0
    for module in modules:
        rows = slice(first, first + module.weight.shape[0])
        first = rows.stop
        quantized = LiftQuantTensor(pack_codes(codes[rows]), row_scale[rows].contiguous(), mapping, folded_signs,
                                    left, right, module.weight.shape, module.weight.dtype)
        module.weight = torch.nn.Parameter(quantized, requires_grad=False)


def _code_signs(weight: LiftQuantTensor) -> torch.Tensor:
    """(N, K·D/d / D, D) float32 ±1 codes of ``weight``, block-major."""
    n = weight.shape[0]
    codes = unpack_codes(weight.packed_codes, weight.code_length, n).view(n, -1, weight.code_bits)
    return codes.to(torch.float32) * 2 - 1


def _code_blocks(weight: LiftQuantTensor, signs: torch.Tensor) -> torch.Tensor:
    """(N, Kp) float32 rotated-domain unit weight blocks(M q) for codes ``signs``, :func:`_code_signs`'s
    (N, blocks, D) ±1 tensor (differentiable: linear in it)."""
    return (signs @ weight.mapping.T).flatten(1)


def _unit_weight(weight: LiftQuantTensor, signs: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 C with ``weight.dequantize() == r[:, None] * C * input_signs[:K]`` for codes ``signs``
    (:func:`_code_blocks` unrotated; differentiable in ``signs``).

    ``unrotate`` is exact for any rotation factors, orthogonal or not: the forward applies
    ``(L ⊗ R)ᵀ`` to x, so the weight it computes is C = blocks · (L ⊗ R)ᵀ, which is ``unrotate`` row
    by row. Fine-tuned factors (:func:`finetune_block`) rely on it.
    """
    return unrotate(_code_blocks(weight, signs), None, weight.rotation_left, weight.rotation_right, weight.shape[1])


def _tuned_scales(weight: LiftQuantTensor, log_r: torch.Tensor, log_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight``'s row scales r·exp(log_r), (N,), and input scales σ·exp(log_s), (K,) (``input_signs``
    cropped to K; ``log_s`` may be longer than K)."""
    k = weight.shape[1]
    return weight.row_scale * log_r.exp(), weight.input_signs[:k] * log_s[:k].exp()


def _dense_weight(weight: LiftQuantTensor, unit: torch.Tensor, log_r: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """(N, K) ``diag(r) C diag(σ)`` in the weight's dtype with the :func:`_tuned_scales` r and σ, C its
    :func:`_unit_weight`."""
    return _scaled_unit(unit, *_tuned_scales(weight, log_r, log_s), weight.dtype)


def _scaled_unit(unit: torch.Tensor, r: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., N, K) ``diag(r) C diag(σ)`` in ``dtype`` for C ``unit`` (..., N, K), r (..., N), σ (..., K):
    one weight, or a stack of weights of one shape."""
    return (r[..., None] * unit * sigma[..., None, :]).to(dtype)


def _scaled_signs(input_signs: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """(Kp,) a new ``input_signs`` whose first len(log_s) entries are multiplied by exp(log_s): the
    learned input scales folded in; the rotation's padding past them keeps its ±1."""
    folded = input_signs.clone()
    folded[: log_s.shape[0]] *= log_s.exp()
    return folded


def _tuned_weight(weight: LiftQuantTensor, log_r: torch.Tensor, input_signs: torch.Tensor,
                  packed_codes: Optional[torch.Tensor] = None, rotation: Optional[tuple] = None,
                  mapping: Optional[torch.Tensor] = None) -> torch.nn.Parameter:
    """``weight`` after fine-tuning, as a frozen Parameter: row scales r·exp(log_r), the given
    (:func:`_scaled_signs`) input signs and, if given, new packed codes, (left, right) rotation
    factors and lattice matrix; the format is unchanged."""
    left, right = (weight.rotation_left, weight.rotation_right) if rotation is None else (f.detach() for f in rotation)
    tuned = LiftQuantTensor(weight.packed_codes if packed_codes is None else packed_codes,
                            weight.row_scale * log_r.exp(), weight.mapping if mapping is None else mapping.detach(),
                            input_signs, left, right, weight.shape, weight.dtype)
    return torch.nn.Parameter(tuned, requires_grad=False)


# Code flipping: the first round flips one bit in this fraction of the decoder block's weight rows; an
# accepted round doubles the fraction (up to the cap), a rejected one quarters it.
_FIRST_FLIP_FRACTION = 0.01
_MAX_FLIP_FRACTION = 0.25


def _flip_curvature(weight: LiftQuantTensor, sigma: torch.Tensor, row_scale: torch.Tensor,
                    inputs: torch.Tensor, output_gain: torch.Tensor) -> torch.Tensor:
    """(N, blocks, D) second-order change of the block's output MSE when one code bit of ``weight`` flips.

    Flipping bit j of block b in row n changes that row by ``-2cᵢ·r_n·v`` with v = σ ⊙ R·(M[:, j]
    placed at block b), so output n of the linear moves by ``Δy_t = -2cᵢ·r_n·(v·x_t)`` at token t,
    and the loss by about ``g_n · Σ_t Δy_t² = 4 g_n r_n² vᵀ(XᵀX)v`` (Gauss-Newton, with g_n the
    diagonal of JᵀJ / count for output n averaged over tokens, J the Jacobian of the block output).
    Computed in the rotated domain, where v is M[:, j] on the d coordinates of block b.

    Args:
        weight: the linear's quantized weight (its rotation and M).
        sigma: (K,) its current input scales (``input_signs`` with their tuned factors).
        row_scale: (N,) its current row scales.
        inputs: (tokens, K) the linear's inputs on the batch.
        output_gain: (N,) g_n.
    """
    x = rotate(inputs.double() * sigma.double(), None, weight.rotation_left.double(), weight.rotation_right.double())
    d, blocks = weight.mapping.shape[0], x.shape[1] // weight.mapping.shape[0]
    x = x.view(-1, blocks, d)
    second = torch.einsum("tbi,tbj->bij", x, x)  # the d×d diagonal blocks of the rotated XᵀX
    mapping = weight.mapping.double()
    per_bit = torch.einsum("ij,bik,kj->bj", mapping, second, mapping)  # diag(Mᵀ S_b M), (blocks, D)
    return (4 * (output_gain.double() * row_scale.double() ** 2)[:, None, None] * per_bit[None]).float()


def _flip_statistics(loss_of, signs: dict, curvature_of, batches: int, round_: int) -> tuple[dict, dict, float]:
    """Gradient and flip curvature of the loss summed over all calibration batches with respect to the
    codes ``signs`` (one batch's graph at a time), and that summed loss; arguments as in :func:`_flip_codes`."""
    names = list(signs)
    grads = {name: torch.zeros_like(signs[name]) for name in names}
    curvature = {name: torch.zeros_like(signs[name]) for name in names}
    current = 0.0
    for batch in range(batches):
        relaxed, seen = {name: signs[name].clone().requires_grad_() for name in names}, {}
        with torch.enable_grad():
            loss = loss_of(relaxed, batch, seen)
            for name, g in zip(names, torch.autograd.grad(loss, [relaxed[n] for n in names], retain_graph=True)):
                grads[name] += g
            for name, h in curvature_of(seen, round_ * batches + batch).items():
                curvature[name] += h
        current += loss.item()
    return grads, curvature, current


def _flip_codes(loss_of, signs: dict, curvature_of, rounds: int, batches: int) -> tuple[int, int]:
    """Flip the code bits that the straight-through gradient says lower the loss, keeping what helps.

    Each round takes the gradient ``g`` of the loss over all calibration batches with respect to the
    ±1 codes ``c`` (relaxed to reals: the straight-through estimator). Flipping bit i changes the
    loss by about ``-2·cᵢ·gᵢ + hᵢ`` (``h``: :func:`_flip_curvature`); in each weight row the bit of
    largest gain ``2·cᵢ·gᵢ - hᵢ`` is the candidate, and the rows with the largest positive gains over
    the whole decoder block flip it together (a fraction of all rows, doubled after a round that
    lowered the loss, quartered after one that did not; rejected rounds are undone). Measured on the
    tiny test model: Adam on latent reals flips bits en masse and raised the error; several bits per
    row, or checking on one batch only, were rejected almost every round. On SmolLM2 the predicted gains overstate the real ones by 10-100× (flips are large
    steps), so the acceptance test does the real work there. A rejected round leaves the codes as they
    were, so the next one reuses their gradient and curvature and only tries fewer flips.

    Args:
        loss_of: ``(signs dict, batch index, record dict or None) -> scalar loss`` (differentiable in
            the signs); with a dict, it records what ``curvature_of`` needs (the linears' inputs and
            outputs, the block's output).
        signs: {name: (N, blocks, D) float32 ±1 codes}, updated in place.
        curvature_of: ``(record dict, probe seed) -> {name: (N, blocks, D)}`` the flips' curvature on
            the recorded batch.
        rounds: flip rounds (fewer when no bit has a positive gain or the fraction falls below one row).
        batches: number of calibration batches (every round uses all of them).
    Returns:
        (bits flipped and kept, rounds accepted).
    """
    names, total = list(signs), sum(s.shape[0] for s in signs.values())
    fraction, kept, accepted = _FIRST_FLIP_FRACTION, 0, 0
    changed = True
    for t in range(rounds):
        count = int(fraction * total)
        if count < 1:
            break
        if changed:  # after a rejected round the codes, and so all of this, are what they were
            grads, curvature, current = _flip_statistics(loss_of, signs, curvature_of, batches, t)
            changed = False
        # At most one bit per row: flips in one row move the same output, so their gains do not add
        # up (the curvature is per flip); the bit is the row's best over its codes.
        best = []
        for n in names:
            gain, bit = (2 * signs[n] * grads[n] - curvature[n]).max(-1)  # best bit per code, (N, blocks)
            value, block = gain.max(-1)  # best code per row, (N,)
            best.append((value, block, bit.gather(1, block[:, None])[:, 0]))
        values, flat = torch.cat([value for value, _, _ in best]).topk(count)
        flat = flat[values > 0]
        if not flat.numel():
            break
        proposal, first = {}, 0
        for name, (value, block, bit) in zip(names, best):  # split the indices back into each linear's rows
            rows = flat[(flat >= first) & (flat < first + value.numel())] - first
            proposal[name] = signs[name].clone()
            proposal[name][rows, block[rows], bit[rows]] *= -1
            first += value.numel()
        with torch.no_grad():
            better = sum(loss_of(proposal, batch).item() for batch in range(batches)) < current
        if better:
            signs.update(proposal)
            kept, accepted, changed = kept + flat.numel(), accepted + 1, True
            fraction = min(2 * fraction, _MAX_FLIP_FRACTION)
        else:
            fraction /= 4
    return kept, accepted


def adam_steps(parameters: list, lr: float, steps: int, loss_at, on_step=None, *, first_step: int = 0,
               optimizer_state: dict | None = None) -> None:
    """``steps`` Adam steps on ``parameters`` minimising ``loss_at(step)`` (a scalar tensor), the
    learning rate cosine-decayed from ``lr`` to 0; ``on_step(loss, optimizer)`` after each (a progress
    bar, a checkpoint of ``optimizer.state_dict()``). ``parameters`` are tensors, or Adam parameter
    groups (dicts), each of which may set its own peak ``"lr"``.

    An interrupted run continues with ``first_step`` (the steps done) and the optimizer state saved
    after the last of them: the parameters as they were then, the same steps follow.
    """
    if first_step >= steps:
        return
    optimizer = torch.optim.Adam(parameters, lr=lr)
    peaks = [group["lr"] for group in optimizer.param_groups]  # before a saved state's decayed ones
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    with torch.enable_grad():
        for step in range(first_step, steps):
            for group, peak in zip(optimizer.param_groups, peaks):  # per step (not a scheduler): a resumed run has it too
                group["lr"] = peak * (0.5 * (1 + math.cos(math.pi * step / steps)))
            loss = loss_at(step)
            for parameter, grad in zip(tensors, torch.autograd.grad(loss, tensors)):
                parameter.grad = grad
            optimizer.step()
            if on_step is not None:
                on_step(loss, optimizer)


# Rotation factors are tuned as F0 + _ROTATION_STEP · Δ with Δ at the scales' learning rate: entries
# of a k×k orthogonal factor are ~1/√k (0.03–0.2), so Adam's ~lr steps on them directly would be large.
_ROTATION_STEP = 0.1


def _tuned_rotation(weight: LiftQuantTensor, turn: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) rotation factors F + _ROTATION_STEP·ΔF of ``weight`` for the tuned (ΔL, ΔR)."""
    return weight.rotation_left + _ROTATION_STEP * turn[0], weight.rotation_right + _ROTATION_STEP * turn[1]


def finetune_block(block: torch.nn.Module, groups: list, inputs: list, targets: list, *, steps: int, lr: float,
                   device, code_rounds: int = 0, tune_rotation: bool = False) -> tuple[float, float]:
    """Tune a coded block's LiftQuant weights against target outputs, in place: codes, then scales.

    Each linear's weight is ``W = diag(r) C(c) diag(σ)`` with C linear in its ±1 codes c, r its row
    scales and σ the group's ``input_signs`` (cropped to K). First ``code_rounds`` rounds of code
    flipping (:func:`_flip_codes`: straight-through gradient and curvature over all batches, flip the
    codes they rank best, keep the flips if the error drops); then Adam (cosine-decayed ``lr``) learns log-factors
    ``r ← r·exp(a)`` (one per row) and ``σ ← σ·exp(b)`` (one per input channel, shared by the group)
    that minimise the mean squared error of the block's output, one calibration batch per step in
    turn; with ``tune_rotation`` also each group's rotation factors (L, R), freely (the forward uses
    whatever factors are stored). The result is kept only if it lowers the error on the first batch.

    Args:
        block: a decoder block whose linears in ``groups`` hold :class:`LiftQuantTensor` weights.
        groups: [[names of linears sharing one input transform]] (names relative to ``block``).
        inputs: [(hidden (B, T, H), keyword arguments)] the block's inputs, per batch.
        targets: [(hidden (B, T, H), ...)] the outputs to match, per batch.
        steps: Adam steps for the scales (0: they stay).
        lr: peak learning rate of the log-factors.
        device: where the block runs.
        code_rounds: code flipping rounds (0: the codes stay).
        tune_rotation: Adam also tunes each group's rotation factors (then stored per group).
    Returns:
        (error before, error after): mean squared output error on the first batch.
    """
    names = [name for group in groups for name in group]
    group_of = {name: g for g, group in enumerate(groups) for name in group}
    old = {name: block.get_submodule(name).weight for name in names}
    signs = {name: _code_signs(w) for name, w in old.items()}
    log_r = {name: torch.zeros(w.shape[0], device=device, requires_grad=True) for name, w in old.items()}
    log_s = [torch.zeros(old[group[0]].shape[1], device=device, requires_grad=True) for group in groups]
    deltas = [tuple(torch.zeros_like(getattr(old[group[0]], f), requires_grad=True)
                    for f in ("rotation_left", "rotation_right")) for group in groups] if tune_rotation else []

    def rotation(g: int) -> Optional[tuple]:
        """Group g's current (left, right) factors; None when they are not tuned."""
        return _tuned_rotation(old[groups[g][0]], deltas[g]) if tune_rotation else None

    def units(codes: dict) -> dict:
        return {name: _unit_weight(old[name], codes[name]) for name in names}

    def loss_with(unit: dict, batch: int, record: Optional[dict] = None) -> torch.Tensor:
        """The block's output error with unit weights ``unit`` and the current scale factors."""
        weights = {f"{name}.weight": _dense_weight(old[name], unit[name], log_r[name], log_s[group_of[name]])
                   for name in names}
        def keep(name):
            return lambda module, args, out: record.__setitem__(name, (args[0].detach().flatten(0, -2), out))

        hooks = [block.get_submodule(n).register_forward_hook(keep(n)) for n in names] if record is not None else []
        hidden, kwargs = inputs[batch]
        try:
            out = torch.func.functional_call(block, weights, (hidden.to(device),), _to(kwargs, device))
        finally:
            for hook in hooks:
                hook.remove()
        out = out[0] if isinstance(out, (tuple, list)) else out
        if record is not None:
            record[None] = out
        return (out - targets[batch][0].to(device)).pow(2).mean()

    def loss_of(codes: dict, batch: int, record: Optional[dict] = None) -> torch.Tensor:
        return loss_with(units(codes), batch, record)

    def curvature_of(record: dict, seed: int) -> dict:
        # diag(JᵀJ) of each linear's outputs by one Hutchinson probe: E[(Jᵀz)²] for z ~ N(0, I).
        out = record[None]
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
        jz = torch.autograd.grad(out, [record[n][1] for n in names], probe)
        with torch.no_grad():
            curvature = {}
            for name, j in zip(names, jz):
                gain = j.flatten(0, -2).double().pow(2).mean(0) / out.numel()
                row_scale, sigma = _tuned_scales(old[name], log_r[name], log_s[group_of[name]])
                curvature[name] = _flip_curvature(old[name], sigma, row_scale, record[name][0], gain)
            return curvature

    with torch.no_grad():
        before = loss_of(signs, 0).item()
    if not steps and not code_rounds:
        return before, before
    _flip_codes(loss_of, signs, curvature_of, code_rounds, len(inputs))
    with torch.no_grad():  # the codes are final: their unit weights (or rotated blocks) once, not per Adam step
        if tune_rotation:
            blocks = {name: _code_blocks(old[name], signs[name]) for name in names}
        else:
            unit = units(signs)

    def tuned_units() -> dict:
        """The unit weights with the current rotation factors (the fixed ones unless tuned)."""
        if not tune_rotation:
            return unit
        return {name: unrotate(blocks[name], None, *rotation(group_of[name]), old[name].shape[1]) for name in names}

    parameters = [*log_r.values(), *log_s, *(d for pair in deltas for d in pair)]
    adam_steps(parameters, lr, steps, lambda step: loss_with(tuned_units(), step % len(inputs)))
    with torch.no_grad():
        after = loss_with(tuned_units(), 0).item()
        if not after < before:
            return before, before
        for g, group in enumerate(groups):
            input_signs = _scaled_signs(old[group[0]].input_signs, log_s[g])
            factors = rotation(g)
            factors = None if factors is None else tuple(f.detach().clone() for f in factors)
            for name in group:
                # Codes are packed again only when flipping may have changed them.
                codes = pack_codes((signs[name] > 0).flatten(1)) if code_rounds else None
                block.get_submodule(name).weight = _tuned_weight(old[name], log_r[name], input_signs, codes, factors)
    return before, after


def _block_sources(model: torch.nn.Module, blocks: list, prefixes: tuple, config: LiftQuantConfig,
                   guided: bool) -> list[dict]:
    """Per decoder block (FQN ``prefixes``, "model.layers.0." …), SHA-256s of the values its codes depend on:
    a resumed block must have been coded from these (the manifest records shapes, not values).

    ``"inputs_sha256"``: block i's codes depend on its own weights and norms, on its inputs (the embeddings
    and blocks before it) and, fine-tuned, on the full-precision targets of those: the state outside the
    blocks and of blocks 0..i; guided, on the whole model (the output sensitivity runs through all of it).
    ``"source_sha256"``: its coded linears' weights alone, which shards written before the other existed
    record (they are checked by it and stay resumable). ``"settings_sha256"``: :func:`lift_ao.io.settings_sha256`,
    the same for every block (shards written before it existed are not checked by it)."""
    tensors = {key: _sha256(t) for key, t in model.state_dict().items()}  # each tensor hashed once
    digest = hashlib.sha256()
    for key, tensor in tensors.items():
        if not key.startswith(prefixes):
            digest.update(f"{key}:{tensor};".encode())
    inputs = []
    for prefix in prefixes:
        for key, tensor in tensors.items():
            if key.startswith(prefix):
                digest.update(f"{key}:{tensor};".encode())
        inputs.append(digest.copy().hexdigest())
    if guided:
        inputs = [inputs[-1]] * len(inputs)
    linears = []
    for block, prefix in zip(blocks, prefixes):
        own = hashlib.sha256()
        for name, _ in quantizable_linears(block, config):
            own.update(f"{name}:{tensors[prefix + name + '.weight']};".encode())
        linears.append(own.hexdigest())
    settings = settings_sha256(model)
    return [{"inputs_sha256": i, "source_sha256": s, "settings_sha256": settings} for i, s in zip(inputs, linears)]


# The guided run's output sensitivity, kept in checkpoint_dir until every block is coded: a resume loads
# it instead of redoing a forward and backward pass of the whole model over all tokens (~4 minutes of
# each resume of the 917504-token recipe on an H100, where it takes 0.8 GB: 4 bytes per token and linear).
SENSITIVITY_SHARD = "output_sensitivity"


def _load_sensitivity(directory, coded: list, batch_size: int, source: dict, overwrite: bool) -> Optional[dict]:
    """:func:`_output_sensitivity`'s ``{name: [(B, T) per batch]}`` for the ``coded`` (name, module) pairs as a
    run over the same model (``source``: the whole-model ``inputs_sha256`` and the ``settings_sha256`` of
    guided :func:`_block_sources`) saved it in ``directory``; None when there is none (or another model's,
    discarded with ``overwrite``).

    Raises:
        CheckpointError: it was computed from another model (and not ``overwrite``).
    """
    shard = load_shard(directory, SENSITIVITY_SHARD, sources=source, overwrite=overwrite)
    if shard is None or set(shard[1]) != {name for name, _ in coded}:  # the manifest pins the names
        return None
    return {name: list(weights.split(batch_size)) for name, weights in shard[1].items()}


def _save_block(directory, index: int, block, groups: list, sources: dict) -> None:
    tensors, weights = {}, {}
    for names in groups:
        for name in names:
            weight = block.get_submodule(name).weight
            weights[name] = {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch.")}
            tensors.update({f"{name}.{n}": getattr(weight, n) for n in ("packed_codes", "row_scale")})
        # Cloned: M and the rotation factors are also shared between groups, and safetensors refuses
        # tensors that share memory.
        leader = block.get_submodule(names[0]).weight
        tensors.update({f"{names[0]}.{n}": getattr(leader, n).clone() for n in SHARED_DATA_NAMES})
    save_shard(directory, f"block_{index:04d}", tensors, {"groups": groups, "weights": weights, **sources})


def _finished_block(directory, index: int, sources: dict, overwrite: bool = False) -> Optional[tuple[dict, dict]]:
    """The verified shard ``(info, tensors)`` of decoder block ``index``, None when it has not been finished
    (or was coded from other values, ``sources`` (:func:`_block_sources`), and ``overwrite`` discarded it).

    Raises:
        CheckpointError: the block was coded from other weights (and not ``overwrite``).
    """
    return load_shard(directory, f"block_{index:04d}", sources=sources, overwrite=overwrite)


def _load_block(shard: tuple[dict, dict], where: str, block, device) -> None:
    """Put the codes of a finished block's shard (:func:`_finished_block`'s ``(info, tensors)``) back into
    ``block``, on ``device``; ``where`` names the shard in errors.

    Raises:
        CheckpointError: a weight's stored rotation factors cannot be one (a tampered shard).
    """
    info, tensors = shard
    for names in info["groups"]:
        shared = {n: tensors[f"{names[0]}.{n}"].to(device) for n in SHARED_DATA_NAMES}
        for name in names:
            parts = {n: tensors[f"{name}.{n}"].to(device) for n in ("packed_codes", "row_scale")} | shared
            spec = info["weights"][name]
            weight = stored_weight(f"{where}: {name}", [parts[n] for n in LiftQuantTensor.tensor_data_names],
                                   torch.Size(spec["shape"]), getattr(torch, spec["dtype"]))
            block.get_submodule(name).weight = torch.nn.Parameter(weight, requires_grad=False)


def _manifest(config: LiftQuantConfig, tokens: torch.Tensor, alpha: float, damping: float, blocks,
              finetune: dict, planned: Optional[dict], refine_passes: int, guided: bool) -> dict:
    settings = {"lattice": config.lattice, "seed": config.seed, "alpha": alpha, "damping": damping}
    if refine_passes:  # absent for LDLQ alone: directories written before refinement existed mean that
        settings["refine_passes"] = refine_passes
    if config.beam_width is not None:  # absent for the lattices' defaults, likewise
        settings["beam_width"] = config.beam_width
    if planned is not None:  # absent for one lattice: earlier runs stay resumable
        settings["planned_lattices"] = planned
    if finetune["steps"] or "code_rounds" in finetune:  # absent without fine-tuning: earlier runs stay resumable
        # `guided` was first recorded inside the fine-tuning entry: it stays there, so that guided
        # fine-tuned directories written then stay resumable.
        settings["finetune"] = {**finetune, "guided": True} if guided else finetune
    else:
        if guided:
            settings["guided"] = True
        settings["batch_size"] = finetune["batch_size"]  # other batches' sums round differently
    return {"calibrate": settings,
            "tokens": {"shape": list(tokens.shape), "sha256": _sha256(tokens)},  # tokens may be on a GPU
            "blocks": [[n, list(m.weight.shape)] for b in blocks for n, m in quantizable_linears(b, config)]}


def sibling_groups(model: torch.nn.Module, names: list, batch: torch.Tensor, weights: Optional[dict] = None) -> list[list[str]]:
    """``names`` (linear FQNs) grouped by the tensor they read in one forward of ``batch`` (token ids,
    (B, T), on the model's device) with ``weights`` (``functional_call``'s; default: the model's own), in
    the order the groups first run. Siblings (q/k/v, gate/up) are what calibrate codes with one Hessian."""
    groups: list = []
    read: list = []  # the tensor of each group; held, so that no later tensor reuses its id()

    def hook(name):
        def record(module, args):
            index = _group_reading(read, args[0])
            if index == len(groups):
                groups.append([])
            groups[index].append(name)
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad(), evaluating(model):
            torch.func.functional_call(model, weights or {}, (batch,), {"use_cache": False})
    finally:
        for handle in handles:
            handle.remove()
    return groups


def _planned_lattices(model, prefixes: tuple, config: LiftQuantConfig, tokens: torch.Tensor, batch_size: int,
                      device, tuned: frozenset) -> dict:
    """{module FQN: lattice name} of a memory-budget config, planned over the model with the config's
    scores or else the calibration tokens as the sensitivity data, for calibrated groups of siblings
    that store their own input signs and the ``tuned`` parts (``lift_ao.plan``'s ``groups``/``tuned``);
    refused if the plan codes a linear outside the decoder blocks, whose FQN ``prefixes``
    ("model.layers.0." …) are given (calibrate codes only those, so the model would not fit the budget)."""
    from lift_ao.budget import plan  # looked up when called: tests count the plans

    names = [name for name, _ in quantizable_linears(model, config)]
    groups = sibling_groups(model, names, tokens[:1, :8].to(next(model.parameters()).device))
    scored = config.allocation == "sensitivity" and config.scores is None  # else the scores are given
    with evaluating(model):  # the plan's activation statistics: the same on a resume
        budget_plan = plan(model, config.memory_budget, reserve=config.reserve, kv_cache=config.kv_cache,
                           allocation=config.allocation, calibration=list(tokens.split(batch_size)) if scored else None,
                           include_lm_head=config.include_lm_head, seed=config.seed, device=device,
                           scores=config.scores, rate_window=config.rate_window, groups=groups,
                           tuned=tuple(sorted(tuned)))
    outside = [name for name in budget_plan.lattices() if not name.startswith(prefixes)]
    if outside:
        raise ValueError(f"the memory budget's plan also codes {outside}, which calibrate leaves in high "
                         "precision (it codes decoder blocks only): plan with include_lm_head=False")
    return budget_plan.lattices()


def _by_lattice(names: list, lattices: dict) -> list[tuple[Lattice, list]]:
    """Split a group of linears that read one input into one list per lattice (``lattices``: name →
    Lattice), in first-seen order."""
    runs: dict = {}
    for name in names:
        runs.setdefault(lattices[name].name, (lattices[name], []))[1].append(name)
    return list(runs.values())


def check_settings(*, alpha: float = DEFAULT_ALPHA, damping: float = 0.01, finetune_steps: int = 0,
                   finetune_lr: float = 1e-2, code_rounds: int = 0, finetune_rotation: bool = False,
                   refine_passes: int = DEFAULT_REFINE_PASSES, tuned_later: tuple = ()) -> None:
    """Raise ValueError for :func:`calibrate` settings it would refuse (arguments as there): it checks them
    before any work, and the command line before it loads the model or measures anything."""
    # damping 0 would leave the Hessian of a layer whose inputs are padded to a multiple of d singular.
    if not 0 <= alpha <= 1 or not damping > 0:
        raise ValueError(f"alpha must be in [0, 1] and damping > 0, got alpha={alpha}, damping={damping}")
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0 \
            or not finetune_lr > 0:
        raise ValueError(f"finetune_steps must be an int >= 0 and finetune_lr > 0, got {finetune_steps!r}, {finetune_lr!r}")
    if finetune_rotation and not finetune_steps:
        raise ValueError("finetune_rotation=True tunes the rotation in the fine-tuning steps: give finetune_steps > 0")
    _check_count("code_rounds", code_rounds)
    _check_count("refine_passes", refine_passes)  # before any work, though hessian_encode_rows checks it too
    later = tuple(part for part in TUNED_PARTS if part != "scales")  # "scales" is the block stage's own
    if isinstance(tuned_later, str) or not set(tuned_later) <= set(later):
        raise ValueError(f"tuned_later must be a tuple of {later}, got {tuned_later!r}")


def calibrate(
    model: torch.nn.Module, config: LiftQuantConfig, tokens: torch.Tensor, *, checkpoint_dir=None,
    overwrite: bool = False, device=None, alpha: float = DEFAULT_ALPHA, damping: float = 0.01, batch_size: int = 8,
    finetune_steps: int = 0, finetune_lr: float = 1e-2, code_rounds: int = 0, finetune_rotation: bool = False,
    guided: bool = False, refine_passes: int = DEFAULT_REFINE_PASSES, tuned_later: tuple = (), progress: bool = True,
) -> torch.nn.Module:
    """Quantize the linears of every decoder block with calibration data, in place.

    Args:
        model: a Hugging Face Llama-style causal LM (decoder blocks at ``model.layers``: Llama, Qwen2,
            Mistral, SmolLM2); it stays where it is except the block being coded.
        config: ``liftquant(bits=...)`` or ``liftquant(lattice=...)`` (one lattice for all layers), or
            ``liftquant(memory_budget=...)``: a lattice per linear from :func:`lift_ao.plan` over the
            whole model (sensitivity from ``tokens``), so the calibrated model fits the budget.
        tokens: LongTensor (batch, length) of calibration token ids (never the evaluation text).
        checkpoint_dir: write each finished block here and resume from it (see the module docstring);
            a directory holding another run is refused (:class:`lift_ao.CheckpointError`) unless
            ``overwrite``, which discards it.
        device: where each block is coded and run (default: where the model is).
        alpha: strength of the input scales (0 = none; :data:`DEFAULT_ALPHA`, measured).
        damping: Hessian damping, fraction of the mean diagonal.
        batch_size: calibration sequences per forward pass (and per fine-tuning step).
        finetune_steps: Adam steps of intra-block fine-tuning per decoder block (0: none), each on one
            batch of ``batch_size`` sequences (cycling): row scales and input scales learn factors that
            bring the block's output closer to the full-precision model's (:func:`finetune_block`).
            Costs about one forward and backward pass of a block per step, plus one full-precision
            forward pass of each block over all tokens.
        finetune_lr: Adam's peak learning rate (cosine decay to 0) for the log-factors.
        code_rounds: rounds of code flipping per decoder block before the scales are tuned (0: the
            codes stay those of the Hessian-aware rounding): each costs about two forward and two
            backward passes of the block over all calibration tokens (:func:`finetune_block`).
        finetune_rotation: the fine-tuning also tunes each group's rotation factors (stored per group
            and lattice: k1² + k2² floats each, shared by the siblings on that lattice).
        guided: weight each token's contribution to a linear's Hessian (and so to its input scales and
            its Hessian-aware rounding) by how much the model's next-token distributions feel that
            linear's output there (:func:`_output_sensitivity`). Needs the whole model on ``device``
            for one forward and backward pass over ``tokens`` first (the blocks are still coded one at
            a time). Measured on SmolLM2-135M in the best recipes (262144 tokens, 200 windows):
            perplexity −0.6 % at 2.4 and at 3.0 bits, held-out KL −4–5 %, no bits; with 16384 tokens
            (no end-to-end stage) +1.5 % [−0.2, +3.3]: give it many tokens
            (benchmarks/results/accuracy_w200_guided_h100.md).
        refine_passes: Gauss-Seidel passes over each group's column blocks after the Hessian-aware
            rounding (:mod:`lift_ao.rounding`; :data:`~lift_ao.rounding.DEFAULT_REFINE_PASSES`, measured; 0: LDLQ
            alone, as before 2026-11-27). Each costs about one more lattice search per block. Before
            :func:`lift_ao.finetune_end_to_end` they measured no gain: pass
            ``lift_ao.rounding.default_refine_passes(end_to_end=True)`` (0) there.
        tuned_later: what :func:`lift_ao.finetune_end_to_end` will tune afterwards and store per group
            of siblings, ``"mapping"`` (its ``tune_mapping``) and/or ``"rotation"`` (``tune_rotation``;
            :func:`lift_ao.finetune.tuned_parts` gives the tuple): a memory-budget plan keeps room for
            those copies, so the tuned model still fits the budget.
        progress: a tqdm bar over blocks (with fine-tuning: the last block's output error after/before).
    Returns:
        ``model``; linears outside the decoder blocks (``lm_head``) are left as they are. A transformers
        model gets the ``hf_quantizer`` that ``save_pretrained`` writes it through, as after
        :func:`lift_ao.quantize`.
    Raises:
        ValueError/TypeError: no or malformed tokens, no decoder blocks, a budget whose plan codes
            linears outside them (``include_lm_head=True``), or a checkpoint_dir written by another
            run (``CheckpointError``, a ValueError).
    """
    if not isinstance(config, LiftQuantConfig):
        raise TypeError(f"config must come from lift_ao.liftquant(...), got {type(config).__name__}")
    check_settings(alpha=alpha, damping=damping, finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                   code_rounds=code_rounds, finetune_rotation=finetune_rotation, refine_passes=refine_passes,
                   tuned_later=tuned_later)
    blocks = _decoder_blocks(model)
    tokens = _check_tokens(tokens, model.get_input_embeddings().weight.shape[0])
    home = next(model.parameters()).device
    device = resolve_device(device) if device is not None else home
    fqn_of = {id(m): n for n, m in model.named_modules()}
    prefixes = tuple(fqn_of[id(block)] + "." for block in blocks)
    planned = (None if config.memory_budget is None
               else _planned_lattices(model, prefixes, config, tokens, batch_size, device,
                                      frozenset(tuned_later) | {part for part, on in (("scales", finetune_steps > 0),
                                                                                      ("rotation", finetune_rotation)) if on}))
    if checkpoint_dir is not None:
        finetune = {"steps": finetune_steps, "lr": finetune_lr, "batch_size": batch_size}
        if code_rounds:  # absent without code flipping: directories of earlier runs stay resumable
            finetune["code_rounds"] = code_rounds
        if finetune_rotation:  # absent without it, likewise
            finetune["rotation"] = True
        manifest = _manifest(config, tokens, alpha, damping, blocks, finetune, planned, refine_passes, guided)
        earlier = ()
        # Recorded since b2ee9ab (9f51ff5: only when not 8): a directory without it is taken for one at 8, the
        # default, which older runs without fine-tuning almost always used.
        if manifest["calibrate"].get("batch_size") == 8:
            older = {k: v for k, v in manifest["calibrate"].items() if k != "batch_size"}
            earlier = ({**manifest, "calibrate": older},)
        open_partial(checkpoint_dir, manifest, overwrite=overwrite, earlier=earlier)

    # A resumed run does only what the blocks still to code need: the sensitivity pass and the runs of the
    # blocks up to the last of them (none at all when a run stopped after calibration, e.g. in a later stage).
    # Hashed before anything moves or is coded, where the blocks wait (the host, for a streamed model).
    sources = [None] * len(blocks) if checkpoint_dir is None else _block_sources(model, blocks, prefixes, config, guided)
    # Each finished block's verified shard, kept until its codes go back into the block: read once, not once to
    # plan and again to load (its codes are a fraction of the full-precision block the host holds anyway).
    finished = [None if checkpoint_dir is None else _finished_block(checkpoint_dir, i, block_sources, overwrite)
                for i, block_sources in enumerate(sources)]
    last = max((i for i, shard in enumerate(finished) if shard is None), default=-1)  # the last block to code
    with evaluating(model):
        sensitivity = None
        if guided and last >= 0:
            coded = [(prefix + name, module) for block, prefix in zip(blocks, prefixes)
                     for name, module in quantizable_linears(block, config)]
            whole_model = (None if checkpoint_dir is None
                           else {k: sources[0][k] for k in ("inputs_sha256", "settings_sha256")})
            sensitivity = None if checkpoint_dir is None else _load_sensitivity(checkpoint_dir, coded, batch_size,
                                                                                whole_model, overwrite)
            if sensitivity is None:
                try:
                    model.to(device)
                    sensitivity = _output_sensitivity(model, coded, tokens, batch_size, device, progress)
                finally:  # out of memory there (or in the move) must not leave the whole model on the device
                    model.to(home)
                if checkpoint_dir is not None:
                    save_shard(checkpoint_dir, SENSITIVITY_SHARD, {n: torch.cat(w) for n, w in sensitivity.items()},
                               whole_model)
        with torch.no_grad():
            # Everything but the blocks runs where it is; the first block's inputs are captured there.
            inputs = _block_inputs(model, blocks, tokens, batch_size, home) if last >= 0 else None
            # With fine-tuning, the full-precision model's activations run alongside as the targets.
            tuning = bool(finetune_steps or code_rounds)
            full_precision = inputs if tuning else None
            bar = tqdm(blocks, desc=f"calibrate {config.lattice or 'budget plan'}", unit="block",
                       disable=not progress)
            for i, block in enumerate(bar):
                block.to(device)
                targets = _run_block(block, full_precision, device) if tuning and i <= last else None
                if finished[i] is not None:
                    _load_block(finished[i], f"{checkpoint_dir}: block {i}", block, device)
                    finished[i] = None  # its tensors are the block's now
                else:
                    linears = quantizable_linears(block, config)
                    lattices = {name: Lattice.load(config.lattice if planned is None else planned[prefixes[i] + name])
                                for name, _ in linears}
                    modules, groups = dict(linears), []
                    weights = None if sensitivity is None else {n: sensitivity[prefixes[i] + n] for n, _ in linears}
                    for names, hessian in _hessians(block, linears, inputs, device, weights):
                        for lattice, members in _by_lattice(names, lattices):
                            _quantize_group([modules[n] for n in members], hessian, lattice, config, alpha, damping,
                                            device, refine_passes)
                            groups.append(members)
                    if tuning:
                        before, after = finetune_block(block, groups, inputs, targets, steps=finetune_steps,
                                                       lr=finetune_lr, device=device, code_rounds=code_rounds,
                                                       tune_rotation=finetune_rotation)
                        bar.set_postfix(finetune=f"{after / before:.3f}" if before else "-")
                    if checkpoint_dir is not None:
                        _save_block(checkpoint_dir, i, block, groups, sources[i])
                if i < last:
                    inputs = _run_block(block, inputs, device)
                full_precision = targets
                block.to(home)
        # Blocks loaded from checkpoint_dir hold their own copies of M and the rotation factors: share
        # them as a run without a resume does, so both give the same footprint.
        share_constants(model)
    if checkpoint_dir is not None:  # every block is coded: a resume needs no sensitivity any more
        remove_shard(checkpoint_dir, SENSITIVITY_SHARD)
    attach_after_quantize(model, config)
    return model
