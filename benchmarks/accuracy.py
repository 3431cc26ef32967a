"""Accuracy benchmark: perplexity against model bytes on the built-in SmolLM2-135M.

Every row is measured by the same harness and text as ``lift-ao eval`` (lift_ao.evaluate.perplexity
on the built-in Wikipedia *evaluation* split, 8 windows × 512 tokens by default); calibrated rows use
the disjoint *calibration* split. Rows:

    reference                 the dequantized Q4_1 GGUF model in fp32 (see lift_ao.data.DEFAULT_MODEL_NOTE)
    rtn-int{2,3,4}-g{64,128}  round-to-nearest, asymmetric, group size g (torchao's intx quantizer)
    hqq-int{2,3,4}-g{64,128}  HQQ (half-quadratic optimisation of scale and zero per group), torchao's
                              built-in implementation (``_choose_qparams_and_quantize_affine_hqq``)
    lift-{bits}               lift_ao data-free at 1.6 / 2.0 / 2.4 / 2.5 / 3.0 bits (lattices in LIFT_LATTICES)
                              or ``lift-{D}/{d}`` (any shipped lattice, e.g. lift-cal-ft-72/24: the
                              library's 3.0-bit pick; the same suffix works for the two rows below)
    lift-cal-{bits}           lift_ao calibrated (lift_ao.calibrate) at the same rates
    lift-cal-ft-{bits}        the same with intra-block fine-tuning (--finetune-steps, --finetune-lr, --finetune-batch)
    lift-cal-ftc-{bits}       the same, the codes fine-tuned first (--code-rounds flip rounds per block)
    lift-cal-fte-{bits}       lift-cal-ft, then end-to-end fine-tuning of all scales against the reference
                              model's logits (lift_ao.finetune_end_to_end: --e2e-steps, --e2e-lr)
    lift-plan-2.4             mixed widths planned by sensitivity at the bytes of uniform 2.4 bits
    lift-cal[-ft|-fte]-plan-{bits}  a calibrated row at mixed widths (--plan-window): liftquant(memory_budget=the bytes
                              of uniform {bits} (a rate or D/d, as above)), planned by lift_ao.calibrate
                              with the calibration tokens

Only linear layers inside the decoder are quantized; embeddings (tied with lm_head) and norms stay in
fp32 in every row, so "model bytes" differ only by the linear layers. RTN INT4 asymmetric with group
size 32 is never a row: it reproduces the reference's Q4_1 grid exactly.

    python benchmarks/accuracy.py [--rows lift-2.4,lift-cal-2.4,...] [--windows 8] [--redo] [--checkpoint-root DIR]

Results are merged into benchmarks/results/accuracy.json row by row (a finished row is skipped unless
--redo), then accuracy.md and accuracy.png (when matplotlib is installed) are rewritten.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

import lift_ao
from lift_ao.budget import DEFAULT_RATE_WINDOW, parse_rate_window
from lift_ao.calibration import DEFAULT_ALPHA, builtin_calibration_tokens, builtin_calibration_tokens_after, calibrate
from lift_ao.rounding import DEFAULT_REFINE_PASSES, default_refine_passes
from lift_ao.finetune import finetune_end_to_end, tuned_parts
from lift_ao.sensitivity import SENSITIVITY_TOKENS, calibrated_sensitivity
from lift_ao.data import DEFAULT_MODEL_NOTE, builtin_text, load_default_model, tokenize_text
from lift_ao.evaluate import PerplexityResult, format_change, perplexity, perplexity_ratio
from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
# The lattice of each rate, pinned (not Lattice.for_bits) so that rows measured at different times
# compare the same codebooks as more lattices get shipped: the lowest-MSE lattice of each rate
# among those shipped when the table was started.
LIFT_LATTICES = {"1.6": "16/10", "2.0": "32/16", "2.4": "24/10", "2.5": "25/10", "3.0": "24/8"}
LIFT_BITS = tuple(LIFT_LATTICES)
RTN = [f"rtn-int{b}-g{g}" for b in (2, 3, 4) for g in (64, 128)]
HQQ = [f"hqq-int{b}-g{g}" for b in (2, 3, 4) for g in (64, 128)]
ROWS = ["reference", *RTN, *HQQ, *(f"lift-{b}" for b in LIFT_BITS), *(f"lift-cal-{b}" for b in LIFT_BITS),
        *(f"lift-cal-ft-{b}" for b in LIFT_BITS), *(f"lift-cal-ftc-{b}" for b in LIFT_BITS),
        *(f"lift-cal-fte-{b}" for b in LIFT_BITS), "lift-plan-2.4"]
# RTN / HQQ storage convention: b-bit codes plus one bf16 scale and one bf16 zero point per group.
GROUP_OVERHEAD_BITS = 32


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def _linears(model) -> list:
    return [m for _, m in lift_ao.quantizable_linears(model, lift_ao.liftquant(bits=2.4))]


def _group_quantize(model, method: str, bits: int, group: int) -> int:
    """Quantize the decoder's linears in place, ``method`` "rtn" (torchao's intx quantizer) or "hqq"
    (torchao's HQQ optimiser: scale and zero of each group fitted by half-quadratic splitting, not
    taken from the group's range), and dequantize them back; returns their nominal packed bytes.

    torchao's ``IntxWeightOnlyConfig`` refuses a group size that does not divide K (576 = 4.5 × 128
    here), so each weight is zero-padded to a multiple of the group, quantized by torchao's
    ``IntxUnpackedToInt8Tensor.from_hp`` and dequantized back. Zero padding leaves the last group's
    parameters unchanged (torchao's asymmetric range always contains 0), so this equals a ragged last
    group; the dense dequantized weight gives the same perplexity as torchao's tensor. (HQQ fits the
    padded zeros too, a small handicap on the last group of each row.)
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor, MappingType
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    nominal = 0.0
    with torch.no_grad():
        for module in _linears(model):
            weight = module.weight
            padded = torch.nn.functional.pad(weight, (0, -weight.shape[1] % group))
            if method == "rtn":
                dequantized = IntxUnpackedToInt8Tensor.from_hp(
                    padded, (1, group), getattr(torch, f"int{bits}"), mapping_type=MappingType.ASYMMETRIC).dequantize()
            else:
                codes, scale, zero, shape = _choose_qparams_and_quantize_affine_hqq(
                    padded.float(), nbits=bits, group_size=group, axis=1, compute_dtype=torch.float32,
                    device=str(padded.device), raw_output=True)
                # raw_output: per (row, group) scale and zero, w ≈ (code − zero) · scale
                dequantized = ((codes.float().view(shape[0], -1, group) - zero[..., None]) * scale[..., None]).view(shape)
            module.weight.copy_(dequantized[:, : weight.shape[1]])
            nominal += weight.numel() * (bits + GROUP_OVERHEAD_BITS / group) / 8
    return int(nominal)


