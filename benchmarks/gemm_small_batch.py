"""The ±1 GEMM at 3–16 tokens (above the lookup kernel's range) on the GPU: what NOTES_kernels.md
round 12 measured to choose its token block, split count and small-block tuning configs.

    python benchmarks/gemm_small_batch.py --study blocks --out $OUT   # 8- vs 16-token blocks, int4 beside
    python benchmarks/gemm_small_batch.py --study sweep --out $OUT    # config × split sweep at 4–8 tokens

``blocks`` first runs ``kernel_speed.check_every_config`` (every config the autotuner may run, 8- to
128-token blocks, against the reference), then times the autotuned kernel with the token block's
minimum forced to 16 and to 8 (``token_block`` replaced in the module for the comparison), the
lookup kernel at 1–2 tokens and torchao int4 at every batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import kernel_speed as ks  # noqa: E402
from lift_ao.kernels import triton_lut, triton_matmul  # noqa: E402

SHAPES = [(28672, 8192), (8192, 28672), (14336, 4096), (4096, 14336), (8192, 8192), (4096, 4096), (1024, 4096)]


def force_token_block_minimum(minimum: int) -> None:
    """Replace the module's token_block by one whose smallest block is ``minimum`` tokens."""
    triton_matmul.token_block = lambda tokens: min(128, max(minimum, triton.next_power_of_2(tokens)))


def matmul(lifted, layer, **kwargs):
    return triton_matmul.lifted_matmul_triton(lifted, layer.codes, layer.row_scale, None, **kwargs)


def study_blocks(say) -> list[dict]:
    """Autotuned ±1 GEMM with 16- and 8-token minimum blocks, lookup kernel and int4, 2.4 bits."""
    results = [dict(check, kind="check") for check in ks.check_every_config(say)]
    for rows, features in SHAPES:
        layer = ks.LiftedLayer(rows, features, 2.4)
        int4 = ks.int4_linear(torch.randn(rows, features, device="cuda", dtype=ks.DTYPE) / math.sqrt(features), say)
        for batch in (1, 2, 3, 4, 8, 16):
            x = torch.randn(batch, features, device="cuda", dtype=ks.DTYPE)
            lifted = layer.lift(x)
            entry = dict(kind="time", rows=rows, features=features, batch=batch)
            for minimum in (16, 8):
                force_token_block_minimum(minimum)
                entry[f"gemm{minimum}"] = ks.bench_us(lambda: matmul(lifted, layer))
            if batch <= triton_lut.MAX_TOKENS:
                entry["lookup"] = ks.bench_us(lambda: triton_lut.lookup_matmul(lifted, layer.codes, layer.row_scale, None))
            if int4 is not None:
                entry["int4"] = ks.bench_us(lambda: int4(x))
            results.append(entry)
            say(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
    return results


def study_sweep(say) -> list[dict]:
    """Every (BLOCK_N, BLOCK_W, warps, stages) with ≥ 16 rows per warp × splits, at 4–8 tokens."""
    configs = [dict(BLOCK_N=n, BLOCK_W=w, num_warps=warps, num_stages=stages)
               for n in (16, 32, 64, 128) for w in (4, 8, 16) for warps in (1, 2, 4, 8) if n >= 16 * warps
               for stages in (3, 5)]
    results = []
    for rows, features, batch in [(28672, 8192, 4), (4096, 14336, 4), (8192, 8192, 8)]:
        layer = ks.LiftedLayer(rows, features, 2.4)
        lifted = layer.lift(torch.randn(batch, features, device="cuda", dtype=ks.DTYPE))
        autotuned = ks.bench_us(lambda: matmul(lifted, layer))
        timed = [dict(rows=rows, features=features, batch=batch, config=cfg, splits=splits,
                      us=ks.bench_us(lambda: matmul(lifted, layer, splits=splits, config=cfg)))
                 for cfg in configs for splits in (None, 1, 2, 4, 8)]
        results += [dict(rows=rows, features=features, batch=batch, autotuned=autotuned)] + timed
        say(f"{rows}x{features} batch {batch}: autotuned {autotuned:.1f} µs; fastest: "
            + "; ".join(f"{e['us']:.1f} {e['config']} splits={e['splits']}" for e in sorted(timed, key=lambda e: e["us"])[:4]))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=["blocks", "sweep"], required=True)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    log = open(os.path.join(args.out, f"gemm_{args.study}.log"), "w")

    def say(message: str):
        print(message, flush=True)
        log.write(message + "\n")
        log.flush()

    results = (study_blocks if args.study == "blocks" else study_sweep)(say)
    with open(os.path.join(args.out, f"gemm_{args.study}.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
