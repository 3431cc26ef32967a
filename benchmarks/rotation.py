"""The rotation u = Rᵀ pad(signs ⊙ x) on the GPU: what the autotuner picks (row tile and column
splits) against every split count it could take.

    python benchmarks/rotation.py --out DIR                           # all rows: ~15 min on an H100
    python benchmarks/rotation.py --bits 2.4 --tokens 1,8,64 --out DIR  # part of it, within one device call

(Every split count is its own tuning key with its own compiled candidates: 13 rows took 216 s in
round 17.)

For Llama-3-8B/70B K (4096, 14336, 28672) at 2.4, 2.0 and 3.0 bits (``Lattice.for_bits``: 48/20,
48/24, 72/24; the shipped rotation of ``make_rotation``) and 1–256 tokens, checks ``rotate_triton``
against a float64 reference, then times it autotuned (row tile and split count) and, up to the
kernel's split-token limit, with each split count fixed (row tile autotuned). Each time is one
CUDA-graph replay with L2 flushed. Writes rotation.json and rotation.md to --out after every row, so a
run cut short keeps what it measured. (Up to 913312b the script also timed the Kronecker factorisation
of least kernel work; its results: results/rotation_factors_h100.md. Up to a9bfd45 it compared 16-row
programs with all: results/rotation_h100.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kernel_speed as ks  # noqa: E402
from lift_ao.kernels import triton_lift  # noqa: E402
from lift_ao.kernels.triton_lift import most_column_splits, rotate_triton  # noqa: E402
from lift_ao import Lattice  # noqa: E402
from lift_ao.transform import make_rotation, rotate  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# Rotation error against float64 with bf16 activations (tf32 products): ~1.1e-3 relative at 2.4 bits,
# about one bf16 rounding of the activation itself.
TOLERANCE = 4e-3


def write_results(out: Path, checks: list[dict], results: list[dict]) -> None:
    """rotation.json and rotation.md in ``out`` from the checks and timed rows so far."""
    failed = [c for c in checks if not c["ok"]]
    device = torch.cuda.get_device_name()
    (out / "rotation.json").write_text(json.dumps(dict(device=device, command=" ".join(sys.argv), checks=checks,
                                                       results=results), indent=1))
    lines = [f"# The rotation on {device} (bf16 activations)", "",
             f"Command: `python {' '.join(sys.argv)}`; µs = median of do_bench over a CUDA-graph replay (L2 flushed). "
             f"Checks of the autotuned kernel against float64 (relative error < {TOLERANCE}): "
             f"{len(checks) - len(failed)}/{len(checks)} passed; largest error "
             f"{max(c['error'] for c in checks):.1e}. Fixed split counts are timed up to "
             f"{triton_lift._MOST_SPLIT_TOKENS} tokens (the autotuner takes one split above).", "",
             "| bits (lattice) | K | (k1, k2) | tokens | autotuned µs | its splits | its rows per program | "
             f"µs at {' / '.join(map(str, triton_lift._SPLIT_COUNTS))} splits (row tile autotuned) | "
             "autotuned / best fixed |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for e in results:
        fixed = " / ".join(f"{e['fixed_us'][s]:.1f}" if s in e["fixed_us"] else "–" for s in triton_lift._SPLIT_COUNTS)
        ratio = f"{e['us'] / min(e['fixed_us'].values()):.2f}" if e["fixed_us"] else ""
        lines.append(f"| {e['bits']} ({e['lattice']}) | {e['features']} | {tuple(e['factors'])} | {e['tokens']} | "
                     f"{e['us']:.1f} | {e['splits']} | {e['rows_per_program']} | {fixed} | {ratio} |")
    (out / "rotation.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--bits", default="2.4,2.0,3.0", help="comma list of bit-widths (Lattice.for_bits)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token counts")
    args = parser.parse_args()
    tokens_list = [int(t) for t in args.tokens.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("rotation.py times the rotation kernel on a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, checks = [], []
    f64 = torch.float64
    for bits in (float(b) for b in args.bits.split(",")):
        lattice = Lattice.for_bits(bits)
        for features in (4096, 14336, 28672):
            rotation = make_rotation(features, lattice.d, seed=0)
            signs, left, right = (t.cuda() for t in (rotation.signs, rotation.left, rotation.right))
            k1, k2 = left.shape[0], right.shape[0]
            for tokens in tokens_list:
                x = torch.randn(tokens, features, device="cuda", dtype=ks.DTYPE)
                label = dict(bits=bits, lattice=lattice.name, features=features, tokens=tokens, factors=(k1, k2))
                ref = rotate(x.to(f64), *(t.to(f64) for t in (signs, left, right)))
                error = ks.relative_error(rotate_triton(x, signs, left, right), ref)
                checks.append(dict(label, error=error, ok=error < TOLERANCE))
                picked = triton_lift._rotate_tuned.best_config.kwargs
                entry = dict(label, us=ks.bench_us(lambda: rotate_triton(x, signs, left, right)),
                             splits=picked["COLUMN_SPLITS"], rows_per_program=picked["BLOCK_I"], fixed_us={})
                if tokens <= triton_lift._MOST_SPLIT_TOKENS:
                    for splits in triton_lift._SPLIT_COUNTS:
                        if splits <= most_column_splits(k2):
                            entry["fixed_us"][splits] = ks.bench_us(
                                lambda: rotate_triton(x, signs, left, right, column_splits=splits))
                results.append(entry)
                print(entry, flush=True)
                write_results(out, checks, results)
    print((out / "rotation.md").read_text())
    failed = [c for c in checks if not c["ok"]]
    if failed:
        sys.exit(f"{len(failed)} rotation checks failed: {failed}")


if __name__ == "__main__":
    main()