def _lattice_of(row: str) -> str:
    """The lattice of a lift row: its rate's entry in LIFT_LATTICES, or the D/d the row names."""
    suffix = row.rpartition("-")[2]
    return LIFT_LATTICES.get(suffix, suffix)


# What calibrated rows recorded before these entries existed were measured with.
UNRECORDED_SETTINGS = {"alpha": 0.5, "refine_passes": 0, "rate_window": DEFAULT_RATE_WINDOW}


def _calibration_settings(row: str, args: argparse.Namespace) -> dict:
    """The calibrate settings a calibrated row runs with, as its JSON records them (absent entries:
    UNRECORDED_SETTINGS); plan rows' include the plan's rate window."""
    refine_passes = (default_refine_passes(end_to_end=row.startswith("lift-cal-fte-"))
                     if args.refine_passes is None else args.refine_passes)
    return {"alpha": args.alpha, "refine_passes": refine_passes, **({"rate_window": args.plan_window}
                                                                   if "-plan-" in row else {})}


def _requested(row: str, args: argparse.Namespace) -> dict:
    """Every command-line setting that changes what row ``row`` measures, as given (recorded in new
    rows as ``requested``: a recorded row answers a request only with equal settings). Not among
    them: --device, --e2e-compile and --checkpoint-root, which change how it runs, not what."""
    names = []
    if row == "lift-plan-2.4":
        names = ["plan_tokens"]
    elif row.startswith("lift-cal-"):
        names = ["calibration_tokens", "guided"]
        if "-plan-" in row:
            names += ["plan_budget", "plan_scores"]
        if row.startswith(("lift-cal-ft-", "lift-cal-ftc-", "lift-cal-fte-")):
            names += ["finetune_steps", "finetune_lr", "finetune_batch", "finetune_rotation"]
        if row.startswith("lift-cal-ftc-"):
            names += ["code_rounds"]
        if row.startswith("lift-cal-fte-"):
            names += ["e2e_steps", "e2e_lr", "e2e_tokens", "e2e_held_out", "e2e_tune_mapping", "e2e_tune_rotation",
                      "e2e_unquantized_lr"]
    requested = {name: getattr(args, name) for name in names}
    if row.startswith("lift-cal-"):
        requested.update(_calibration_settings(row, args))  # α, refinement passes (resolved), rate window
    return json.loads(json.dumps(requested, default=str))  # as the JSON holds it (paths as strings)


