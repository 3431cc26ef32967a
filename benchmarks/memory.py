"""Peak memory of encoding one large linear weight on CPU.

Encodes an N×K weight (default 16384×16384, float32: 1 GiB) with ``LiftQuantTensor.from_hp`` and
records the process's peak resident memory (Linux ``VmHWM``, reset just before encoding through
``/proc/self/clear_refs``) against its resident memory just before: the difference is what encoding
costs on top of the weight it reads. The encoder works one chunk of rows at a time
(``lift_ao.encode.encode_weight``), so that cost is the packed output (N·K·D/d bits) plus a
working set independent of N.

    python benchmarks/memory.py                                 # 16384 x 16384, 24/10, 2 threads
    python benchmarks/memory.py --rows 2048 --threads 1         # a quicker look

Writes benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from lift_ao import Lattice, LiftQuantTensor

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Make VmHWM (the peak) start again from the current resident size (Linux ≥ 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(rows: int, cols: int, lattice: str, dtype: torch.dtype, seed: int = 0, progress: bool = False) -> dict:
    """Encode a random (rows, cols) weight; resident memory in MiB and time in seconds."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    before = _status_kib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    quantized = LiftQuantTensor.from_hp(weight, Lattice.load(lattice), progress=progress)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "rows": rows, "cols": cols, "lattice": lattice, "dtype": str(dtype).removeprefix("torch."),
        "weight_mib": weight.nbytes / 2**20, "output_mib": quantized.storage_bytes() / 2**20,
        "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024, "encode_extra_mib": (peak - before) / 1024,
        "seconds": seconds, "threads": torch.get_num_threads(),
    }


def markdown(result: dict) -> str:
    return (
        "# Encoding memory\n\n"
        f"Command: `{result['command']}`  \nMachine: {result['machine']}, {result['threads']} threads\n\n"
        "Peak resident memory of `LiftQuantTensor.from_hp` on one weight; *encoding extra* = peak − resident "
        "size just before (process + weight). Seconds are wall time on a CPU shared with other jobs, not a "
        "speed measurement (see codebook.md).\n\n"
        "| weight | lattice | weight MiB | packed output MiB | RSS before MiB | peak RSS MiB | encoding extra MiB | seconds |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {result['rows']}×{result['cols']} {result['dtype']} | {result['lattice']} | {result['weight_mib']:.0f} | "
        f"{result['output_mib']:.1f} | {result['rss_before_mib']:.0f} | {result['peak_rss_mib']:.0f} | "
        f"{result['encode_extra_mib']:.0f} | {result['seconds']:.0f} |\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--cols", type=int, default=16384)
    parser.add_argument("--lattice", default="24/10")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.rows, args.cols, args.lattice, getattr(torch, args.dtype), progress=True)
    result["command"] = "python benchmarks/memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "memory.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
