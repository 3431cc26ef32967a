"""Decode speed: bf16 vs torchao int4 vs lift_ao, compiled with a static KV cache, passes on and off.

    python benchmarks/decode.py                          # GPU: Llama-3-8B and Qwen2.5-1.5B shapes, all variants
    python benchmarks/decode.py --models llama3-8b --variants bf16,int4,lift2.4,lift2.4-nopasses
    python benchmarks/decode.py --smoke                  # CPU: tiny config, a few tokens (checks the script)

Models are built from configs with random weights (real shapes, 128k/152k vocabularies). LiftQuant
weights are built directly from random codes (``LiftQuantTensor.from_random_codes``) instead of running the
nearest-neighbour search: decode speed does not depend on code values, and searching 8B weights on
the reference encoder would take hours. Outputs are therefore meaningless text; only speed, memory
and bytes are measured.

Per variant: batch 1, a ``--prompt-len`` prompt prefilled eagerly, then ``--new-tokens`` greedy steps
through ``torch.compile(decode_step, fullgraph=True, mode="reduce-overhead")`` (CUDA graphs; default
mode on CPU); one warm-up generation (compile + graph capture), then ``--repeats`` timed ones.
Every variant compiles with ``torch._inductor.config.freezing = True`` (``--no-freezing`` turns it off):
without it, torch 2.11 unwraps each tensor-subclass weight on the host at every call (AOTAutograd's
``runtime_unwrap_tensor_subclasses``), ~40 µs per weight, which made both torchao int4 (9.4 ms/token)
and lift_ao (10.4 ms/token) host-bound on the Llama-3-8B shape (H100, benchmarks/results); freezing
folds the weights into the graph as constants. Plain bf16 is unaffected (0.6 ms/token on the host).
On CUDA every variant runs in a fresh process (``--no-isolate``: all in this one). In one process
later variants ran slower than alone (H200, Llama-3-8B shape: lift2.0 152 tokens/s as the fourth
variant after bf16, int4 and lift2.4, 216 alone; decode_llama3-8b_e_h200.md / _f_h200.md), and
torchao's int4 ``quantize_`` switches on ``coordinate_descent_tuning`` for the whole process (its
recommended settings), under which Inductor turns a frozen bf16 lm_head at batch 1 into a Triton
reduction (684 µs for 128256×4096 on the H100, cuBLAS 395 µs). Without isolation each variant still
compiles under the Inductor settings the run started with.
Reports decode tokens/s (median), the loop's host time per token, peak memory during the timed
runs, model bytes (every storage once), recompiles, and the first generated tokens. Results: ``decode_<tag>.json`` and ``.md`` under ``--out``
(default ``$OUT`` if set, else ``benchmarks/results``), rewritten after every variant so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache

import lift_ao
from lift_ao import Lattice, LiftQuantTensor, passes
from machine import synchronize

MODEL_CONFIGS = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # Qwen/Qwen2.5-1.5B config.json (q/k/v have biases; lm_head tied to the embedding)
    "qwen2.5-1.5b": lambda: Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    # --smoke: few-layer models that compile in seconds on a CPU.
    "tiny-llama": lambda: LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    "tiny-qwen2": lambda: Qwen2Config(
        vocab_size=256, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    ),
}
MODEL_CLASSES = {LlamaConfig: LlamaForCausalLM, Qwen2Config: Qwen2ForCausalLM}

LIFT_BITS = (2.0, 2.4, 3.0)


@dataclass(frozen=True)
class Variant:
    """One row of the table: a weight format and whether lift_ao's passes are installed."""

    name: str
    kind: str  # "bf16" | "int4" | "lift"
    bits: Optional[float] = None
    lm_head: bool = False  # lm_head quantized too
    passes: bool = True


def all_variants() -> dict[str, Variant]:
    """Variant name → Variant: bf16, int4 (±lm_head), lift at each bit-width (±lm_head, passes on/off)."""
    variants = [Variant("bf16", "bf16"), Variant("int4", "int4"), Variant("int4+lm_head", "int4", lm_head=True)]
    for bits in LIFT_BITS:
        for lm_head in (False, True):
            for passes_on in (True, False):
                name = f"lift{bits}{'+lm_head' if lm_head else ''}{'' if passes_on else '-nopasses'}"
                variants.append(Variant(name, "lift", bits, lm_head, passes_on))
    return {v.name: v for v in variants}


DEFAULT_VARIANTS = (
    "bf16", "int4", "lift2.0", "lift2.4", "lift3.0", "lift2.0+lm_head", "lift2.4+lm_head", "lift3.0+lm_head",
    "lift2.4-nopasses", "lift2.4+lm_head-nopasses",
)


