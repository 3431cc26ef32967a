"""Codebook benchmark: MSE and encode speed of every shipped lattice.

For each shipped lattice: bits, MSE per coordinate on N(0,1) vectors (fixed seed) with
``nearest_codes``, the paper's MSE where given, the Shannon bound 2^(−2b), and the encode time per
1M weights on CPU with 2 threads. For 24/10, 16/8 and 32/16 also the MSE and time of the paper's
full enumeration (``enumerate_codes``) and of ``nearest_codes`` on the same subsample, so the
"within 1% of enumeration" claim is measured.

    python benchmarks/codebook.py [--vectors 200000] [--enum-blocks 2000]

Writes benchmarks/results/codebook.json and codebook.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from lift_ao.lattice import Lattice
from lift_ao.search import code_errors, enumerate_codes, nearest_codes
from machine import cpu_name, fastest

PAPER_MSE = {"16/8": 0.089, "32/16": 0.082, "30/14": 0.070, "24/10": 0.053, "32/20": 0.146}
ENUMERATED = ("24/10", "16/8", "32/16")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=200_000, help="N(0,1) blocks for the MSE")
    parser.add_argument("--timing-weights", type=int, default=1_000_000, help="weights encoded for the timing")
    parser.add_argument("--enum-blocks", type=int, default=1000, help="subsample for enumerate_codes (24/10, 16/8)")
    parser.add_argument("--enum-blocks-32", type=int, default=200, help="subsample for enumerate_codes at 32/16")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (minimum is reported)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    rows = []
    for lattice in Lattice.shipped():
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.vectors, lattice.d, generator=gen)
        codes = nearest_codes(x, lattice)
        mse = float(code_errors(x, codes, lattice).mean()) / lattice.d
        x_time = torch.randn(args.timing_weights // lattice.d, lattice.d, generator=gen)
        _, seconds, cpu_seconds = fastest(lambda: nearest_codes(x_time, lattice), args.repeats)
        seconds_per_1m = seconds * 1e6 / x_time.numel()
        row = dict(
            lattice=lattice.name, d=lattice.d, D=lattice.D, bits=round(lattice.bits, 4), mse=mse,
            paper_mse=PAPER_MSE.get(lattice.name), shannon=2 ** (-2 * lattice.bits),
            nearest_s_per_1m_weights=seconds_per_1m,
            nearest_cpu_s_per_1m_weights=cpu_seconds * 1e6 / x_time.numel(),
            load_average_1min=os.getloadavg()[0],
            fingerprint=lattice.fingerprint,
        )
        if lattice.name in ENUMERATED:
            n = args.enum_blocks_32 if lattice.D - lattice.d > 14 else args.enum_blocks
            sub = x[:n]
            enum_codes, enum_seconds, _ = fastest(lambda: enumerate_codes(sub, lattice), 1)
            enum_mse = float(code_errors(sub, enum_codes, lattice).mean()) / lattice.d
            fast_sub_mse = float(code_errors(sub, codes[:n], lattice).mean()) / lattice.d
            row.update(
                enum_blocks=n, enum_mse=enum_mse, nearest_mse_on_enum_blocks=fast_sub_mse,
                nearest_over_enum=fast_sub_mse / enum_mse,
                enum_s_per_1m_weights=enum_seconds * 1e6 / sub.numel(),
            )
        rows.append(row)
        print(json.dumps(row), flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    device = f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads (shared machine)"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "codebook.json").write_text(json.dumps(dict(command=command, device=device, rows=rows), indent=1))

    lines = [
        "# Codebook benchmark", "", f"Command: `{command}`  ", f"Device: {device}  ",
        f"MSE per coordinate on {args.vectors} N(0,1) blocks (seed {args.seed}) with `nearest_codes`; "
        f"time = fastest of {args.repeats} encodes of {args.timing_weights} weights.", "",
        "The CPU is shared with other jobs: the 1-minute load average at each timing is given "
        "(2.0 = both cores busy with our own threads; above that, others compete), and the process "
        "CPU seconds of the same encode (both threads): CPU / 2 estimates the wall time on idle cores.", "",
        "| lattice | bits | MSE | paper | Shannon 2^(-2b) | MSE / Shannon | wall s / 1M weights | CPU s / 1M | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = f"{r['paper_mse']:.3f}" if r["paper_mse"] is not None else "—"
        lines.append(
            f"| {r['lattice']} | {r['bits']:.3f} | {r['mse']:.4f} | {paper} | {r['shannon']:.4f} | "
            f"{r['mse'] / r['shannon']:.3f} | {r['nearest_s_per_1m_weights']:.2f} | "
            f"{r['nearest_cpu_s_per_1m_weights']:.2f} | {r['load_average_1min']:.1f} |"
        )
    lines += [
        "", "Against the paper's full enumeration (`enumerate_codes`, 2^(D−d) paddings) on a subsample:", "",
        "| lattice | blocks | nearest MSE | enumeration MSE | ratio | nearest s / 1M | enumeration s / 1M |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "enum_mse" in r:
            lines.append(
                f"| {r['lattice']} | {r['enum_blocks']} | {r['nearest_mse_on_enum_blocks']:.4f} | "
                f"{r['enum_mse']:.4f} | {r['nearest_over_enum']:.4f} | {r['nearest_s_per_1m_weights']:.2f} | "
                f"{r['enum_s_per_1m_weights']:.0f} |"
            )
    (RESULTS / "codebook.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
