"""``lift-ao``: the command line.

    lift-ao quantize [--bits 2.4] [--out DIR]   quantize a model, report size and perplexity
    lift-ao eval [--checkpoint DIR]             perplexity of a model on text
    lift-ao lattice ...                         train / list lattices (python -m lift_ao.lattice)
    lift-ao plan --preset llama3-70b --budget 24GiB   per-layer lattices that fit a memory budget
    lift-ao bench [--shape 4096 4096] [--bits 2.4]    time one quantized linear against the dense one

Exit codes: 0 success, 1 the work failed, 2 bad arguments or input (argparse's convention).
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

__all__ = ["main"]

BUILTIN = "builtin"
PARTIAL_DIR = "lift_ao.partial"  # under --out: one shard per finished layer (lift_ao.quantize's resume_dir)
_E2E_HELD_OUT = 0.125  # --e2e-held-out's default


def _log(args, message: str) -> None:
    # With --json, stdout carries only the JSON document; human-readable lines go to stderr.
    print(message, file=sys.stderr if args.json else sys.stdout, flush=True)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(spec: str, device: str):
    """(model, tokenizer) for ``builtin`` or a local Hugging Face directory."""
    if spec == BUILTIN:
        from lift_ao.data import load_default_model

        return load_default_model(device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r}: not a directory; give a local Hugging Face model directory or 'builtin'")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def _eval_tokens(args, tokenizer) -> torch.Tensor:
    from lift_ao.data import builtin_text, load_token_file, tokenize_text

    if args.text:
        return load_token_file(args.text, tokenizer)
    return tokenize_text(tokenizer, builtin_text("evaluation"))


def _perplexity(args, model, tokens):
    from lift_ao.evaluate import perplexity

    return perplexity(
        model, tokens, context_length=args.context, stride=args.stride, max_windows=args.windows,
        progress=True,  # tqdm writes to stderr, so --json output stays clean
    )


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", metavar="FILE", help="evaluate on this text file or tokenized file "
                   "(.safetensors with a 1-D 'tokens' tensor, or .npy) instead of the built-in Wikipedia split")
    p.add_argument("--context", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="window stride; default = context (disjoint windows)")
    p.add_argument("--windows", type=int, default=8, help="number of windows to score (default 8; 0 = all)")


_CALIBRATION_TOKENS = 16384  # --calibration-tokens' default
# What `tokenizer.save_pretrained` writes: `lift-ao quantize --out` saves one beside the checkpoint.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _check_positive(args, *dests: str) -> None:
    """Raise ValueError naming the option unless each of ``dests`` (argparse dests) is None or a positive int."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ValueError(f"--{dest.replace('_', '-')} must be a positive number, got {value}")


def _given(args, **defaults) -> list[str]:
    """The options among ``defaults`` (dest=default value) that the command line set, as flags."""
    return ["--" + dest.replace("_", "-") for dest, default in defaults.items() if getattr(args, dest) != default]


