"""Which configs the autotuners pick in one decode process, how they timed each, and the decode speed.

    python benchmarks/autotune_picks.py --name p1                         # tune as usual, record the picks
    python benchmarks/autotune_picks.py --name p2 --pin $OUT/picks_p1.json  # reuse p1's picks, no tuning

Runs ``benchmarks/decode.py``'s :func:`measure` for one model and variant in this process (CUDA) with
every lift_ao autotuner (lookup, rotation, ±1 GEMM, rebuild) wrapped: for each new key it records the
pick, each config's median time by the autotuner's own timer, and the same config re-timed with a 10×
budget. ``--pin`` fills the caches from an earlier process's file before anything runs, so a fresh
process can replay another's picks: if tokens/s follows the picks, the picks explain a spread between
processes (NOTES_kernels.md, round 16). Writes ``picks_<name>.json`` under ``--out``.

The autotuners cache their timings on disk (``triton_matmul.autotune``): a key already in
``TRITON_CACHE_DIR`` is not timed again, so its record has the pick and no timings. Point
``TRITON_CACHE_DIR`` at an empty directory to time every key.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))
import decode  # noqa: E402
from lift_ao.kernels import triton_dequant, triton_lift, triton_lut, triton_matmul  # noqa: E402

TUNERS = {"lookup": triton_lut._lookup_tuned, "rotate": triton_lift._rotate_tuned,
          "gemm": triton_matmul._lifted_matmul_tuned, "rebuild": triton_dequant._rebuild_tuned}


def config_name(config) -> str:
    """A config as one comparable string (its kwargs, warps, stages, register cap)."""
    return f"{config.kwargs} warps={config.num_warps} stages={config.num_stages} maxnreg={config.maxnreg}"


def record_picks(tuner, record: dict) -> None:
    """Wrap ``tuner`` so every key it tunes adds {pick, timings: [(config, ms, ms at 10× budget)]} to
    ``record`` (key as a string)."""
    bench, run = tuner._bench, tuner.run
    timings: list = []

    def timed_bench(*args, config, **meta):
        quick = bench(*args, config=config, **meta)
        timer = tuner.do_bench
        tuner.__dict__["do_bench"] = lambda fn, quantiles: timer(fn, quantiles, budget_ms=200)
        try:
            longer = bench(*args, config=config, **meta)
        finally:
            tuner.__dict__["do_bench"] = timer
        timings.append((config_name(config), quick[0], longer[0]))
        return quick

    def recorded_run(*args, **kwargs):
        known = set(tuner.cache)
        timings.clear()
        result = run(*args, **kwargs)
        for key in set(tuner.cache) - known:
            record[repr(key)] = {"pick": config_name(tuner.cache[key]), "timings": list(timings)}
        return result

    tuner._bench, tuner.run = timed_bench, recorded_run


def pin_picks(tuner, picks: dict) -> None:
    """Fill ``tuner``'s cache with an earlier process's picks (keys as written by :func:`record_picks`)."""
    by_name = {config_name(c): c for c in tuner.configs}
    for key, entry in picks.items():
        tuner.cache[eval(key, {"__builtins__": {}})] = by_name[entry["pick"]]  # a tuple of ints and strings


def gpu_clocks() -> str:
    """SM and memory clocks, temperature, power and throttle reasons, from nvidia-smi."""
    query = "clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_event_reasons.active"
    return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="this process's name (output picks_<name>.json)")
    parser.add_argument("--pin", default=None, help="a picks_*.json whose picks this process reuses")
    parser.add_argument("--model", default="llama3-8b", choices=list(decode.MODEL_CONFIGS))
    parser.add_argument("--variant", default="lift2.4")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("autotune_picks.py needs a CUDA GPU: the autotuners only run there")
    record = {name: {} for name in TUNERS}
    for name, tuner in TUNERS.items():
        record_picks(tuner, record[name])
    if args.pin:
        pinned = json.load(open(args.pin))["tuners"]
        for name, tuner in TUNERS.items():
            pin_picks(tuner, pinned[name])
    settings = types.SimpleNamespace(freezing=True, seed=0, layers=None, prompt_len=128, new_tokens=args.new_tokens,
                                     repeats=3, profile=0)
    decode._configure(settings)
    clocks_before = gpu_clocks()
    result = decode.measure(args.model, decode.all_variants()[args.variant], settings, torch.device("cuda"))
    report = {"name": args.name, "pinned_from": args.pin, "model": args.model, "variant": args.variant,
              "tokens_per_s": result.tokens_per_s, "tokens_per_s_runs": result.tokens_per_s_runs,
              "first_tokens": result.first_tokens, "clocks_before": clocks_before, "clocks_after": gpu_clocks(),
              "tuners": record}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"picks_{args.name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{args.name}: {result.tokens_per_s:.1f} tokens/s {'(pinned from ' + args.pin + ')' if args.pin else ''}")
    for name in ("lookup", "rotate"):
        for key, entry in record[name].items():
            print(f"  {name} {key[:60]}: {entry['pick']}  " + "  ".join(f"{ms * 1e3:.1f}/{longer * 1e3:.1f} µs"
                                                                         for _, ms, longer in entry["timings"]))


if __name__ == "__main__":
    main()