def _is_row(name: str) -> bool:
    lattice_row = re.fullmatch(r"lift-(cal-(ft[ce]?-)?)?(\d+/\d+)", name)
    plan_row = re.fullmatch(r"lift-cal-(ft[ce]?-)?plan-(.+)", name)
    shipped = {lat.name for lat in lift_ao.Lattice.shipped()}
    return (name in ROWS or (lattice_row is not None and lattice_row.group(3) in shipped)
            or (plan_row is not None and _lattice_of(name) in shipped))


def _table_order(rows: dict) -> list[str]:
    """The measured rows in ROWS order, then lattice-named rows (``lift-cal-ft-72/24``) sorted."""
    return [r for r in ROWS if r in rows] + sorted(r for r in rows if r not in ROWS)


def run_row(name: str, reference, tokenizer, eval_tokens, args) -> dict:
    """Quantize a copy of ``reference`` as row ``name`` and measure it."""
    model = copy.deepcopy(reference)
    linears = _linears(model)
    linear_weights = sum(m.weight.numel() for m in linears)
    linear_bytes_before = sum(m.weight.nbytes for m in linears)
    row = {"method": name, "requested": _requested(name, args), "load_average_before": os.getloadavg()}
    start = time.perf_counter()
    if name == "reference":
        linear_bytes = linear_bytes_before
    elif name.startswith(("rtn-", "hqq-")):
        method, bits_group = name.split("-int")
        bits, group = bits_group.split("-g")
        linear_bytes = _group_quantize(model, method, int(bits), int(group))
    else:
        if name == "lift-plan-2.4":
            uniform = lift_ao.plan(model, 10**12, allocation="uniform", lattices=[lift_ao.Lattice.load(LIFT_LATTICES["2.4"])])
            config = lift_ao.liftquant(memory_budget=uniform.model_bytes)
            calibration = builtin_calibration_tokens(tokenizer, args.plan_tokens)
            lift_ao.quantize(model, config, calibration=calibration, device=args.device)
        elif name.startswith("lift-cal-"):
            calibration = builtin_calibration_tokens(tokenizer, args.calibration_tokens)
            checkpoint = None if args.checkpoint_root is None else args.checkpoint_root / name
            # Its quantize time then covers only this run's part of the work, and the table says so.
            row["resumed"] = checkpoint is not None and checkpoint.is_dir() and any(checkpoint.iterdir())
            config = lift_ao.liftquant(lattice=_lattice_of(name))
            if "-plan-" in name:
                uniform = lift_ao.plan(model, 10**12, allocation="uniform", lattices=[lift_ao.Lattice.load(_lattice_of(name))])
                budget = args.plan_budget or uniform.model_bytes
                scores = None
                if args.plan_scores == "measured":  # on text after what the block and end-to-end stages read
                    scores = calibrated_sensitivity(
                        reference, budget, calibration, builtin_calibration_tokens_after(
                            tokenizer, max(calibration.numel(), args.e2e_tokens or 0), SENSITIVITY_TOKENS),
                        alpha=args.alpha, device=args.device,
                        checkpoint_dir=None if checkpoint is None else checkpoint / "sensitivity")
                elif args.plan_scores is not None:
                    scores = json.loads(Path(args.plan_scores).read_text())
                config = lift_ao.liftquant(memory_budget=budget, scores=scores, rate_window=args.plan_window)
                if scores is not None:
                    row["plan_scores"] = str(args.plan_scores)
            finetune = {}
            if name.startswith(("lift-cal-ft-", "lift-cal-ftc-", "lift-cal-fte-")):
                finetune = dict(finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                                batch_size=args.finetune_batch, finetune_rotation=args.finetune_rotation)
                if name.startswith("lift-cal-ftc-"):
                    finetune["code_rounds"] = args.code_rounds
                row["finetune"] = finetune
            settings = _calibration_settings(name, args)
            # A budget plan keeps room for what the end-to-end stage will tune per group.
            tuned_later = tuned_parts(args.e2e_tune_mapping, args.e2e_tune_rotation) if name.startswith("lift-cal-fte-") else ()
            calibrate(model, config, calibration, device=args.device, checkpoint_dir=checkpoint, guided=args.guided,
                      alpha=settings["alpha"], refine_passes=settings["refine_passes"], tuned_later=tuned_later, **finetune)
            row.update(settings)
            if args.guided:
                row["guided"] = True
            if name.startswith("lift-cal-fte-"):
                # A superset of the block stage's text (its first tokens are the same): the end-to-end
                # stage overfits its sequences, while the block stage's cost grows with them.
                e2e_tokens = (calibration if args.e2e_tokens in (None, args.calibration_tokens)
                              else builtin_calibration_tokens(tokenizer, args.e2e_tokens))
                row["end_to_end"] = dict(steps=args.e2e_steps, lr=args.e2e_lr, tune_mapping=args.e2e_tune_mapping,
                                         tune_rotation=args.e2e_tune_rotation, batch_size=args.finetune_batch, held_out=args.e2e_held_out,
                                         tokens=e2e_tokens.numel(), compiled=args.e2e_compile,
                                         **({"unquantized_lr": args.e2e_unquantized_lr} if args.e2e_unquantized_lr else {}))
                tuned = finetune_end_to_end(
                    model, reference, e2e_tokens, steps=args.e2e_steps, lr=args.e2e_lr, tune_mapping=args.e2e_tune_mapping,
                    tune_rotation=args.e2e_tune_rotation, unquantized_lr=args.e2e_unquantized_lr, batch_size=args.finetune_batch,
                    held_out=args.e2e_held_out, checkpoint_dir=checkpoint, compiled=args.e2e_compile)
                row["end_to_end"].update(held_out_kl_before_after=[tuned.before, tuned.after],
                                         held_out_kl_checks=tuned.checks)
            row["calibration_tokens"] = calibration.numel()
        else:
            lift_ao.quantize(model, lift_ao.liftquant(lattice=_lattice_of(name)), device=args.device)
        linear_bytes = sum(m.weight.storage_bytes() for m in linears)
        row["lattices"] = sorted({m.weight.lattice.name for m in linears})
    row["quantize_seconds"] = round(time.perf_counter() - start, 1)
    row["load_average_after"] = os.getloadavg()
    # Shared M / rotations make the per-layer sum slightly larger than the footprint's; the
    # footprint (exact) is what the model occupies.
    rest = lift_ao.footprint(reference) - linear_bytes_before
    row["model_bytes"] = int(lift_ao.footprint(model) if name.startswith("lift-") else rest + linear_bytes)
    row["bits_per_weight"] = 8 * (row["model_bytes"] - rest) / linear_weights
    row["device"] = _device_name(torch.device(args.device))
    if args.eval_dense and name.startswith("lift-"):
        # Same weights, dense matmuls: the CPU reference op unpacks codes on every call (~5x slower).
        for module in linears:
            module.weight = torch.nn.Parameter(module.weight.dequantize(), requires_grad=False)
    if name.startswith("lift-"):
        row["eval_weights"] = "dequantized (dense)" if args.eval_dense else "as quantized"
    result = perplexity(model, eval_tokens, context_length=args.context, max_windows=args.windows)
    row.update(perplexity=result.perplexity, eval=result.to_dict())
    return row


