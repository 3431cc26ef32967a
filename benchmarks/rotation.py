"""The rotation u = Rᵀ pad(signs ⊙ x) on the GPU: how many programs share a row block of U (column
splits), and what another Kronecker factorisation of the padded input would cost.

    python benchmarks/rotation.py --out DIR    # ~3 min on an H100

For Llama-3-8B/70B K (4096, 14336, 28672) at 2.4, 2.0 and 3.0 bits (``Lattice.for_bits``: 48/20,
48/24, 72/24) and 1–1024 tokens, checks ``rotate_triton`` against a float64 reference, then times it
(autotuned) at one column split, at the most splits (every 32-column chunk its own program) and at
what it picks by default (``column_splits_of``); and, where it differs, with the factorisation of
least kernel work within 1 % more padding (:func:`least_work_factors`; NOTES_kernels.md round 16),
checked and timed at its own default splits. Each time is one CUDA-graph replay with L2 flushed.
Writes rotation.json and rotation.md to --out. (Up to a9bfd45 the last columns compared 16-row
programs with all: results/rotation_h100.md.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import kernel_speed as ks  # noqa: E402
from lift_ao.kernels import triton_lift  # noqa: E402
from lift_ao.kernels.triton_lift import column_splits_of, padded_columns_of_u, rotate_triton  # noqa: E402
from lift_ao import Lattice  # noqa: E402
from lift_ao.transform import make_rotation, padded_in_features, rotate  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


# Rotation error against float64 with bf16 activations (tf32 products): ~1.1e-3 relative at 2.4 bits,
# about one bf16 rounding of the activation itself.
TOLERANCE = 4e-3


def rotation_work(k1: int, k2: int) -> int:
    """Multiply-adds per token of the rotation kernel: k1²·K2P for P1ᵀV and k1·K2P² for the product
    with P2, which every program reads whole (K2P = k2 padded to a power of two)."""
    padded = padded_columns_of_u(k2)
    return k1 * k1 * padded + k1 * padded * padded


def least_work_factors(features: int, d: int, slack: float = 0.01) -> tuple[int, int, int]:
    """(Kp, k1, k2) of least :func:`rotation_work` among the multiples Kp of d from
    ``padded_in_features(features, d)``'s up to ``slack`` more, k1·k2 = Kp in either order (the kernel
    takes k1 > k2 too), neither factor more than 16× the other (as padded_in_features allows)."""
    kp, k1, k2 = padded_in_features(features, d)
    best = (rotation_work(k1, k2), kp, k1, k2)
    for size in range(kp, int(kp * (1 + slack)) + 1, d):
        for small in range(1, math.isqrt(size) + 1):
            if size % small == 0 and size // small <= 16 * small:
                for a, b in ((small, size // small), (size // small, small)):
                    best = min(best, (rotation_work(a, b), size, a, b))
    return best[1:]


def random_rotation(padded: int, k1: int, k2: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ±1 signs (padded,) and orthogonal factors (k1, k1), (k2, k2), float32 on ``device``."""
    g = torch.Generator().manual_seed(padded + k1)
    signs = torch.randint(0, 2, (padded,), generator=g).float() * 2 - 1
    left, right = (torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0].float() for k in (k1, k2))
    return signs.to(device), left.to(device), right.to(device)


def check_and_time(x, signs, left, right, splits, checks, label) -> float:
    """µs of rotate_triton at ``splits`` after checking it against float64 (appended to ``checks``)."""
    f64 = torch.float64
    ref = rotate(x.to(f64), *(t.to(f64) for t in (signs, left, right)))
    error = ks.relative_error(rotate_triton(x, signs, left, right, column_splits=splits), ref)
    checks.append(dict(label, error=error, ok=error < TOLERANCE))
    return ks.bench_us(lambda: rotate_triton(x, signs, left, right, column_splits=splits))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    results, checks = [], []
    for bits in (2.4, 2.0, 3.0):
        lattice = Lattice.for_bits(bits)
        for features in (4096, 14336, 28672):
            rotation = make_rotation(features, lattice.d, seed=0)
            signs, left, right = (t.cuda() for t in (rotation.signs, rotation.left, rotation.right))
            k1, k2 = left.shape[0], right.shape[0]
            other = least_work_factors(features, lattice.d)
            other_rotation = random_rotation(*other, signs.device) if other[1:] != (k1, k2) else None
            for tokens in TOKENS:
                x = torch.randn(tokens, features, device="cuda", dtype=ks.DTYPE)
                picked, most = column_splits_of(tokens, k1, k2, x.device)
                label = dict(bits=bits, lattice=lattice.name, features=features, tokens=tokens)
                entry = dict(label, factors=(k1, k2), picked=picked, us={}, other_factors=other)
                entry["us"][picked] = check_and_time(x, signs, left, right, picked, checks, dict(label, factors=(k1, k2)))
                entry["rows_per_program"] = triton_lift._rotate_tuned.best_config.kwargs["BLOCK_I"]
                for splits in sorted({1, most} - {picked}):
                    entry["us"][splits] = ks.bench_us(lambda: rotate_triton(x, signs, left, right, column_splits=splits))
                if other_rotation is not None:
                    other_splits, _ = column_splits_of(tokens, *other[1:], x.device)
                    entry["other_us"] = check_and_time(x, *other_rotation, other_splits, checks,
                                                       dict(label, factors=other[1:]))
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
             "| bits (lattice) | K | (k1, k2) | tokens | picked splits | µs, 1 split | µs, picked | µs, most splits | "
             "rows per program (autotuned) | least-work (Kp, k1, k2) | µs | / picked |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for e in results:
        most = max(e["us"])
        other = (f"{tuple(e['other_factors'])} | {e['other_us']:.1f} | {e['other_us'] / e['us'][e['picked']]:.2f}"
                 if "other_us" in e else "same | | ")
        lines.append(f"| {e['bits']} ({e['lattice']}) | {e['features']} | {tuple(e['factors'])} | {e['tokens']} | {e['picked']} | "
                     f"{e['us'][1]:.1f} | {e['us'][e['picked']]:.1f} | {e['us'][most]:.1f} ({most}) | "
                     f"{e['rows_per_program']} | {other} |")
    (out / "rotation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failed:
        sys.exit(f"{len(failed)} rotation checks failed: {failed}")


if __name__ == "__main__":
    main()
