"""Speed of the end-to-end fine-tuning stage (lift_ao.finetune_end_to_end): seconds per step and per
held-out check and the compilation's cost, eager against compiled, on a model of the built-in model's shape with random weights
(speed does not depend on the values, so one `device` call needs no model staging).

    python benchmarks/e2e_speed.py [--shape smollm2-135m] [--layers N] [--variants eager,compile,compile+tf32]
                                   [--steps 32] [--sequences 256] [--held-out 0.25] [--profile] [--out DIR]

The model is coded data-free at 2.4 bits once; every variant tunes that same model (its scales drift
from run to run; the time does not). Per variant: a warm-up run of 4 steps and 3 held-out checks
(compilation), then, as medians of 3 runs, a check alone (a run of no steps) and --steps steps between
two checks: a step costs (that − 2·check)/steps, the compilation what the warm-up took beyond its steps
and checks. "compile": finetune_end_to_end(compiled=True), its decoder blocks through torch.compile;
"+tf32": the variant with TF32 matmuls. The table prices the built-in model's best recipe (1024
steps, a check every 16, 64 held-out sequences of 512 tokens) at these costs. ``--profile``: a
torch.profiler table of 4 steps and 2 checks per variant. Writes e2e_speed.json and e2e_speed.md (and
the profiles) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import lift_ao
from lift_ao.finetune import finetune_end_to_end
from machine import synchronize

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M's config (the built-in model)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "tiny": dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),  # for the CPU test
}
RECIPE_STEPS, RECIPE_CHECK_EVERY = 1024, 16
# finetune_end_to_end's compiled= per variant; "+tf32": TF32 matmuls on CUDA
COMPILED = {"eager": False, "compile": True}
VARIANTS = [name + extra for extra in ("", "+tf32") for name in COMPILED]


def time_variant(student, teacher, tokens, variant: str, steps: int, held_out: float, device: str,
                 profile_to: Path | None = None) -> dict:
    """{"step_seconds", "check_seconds", "compile_seconds", "graphs_compiled_while_timed"} of one of
    :data:`VARIANTS`: medians of 3 runs (compile_seconds: the warm-up's time beyond its steps and checks)."""
    base, _, extra = variant.partition("+")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = extra == "tf32"
    try:
        def run(run_steps: int, check_every: int) -> float:
            synchronize(device)
            start = time.perf_counter()
            finetune_end_to_end(student, teacher, tokens, steps=run_steps, lr=1e-3, batch_size=4, held_out=held_out,
                                check_every=check_every, progress=False, compiled=COMPILED[base])
            synchronize(device)
            return time.perf_counter() - start

        warm_up = run(4, 2)  # compiles the graphs (one batch shape per grad mode, see main)
        graphs = counters["stats"]["unique_graphs"]
        check = statistics.median(run(0, 1) for _ in range(3))  # no steps: the held-out loss only
        step = (statistics.median(run(steps, steps) for _ in range(3)) - 2 * check) / steps  # a check before, after
        result = dict(check_seconds=check, step_seconds=step, compile_seconds=warm_up - 4 * step - 3 * check,
                      graphs_compiled_while_timed=counters["stats"]["unique_graphs"] - graphs)
        if profile_to is not None:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=activities) as prof:
                run(4, 4)
            key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            profile_to.write_text(prof.key_averages().table(sort_by=key, row_limit=30))
        return result
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def markdown(doc: dict) -> str:
    lines = [f"# End-to-end fine-tuning speed, {doc['shape']} shape, {doc['layers']} blocks (random weights), "
             f"{doc['device_name']}", "",
             f"`{doc['command']}`", "",
             f"{doc['sequences']} sequences of {doc['length']} tokens, {doc['held_out_sequences']} held out, batch 4; "
             f"{doc['steps']} timed steps per run. Recipe: {RECIPE_STEPS} steps and a check every "
             f"{RECIPE_CHECK_EVERY} at these costs (the built-in model's best recipe holds out 64 sequences).", "",
             "| variant | s / step | s / check | s compiling | recipe s (compile + steps + checks) | × eager | "
             "graphs compiled while timed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    # A step's time is a difference of two runs' times: where it is not positive, this machine's noise is larger
    # than the steps' cost (a tiny model on a busy CPU) and the variant's recipe cannot be priced.
    recipe = {name: r["compile_seconds"] + RECIPE_STEPS * r["step_seconds"]
              + (RECIPE_STEPS // RECIPE_CHECK_EVERY + 1) * r["check_seconds"]
              for name, r in doc["variants"].items() if r["step_seconds"] > 0}
    for name, r in doc["variants"].items():
        priced = f"{recipe[name]:.0f}" if name in recipe else "below noise"
        ratio = f"{recipe['eager'] / recipe[name]:.2f}" if "eager" in recipe and name in recipe else ""
        lines.append(f"| {name} | {r['step_seconds']:.3f} | {r['check_seconds']:.3f} | {r['compile_seconds']:.0f} | "
                     f"{priced} | {ratio} | {r['graphs_compiled_while_timed']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shape's), e.g. fewer "
                        "for a quick look on a CPU")
    parser.add_argument("--variants", default="eager,compile,compile+tf32")
    parser.add_argument("--steps", type=int, default=32, help="timed steps per run (a multiple of 4)")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--held-out", type=float, default=0.25)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {VARIANTS}")
    held = len(lift_ao.finetune.held_out_rows(args.sequences, args.held_out))
    if args.steps < 4 or args.steps % 4 or held % 4 or (args.sequences - held) % 4:
        parser.error("--steps, the held-out sequences and the others must be multiples of 4 (the batch): one batch "
                     f"shape, so that the warm-up compiles every graph (got {args.steps}, {held}, {args.sequences - held})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    shape = SHAPES[args.shape] | ({} if args.layers is None else {"num_hidden_layers": args.layers})
    config = LlamaConfig(**shape, max_position_embeddings=max(2048, args.length))
    teacher = LlamaForCausalLM(config).to(device).eval()
    student = LlamaForCausalLM(config).to(device).eval()
    student.load_state_dict(teacher.state_dict())
    lift_ao.quantize(student, lift_ao.liftquant(bits=2.4), device=device, progress=False)
    tokens = torch.randint(0, config.vocab_size, (args.sequences, args.length))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = dict(command="python benchmarks/e2e_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
               shape=args.shape, layers=config.num_hidden_layers, steps=args.steps, sequences=args.sequences,
               length=args.length, held_out_sequences=held,
               device_name=torch.cuda.get_device_name() if device == "cuda" else "CPU", variants={})
    for variant in variants:
        profile_to = args.out / f"e2e_speed_profile_{variant}.txt" if args.profile else None
        doc["variants"][variant] = time_variant(student, teacher, tokens, variant, args.steps, args.held_out, device,
                                                profile_to)
        print(variant, doc["variants"][variant], flush=True)
        (args.out / "e2e_speed.json").write_text(json.dumps(doc, indent=1))  # after each: a cut run keeps what it has
        (args.out / "e2e_speed.md").write_text(markdown(doc))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
