"""The rotation u = Rᵀ pad(signs ⊙ x) on the GPU: how many programs share a row block of U (column
splits), and how many rows of U a program takes.

    python benchmarks/rotation.py --out DIR    # ~3 min on an H100

For Llama-3-8B/70B K (4096, 14336, 28672) at 2.4 and 2.0 bits and 1–1024 tokens, checks
``rotate_triton`` against a float64 reference, then times it at one column split, at the most splits
(every 32-column chunk its own program) and at what ``triton_lift._column_splits`` picks, and, at the
picked splits, autotuned over only the 16-row configs (the kernel before round 15) instead of all,
each as one CUDA-graph replay with L2 flushed. Writes rotation.json and rotation.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import kernel_speed as ks  # noqa: E402
from lift_ao.kernels import triton_lift  # noqa: E402
from lift_ao.kernels.triton_lift import _column_splits, rotate_triton  # noqa: E402
from lift_ao.kernels.triton_matmul import quick_bench, sm_count  # noqa: E402
from lift_ao.transform import rotate  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


# Rotation error against float64 with bf16 activations (tf32 products): ~1.1e-3 relative at 2.4 bits,
# about one bf16 rounding of the activation itself.
TOLERANCE = 4e-3

# The autotuner over the 16-row configs only, as before 32- and 64-row programs were added.
_rotate_16_rows = triton.autotune(configs=[c for c in triton_lift._ROTATE_CONFIGS if c.kwargs["BLOCK_I"] == 16],
                                  key=triton_lift._rotate_tuned.keys, do_bench=quick_bench)(triton_lift._rotate_kernel)


def rotate_16_rows(x, layer, splits):
    """rotate_triton with its autotuner restricted to 16 rows of U per program."""
    tuned, triton_lift._rotate_tuned = triton_lift._rotate_tuned, _rotate_16_rows
    try:
        return rotate_triton(x, layer.signs, layer.left, layer.right, column_splits=splits)
    finally:
        triton_lift._rotate_tuned = tuned


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    results, checks = [], []
    for bits in (2.4, 2.0):
        for features in (4096, 14336, 28672):
            layer = ks.LiftedLayer(16, features, bits)
            k1, k2 = layer.factors
            most = max(16, triton.next_power_of_2(k2)) // 32
            for tokens in TOKENS:
                x = torch.randn(tokens, features, device="cuda", dtype=ks.DTYPE)
                f64 = torch.float64
                ref = rotate(x.to(f64), *(t.to(f64) for t in (layer.signs, layer.left, layer.right)))
                picked = _column_splits(tokens * triton.cdiv(k1, 16), most, sm_count(x.device))
                error = ks.relative_error(rotate_triton(x, layer.signs, layer.left, layer.right, column_splits=picked), ref)
                checks.append(dict(bits=bits, features=features, tokens=tokens, error=error, ok=error < TOLERANCE))
                entry = dict(bits=bits, features=features, factors=(k1, k2), tokens=tokens, picked=picked, us={},
                             rows_per_program=triton_lift._rotate_tuned.best_config.kwargs["BLOCK_I"])
                for splits in sorted({1, picked, most}):
                    entry["us"][splits] = ks.bench_us(lambda: rotate_triton(
                        x, layer.signs, layer.left, layer.right, column_splits=splits))
                entry["rows16_us"] = ks.bench_us(lambda: rotate_16_rows(x, layer, picked))
                results.append(entry)
                print(entry, flush=True)
    failed = [c for c in checks if not c["ok"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rotation.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), command=" ".join(sys.argv),
                                                       checks=checks, results=results), indent=1))
    lines = [f"# The rotation on {torch.cuda.get_device_name()} (bf16 activations)", "",
             f"Command: `python {' '.join(sys.argv)}`; µs = median of do_bench over a CUDA-graph replay (L2 flushed). "
             f"Checks against float64 (relative error < {TOLERANCE}): {len(checks) - len(failed)}/{len(checks)} passed; "
             "largest error " + f"{max(c['error'] for c in checks):.1e}.", "",
             "| bits | K | (k1, k2) | tokens | picked splits | µs, 1 split | µs, picked | µs, most splits | "
             "rows per program (autotuned) | µs, picked, 16 rows per program | 16 rows / autotuned |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in results:
        most = max(e["us"])
        lines.append(f"| {e['bits']} | {e['features']} | {tuple(e['factors'])} | {e['tokens']} | {e['picked']} | "
                     f"{e['us'][1]:.1f} | {e['us'][e['picked']]:.1f} | {e['us'][most]:.1f} ({most}) | "
                     f"{e['rows_per_program']} | {e['rows16_us']:.1f} | {e['rows16_us'] / e['us'][e['picked']]:.2f} |")
    (out / "rotation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failed:
        sys.exit(f"{len(failed)} rotation checks failed: {failed}")


if __name__ == "__main__":
    main()
