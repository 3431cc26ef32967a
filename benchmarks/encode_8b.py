"""Data-free encode time of an 8B-class model: every linear weight of Llama-3-8B, layer by layer.

Issue 9's target: quantizing an 8B-class model data-free takes under 10 minutes on one H100. This
builds the Llama-3-8B decoder linear shapes (32 layers × q 4096×4096, k/v 1024×4096, o 4096×4096,
gate/up 14336×4096, down 4096×14336; ``lm_head`` stays in high precision as in ``lift_ao.quantize``),
generates each weight on the device just before encoding it (bf16, Gaussian with log-normal row
scales, seeded per layer and projection; only one weight and its codes live at a time, never the
model), and encodes it with the library's path: ``LiftQuantTensor.from_hp`` (what ``quantize_`` and
``lift_ao.quantize`` call) when lift_ao imports fully, else — on a machine without torchao —
``lift_ao.encode.encode_weight`` with the same rotation, which is the whole of from_hp's work
besides input checks and wrapping (the ``path`` field says which ran).

Reports total wall time, time per shape, weights per second, and writes ``encode_8b.json`` and
``encode_8b.md`` under ``--out`` after every layer (a run cut short keeps what it measured).
``--layers N`` encodes the first N layers only; the 32-layer time is then *extrapolated*
(labelled as such): measured total × 32 / N, and the steady-state estimate from layers after the
first (which also builds the search tables and warms up the device).

    python benchmarks/encode_8b.py --device cuda --out $OUT                      # whole model
    python benchmarks/encode_8b.py --device cuda --layers 8 --out $OUT           # 8 layers, extrapolated
    python benchmarks/encode_8b.py --device cpu --layers 1 --scale 64 --out /tmp/e8   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_only  # noqa: E402
from machine import synchronize  # noqa: E402

torch_only.install()
from lift_ao.lattice import Lattice  # noqa: E402
from lift_ao.search import check_beam_width  # noqa: E402
from encoder import device_name  # noqa: E402

# meta-llama/Meta-Llama-3-8B: hidden 4096, intermediate 14336, 32 layers, 8 KV heads of 128.
LLAMA3_8B_LAYERS = 32
LLAMA3_8B_SHAPES = {  # name: (out_features N, in_features K)
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def layer_shapes(scale: int = 1) -> dict[str, tuple[int, int]]:
    """The seven linear shapes of one decoder layer, each dimension divided by ``scale`` (≥ 1).

    Returns:
        {name: (N, K)}.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    return {name: (max(1, n // scale), max(1, k // scale)) for name, (n, k) in LLAMA3_8B_SHAPES.items()}


def make_weight(shape: tuple[int, int], seed: int, device: torch.device, dtype=torch.bfloat16) -> torch.Tensor:
    """A Gaussian-ish weight generated on ``device``: N(0, 0.02²) entries times log-normal row scales
    (rows of real layers differ in norm), so the per-row normalisation is exercised.

    Args:
        shape: (N, K).
        seed: generator seed (deterministic per device type).
    Returns:
        (N, K) tensor of ``dtype`` on ``device``.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = torch.exp(0.3 * torch.randn(shape[0], 1, generator=gen, device=device))
    return (torch.randn(shape, generator=gen, device=device) * (0.02 * rows)).to(dtype)


def _encoder(beam_width):
    """(path name, encode(weight, lattice, seed) -> (packed_codes, row_scale)) — from_hp when lift_ao
    imports with torchao, else encode_weight with from_hp's rotation."""
    try:
        from lift_ao.tensor import LiftQuantTensor
    except ImportError:
        try:
            import tqdm.auto  # noqa: F401  (lift_ao.encode's progress bar)
        except ImportError:  # a bare GPU machine: progress bars are off here anyway
            sys.modules["tqdm"] = types.ModuleType("tqdm")
            sys.modules["tqdm.auto"] = stub = types.ModuleType("tqdm.auto")
            stub.tqdm = lambda iterable, **_: iterable
        from lift_ao.encode import encode_weight
        from lift_ao.transform import make_rotation

        rotations = {}

        def encode(weight, lattice, seed):
            key = (weight.shape[1], lattice.d, seed)
            if key not in rotations:
                r = make_rotation(weight.shape[1], lattice.d, seed)
                rotations[key] = tuple(t.to(weight.device) for t in (r.signs, r.left, r.right))
            return encode_weight(weight, lattice.to(weight.device), *rotations[key], beam_width=beam_width)

        return "lift_ao.encode.encode_weight (no torchao here)", encode

    def encode(weight, lattice, seed):
        t = LiftQuantTensor.from_hp(weight, lattice, seed=seed, beam_width=beam_width)
        return t.packed_codes, t.row_scale

    return "LiftQuantTensor.from_hp", encode


def summarize(per_layer: list[dict], n_layers_model: int) -> dict:
    """Totals over the measured layers and the extrapolation to ``n_layers_model`` layers.

    Args:
        per_layer: one dict per measured layer with ``seconds`` and ``weights``.
    Returns:
        dict: measured seconds/weights, weights/s, and (when fewer layers were measured) the
        extrapolated whole-model seconds, both as measured × n/len and from the steady state
        (mean of the layers after the first).
    """
    seconds = sum(r["seconds"] for r in per_layer)
    weights = sum(r["weights"] for r in per_layer)
    out = dict(layers_measured=len(per_layer), seconds_measured=seconds, weights_measured=weights,
               weights_per_second=weights / seconds if seconds > 0 else float("nan"))
    n = len(per_layer)
    if n < n_layers_model:
        out["extrapolated"] = True
        out["seconds_model_extrapolated"] = seconds * n_layers_model / n
        if n > 1:
            steady = sum(r["seconds"] for r in per_layer[1:]) / (n - 1)
            out["seconds_model_steady_state"] = per_layer[0]["seconds"] + steady * (n_layers_model - 1)
    else:
        out["extrapolated"] = False
        out["seconds_model"] = seconds
    return out


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "encode_8b.json").write_text(json.dumps(result, indent=1))
    s, m = result["summary"], result["settings"]
    lines = [
        "# Data-free encode time, Llama-3-8B linear shapes", "",
        f"Command: `{result['command']}`  ", f"Device: {result['device']}  ",
        f"Encode path: `{result['path']}`; lattice {m['lattice']} ({m['bits']} bits), beam width "
        f"{m['beam_width']}; weights generated on the device (bf16), one at a time; shapes divided by "
        f"{m['scale']}.", "",
    ]
    if s["extrapolated"]:
        steady = s.get("seconds_model_steady_state")
        lines += [
            f"**Measured {s['layers_measured']} of {m['model_layers']} layers; the whole-model time is "
            f"EXTRAPOLATED**: {s['seconds_model_extrapolated']:.1f} s (measured × {m['model_layers']}/"
            f"{s['layers_measured']})" + (f", {steady:.1f} s from the steady state (layers after the first)" if steady else "")
            + ".", "",
        ]
    else:
        lines += [f"**Whole model ({m['model_layers']} layers): {s['seconds_model']:.1f} s measured.**", ""]
    lines += [
        f"Measured: {s['weights_measured'] / 1e9:.3f} G weights in {s['seconds_measured']:.1f} s "
        f"= {s['weights_per_second'] / 1e6:.1f} M weights/s.", "",
        "| projection | N×K | count | s (total) | s per weight matrix | s / 1M weights |", "|---|---|---|---|---|---|",
    ]
    for name, r in result["per_shape"].items():
        lines.append(
            f"| {name} | {r['shape'][0]}×{r['shape'][1]} | {r['count']} | {r['seconds']:.2f} | "
            f"{r['seconds'] / r['count']:.3f} | {r['seconds'] * 1e6 / (r['count'] * r['shape'][0] * r['shape'][1]):.4f} |"
        )
    lines += ["", "| layer | s | weights |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['seconds']:.2f} | {r['weights']} |" for r in result["per_layer"]]
    (out / "encode_8b.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    """Run the benchmark (argv as for the command line); returns the result dict also written to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits", type=float, default=2.4, help="rate; lattice = Lattice.for_bits(bits)")
    parser.add_argument("--lattice", default=None, help="a lattice name instead of --bits, e.g. 24/10")
    parser.add_argument("--beam-width", type=int, default=None, help="search beam width (default: the lattice's)")
    parser.add_argument("--layers", type=int, default=LLAMA3_8B_LAYERS, help="layers to encode (fewer: extrapolated)")
    parser.add_argument("--scale", type=int, default=1, help="divide every shape by this (smoke tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the rotations")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= LLAMA3_8B_LAYERS:
        parser.error(f"--layers must be in 1..{LLAMA3_8B_LAYERS}")
    device = torch.device(args.device)
    lattice = Lattice.load(args.lattice) if args.lattice else Lattice.for_bits(args.bits)
    beam_width = check_beam_width(args.beam_width, lattice)
    shapes = layer_shapes(args.scale)
    path, encode = _encoder(args.beam_width)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/encode_8b.py", *(sys.argv[1:] if argv is None else argv)])
    result = dict(
        command=command, device=device_name(device), path=path,
        settings=dict(lattice=lattice.name, bits=round(lattice.bits, 4), beam_width=beam_width, scale=args.scale,
                      model_layers=LLAMA3_8B_LAYERS, layers=args.layers, seed=args.seed),
        per_shape={name: dict(shape=list(shape), count=0, seconds=0.0) for name, shape in shapes.items()},
        per_layer=[],
    )
    for layer in range(args.layers):
        layer_seconds, layer_weights = 0.0, 0
        for j, (name, shape) in enumerate(shapes.items()):
            weight = make_weight(shape, args.seed * 1000 + layer * len(shapes) + j, device)
            synchronize(device)
            start = time.perf_counter()
            packed, scale = encode(weight, lattice, args.seed)
            synchronize(device)
            seconds = time.perf_counter() - start
            if not bool(torch.isfinite(scale).all()):
                raise RuntimeError(f"layer {layer} {name}: non-finite row scales")
            del weight, packed, scale
            entry = result["per_shape"][name]
            entry["count"] += 1
            entry["seconds"] += seconds
            layer_seconds += seconds
            layer_weights += shape[0] * shape[1]
        result["per_layer"].append(dict(layer=layer, seconds=layer_seconds, weights=layer_weights))
        result["summary"] = summarize(result["per_layer"], LLAMA3_8B_LAYERS)
        _write(Path(args.out), result)
        print(f"layer {layer}: {layer_seconds:.2f} s, {layer_weights / layer_seconds / 1e6:.1f} M weights/s", flush=True)
    print((Path(args.out) / "encode_8b.md").read_text())
    return result


if __name__ == "__main__":
    main()