@dataclass
class Result:
    """Measurements of one (model, variant)."""

    model: str
    variant: str
    tokens_per_s: Optional[float] = None
    tokens_per_s_runs: list = field(default_factory=list)
    host_ms_per_token: Optional[float] = None  # the decode loop's host time before its final sync
    peak_memory_bytes: Optional[int] = None
    allocated_bytes: Optional[int] = None  # allocated after compiling, before the timed runs
    # Both memory figures exclude what was allocated before this variant was built.
    model_bytes: Optional[int] = None
    frames_compiled: Optional[int] = None
    lift_ao_rewrites: dict = field(default_factory=dict)
    lattice: Optional[str] = None  # lift variants: Lattice.for_bits(bits).name
    cudagraph_counters: dict = field(default_factory=dict)
    first_tokens: list = field(default_factory=list)
    profile: Optional[str] = None
    error: Optional[str] = None


# ----- model construction ---------------------------------------------------------------------------


def build_model(name: str, device: torch.device, layers: Optional[int] = None) -> nn.Module:
    """Random-weight bf16 model of a named shape on ``device`` (HF initialisation, eval mode);
    ``layers`` overrides the number of decoder layers (profiling runs)."""
    config = MODEL_CONFIGS[name]()
    if layers is not None:
        config.num_hidden_layers = layers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = MODEL_CLASSES[type(config)](config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def apply_variant(model: nn.Module, variant: Variant, seed: int = 0) -> nn.Module:
    """Quantize ``model``'s linears in place as ``variant`` says (lm_head only with ``lm_head=True``)."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and (variant.lm_head or m is not head)]
    if variant.kind == "int4":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        chosen = {id(m) for m in linears}
        quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
                  filter_fn=lambda module, fqn: id(module) in chosen)
    elif variant.kind == "lift":
        lattice = Lattice.for_bits(variant.bits)
        generator = torch.Generator().manual_seed(seed)
        for module in linears:
            # A fresh Parameter also unties a tied lm_head from the (bf16) embedding.
            quantized = LiftQuantTensor.from_random_codes(
                module.weight.shape, lattice, dtype=module.weight.dtype, device=module.weight.device, generator=generator)
            module.weight = nn.Parameter(quantized, requires_grad=False)
    return model


# ----- decoding ---------------------------------------------------------------------------------------


def generate(model, step, prompt: torch.Tensor, cache: StaticCache, new_tokens: int) -> tuple[list, float, float]:
    """Greedy decode ``new_tokens`` after an eager prefill; returns (tokens, decode seconds, host seconds).

    Like a serving loop (gpt-fast), nothing in the loop waits for the GPU: the position is a device
    tensor advanced in place (``torch.tensor([p], device=cuda)`` per token would be a pageable host
    copy, which waits for the previous token, so the host's own per-token work would add to the GPU's
    instead of overlapping it). Host seconds is the loop's time before the final sync: when it is
    close to the decode seconds, the host (guards, graph replay) and not the GPU sets the speed."""
    device = prompt.device
    cache.reset()
    with torch.no_grad():
        logits = model(input_ids=prompt, cache=cache, cache_position=torch.arange(prompt.shape[1], device=device),
                       use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.tensor([prompt.shape[1]], device=device)
        tokens = []
        synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            token = step(token, cache, position)[:, -1:].argmax(-1)
            position += 1
            tokens.append(token)
        host = time.perf_counter() - start
        synchronize(device)
        elapsed = time.perf_counter() - start
    return [int(t) for t in torch.cat(tokens, 1)[0, :8]], elapsed, host


def measure(model_name: str, variant: Variant, args, device: torch.device) -> Result:
    """Build, quantize, compile and time one variant."""
    from torch._dynamo.utils import counters

    result = Result(model_name, variant.name)
    torch._dynamo.reset()
    counters.clear()
    gc.collect()
    # Memory figures are this variant's own: with freezing, an earlier variant's compiled graph keeps
    # its weights allocated (measured: each later variant's allocation grew by the earlier model's bytes).
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if variant.passes:
        passes.install()
    else:
        passes.uninstall()
    torch.manual_seed(args.seed)
    model = apply_variant(build_model(model_name, device, args.layers), variant, args.seed)
    result.lattice = Lattice.for_bits(variant.bits).name if variant.kind == "lift" else None
    result.model_bytes = lift_ao.footprint(model)

    def decode_step(ids, cache, position):
        return model(input_ids=ids, cache=cache, cache_position=position, use_cache=True).logits

    if device.type == "cuda":
        step = torch.compile(decode_step, fullgraph=True, mode="reduce-overhead")
    else:
        step = torch.compile(decode_step, fullgraph=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    cache = StaticCache(config=model.config, max_cache_len=args.prompt_len + args.new_tokens)
    generate(model, step, prompt, cache, args.new_tokens)  # compile + graph capture
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        result.allocated_bytes = torch.cuda.memory_allocated() - baseline
    host_seconds = []
    for _ in range(args.repeats):
        result.first_tokens, seconds, host = generate(model, step, prompt, cache, args.new_tokens)
        result.tokens_per_s_runs.append(args.new_tokens / seconds)
        host_seconds.append(host)
    result.tokens_per_s = statistics.median(result.tokens_per_s_runs)
    result.host_ms_per_token = 1e3 * statistics.median(host_seconds) / args.new_tokens
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated() - baseline
    result.frames_compiled = counters["stats"]["unique_graphs"]
    result.lift_ao_rewrites = dict(counters["lift_ao"])
    result.cudagraph_counters = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    if args.profile:
        result.profile = profile_decode(model, step, prompt, cache, args.profile)
    passes.install()
    del model, cache, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def profile_decode(model, step, prompt: torch.Tensor, cache: StaticCache, new_tokens: int) -> str:
    """A ``new_tokens`` generation under torch.profiler (kernels by total device time; divide by
    ``new_tokens`` for per-token figures), then one under cProfile (host functions by own time), so
    a slow decode names what it spends its time on, on the GPU and on the host."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prompt.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _, seconds, _ = generate(model, step, prompt, cache, new_tokens)
    averages = prof.key_averages()
    sort_key = "self_device_time_total" if prompt.device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=sort_key, row_limit=30, max_name_column_width=70)
    host = cProfile.Profile()
    host.enable()
    _, host_seconds, _ = generate(model, step, prompt, cache, new_tokens)
    host.disable()
    host_table = io.StringIO()
    pstats.Stats(host, stream=host_table).sort_stats("tottime").print_stats(25)
    return (f"{new_tokens} tokens in {seconds:.3f} s under the profiler\n{table}\n"
            f"{new_tokens} tokens in {host_seconds:.3f} s under cProfile (host functions by own time)\n"
            f"{host_table.getvalue()}")


