"""The rotation's column splits on the GPU: how many programs should share each 16 rows of U.

    python benchmarks/rotation_splits.py --out DIR    # ~1 min on an H100

For the Llama-3-8B K at 2.4 bits (4096 = 50×82, 14336 = 60×239) and 1–64 tokens, times
``rotate_triton`` at one split, at the most splits (every 32-column chunk its own program: what the
rule before round 14 took whenever the row programs left SMs idle), and at what
``triton_lift._column_splits`` picks, each as one CUDA-graph replay with L2 flushed. Writes rotation_splits.json and rotation_splits.md to --out.
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
from lift_ao.kernels.triton_lift import _column_splits, rotate_triton  # noqa: E402
from lift_ao.kernels.triton_matmul import sm_count  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    results = []
    for features in (4096, 14336):
        layer = ks.LiftedLayer(16, features, 2.4)
        k1, k2 = layer.factors
        most = max(16, triton.next_power_of_2(k2)) // 32
        for tokens in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(tokens, features, device="cuda", dtype=ks.DTYPE)
            picked = _column_splits(tokens * triton.cdiv(k1, 16), most, sm_count(x.device))
            entry = dict(features=features, factors=(k1, k2), tokens=tokens, picked=picked, us={})
            for splits in sorted({1, picked, most}):
                entry["us"][splits] = ks.bench_us(
                    lambda: rotate_triton(x, layer.signs, layer.left, layer.right, column_splits=splits))
            results.append(entry)
            print(entry, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rotation_splits.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                              command=" ".join(sys.argv), results=results), indent=1))
    lines = [f"# Rotation column splits on {torch.cuda.get_device_name()} (bf16 activations, 2.4 bits)", "",
             f"Command: `python {' '.join(sys.argv)}`; µs = median of do_bench over a CUDA-graph replay (L2 flushed).", "",
             "| K | (k1, k2) | tokens | picked | µs at 1 split | µs at picked | µs at most splits |",
             "|---|---|---|---|---:|---:|---:|"]
    for e in results:
        most = max(e["us"])
        lines.append(f"| {e['features']} | {tuple(e['factors'])} | {e['tokens']} | {e['picked']} | {e['us'][1]:.1f} | "
                     f"{e['us'][e['picked']]:.1f} | {e['us'][most]:.1f} ({most}) |")
    (out / "rotation_splits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
