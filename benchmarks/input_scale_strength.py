"""How strong should the activation-aware input scales be? Block-LDLQ coding error per sibling group
of the built-in model against α (``s = E[x²]^(α/2)``, lift_ao.calibrate's ``alpha``).

    python benchmarks/input_scale_strength.py [--blocks 2,15,28] [--alphas 0,0.25,0.5,0.75,1] [--out DIR]

For each chosen decoder block and each group of linears that read one input (q/k/v, o, gate/up,
down), the group is coded as :func:`lift_ao.calibrate` codes it (its groups, Hessians, input scales,
rotation and block LDLQ) at every α, and the error is measured where it matters, on the layer's
output: ``tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ)`` with ``H = E[x xᵀ]`` of the group's input. Inputs are
the full-precision model's activations on the calibration split (calibration streams the quantized
model's; the difference is small next to the effect measured here). CPU: ~5 min.
Writes ``input_scale_strength.json`` and ``.md`` to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from lift_ao.api import quantizable_linears
from lift_ao.calibration import (_block_inputs, _decoder_blocks, _hessians, _quantize_group, _run_block,
                                 builtin_calibration_tokens)
from lift_ao.config import liftquant
from lift_ao.data import load_default_model
from lift_ao.lattice import Lattice


@torch.no_grad()
def group_hessians(model, config, blocks: list[int], tokens: torch.Tensor, batch_size: int = 4) -> dict:
    """{block index: [(names within the block, (K, K) float64 H)]} of the chosen decoder blocks' groups,
    as :func:`lift_ao.calibrate` gathers them, on the full-precision model's activations of ``tokens``."""
    decoder = _decoder_blocks(model)
    inputs = _block_inputs(model, decoder, tokens, batch_size, "cpu")
    found = {}
    for index in range(max(blocks) + 1):
        block = decoder[index]
        if index in blocks:
            found[index] = _hessians(block, quantizable_linears(block, config), inputs, "cpu")
        inputs = _run_block(block, inputs, "cpu")
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="2,15,28")
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--lattice", default="48/20")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    blocks, alphas = [int(b) for b in args.blocks.split(",")], [float(a) for a in args.alphas.split(",")]
    if 0.5 not in alphas:
        parser.error("--alphas must include 0.5, the default the table compares against")
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    config, lattice = liftquant(lattice=args.lattice), Lattice.load(args.lattice)
    hessians = group_hessians(model, config, blocks, builtin_calibration_tokens(tokenizer, args.tokens))
    rows = []
    for b in blocks:
        layer = _decoder_blocks(model)[b]
        for group, h in hessians[b]:
            w = torch.cat([layer.get_submodule(name).weight.detach().double() for name in group])
            total = torch.einsum("nk,kl,nl->", w, h, w).item()
            row = dict(block=b, group="/".join(name.split(".")[-1] for name in group), errors={})
            for alpha in alphas:
                modules = [copy.deepcopy(layer.get_submodule(name)) for name in group]
                _quantize_group(modules, h, lattice, config, alpha, 0.01, "cpu")
                error = torch.cat([m.weight.dequantize().double() for m in modules]) - w
                row["errors"][f"{alpha:g}"] = torch.einsum("nk,kl,nl->", error, h, error).item() / total
            print(row, flush=True)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/input_scale_strength.py " + " ".join(sys.argv[1:])
    (args.out / "input_scale_strength.json").write_text(json.dumps(dict(command=command, lattice=args.lattice,
                                                                       tokens=args.tokens, rows=rows), indent=1))
    header = " | ".join(f"α = {a:g}" for a in alphas)
    lines = [f"| block | group | {header} | best α | best / α = 0.5 |", "|---|---|" + "---:|" * (len(alphas) + 2)]
    for row in rows:
        errors = row["errors"]
        best = min(errors, key=errors.get)
        lines.append(f"| {row['block']} | {row['group']} | " + " | ".join(f"{errors[f'{a:g}']:.5f}" for a in alphas)
                     + f" | {best} | {errors[best] / errors['0.5']:.3f} |")
    (args.out / "input_scale_strength.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
