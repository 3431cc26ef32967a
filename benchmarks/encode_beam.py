"""Beam width of the fast search: MSE and time per 1M weights for several K, one run, same blocks.

For each lattice and each beam width K: ``nearest_codes(x, lattice, beam_width=K)`` on the same
N(0,1) blocks (fixed seed), MSE per coordinate, time per 1M weights (fastest of ``--repeats``), and
both as ratios to ``--base`` (K = 32, the width before per-lattice defaults). Also the information
bits ``−½·log2(MSE)`` and the gap to the rate (issue 9's target: gap ≤ 0.2 bit).

    python benchmarks/encode_beam.py --device cpu --threads 1            # CPU, single thread
    python benchmarks/encode_beam.py --device cuda --blocks 100000       # GPU

Writes ``encode_beam_<device>.{json,md}`` under ``--out`` (default benchmarks/results). Runs
without torchao (see torch_only.py).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_only  # noqa: E402

torch_only.install()
from lift_ao.lattice import Lattice  # noqa: E402
from lift_ao.search import code_errors, default_beam_width, nearest_codes  # noqa: E402
from encoder import device_name, write_results  # noqa: E402
from machine import fastest  # noqa: E402

LATTICES = ("24/10", "24/8", "32/16", "32/10", "40/16", "48/24", "48/20", "48/16@256")
WIDTHS = (16, 32, 64, 128)
RESULTS = Path(__file__).resolve().parent / "results"


def measure(lattice: Lattice, widths, device: torch.device, blocks: int, repeats: int, seed: int) -> list[dict]:
    """Rows (one per K) for one lattice: MSE per coordinate on ``blocks`` (B, d) N(0,1) blocks and
    seconds per 1M weights, on ``device``."""
    lat = lattice.to(device)
    x = torch.randn(blocks, lat.d, generator=torch.Generator().manual_seed(seed)).to(device)
    rows = []
    for K in widths:
        codes = nearest_codes(x, lat, beam_width=K)
        _, seconds, cpu_seconds = fastest(lambda: nearest_codes(x, lat, beam_width=K), repeats, device)
        mse = float(code_errors(x, codes, lat).double().mean()) / lat.d
        info_bits = -0.5 * math.log2(mse)
        rows.append(dict(
            lattice=lat.name, bits=round(lat.bits, 4), K=K, blocks=blocks, mse=mse,
            info_bits=info_bits, gap_bits=lat.bits - info_bits, s_per_1m=seconds * 1e6 / x.numel(),
            cpu_s_per_1m=cpu_seconds * 1e6 / x.numel(),
            default=K == default_beam_width(lat), fingerprint=lat.fingerprint,
        ))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lattices", default=",".join(LATTICES),
                        help="comma-separated names; NAME@K1+K2 adds widths for that lattice, e.g. 48/16@256")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--base", type=int, default=32, help="K the ratios are taken against")
    parser.add_argument("--blocks", type=int, default=20_000, help="N(0,1) blocks per lattice (same for every K)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = sorted({int(k) for k in args.widths.split(",")} | {args.base})
    device_desc = device_name(device)
    rows = []
    for entry in args.lattices.split(","):
        name, _, extra = entry.partition("@")
        lattice_widths = sorted(set(widths) | {int(k) for k in extra.split("+") if k})
        lattice_rows = measure(Lattice.load(name), lattice_widths, device, args.blocks, args.repeats, args.seed)
        base = next(r for r in lattice_rows if r["K"] == args.base)
        for r in lattice_rows:
            r["mse_ratio"], r["time_ratio"] = r["mse"] / base["mse"], r["s_per_1m"] / base["s_per_1m"]
            r["cpu_time_ratio"] = r["cpu_s_per_1m"] / base["cpu_s_per_1m"]
        rows += lattice_rows

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/encode_beam.py", *(argv or sys.argv[1:])])
    out = Path(args.out)
    stem = f"encode_beam_{device.type}"
    payload = dict(command=command, device=device_desc, rows=rows)
    lines = [
        f"# Beam width of `nearest_codes` ({device.type})", "", f"Command: `{command}`  ", f"Device: {device_desc}  ",
        f"{args.blocks} N(0,1) blocks per lattice (seed {args.seed}), the same blocks for every K. MSE per "
        f"coordinate; ratios against K = {args.base}; info bits = −½·log2(MSE), gap = rate − info bits "
        "(issue 9's target: ≤ 0.2). Time = fastest of the repeats; on a shared CPU read the ratios, "
        "not the absolute times; process CPU seconds are steadier than wall under load. **bold K** = "
        "the lattice's default (`default_beam_width`).", "",
        "| lattice | bits | K | MSE | MSE ratio | info bits | gap | wall s / 1M | CPU s / 1M | wall ratio | CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = f"**{r['K']}**" if r["default"] else str(r["K"])
        lines.append(
            f"| {r['lattice']} | {r['bits']:.3f} | {k} | {r['mse']:.5f} | {r['mse_ratio']:.4f} | "
            f"{r['info_bits']:.3f} | {r['gap_bits']:.3f} | {r['s_per_1m']:.3f} | {r['cpu_s_per_1m']:.3f} | "
            f"{r['time_ratio']:.2f} | {r['cpu_time_ratio']:.2f} |"
        )
    write_results(out, stem, payload, lines)


if __name__ == "__main__":
    main()