def _evaluated(name: str, row: dict) -> str:
    if name == "reference":
        return "fp32 weights"
    if name.startswith(("rtn-", "hqq-")):
        return "dequantized (dense)"  # see _group_quantize
    return row.get("eval_weights", "as quantized")


def relative_change(row: dict, baseline: dict) -> str:
    """``+22.7 % [+21.0, +24.4]``: the perplexity of ``row`` over that of ``baseline`` (two results rows
    evaluated on the same windows), compared window by window, with its ~95 % interval (± 2 standard
    errors of the mean NLL difference).

    Raises:
        ValueError: either lacks per-window NLLs (rows recorded before them), or other windows.
    """
    return format_change(*perplexity_ratio(PerplexityResult(**row["eval"]), PerplexityResult(**baseline["eval"])))


def _versus_reference(rows: dict, name: str) -> str:
    """Row ``name`` against the reference row (:func:`relative_change`); blank where it cannot be paired."""
    if name == "reference" or "eval" not in rows.get("reference", {}) or "eval" not in rows[name]:
        return ""
    try:
        return relative_change(rows[name], rows["reference"])
    except ValueError:  # either was measured without per-window NLLs, or on other windows
        return ""


def _markdown(doc: dict) -> str:
    commands = sorted({row.get("command", doc["command"]) for row in doc["rows"].values()})
    lines = [
        "# Accuracy on SmolLM2-135M-Instruct",
        "",
        DEFAULT_MODEL_NOTE,
        "",
        f"Text: built-in Wikipedia evaluation split, {doc['windows']} windows × {doc['context']} tokens "
        "(the harness of `lift-ao eval`); calibration uses the disjoint calibration split.",
        "",
        "Bits/weight: over the decoder's linear weights, everything stored included (lift_ao: codes, row "
        "scales, lattice M, rotation; RTN and HQQ: packed codes + a bf16 scale and a bf16 zero point per group). "
        "Embeddings (tied with lm_head) and norms stay fp32 in every row, so model MB is dominated by them.",
        "",
        f"Machine: {doc['machine']}. The CPU is shared with other jobs: wall times are upper bounds; the "
        "load average (1 min) before → after each row is listed. \"evaluated\": lift_ao rows may be evaluated "
        "with their dequantized weights as dense matrices (the same values; the CPU reference op is ~5x slower). "
        "\"(resumed)\": the row continued from its --checkpoint-root directory; its time is this run's part only.",
        "",
        "Calibrated rows (`lift-cal-*`): `lift_ao.calibrate` with the first --calibration-tokens tokens of the "
        "calibration split in sequences of 512, input-scale strength α = "
        + "/".join(f"{a:g}" for a in sorted({r.get("alpha", UNRECORDED_SETTINGS["alpha"]) for r in doc["rows"].values()
                                              if r["method"].startswith("lift-cal-")} or {UNRECORDED_SETTINGS["alpha"]}))
        + f" (per row: the JSON's `alpha`; {UNRECORDED_SETTINGS['alpha']:g} where absent), Hessian damping 1%, "
        + "/".join(str(p) for p in sorted({r.get("refine_passes", UNRECORDED_SETTINGS["refine_passes"])
                                           for r in doc["rows"].values()
                                           if r["method"].startswith("lift-cal-")} or {UNRECORDED_SETTINGS["refine_passes"]}))
        + " Gauss-Seidel refinement passes after LDLQ (per row: the JSON's `refine_passes`; "
        f"{UNRECORDED_SETTINGS['refine_passes']} where absent)"
        + ("; rows marked guided (the JSON's `guided`): each token's share of a linear's Hessian weighted by "
           "its outputs' sensitivity (--guided, `calibrate(guided=True)`)"
           if any(r.get("guided") for r in doc["rows"].values()) else "")
        + ", decoder blocks streamed one at a time; no intra-block fine-tuning. `lift-cal-ft-*`: the same plus intra-block "
        "fine-tuning (row and input scales, Adam against the full-precision model's block outputs): "
        + (", ".join(sorted({f"{r['finetune']['finetune_steps']} steps per block of {r['finetune']['batch_size']} "
                             f"sequences, peak lr {r['finetune']['finetune_lr']:g}" for r in doc["rows"].values()
                             if r.get("finetune")})) or "none measured yet") + ". `lift-cal-ftc-*`: the codes are "
        "fine-tuned first (straight-through gradient and Gauss-Newton curvature of the block output error "
        "pick the codes to flip; a round is kept when the error over the calibration batches drops): "
        + (", ".join(sorted({f"{r['finetune']['code_rounds']} rounds per block" for r in doc["rows"].values()
                             if r.get("finetune", {}).get("code_rounds")})) or "none measured yet") + ". `lift-cal-fte-*`: "
        "lift-cal-ft, then every row and input scale of the model tuned at once against the reference model's "
        "next-token distributions (KL, Adam, `lift_ao.finetune_end_to_end`): "
        + (", ".join(sorted({f"{r['end_to_end']['steps']} steps of {r['end_to_end']['batch_size']} sequences, peak lr "
                             f"{r['end_to_end']['lr']:g}" + (f", {r['end_to_end']['held_out']:g} of the sequences held out "
                                                            "to pick the kept scales" if "held_out" in r['end_to_end'] else "")
                             + (f", over the first {r['end_to_end']['tokens']} calibration tokens"
                                if r['end_to_end'].get("tokens", r.get("calibration_tokens")) != r.get("calibration_tokens") else "")
                             + (", each group's lattice matrix M tuned too (--e2e-tune-mapping; stored per group)"
                                if r['end_to_end'].get("tune_mapping") else "")
                             + (", each input transform's rotation factors tuned too (--e2e-tune-rotation; stored per "
                                "transform)" if r['end_to_end'].get("tune_rotation") else "")
                             + (f", the embeddings and norm weights tuned too at peak lr {r['end_to_end']['unquantized_lr']:g} "
                                "(--e2e-unquantized-lr)" if r['end_to_end'].get("unquantized_lr") else "")
                             for r in doc["rows"].values() if r.get("end_to_end")}))
           or "none measured yet") + "."
        + (" `lift-cal-*-plan-*`: a lattice per linear, planned to the row's bytes by sensitivity among the lattices "
           "within " + "/".join(sorted({f"±{w:g} bits" if w is not None else "any distance" for w in (
               r.get("rate_window", UNRECORDED_SETTINGS["rate_window"]) for r in doc["rows"].values()
               if "-plan-" in r["method"])}, key=str))
           + " of the uniform plan's rate (per row: the JSON's `rate_window`; "
           f"{UNRECORDED_SETTINGS['rate_window']:g} where absent; --plan-window)."
           if any("-plan-" in r["method"] and r["method"].startswith("lift-cal-") for r in doc["rows"].values()) else ""),
        "",
        "HQQ rows (`hqq-*`): torchao's HQQ optimiser with its defaults (per-group scale and zero fitted by "
        "half-quadratic splitting of an ℓp<1 error, 20 iterations, groups along K). On this model it beats "
        "RTN at 4 bits but not at 3 or 2 (not investigated; possible causes: the ℓp<1 objective tolerates a "
        "few large errors, and the reference's weights already sit on a 4-bit Q4_1 grid).",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands),
        "",
        "\"vs reference\": the perplexity ratio to the reference row from the same windows compared window by "
        "window, with its ~95 % interval (exp(mean ± 2 SE) of the per-window NLL differences; "
        "lift_ao.evaluate.perplexity_ratio); blank for rows recorded without per-window NLLs.",
        "",
        "| method | bits/weight | model MB | perplexity | vs reference | quantize s | device | load avg | evaluated |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for name in _table_order(doc["rows"]):
        row = doc["rows"][name]
        load = f"{row['load_average_before'][0]:.1f} → {row['load_average_after'][0]:.1f}"
        method = f"{name} ({', '.join(row['lattices'])})" if row.get("lattices") else name
        lines.append(f"| {method} | {row['bits_per_weight']:.3f} | {row['model_bytes'] / 1e6:.1f} | "
                     f"{row['perplexity']:.2f} | {_versus_reference(doc['rows'], name)} | {row['quantize_seconds']:.0f}{' (resumed)' if row.get('resumed') else ''} | "
                     f"{row['device']} | {load} | "
                     f"{_evaluated(name, row)} |")
    notes = [f"- {name}: {doc['rows'][name]['note']}" for name in _table_order(doc["rows"]) if doc["rows"][name].get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def _plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    families = {"RTN g64": "rtn-int.-g64$", "RTN g128": "rtn-int.-g128$", "HQQ g64": "hqq-int.-g64$",
                "HQQ g128": "hqq-int.-g128$", "lift_ao data-free": r"lift-\d",
                "lift_ao calibrated": r"lift-cal-\d",
                "lift_ao calibrated + fine-tuned": "lift-cal-ft-", "lift_ao calibrated + codes fine-tuned": "lift-cal-ftc-",
                "lift_ao calibrated + end-to-end fine-tuned": "lift-cal-fte-",
                "lift_ao planned": "lift-plan-"}
    import re

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pattern in families.items():
        points = sorted((r["model_bytes"] / 1e6, r["perplexity"]) for n, r in doc["rows"].items() if re.match(pattern, n))
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    if "reference" in doc["rows"]:
        ax.axhline(doc["rows"]["reference"]["perplexity"], color="gray", linestyle="--", label="reference (Q4_1 → fp32)")
    ax.set(xlabel="model MB", ylabel="perplexity", yscale="log", title="SmolLM2-135M: perplexity vs model size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    parser.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--calibration-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    parser.add_argument("--finetune-rotation", action="store_true",
                        help="fine-tuned rows also tune each group's rotation factors (calibrate(finetune_rotation=True))")
    parser.add_argument("--plan-tokens", type=int, default=4096, help="tokens to score layer sensitivity (plan row)")
    parser.add_argument("--plan-scores", default=None, help="lift-cal-*-plan-* rows: a JSON {layer FQN: score} "
                        "(lift_ao.measure_sensitivity's) the plan weighs the layers by, or 'measured': "
                        "lift_ao.calibrated_sensitivity's, on the 16384 calibration tokens after those the stages read "
                        "(default: the planner's own score on the calibration tokens)")
    parser.add_argument("--plan-budget", type=int, default=None,
                        help="memory budget in bytes of the lift-cal-*-plan-* rows (default: the data-free uniform "
                             "plan's bytes at the row's lattice; calibrated groups' own input signs come out of it)")
    parser.add_argument("--plan-window", type=parse_rate_window,
                        default=DEFAULT_RATE_WINDOW, help="lift-cal-*-plan-* rows: the plan's rate window in bits "
                        f"(lift_ao.plan's rate_window; 'none': any; default {DEFAULT_RATE_WINDOW})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-dense", action="store_true", help="evaluate lift_ao rows with their dequantized "
                        "weights (the same values; the CPU reference op is ~5x slower than a dense matmul)")
    parser.add_argument("--guided", action="store_true", help="calibrated rows: Hessians weighted per token by "
                        "the model's output sensitivity (lift_ao.calibrate(guided=True))")
    parser.add_argument("--refine-passes", type=int, default=None, help="calibrated rows: Gauss-Seidel passes "
                        f"after LDLQ (lift_ao.calibrate's refine_passes; default {DEFAULT_REFINE_PASSES}, 0 for "
                        "lift-cal-fte rows: lift_ao.rounding.default_refine_passes; rows before it was recorded "
                        "used 0)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="calibrated rows: input-scale strength "
                        f"α (lift_ao.calibrate's alpha; default {DEFAULT_ALPHA}; rows before it was recorded used 0.5)")
    parser.add_argument("--finetune-steps", type=int, default=16, help="lift-cal-ft rows: Adam steps per decoder block")
    parser.add_argument("--finetune-lr", type=float, default=1e-2, help="lift-cal-ft rows: Adam's peak learning rate")
    parser.add_argument("--finetune-batch", type=int, default=4, help="lift-cal-ft rows: sequences per step")
    parser.add_argument("--code-rounds", type=int, default=16, help="lift-cal-ftc rows: code flipping rounds per block")
    parser.add_argument("--e2e-steps", type=int, default=128, help="lift-cal-fte rows: end-to-end Adam steps")
    parser.add_argument("--e2e-lr", type=float, default=3e-3, help="lift-cal-fte rows: end-to-end peak learning rate")
    parser.add_argument("--e2e-tune-mapping", action="store_true", help="lift-cal-fte rows: the end-to-end stage also "
                        "tunes each group's lattice matrix (finetune_end_to_end(tune_mapping=True))")
    parser.add_argument("--e2e-tune-rotation", action="store_true", help="lift-cal-fte rows: the end-to-end stage also "
                        "tunes each input transform's rotation factors (finetune_end_to_end(tune_rotation=True))")
    parser.add_argument("--e2e-unquantized-lr", type=float, default=None, help="lift-cal-fte rows: the end-to-end "
                        "stage also tunes the unquantized parameters (embeddings, norms) at this peak learning rate "
                        "(finetune_end_to_end(unquantized_lr=...); default: they stay)")
    parser.add_argument("--e2e-tokens", type=int, default=None, help="lift-cal-fte rows: calibration tokens of the "
                        "end-to-end stage (default: --calibration-tokens; the first ones are the block stage's)")
    parser.add_argument("--e2e-compile", action=argparse.BooleanOptionalAction, default=None, help="lift-cal-fte "
                        "rows: the decoder blocks through torch.compile in the end-to-end steps (default: on CUDA)")
    parser.add_argument("--e2e-held-out", type=float, default=0.125, help="lift-cal-fte rows: fraction of the "
                        "end-to-end sequences held out to pick the kept scales (default 0.125)")
    parser.add_argument("--checkpoint-root", type=Path, default=None, help="calibrated rows save each finished "
                        "decoder block (and fte rows their end-to-end progress) under ROOT/<row>/ and a rerun resumes "
                        "from there (bit-identical)")
    parser.add_argument("--redo", action="store_true", help="measure rows already in the results again")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy", help="results path without suffix")
    return parser


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(n for n in names if not _is_row(n))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose among {ROWS} or lift[-cal[-ft|-ftc|-fte]]-D/d with a shipped lattice")

    # Suffixes are appended, not swapped: --out /tmp/alpha_0.25 must not write /tmp/alpha_0.json.
    out_path = lambda suffix: args.out.parent / (args.out.name + suffix)  # noqa: E731
    json_path = out_path(".json")
    doc = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": {}}
    if doc.get("rows") and (doc.get("windows"), doc.get("context")) != (args.windows, args.context):
        sys.exit(f"{json_path} holds rows measured with {doc['windows']} windows × {doc['context']} tokens; "
                 "use the same --windows/--context or another --out")
    doc.update(windows=args.windows, context=args.context)
    # A recorded row answers a request only if it was measured with the requested settings: all of
    # them where it recorded them, else (rows written before `requested`) those it recorded apart.
    other_settings = {}
    for n in (n for n in names if n in doc["rows"]):
        recorded, wanted = doc["rows"][n].get("requested"), _requested(n, args)
        if recorded is None:
            recorded = {k: doc["rows"][n].get(k, UNRECORDED_SETTINGS[k]) for k in _calibration_settings(n, args)
                        } if n.startswith("lift-cal-") else {}
            wanted = {k: wanted[k] for k in recorded}
        if recorded != wanted:
            other_settings[n] = sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k))
    if other_settings and not args.redo:
        sys.exit(f"{json_path} holds rows measured with other settings ({other_settings}; rate_window is "
                 "--plan-window, the others their option's name); use those options, --redo or another --out")
    todo = [n for n in names if args.redo or n not in doc["rows"]]
    if not todo:
        print("nothing to do: every requested row is in the results (pass --redo to measure again)")
    else:  # what measures rows names itself; re-rendering recorded rows elsewhere keeps their machine and command
        doc.update(command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
                   machine=f"{platform.node() or 'host'}: {_device_name(torch.device(args.device))}, torch {torch.__version__}")
        reference, tokenizer = load_default_model(device=args.device)
        eval_tokens = tokenize_text(tokenizer, builtin_text("evaluation"))
        for name in todo:
            print(f"== {name}", file=sys.stderr, flush=True)
            row = run_row(name, reference, tokenizer, eval_tokens, args)
            row["command"] = doc["command"]
            print(f"{name}: perplexity {row['perplexity']:.3f}, {row['bits_per_weight']:.3f} bits/weight, "
                  f"{row['model_bytes'] / 1e6:.1f} MB, quantized in {row['quantize_seconds']:.0f} s", flush=True)
            # Re-read before writing: another invocation may have added rows meanwhile.
            if json_path.is_file():
                doc["rows"] = {**json.loads(json_path.read_text())["rows"], **doc["rows"]}
            doc["rows"][name] = row
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path(f".json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=2))
            os.replace(tmp, json_path)  # a killed run keeps every finished row
    if json_path.is_file():
        doc["rows"] = {**json.loads(json_path.read_text())["rows"], **doc["rows"]}
    out_path(".md").write_text(_markdown(doc))
    if not _plot(doc, out_path(".png")):
        print("matplotlib is not installed: no accuracy.png (pip install matplotlib, then rerun with no rows to do)")


if __name__ == "__main__":
    main()
