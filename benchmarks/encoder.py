"""Encoder benchmark: the fast search (``nearest_codes``) against the paper's full enumeration.

For 16/8, 32/16, 24/10, 30/14 and 24/8: time per 1M weights and MSE per coordinate of
``nearest_codes`` on N(0,1) blocks, and of ``enumerate_codes`` (every padding in {±1}^(D−d)) on a
subsample of the same blocks, in the same run on the same device; for D ≤ 16 also the true nearest
neighbour (``exhaustive_codes``). Times are the fastest of the repeats (``machine.fastest``: on CUDA
after a warm-up, synchronised; the CPU may be shared). results/encoder_cuda.md (2026-11-25 16:05) timed
CUDA as the median of CUDA events.

    python benchmarks/encoder.py --device cuda                       # GPU
    python benchmarks/encoder.py --device cpu --enum-blocks 500      # CPU: small sample, ratios

Writes benchmarks/results/encoder_{cuda,cpu}.{json,md} (or under --out). Runs without torchao
(see torch_only.py), so it also runs on a machine with only torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_only  # noqa: E402
from machine import cpu_name, fastest  # noqa: E402

torch_only.install()
from lift_ao.lattice import Lattice  # noqa: E402
from lift_ao.search import code_errors, enumerate_codes, exhaustive_codes, nearest_codes  # noqa: E402

LATTICES = ("16/8", "32/16", "24/10", "30/14", "24/8")
RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    """The device a benchmark ran on, for its results: GPU name and torch version, or the CPU
    model, torch version, thread count and the 1-minute load average (the CPU may be shared)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = cpu_name()
    return (f"CPU: {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"1-min load {os.getloadavg()[0]:.1f} at start (shared machine)")


def bench(lattice: Lattice, device: torch.device, weights: int, enum_blocks: int, repeats: int, seed: int) -> dict:
    """One row: nearest_codes on ``weights`` weights, enumeration (and exhaustive, D ≤ 16) on the
    first ``enum_blocks`` blocks (fewer when D − d > 14: the enumeration costs 2^(D−d))."""
    lat = lattice.to(device)
    x = torch.randn(weights // lat.d, lat.d, generator=torch.Generator().manual_seed(seed)).to(device)
    codes = nearest_codes(x, lat)
    _, nearest_s, _ = fastest(lambda: nearest_codes(x, lat), repeats, device)
    n = enum_blocks // 4 if lat.D - lat.d > 14 else enum_blocks
    sub = x[:n]
    # Big chunks on CUDA (fewer launches), the function's defaults on CPU.
    enum_kw = dict(chunk_size=512, padding_chunk=8192) if device.type == "cuda" else {}
    enum = enumerate_codes(sub, lat, **enum_kw)
    _, enum_s, _ = fastest(lambda: enumerate_codes(sub, lat, **enum_kw), 1, device)
    mse = lambda c, v: float(code_errors(v, c, lat).mean()) / lat.d  # noqa: E731
    row = dict(
        lattice=lat.name, bits=round(lat.bits, 4), blocks=len(x), mse=mse(codes, x),
        nearest_s_per_1m=nearest_s * 1e6 / x.numel(),
        enum_blocks=n, enum_mse=mse(enum, sub), nearest_mse_on_enum_blocks=mse(codes[:n], sub),
        enum_s_per_1m=enum_s * 1e6 / sub.numel(), fingerprint=lat.fingerprint,
    )
    row["nearest_over_enum_mse"] = row["nearest_mse_on_enum_blocks"] / row["enum_mse"]
    row["speedup"] = row["enum_s_per_1m"] / row["nearest_s_per_1m"]
    if lat.D <= 16:
        row["exhaustive_mse"] = mse(exhaustive_codes(sub, lat), sub)
    return row


def write_results(out: Path, stem: str, payload: dict, lines: list[str]) -> None:
    """Write ``out/stem.json`` (``payload``) and ``out/stem.md`` (``lines``) and print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", type=int, default=1_000_000, help="weights encoded by nearest_codes")
    parser.add_argument("--enum-blocks", type=int, default=20_000, help="subsample for the enumeration (÷4 when D−d > 14)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lattices", default=",".join(LATTICES))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=str(RESULTS), help="folder for encoder_<device>.{json,md}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))

    device_desc = device_name(device)
    rows = []
    for name in args.lattices.split(","):
        rows.append(bench(Lattice.load(name), device, args.weights, args.enum_blocks, args.repeats, args.seed))
        print(json.dumps(rows[-1]), flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/encoder.py", *(argv or sys.argv[1:])])
    out = Path(args.out)
    stem = f"encoder_{device.type}"
    payload = dict(command=command, device=device_desc, rows=rows)
    lines = [
        f"# Encoder benchmark ({device.type})", "", f"Command: `{command}`  ", f"Device: {device_desc}  ",
        f"`nearest_codes` (beam search) on {args.weights} N(0,1) weights; the paper's enumeration "
        "(`enumerate_codes`, all 2^(D−d) paddings) and, for D ≤ 16, the exhaustive search on the "
        "first blocks of the same sample. MSE per coordinate; ratio = nearest / enumeration on "
        "those blocks (< 1: the beam finds closer codes).", "",
        "| lattice | bits | nearest s / 1M | nearest MSE | enum blocks | enum s / 1M | speed-up | "
        "nearest MSE (sub) | enum MSE (sub) | ratio | exhaustive MSE (sub) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        exhaustive = f"{r['exhaustive_mse']:.4f}" if "exhaustive_mse" in r else "—"
        lines.append(
            f"| {r['lattice']} | {r['bits']:.3f} | {r['nearest_s_per_1m']:.4f} | {r['mse']:.4f} | {r['enum_blocks']} | "
            f"{r['enum_s_per_1m']:.3f} | {r['speedup']:.0f}× | {r['nearest_mse_on_enum_blocks']:.4f} | "
            f"{r['enum_mse']:.4f} | {r['nearest_over_enum_mse']:.4f} | {exhaustive} |"
        )
    write_results(out, stem, payload, lines)


if __name__ == "__main__":
    main()
