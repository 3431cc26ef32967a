"""Memory-budget plans for real model shapes, and mixed vs uniform widths on the built-in model.

    python benchmarks/budget.py                      # plans -> benchmarks/results/budget_plans.{json,md}
    python benchmarks/budget.py --perplexity --device cuda
        # SmolLM2-135M: uniform 2.4 bits vs a sensitivity-driven mixed plan of the same bytes
        # -> benchmarks/results/budget_perplexity.{json,md}

The plans are made on the meta device from the models' Hugging Face configs (lift_ao.budget.PRESETS,
the real shapes): nothing is downloaded and no weight is touched, so they take seconds on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import lift_ao
from lift_ao.budget import PRESETS, plan
from lift_ao.lattice import Lattice

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30

# (preset, budget, KV cache): the three targets, then the same budgets with a KV cache
# (4k tokens for the 8B: 8k would leave less than the smallest rate needs with lm_head in bf16).
CASES = [
    ("llama3-70b", "24GiB", None),
    ("qwen2.5-32b", "12GiB", None),
    ("llama3-8b", "4GiB", None),
    ("llama3-70b", "24GiB", dict(context=8192, batch=1)),
    ("qwen2.5-32b", "12GiB", dict(context=8192, batch=1)),
    ("llama3-8b", "4GiB", dict(context=4096, batch=1)),
]


def _command() -> str:
    return "python benchmarks/budget.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "lattices": [lat.name for lat in Lattice.shipped()]}


def run_plans() -> dict:
    """Plan every case with both allocations; returns the JSON document (per-layer tables omitted)."""
    rows = []
    for preset, budget, kv_cache in CASES:
        for allocation in ("sensitivity", "uniform"):
            began = time.perf_counter()
            result = plan(PRESETS[preset], budget, kv_cache=kv_cache, allocation=allocation)
            seconds = time.perf_counter() - began
            summary = replace(result, model_name=preset).to_dict()
            summary.pop("layers")
            summary.update(budget=budget, plan_seconds=round(seconds, 2))
            rows.append(summary)
            print(replace(result, model_name=preset).summary(), f"\n  planned in {seconds:.2f} s\n", flush=True)
    return {"command": _command(), "environment": _environment(), "plans": rows}


def plans_markdown(document: dict) -> str:
    lines = [
        "# Memory-budget plans (meta device, real shapes)",
        "",
        f"Command: `{document['command']}`; shipped lattices: {', '.join(document['environment']['lattices'])}.",
        "High precision = embeddings, lm_head, norms, buffers (bf16). Bits: code bits D/d averaged over the",
        "quantized weights, and storage bits with row scales, lattices and rotations. Headroom = budget − total.",
        "",
        "| model | budget | KV cache | allocation | high precision GiB | quantized GiB | KV GiB | total bytes "
        "| headroom | code bits | bits/weight | lattices (layers) | plan s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in document["plans"]:
        kv = f"{row['kv_cache']['context']} tok × {row['kv_cache']['batch']}" if row["kv_cache"] else "none"
        mix = ", ".join(f"{name} ({v['layers']})" for name, v in row["lattices"].items())
        lines.append(
            f"| {row['model']} | {row['budget']} | {kv} | {row['allocation']} | {row['high_precision_bytes'] / GiB:.3f} "
            f"| {row['quantized_bytes'] / GiB:.3f} | {row['kv_cache_bytes'] / GiB:.3f} | {row['total_bytes']} "
            f"| {row['headroom_bytes'] / 2**20:.2f} MiB ({100 * row['headroom_fraction']:.4f}%) | {row['code_bits']:.4f} "
            f"| {row['bits_per_weight']:.4f} | {mix} | {row['plan_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def run_perplexity(args) -> dict:
    """Uniform ``--bits`` vs a sensitivity plan with the same bytes, on the built-in SmolLM2-135M."""
    from lift_ao.data import builtin_text, load_default_model, tokenize_text
    from lift_ao.evaluate import perplexity

    model, tokenizer = load_default_model(device=args.device)
    evaluation = tokenize_text(tokenizer, builtin_text("evaluation"))
    calibration_tokens = tokenize_text(tokenizer, builtin_text("calibration"), max_tokens=args.calib_sequences * 512)
    calibration = [calibration_tokens[i * 512:(i + 1) * 512][None] for i in range(args.calib_sequences)]

    def score(m):
        return perplexity(m, evaluation, context_length=512, max_windows=args.windows, progress=False).to_dict()

    report = {"command": _command(), "environment": _environment(), "device": args.device, "windows": args.windows,
              "calibration_sequences": args.calib_sequences, "reference": {"bytes": lift_ao.footprint(model)}}
    report["reference"]["perplexity"] = score(model)
    print(f"reference: {report['reference']}", flush=True)

    uniform = copy.deepcopy(model)
    began = time.perf_counter()
    lift_ao.quantize(uniform, lift_ao.liftquant(bits=args.bits), progress=False)
    budget = lift_ao.footprint(uniform)
    report["uniform"] = {"lattice": Lattice.for_bits(args.bits).name, "bytes": budget,
                         "quantize_seconds": round(time.perf_counter() - began, 1), "perplexity": score(uniform)}
    print(f"uniform: {report['uniform']}", flush=True)
    del uniform

    mixed_plan = plan(model, budget, calibration=calibration)
    mixed = copy.deepcopy(model)
    began = time.perf_counter()
    lift_ao.quantize(mixed, lift_ao.liftquant(memory_budget=budget), calibration=calibration, progress=False)
    report["mixed"] = {
        "bytes": lift_ao.footprint(mixed), "planned_bytes": mixed_plan.model_bytes, "code_bits": mixed_plan.code_bits,
        "bits_per_weight": mixed_plan.bits_per_weight,
        "lattices": {name: n for name, (n, _) in mixed_plan.lattice_counts().items()},
        "quantize_seconds": round(time.perf_counter() - began, 1), "perplexity": score(mixed),
    }
    print(f"mixed: {report['mixed']}", flush=True)
    return report


def perplexity_markdown(report: dict) -> str:
    ref, uni, mix = report["reference"], report["uniform"], report["mixed"]
    return "\n".join([
        "# Mixed (sensitivity) vs uniform widths at the same bytes — SmolLM2-135M",
        "",
        f"Command: `{report['command']}` on {report['device']}; {report['windows']} windows of 512 tokens of the "
        f"built-in evaluation split; sensitivity from {report['calibration_sequences']} calibration sequences of 512.",
        "",
        "| model | bytes | code bits | perplexity |",
        "|---|---|---|---|",
        f"| reference (dequantized Q4_1, fp32) | {ref['bytes']} | — | {ref['perplexity']['perplexity']:.3f} |",
        f"| uniform {uni['lattice']} | {uni['bytes']} | {Lattice.load(uni['lattice']).bits:.4f} | {uni['perplexity']['perplexity']:.3f} |",
        f"| mixed, same budget ({', '.join(f'{k}×{v}' for k, v in mix['lattices'].items())}) | {mix['bytes']} "
        f"| {mix['code_bits']:.4f} | {mix['perplexity']['perplexity']:.3f} |",
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perplexity", action="store_true", help="also run the SmolLM2-135M comparison (slow on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits", type=float, default=2.4, help="the uniform width; the mixed plan gets its bytes")
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens (default 32)")
    parser.add_argument("--calib-sequences", type=int, default=8, help="calibration sequences of 512 tokens")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)

    document = run_plans()
    (RESULTS / "budget_plans.json").write_text(json.dumps(document, indent=2) + "\n")
    (RESULTS / "budget_plans.md").write_text(plans_markdown(document))
    if args.perplexity:
        report = run_perplexity(args)
        (RESULTS / "budget_perplexity.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "budget_perplexity.md").write_text(perplexity_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