def kernel_status(device: torch.device) -> dict[str, bool]:
    """Which lift_ao ops have a kernel for ``device`` beyond the reference (CompositeExplicitAutograd)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    names = ("lift_activation", "lifted_matmul", "lifted_linear", "lifted_linear_group")
    return {n: torch._C._dispatch_has_kernel_for_dispatch_key(f"lift_ao::{n}", key) for n in names}


def _fmt_bytes(n: Optional[int]) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def write_report(results: list[Result], meta: dict, out_dir: str, tag: str):
    """``decode_<tag>.json`` (everything) and ``decode_<tag>.md`` (one table per model)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"decode_{tag}.json"), "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=2)
    lines = [f"# Decode benchmark ({tag})", "", f"Command: `{meta['command']}`", "",
             f"Device: {meta['device']}; torch {meta['torch']}; batch 1, prompt {meta['prompt_len']}, "
             f"{meta['new_tokens']} new tokens, median of {meta['repeats']}; environment {meta.get('environment', {})}.",
             "", meta["note"], ""]
    missing = [n for n, ok in meta["device_kernels"].items() if not ok]
    if meta["cuda"] and missing:
        lines += [f"**Note:** no CUDA kernel of their own: {missing}. Base ops without one ran the PyTorch "
                  "reference; fused ops without one composed the base ops (lift shared, not fused).", ""]
    for model in dict.fromkeys(r.model for r in results):
        rows = [r for r in results if r.model == model]
        base = {r.variant: r.tokens_per_s for r in rows if r.tokens_per_s}
        lines += [f"## {model}", "",
                  "| variant | tokens/s | ms/token | host ms/token | × bf16 | × int4 | peak memory | allocated before "
                  "timing | model bytes | graphs | lift_ao rewrites |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r.error:
                lines.append(f"| {r.variant} | error: {r.error} | | | | | | | | | |")
                continue
            ratio = lambda ref: f"{r.tokens_per_s / base[ref]:.2f}" if ref in base else "—"  # noqa: E731
            lines.append(f"| {r.variant}{f' ({r.lattice})' if r.lattice else ''} | {r.tokens_per_s:.1f} | {1e3 / r.tokens_per_s:.2f} | {r.host_ms_per_token:.2f} | "
                         f"{ratio('bf16')} | {ratio('int4')} | "
                         f"{_fmt_bytes(r.peak_memory_bytes)} | {_fmt_bytes(r.allocated_bytes)} | {_fmt_bytes(r.model_bytes)} | {r.frames_compiled} | "
                         f"{r.lift_ao_rewrites} |")
        for r in rows:
            off = base.get(r.variant + "-nopasses")
            if r.variant.startswith("lift") and off and r.tokens_per_s:
                lines.append(f"\nPasses on/off, {r.variant}: {r.tokens_per_s / off:.2f}×")
        lines.append("")
        for r in rows:
            if r.cudagraph_counters:
                lines.append(f"{r.variant}: inductor CUDA-graph counters {r.cudagraph_counters}  ")
            if r.profile:
                lines += ["", f"### Profile: {r.variant}", "", "```", r.profile, "```", ""]
    with open(os.path.join(out_dir, f"decode_{tag}.md"), "w") as f:
        f.write("\n".join(lines))


def _configure(args) -> None:
    """The process-wide compile settings of every variant."""
    torch._inductor.config.freezing = args.freezing
    # A compile served from the FX-graph or AOTAutograd cache skips the passes, so their counters
    # (the report's rewrite column) would read {} although the cached code has the rewrites.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def _measure_configured(model_name: str, variant_name: str, args, device: torch.device) -> dict:
    """A fresh process's whole job: configure, measure one variant, return its Result as a dict
    (classes of a spawned ``__main__`` do not unpickle in the parent)."""
    _configure(args)
    return asdict(measure(model_name, all_variants()[variant_name], args, device))


def measure_in_fresh_process(model_name: str, variant: Variant, args, device: torch.device) -> Result:
    """:func:`measure` in a new interpreter (spawned: CUDA does not survive a fork), so no compile
    cache, CUDA-graph pool, autotuning or setting of an earlier variant can touch this one."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return Result(**pool.submit(_measure_configured, model_name, variant.name, args, device).result())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model(s) on CPU, 8+8 tokens, 1 repeat")
    parser.add_argument("--models", default="llama3-8b,qwen2.5-1.5b", help=f"comma list of {list(MODEL_CONFIGS)}")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(all_variants())}")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-freezing", dest="freezing", action="store_false",
                        help="compile without torch._inductor.config.freezing (the default freezes, see the docstring)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="measure each variant in a fresh process (default: on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="override the decoder layer count (profiling)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOKENS",
                        help="after timing, profile a generation of TOKENS tokens (kernel table in the report)")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--tag", default=None, help="output name decode_<tag>.{json,md} (default: from models)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt_len, args.new_tokens, args.repeats = 8, 8, 1
        if args.models == parser.get_default("models"):
            args.models = "tiny-llama"
        if args.variants == ",".join(DEFAULT_VARIANTS):
            args.variants = "bf16,lift2.4,lift2.4-nopasses,lift2.4+lm_head"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    variants = all_variants()
    chosen = [variants[v] for v in args.variants.split(",")]
    if device.type != "cuda" and any(v.kind == "int4" for v in chosen):
        print("skipping int4: tile_packed_to_4d needs CUDA", file=sys.stderr)
        chosen = [v for v in chosen if v.kind != "int4"]
    _configure(args)
    isolate = device.type == "cuda" if args.isolate is None else args.isolate
    tag = args.tag or ("smoke" if args.smoke else args.models.replace(",", "_"))
    meta = {
        "command": " ".join(["python", "benchmarks/decode.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "lift_ao": lift_ao.__version__, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "freezing": args.freezing, "layers": args.layers,
        "cuda": device.type == "cuda", "device_kernels": kernel_status(device), "isolated": isolate,
        "environment": {k: os.environ[k] for k in ("LIFT_AO_PDL", "TORCHINDUCTOR_ENABLE_PDL") if k in os.environ},
        "note": "LiftQuant weights are random codes built directly (no nearest-neighbour search): speed does "
                "not depend on code values; all weights are random, so generated text is meaningless.",
    }
    if args.layers is not None:
        meta["note"] += f" Decoder layers overridden to {args.layers} (profiling run): not the full model's speed."
    if args.smoke:
        meta["note"] += " Smoke run: a tiny CPU model and 8 tokens only check the script; its timings mean nothing."
    print(meta["note"])
    if meta["cuda"] and not all(meta["device_kernels"].values()):
        print(f"note: lift_ao ops with a CUDA kernel of their own: {meta['device_kernels']}", file=sys.stderr)
    results = []
    inductor_settings = torch._inductor.config.save_config()
    for model_name in args.models.split(","):
        for variant in chosen:
            try:
                result = (measure_in_fresh_process if isolate else measure)(model_name, variant, args, device)
            except Exception as error:  # keep measuring the other variants; the report shows the error
                result = Result(model_name, variant.name, error=f"{type(error).__name__}: {error}"[:300])
                passes.install()
            finally:  # what a variant's quantize_ changed (int4: coordinate descent tuning) ends with it
                torch._inductor.config.load_config(inductor_settings)
            results.append(result)
            print(json.dumps(asdict(result)), flush=True)
            write_report(results, meta, args.out, tag)
    print(f"wrote {os.path.join(args.out, f'decode_{tag}')}.json/.md")


if __name__ == "__main__":
    main()