def _cmd_quantize(args) -> dict:
    import lift_ao
    from lift_ao.api import quantizable_linears, resolve_device
    from lift_ao.budget import DEFAULT_RATE_WINDOW, reserved_kv_bytes
    from lift_ao.evaluate import format_change, perplexity_ratio
    from lift_ao.finetune import tuned_parts

    device = str(resolve_device(args.device or _default_device()))
    if args.memory_budget is not None and (args.bits is not None or args.lattice is not None):
        raise ValueError("--memory-budget replaces --bits and --lattice: give one of the three")
    if args.bits is not None and args.lattice is not None:
        raise ValueError("--lattice replaces --bits (each rate has its lattice): give one of the two")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: give a directory (created if missing)")
    if args.overwrite and args.out is None:
        raise ValueError(f"--overwrite discards a DIR/{PARTIAL_DIR} of --out DIR: add --out DIR, or drop --overwrite")
    evaluation = _given(args, text=None, context=512, stride=None, windows=8)
    if args.skip_eval and evaluation:
        raise ValueError(f"{', '.join(evaluation)} choose the evaluation that --skip-eval skips: drop one or the other")
    if args.rate_window != DEFAULT_RATE_WINDOW and args.memory_budget is None:
        raise ValueError("--rate-window bounds the lattices a --memory-budget plan mixes: add --memory-budget SIZE")
    reservations = _given(args, reserve="0", kv_context=None, kv_batch=1, kv_prefill=None)
    if reservations and args.memory_budget is None:
        raise ValueError(f"{', '.join(reservations)} keep room in a --memory-budget: add --memory-budget SIZE")
    kv_only = _given(args, kv_batch=1, kv_prefill=None)
    if kv_only and args.kv_context is None:
        raise ValueError(f"{', '.join(kv_only)} size the KV cache of --kv-context: add --kv-context TOKENS")
    _check_positive(args, "kv_context", "kv_batch", "kv_prefill")
    if _given(args, calibration_tokens=_CALIBRATION_TOKENS) and not (args.calibrate or args.memory_budget is not None):
        raise ValueError("--calibration-tokens sizes the text of --calibrate, or of a --memory-budget plan's "
                         "activation statistics: add one of them")
    if args.measure_sensitivity and not (args.calibrate and args.memory_budget is not None):
        raise ValueError("--measure-sensitivity plans a --memory-budget in calibrated mode: add --calibrate and "
                         "--memory-budget SIZE")
    # Options of calibrated mode's stages are refused without them, never silently ignored.
    calibrated_only = _given(args, guided=False, refine_passes=None, alpha=None, finetune_steps=0,
                             finetune_rotation=False, code_rounds=0, e2e_steps=0)
    if calibrated_only and not args.calibrate:
        raise ValueError(f"{', '.join(calibrated_only)} set calibrated mode's stages (Hessians, rounding, "
                         "fine-tuning): add --calibrate")
    end_to_end_only = _given(args, e2e_tokens=None, e2e_held_out=_E2E_HELD_OUT, e2e_tune_mapping=False,
                             e2e_tune_rotation=False, e2e_unquantized_lr=None, e2e_compile=None)
    if end_to_end_only and not (args.calibrate and args.e2e_steps):
        raise ValueError(f"{', '.join(end_to_end_only)} set the end-to-end stage: add --calibrate and --e2e-steps N")
    if args.calibrate and args.lm_head:
        raise ValueError("--calibrate codes the decoder blocks and keeps the output projection in full precision: "
                         "drop --lm-head (or quantize without --calibrate)")
    if args.e2e_unquantized_lr is not None and not args.e2e_unquantized_lr > 0:
        raise ValueError(f"--e2e-unquantized-lr must be > 0, got {args.e2e_unquantized_lr}")
    if args.calibrate:  # before the model loads and the sensitivity is measured, both of which may take long
        from lift_ao.calibration import check_settings

        check_settings(finetune_steps=args.finetune_steps, code_rounds=args.code_rounds,
                       finetune_rotation=args.finetune_rotation,
                       **({} if args.alpha is None else {"alpha": args.alpha}),
                       **({} if args.refine_passes is None else {"refine_passes": args.refine_passes}))
        if args.e2e_steps < 0:
            raise ValueError(f"--e2e-steps must be >= 0, got {args.e2e_steps}")
        # The end-to-end stage's text: --e2e-tokens, else the block stage's.
        e2e_tokens = args.calibration_tokens if args.e2e_tokens is None else args.e2e_tokens
        if not 0 < args.e2e_held_out < 1 or (args.e2e_steps and e2e_tokens < 1024):
            raise ValueError(f"--e2e-held-out must be in (0, 1) and the end-to-end stage's tokens (--e2e-tokens, else "
                             f"--calibration-tokens) at least 1024 (two sequences of 512), got {args.e2e_held_out} "
                             f"and {e2e_tokens}")
    bits = 2.4 if args.bits is None else args.bits  # the default unless a lattice or a budget replaces it
    if args.lattice is not None or args.memory_budget is not None:
        bits = None
    budget_options = {} if args.memory_budget is None else dict(
        reserve=args.reserve, kv_cache=None if args.kv_context is None else dict(
            context=args.kv_context, batch=args.kv_batch, prefill=args.kv_prefill))
    config = lift_ao.liftquant(bits=bits, lattice=args.lattice, memory_budget=args.memory_budget, seed=args.seed,
                               include_lm_head=args.lm_head, beam_width=args.beam_width, rate_window=args.rate_window,
                               **budget_options)
    t0 = time.perf_counter()
    model, tokenizer = _load_model(args.model, device)
    report = {"model": args.model, "device": device, "lattice": config.lattice, "bits_requested": bits,
              "memory_budget": args.memory_budget,
              "load_seconds": round(time.perf_counter() - t0, 2)}
    room = None  # the bytes of the budget the model may take: less the reserve and KV cache it keeps free
    if args.memory_budget is not None:
        report["rate_window"] = config.rate_window
        report["reserve_bytes"] = config.reserve
        report["kv_cache_bytes"] = reserved_kv_bytes(model, config.kv_cache)
        room = config.memory_budget - config.reserve - report["kv_cache_bytes"]
    targets = quantizable_linears(model, config)
    linear_weights = sum(m.weight.numel() for _, m in targets)
    report["bytes_before"] = lift_ao.footprint(model)
    report["linear_bytes_before"] = sum(m.weight.nbytes for _, m in targets)
    _log(args, f"model {args.model}: {report['bytes_before'] / 2**20:.1f} MiB, {len(targets)} linear layers "
               f"({linear_weights / 1e6:.1f} M weights) to code with "
               f"{f'lattice {config.lattice}' if config.lattice else f'lattices planned to fit {args.memory_budget}'}")
    tokens = None
    if not args.skip_eval:
        tokens = _eval_tokens(args, tokenizer)
        before = _perplexity(args, model, tokens)
        report["perplexity_before"] = before.to_dict()
        _log(args, f"perplexity before: {before.perplexity:.3f}")
    t0 = time.perf_counter()
    # Finished layers are kept under --out as they are done, so a killed run resumes where it stopped.
    partial = args.out / PARTIAL_DIR if args.out else None
    if args.calibrate:
        from lift_ao.calibration import (DEFAULT_ALPHA, builtin_calibration_tokens, builtin_calibration_tokens_after,
                                         calibrate)
        from lift_ao.rounding import default_refine_passes
        from lift_ao.sensitivity import SENSITIVITY_TOKENS

        calibration = builtin_calibration_tokens(tokenizer, args.calibration_tokens)
        report["calibration_tokens"] = calibration.numel()
        report["finetune_steps"], report["code_rounds"] = args.finetune_steps, args.code_rounds
        alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
        report["finetune_rotation"], report["alpha"], report["guided"] = args.finetune_rotation, alpha, args.guided
        refine_passes = report["refine_passes"] = (default_refine_passes(end_to_end=args.e2e_steps > 0)
                                                   if args.refine_passes is None else args.refine_passes)
        if args.measure_sensitivity:
            # Measured on text no other stage reads: after the block and end-to-end stages' tokens.
            score_tokens = builtin_calibration_tokens_after(tokenizer, max(calibration.numel(), args.e2e_tokens or 0),
                                                            SENSITIVITY_TOKENS)
            scores = lift_ao.calibrated_sensitivity(
                model, args.memory_budget, calibration, score_tokens, reserve=config.reserve, kv_cache=config.kv_cache,
                alpha=alpha, seed=args.seed, device=device,
                checkpoint_dir=None if partial is None else partial / "sensitivity", overwrite=args.overwrite)
            config = dataclasses.replace(config, scores=scores)
            report["sensitivity_tokens"] = score_tokens.numel()
        # The teacher of end-to-end fine-tuning is the model before quantization (a second copy).
        teacher = copy.deepcopy(model) if args.e2e_steps else None
        calibrate(model, config, calibration, checkpoint_dir=partial, overwrite=args.overwrite, device=device,
                  finetune_steps=args.finetune_steps, code_rounds=args.code_rounds,
                  finetune_rotation=args.finetune_rotation, alpha=alpha, guided=args.guided,
                  refine_passes=refine_passes,  # a budget plan keeps room for what the end-to-end stage tunes
                  tuned_later=tuned_parts(args.e2e_tune_mapping, args.e2e_tune_rotation))
        if args.e2e_steps:
            # A superset of the block stage's text (its first tokens are the same): the end-to-end stage
            # overfits few sequences, while the block stage's cost grows with them.
            e2e_tokens = (calibration if args.e2e_tokens in (None, args.calibration_tokens)
                          else builtin_calibration_tokens(tokenizer, args.e2e_tokens))
            report["e2e_tokens"], report["e2e_held_out"] = e2e_tokens.numel(), args.e2e_held_out
            report["e2e_compile"] = args.e2e_compile
            report["e2e_tune_mapping"], report["e2e_tune_rotation"] = args.e2e_tune_mapping, args.e2e_tune_rotation
            report["e2e_unquantized_lr"] = args.e2e_unquantized_lr
            tuned = lift_ao.finetune_end_to_end(
                model, teacher, e2e_tokens, steps=args.e2e_steps, held_out=args.e2e_held_out,
                tune_mapping=args.e2e_tune_mapping, tune_rotation=args.e2e_tune_rotation,
                unquantized_lr=args.e2e_unquantized_lr, checkpoint_dir=partial, overwrite=args.overwrite,
                compiled=args.e2e_compile)
            report["e2e_held_out_kl_before_after"] = [tuned.before, tuned.after]
            report["e2e_held_out_kl_checks"] = tuned.checks
            del teacher
    else:
        planned = None  # a memory budget is planned by sensitivity from the calibration text's activations
        if args.memory_budget is not None:
            from lift_ao.calibration import builtin_calibration_tokens

            planned = list(builtin_calibration_tokens(tokenizer, args.calibration_tokens).split(8))
        lift_ao.quantize(model, config, progress=True, calibration=planned, resume_dir=partial,
                         overwrite=args.overwrite)
    report["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    quantized = [m.weight for _, m in targets]
    report["bytes_after"] = lift_ao.footprint(model)
    # Storages shared between layers (one M per lattice, one rotation per input size) count once.
    report["linear_bytes_after"] = lift_ao.footprint(quantized)
    report["bits_per_weight"] = 8 * report["linear_bytes_after"] / linear_weights
    report["code_bits_per_weight"] = 8 * sum(w.packed_codes.nbytes for w in quantized) / linear_weights
    report["lattices"] = dict(collections.Counter(w.lattice.name for w in quantized))
    _log(args, f"size: {report['bytes_before'] / 2**20:.1f} MiB -> {report['bytes_after'] / 2**20:.1f} MiB "
               f"(linear layers {report['linear_bytes_before'] / 2**20:.1f} -> {report['linear_bytes_after'] / 2**20:.1f} MiB); "
               f"{report['bits_per_weight']:.4f} bits/weight with scales and transforms "
               f"({report['code_bits_per_weight']:.4f} in codes); encoded in {report['quantize_seconds']:.0f} s")
    if room is not None and report["bytes_after"] > room:
        # The plan counts what every stage stores, so this is a planning bug: said, never silent.
        report["over_budget_bytes"] = over = report["bytes_after"] - room
        print(f"lift-ao quantize: warning: the model takes {over} bytes more than --memory-budget "
              f"({config.memory_budget}) leaves it beside the reserve and KV cache, which its plan did not foresee "
              f"(please report it); run again with --memory-budget {config.memory_budget - over} to fit",
              file=sys.stderr, flush=True)
    if tokens is not None:
        after = _perplexity(args, model, tokens)
        report["perplexity_after"] = after.to_dict()
        change = ""
        if after.windows >= 2:  # the same windows before and after: compared window by window
            ratio = perplexity_ratio(after, before)
            report["perplexity_ratio"] = dict(zip(("ratio", "low", "high"), ratio))
            change = f"; {format_change(*ratio)}, ~95 % interval over windows"
        _log(args, f"perplexity after: {after.perplexity:.3f} (before {before.perplexity:.3f}{change})")
    if args.out:
        lift_ao.save_quantized(model, args.out)
        tokenizer.save_pretrained(args.out)
        shutil.rmtree(partial)
        report["saved_to"] = str(args.out)
        _log(args, f"saved to {args.out}")
    return report


def _cmd_eval(args) -> dict:
    import lift_ao

    if args.checkpoint and args.model is not None:
        raise ValueError("give --model or --checkpoint, not both (a checkpoint rebuilds its own model)")
    device = str(lift_ao.api.resolve_device(args.device or _default_device()))
    if args.checkpoint:
        from transformers import AutoTokenizer

        from lift_ao.data import needs_tokenizer

        token_ids = args.text is not None and not needs_tokenizer(args.text)
        has_tokenizer = any((Path(args.checkpoint) / name).is_file() for name in _TOKENIZER_FILES)
        # (Where there is no checkpoint either, load_quantized says so.)
        if not (has_tokenizer or token_ids) and (Path(args.checkpoint) / lift_ao.io.CHECKPOINT_NAME).is_file():
            raise ValueError(f"{args.checkpoint} holds no tokenizer (lift_ao.save_quantized writes none; `lift-ao "
                             "quantize --out` saves the model's): save one there with tokenizer.save_pretrained(dir), "
                             "or pass --text with token ids (.safetensors or .npy)")
        model = lift_ao.load_quantized(args.checkpoint, device=device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True) if has_tokenizer else None
    else:
        model, tokenizer = _load_model(args.model or BUILTIN, device)
    result = _perplexity(args, model, _eval_tokens(args, tokenizer)).to_dict()
    _log(args, f"perplexity: {result['perplexity']:.3f} over {result['tokens']} tokens")
    return {"model": str(args.checkpoint) if args.checkpoint else args.model or BUILTIN, "device": device, **result}


def _cmd_plan(args) -> dict:
    from dataclasses import replace

    from lift_ao.budget import PRESETS, plan

    if (args.hf_config is None) == (args.preset is None):
        raise ValueError("give exactly one of --hf-config PATH or --preset NAME")
    source = PRESETS[args.preset] if args.preset else args.hf_config
    kv_cache = (dict(context=args.context, batch=args.batch, prefill=args.prefill) if args.context is not None
                else None)
    kv_only = _given(args, batch=1, prefill=None)
    if kv_only and kv_cache is None:
        raise ValueError(f"{', '.join(kv_only)} size the KV cache: give --context too")
    _check_positive(args, "context", "batch", "prefill")
    result = plan(source, args.budget, reserve=args.reserve, kv_cache=kv_cache, allocation=args.allocation,
                  include_lm_head=args.lm_head, rate_window=args.rate_window)
    result = replace(result, model_name=args.preset or str(args.hf_config))
    _log(args, str(result) if args.layers else result.summary())
    return result.to_dict()


def _cmd_bench(args) -> dict:
    import torch.nn.functional as F
    from torch.utils.benchmark import Timer

    import lift_ao
    from lift_ao.api import resolve_device

    device = resolve_device(args.device or _default_device())
    dtype = getattr(torch, args.dtype)
    rows, features = args.shape
    if rows <= 0 or features <= 0 or args.batch <= 0:
        raise ValueError(f"--shape and --batch must be positive, got {args.shape} and {args.batch}")
    if args.bits is not None and args.lattice is not None:
        raise ValueError("give --bits or --lattice, not both")
    lattice = lift_ao.Lattice.for_bits(2.4 if args.bits is None else args.bits) if args.lattice is None \
        else lift_ao.Lattice.load(args.lattice)
    # Speed does not depend on code values: random codes skip the search (seconds per layer on CPU).
    generator = torch.Generator().manual_seed(0)
    weight = lift_ao.LiftQuantTensor.from_random_codes((rows, features), lattice, dtype=dtype, device=device,
                                                       generator=generator)
    dense = torch.randn(rows, features, generator=generator).to(device, dtype)
    x = torch.randn(args.batch, features, generator=generator).to(device, dtype)
    report = {"device": str(device), "dtype": args.dtype, "shape": [rows, features], "batch": args.batch,
              "lattice": lattice.name, "bits_per_weight": weight.bits_per_weight(),
              "dense_bytes": dense.nbytes, "quantized_bytes": weight.storage_bytes()}
    with torch.no_grad():
        for name, w in (("dense", dense), ("liftquant", weight)):
            # Timer synchronizes CUDA around each measurement; blocked_autorange picks the repeat count.
            measured = Timer("F.linear(x, w)", globals={"F": F, "x": x, "w": w}).blocked_autorange(min_run_time=1.0)
            report[f"{name}_us"] = measured.median * 1e6
    report["speedup"] = report["dense_us"] / report["liftquant_us"]
    _log(args, f"{rows}x{features} batch {args.batch} {args.dtype} on {device}: dense {report['dense_us']:.1f} us, "
               f"liftquant {lattice.name} {report['liftquant_us']:.1f} us ({report['speedup']:.2f}x), "
               f"{report['dense_bytes'] / 2**20:.1f} -> {report['quantized_bytes'] / 2**20:.2f} MiB")
    return report


def _parser() -> argparse.ArgumentParser:
    from lift_ao.budget import ALLOCATIONS, DEFAULT_RATE_WINDOW, PRESETS, parse_rate_window

    parser = argparse.ArgumentParser(prog="lift-ao", description="LiftQuant continuous bit-width weight quantization.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model; report size, bits/weight and perplexity before/after",
                       description="Quantize every linear layer (lm_head excluded unless --lm-head) of a causal LM.")
    q.add_argument("--model", default=BUILTIN, help="'builtin' (SmolLM2-135M-Instruct, shipped offline) or a local "
                   "Hugging Face model directory (default: builtin)")
    q.add_argument("--bits", type=float, default=None, help="target bits per weight; the largest shipped rate <= bits "
                   "is used (default 2.4)")
    q.add_argument("--lattice", default=None, help="a lattice name such as 24/10 instead of --bits")
    q.add_argument("--memory-budget", default=None, metavar="SIZE", help="instead of --bits/--lattice: the size the "
                   "model must fit (bytes, or e.g. 150MB, 24GiB); a lattice per linear layer is planned to fit it "
                   "(lift_ao.plan), by sensitivity from the calibration tokens")
    q.add_argument("--reserve", default="0", metavar="SIZE", help="with --memory-budget: bytes of it to keep free "
                   "besides the model and its KV cache (activations, other processes); default 0")
    q.add_argument("--kv-context", type=int, default=None, metavar="TOKENS", help="with --memory-budget: keep room "
                   "in it for the KV cache of this many tokens per sequence (as transformers caches them)")
    q.add_argument("--kv-batch", type=int, default=1, metavar="SEQUENCES", help="with --kv-context: sequences in "
                   "the KV cache (default 1)")
    q.add_argument("--kv-prefill", type=int, default=None, metavar="TOKENS", help="with --kv-context: the longest "
                   "prompt; sliding-window layers then hold max(window, TOKENS) (default: the context; 1 for a "
                   "StaticCache)")
    q.add_argument("--measure-sensitivity", action="store_true", help="with --calibrate and --memory-budget: plan "
                   "from sensitivities measured on a copy calibrated at the one lattice that fits the budget "
                   "(lift_ao.calibrated_sensitivity, on the 16384 calibration tokens after those the other stages "
                   "read) instead of the built-in score: at 2.4 bits 1.4 %% lower perplexity on the built-in model "
                   "for one more calibration (benchmarks/results/accuracy_w200_h100.md)")
    q.add_argument("--rate-window", type=parse_rate_window, default=DEFAULT_RATE_WINDOW, metavar="BITS",
                   help=f"with --memory-budget: the planned lattices stay within BITS of the uniform plan's rate "
                   f"(default {DEFAULT_RATE_WINDOW}; 'none': any). With --measure-sensitivity and --e2e-steps 1.0 measured "
                   "-0.6 %% perplexity at 2.4 bits on the built-in model (benchmarks/results/accuracy_w200_window_h200.md)")
    q.add_argument("--seed", type=int, default=0, help="seed of the input rotations (default 0)")
    q.add_argument("--beam-width", type=int, default=None, help="beam width of the nearest-code search (default: "
                   "the lattice's, 64 for D >= 40, else 32); wider is slower and a little more accurate (the "
                   "--measure-sensitivity probe, which only ranks layers, keeps the default)")
    q.add_argument("--lm-head", action="store_true", help="also quantize the output projection (not with --calibrate, "
                   "which codes the decoder blocks)")
    q.add_argument("--out", type=Path, default=None, help="save the quantized model (safetensors) to this directory; "
                   f"finished layers are kept in DIR/{PARTIAL_DIR} until then, so rerunning a killed run resumes it")
    q.add_argument("--overwrite", action="store_true", help=f"discard a DIR/{PARTIAL_DIR} left by a run with another "
                   "model, lattice or seed instead of refusing")
    q.add_argument("--calibrate", action="store_true", help="calibrated mode (lift_ao.calibrate): activation-aware "
                   "input scales and Hessian-aware rounding from the built-in calibration text, block by block")
    q.add_argument("--calibration-tokens", type=int, default=_CALIBRATION_TOKENS, help="calibration tokens with --calibrate, and "
                   "the activations that score the layers of a --memory-budget plan (default 16384, in sequences "
                   "of 512)")
    q.add_argument("--alpha", type=float, default=None, help="with --calibrate: strength of the activation-aware "
                   "input scales, 0 (none) to 1 (default 0.25, lift_ao.calibration.DEFAULT_ALPHA; results measured "
                   "before it was 0.25 used 0.5)")
    q.add_argument("--guided", action="store_true", help="with --calibrate: weight each token's share of a linear's "
                   "Hessian by how much the model's output feels that linear there (one forward and backward pass of "
                   "the whole model first; on the built-in model -0.6 %% perplexity with --calibration-tokens 262144, but "
                   "+1.5 %% with the default 16384: it needs many tokens; benchmarks/results/accuracy_w200_guided_h100.md)")
    q.add_argument("--refine-passes", type=int, default=None, help="with --calibrate: Gauss-Seidel passes over each "
                   "layer's column blocks after the Hessian-aware rounding (default 2: -2.2 %% perplexity on the "
                   "built-in model for about twice the rounding's search time, accuracy_refine_16k_cpu.md; but 0 "
                   "with --e2e-steps, after which they measured no gain, accuracy_w200_refine_h200.md; "
                   "lift_ao.rounding.default_refine_passes)")
    q.add_argument("--finetune-steps", type=int, default=0, help="with --calibrate: Adam steps per decoder block "
                   "tuning row and input scales against the full-precision block outputs (default 0: none; 16 is "
                   "what benchmarks/results/accuracy.md measured)")
    q.add_argument("--finetune-rotation", action="store_true", help="with --finetune-steps: the same steps also "
                   "tune each sibling group's rotation factors (stored per group)")
    q.add_argument("--code-rounds", type=int, default=0, help="with --calibrate: rounds of code fine-tuning per "
                   "decoder block before the scales (flip the codes the straight-through gradient ranks best, keep "
                   "what lowers the block's output error; default 0: none)")
    q.add_argument("--e2e-steps", type=int, default=0, help="with --calibrate: Adam steps of end-to-end fine-tuning "
                   "of all scales against the unquantized model's logits after calibration (needs the model twice "
                   "in memory; with --out a killed run resumes from its last held-out check; --e2e-held-out of its "
                   "sequences are held out and "
                   "the scales with the lowest KL there are kept; default 0: none)")
    q.add_argument("--e2e-tokens", type=int, default=None, help="with --e2e-steps: calibration tokens of the "
                   "end-to-end stage, the first of them the block stage's (default: --calibration-tokens; more "
                   "overfits less: 2.4 bits on the built-in model, 262144 → 917504 tokens: perplexity 16.90 → 16.30, "
                   "benchmarks/results/accuracy_fte1024_e2e917k_2bit4_h100.md)")
    q.add_argument("--e2e-held-out", type=float, default=_E2E_HELD_OUT, help="with --e2e-steps: fraction of the end-to-end "
                   "sequences held out to pick the kept scales (default 0.125)")
    q.add_argument("--e2e-tune-mapping", action="store_true", help="with --e2e-steps: also tune each sibling group's "
                   "lattice matrix M (stored per group: +0.027 bits/weight on the built-in model at 2.4 bits, "
                   "perplexity -1.1 %%; benchmarks/results/accuracy_w200_mapping_h100.md)")
    q.add_argument("--e2e-tune-rotation", action="store_true", help="with --e2e-steps: also tune each input "
                   "transform's rotation factors (stored per transform: ~+0.06 bits/weight on the built-in model, "
                   "~0.008 on an 8B one; there perplexity -1.1 %% at 2.4 bits, -0.1 %% at 3.0: not worth its bits on a model "
                   "that small; benchmarks/results/accuracy_w200_mapping_h100.md)")
    q.add_argument("--e2e-unquantized-lr", type=float, default=None, metavar="LR", help="with --e2e-steps: also tune "
                   "the unquantized parameters (embeddings and a tied head, norm weights) at this peak learning rate; "
                   "same size and format; 16 bytes per tuned number on the device (1e-4 on the built-in model: "
                   "perplexity -1.5 %% at 2.4 bits, -0.9 %% at "
                   "3.0; benchmarks/results/accuracy_w200_unquantized_h100.md; default: they stay)")
    q.add_argument("--e2e-compile", action=argparse.BooleanOptionalAction, default=None, help="with --e2e-steps: "
                   "run the decoder blocks through torch.compile during the end-to-end steps (default: on CUDA; "
                   "~1.5x faster on an H100 after a 25 s compilation, benchmarks/results/e2e_speed_h100.md)")
    q.add_argument("--skip-eval", action="store_true", help="do not measure perplexity")
    _add_eval_options(q)

    e = sub.add_parser("eval", help="perplexity of a model or a saved quantized checkpoint")
    e.add_argument("--model", default=None, help="'builtin' (the default) or a local Hugging Face model directory")
    e.add_argument("--checkpoint", type=Path, default=None, help="a directory written by `lift-ao quantize --out`")
    _add_eval_options(e)

    sub.add_parser("lattice", help="train or list lattices (same as python -m lift_ao.lattice)", add_help=False)

    pl = sub.add_parser("plan", help="choose per-layer lattices so a model fits a memory budget (no weights needed)",
                        description="Plan a model on the meta device from its Hugging Face config: what stays in high "
                                    "precision, the KV cache, and a lattice per linear layer filling the rest.")
    pl.add_argument("--hf-config", type=Path, default=None, help="a Hugging Face config.json or model directory")
    pl.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a built-in config with the real shapes")
    pl.add_argument("--budget", required=True, help="memory budget: bytes or a size such as 24GiB, 24GB, 512MiB")
    pl.add_argument("--reserve", default="0", help="bytes to keep free besides weights and KV cache (default 0)")
    pl.add_argument("--context", type=int, default=None, help="reserve the KV cache for this many tokens per sequence")
    pl.add_argument("--batch", type=int, default=1, help="sequences in the KV cache (default 1)")
    pl.add_argument("--prefill", type=int, default=None, metavar="TOKENS", help="with --context: the longest "
                    "prompt; sliding-window layers then hold max(window, TOKENS) (default: the context; 1 for a "
                    "StaticCache)")
    pl.add_argument("--allocation", choices=ALLOCATIONS, default="sensitivity", help="mixed widths by sensitivity "
                    "(default) or one lattice for all layers")
    pl.add_argument("--rate-window", type=parse_rate_window, default=DEFAULT_RATE_WINDOW, metavar="BITS",
                    help=f"sensitivity allocation: lattices within BITS of the uniform plan's rate (default "
                    f"{DEFAULT_RATE_WINDOW}; 'none': any)")
    pl.add_argument("--lm-head", action="store_true", help="also quantize the output projection")
    pl.add_argument("--layers", action="store_true", help="print the per-layer table, not only the totals")
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON document on stdout")

    b = sub.add_parser("bench", help="time one quantized linear layer against the dense one (random codes)",
                       description="Median time of F.linear with a LiftQuant weight and with a dense weight of the "
                                   "same shape, on this machine's device. Full benchmarks: benchmarks/ in the repository.")
    b.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("N", "K"),
                   help="output and input features (default 4096 4096)")
    b.add_argument("--batch", type=int, default=1, help="activation rows (tokens), default 1")
    b.add_argument("--bits", type=float, default=None, help="bits per weight, as for quantize (default 2.4)")
    b.add_argument("--lattice", default=None, help="a lattice name such as 24/10 instead of --bits")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="activation / logical weight dtype (default bfloat16)")

    for p in (q, e, b):
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lattice"]:  # its own parser (python -m lift_ao.lattice), under the same error handling
        from lift_ao.lattice import main as lattice_main

        command, run = "lattice", lambda: lattice_main(argv[1:])
    else:
        args = _parser().parse_args(argv)
        if getattr(args, "windows", None) == 0:
            args.windows = None
        commands = {"quantize": _cmd_quantize, "eval": _cmd_eval, "plan": _cmd_plan, "bench": _cmd_bench}
        command, run = args.command, lambda: commands[args.command](args)
    try:
        report = run()
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:  # bad input or a missing package: say the fix
        print(f"lift-ao {command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"lift-ao {command}: failed: {e}", file=sys.stderr)
        return 1
    if command == "lattice":
        return report  # its exit code; it printed its own output
    if args.json:
        # Strict JSON: a diverged model's inf/NaN perplexity becomes null, not the non-standard Infinity/NaN.
        print(json.dumps(_finite_or_none(report), indent=2, allow_nan=False))
    return 0


def _finite_or_none(value):
    """``value`` with every non-finite float (nested too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
