"""LiftQuant Triton kernels vs bf16 cuBLAS and torchao int4 weight-only, on one GPU, timed in one process.

    python benchmarks/kernel_speed.py [--out DIR] [--quick | --shapes 4096x4096,1024x4096]
    python benchmarks/kernel_speed.py --prefill-study --out DIR   # the prefill path alone, ~1-2 min

The checks compile every tuning candidate, which took one process over 530 s on an H100; they run in
``--jobs`` processes (default min(8, CPUs)), and the full table fits one 10-minute device call again
(515 s on an H100, checks 174 s; NOTES_kernels.md round 18). To split it anyway: ``--checks-only`` in
one call, then ``--shapes ... --skip-checks`` in others, each marked in its output.

1. Device facts and the measured device-to-device copy bandwidth (bytes read + written).
2. Correctness at real sizes, before any timing: the Triton ``lifted_matmul`` and ``lift_activation``
   (and the registered CUDA ops) against ``kernels/reference.py`` on fresh random inputs; the prefill
   path's weight rebuild (every tuning config) against its float64 value and the fused ops' rebuilt-
   weight branch against the reference chain.
3. Times (median of ``triton.testing.do_bench``, L2 flushed between repetitions) for Llama-3 8B/70B
   linear shapes × batch 1/4/16/64/256 × 2.0/2.4/3.0 bits, beside ``x @ W.T`` in bf16 and torchao's
   ``Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")``; at batch
   16/64/256 also the prefill path (rotation + rebuilt weight + cuBLAS), the rotation and the rebuild
   kernel alone (with its GB/s).
4. Split-K variants for the notes; with --sweep, every tuning candidate on decode shapes; with
   --lookup-study, the table-lookup decode kernel's configs × split counts beside the ±1 GEMM at
   1–8 tokens (to set ``LOOKUP_MAX_TOKENS``); with --decode-study, the decode tables (rotation +
   tables from u) checked against float64 at real sizes, one Llama-3-8B decoder layer's LiftQuant
   work (fused decode ops vs composition) and the rotation and tables alone at Llama-3-8B and
   Qwen2.5-1.5B K (kernels_decode.json / .md); with
   --prefill-study, only the prefill checks and the prefill path at 2.4 bits on two 8B shapes ×
   batch 16/64/256/1024 beside the lift + ±1 GEMM and bf16 (kernels_prefill.json / .md), to set
   ``REBUILD_MIN_TOKENS``.

Writes ``kernels.json`` and ``kernels.md`` to --out (default $OUT or the working directory).
Random codes and mappings are enough for speed: the kernels' cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from lift_ao.packing import random_packed_codes, unpack_codes, words_per_row
from lift_ao.transform import make_rotation
from lift_ao.kernels import lift_activation, lifted_matmul  # importing registers the CUDA kernels
from lift_ao.kernels.reference import lift_activation_reference, lifted_matmul_reference
from lift_ao.kernels.fused_ops import compose_group
from lift_ao.kernels.triton_lift import lift_activation_triton, rotate_triton
from lift_ao.kernels import triton_dequant, triton_lut
from lift_ao.kernels.triton_dequant import padded_columns, rebuild_rotated_weight
from lift_ao.kernels.triton_register import (
    LOOKUP_MAX_TOKENS, REBUILD_MIN_TOKENS, _lifted_linear_group_cuda, _lifted_matmul_cuda, _prefill_siblings)
from lift_ao.kernels.triton_matmul import (_TUNING_CONFIGS, _lifted_matmul_tuned, _prune_configs, lifted_matmul_triton,
                                           token_block)

# Relative error allowed against the float64 reference, per activation dtype.
CHECK_BOUNDS = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}

# (index, count): this process runs every count-th unit of the checks' work, from index on (--shard).
# The checks are mostly Triton compiling each tuning candidate (one CPU core per process), so
# --jobs N runs them as N processes on one GPU (see run_checks_in_processes).
_SHARD = (0, 1)
_check_units = itertools.count()


def _runs_here() -> bool:
    """Whether the next unit of check work is this process's (always, without --shard). Every process
    walks the same units in the same order, so the shards cover each once."""
    index, count = _SHARD
    return next(_check_units) % count == index
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672)]
BATCHES = [1, 4, 16, 64, 256]
PREFILL_BATCHES = [16, 64, 256]   # where the prefill path is timed beside the ±1 GEMM
LATTICES = {2.0: (32, 16), 2.4: (24, 10), 3.0: (24, 8)}  # bits: (D, d)
DTYPE = torch.bfloat16


def bench_us(fn) -> float:
    """Median µs of one CUDA-graph replay of ``fn`` (do_bench zeroes a 256 MB buffer before each
    repetition, so L2 is flushed). The graph keeps Python launch overhead (tens of µs for a few
    Triton launches, more than a decode kernel takes) out of the number, for every method alike."""
    fn()  # compiles and autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    us = 1e3 * do_bench(graph.replay, warmup=20, rep=60, return_mode="median")
    del graph
    return us


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    us = 1e3 * do_bench(lambda: dst.copy_(src), warmup=20, rep=100, return_mode="median")
    return 2 * src.numel() * 4 / us / 1e3


def random_mapping(d: int, D: int) -> torch.Tensor:
    """(d, D) with orthonormal rows, scaled like a trained lattice."""
    return (torch.linalg.qr(torch.randn(D, d, dtype=torch.float64)).Q.T * math.sqrt(D / d)).float().contiguous().cuda()


class LiftedLayer:
    """Random LiftQuant weights of one (N, K, bits) shape on the GPU."""

    def __init__(self, rows: int, features: int, bits: float):
        self.D, self.d = LATTICES[bits]
        rotation = make_rotation(features, self.d, seed=0)
        self.signs, self.left, self.right = (t.cuda() for t in (rotation.signs, rotation.left, rotation.right))
        self.mapping = random_mapping(self.d, self.D)
        self.length = rotation.padded_features // self.d * self.D
        self.codes, self.row_scale = self.sibling_weights(rows)
        self.features = features

    def sibling_weights(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random codes and row scales of ``rows`` outputs that read this layer's lift (its own, or
        k/v beside q, up beside gate)."""
        return random_packed_codes(rows, self.length, device="cuda"), (torch.rand(rows, device="cuda") + 0.5) / math.sqrt(self.length)

    def lift(self, x):
        return lift_activation_triton(x, self.signs, self.left, self.right, self.mapping)

    def lift_reference(self, x):
        return lift_activation_reference(x, self.signs, self.left, self.right, self.mapping)

    def code_bytes(self) -> int:
        return self.codes.numel() * 4 + self.row_scale.numel() * 4

    @property
    def padded_features(self) -> int:
        return self.signs.shape[0]

    @property
    def factors(self) -> tuple[int, int]:
        """(k1, k2): the rotation's Kronecker factor sizes."""
        return self.left.shape[0], self.right.shape[0]

    def prefill(self, x, bias=None):
        """The fused ops' prefill branch for this layer alone: rotation, rebuilt weight, cuBLAS."""
        return _prefill_siblings((x, self.signs, self.left, self.right, self.mapping), [self.codes],
                                 [self.row_scale], [bias])[0]

    def rebuild(self, config=None):
        """(N, padded_columns(Kp)) rotated-domain weight in DTYPE."""
        return rebuild_rotated_weight(self.codes, self.row_scale, self.mapping, self.padded_features, DTYPE,
                                      config=config)

    def rebuild_bytes(self) -> int:
        """Codes and scales read plus the bf16 weight written."""
        return self.code_bytes() + 2 * self.row_scale.shape[0] * padded_columns(self.padded_features)

    def rotated_weight_float64(self) -> torch.Tensor:
        """(N, Kp) float64 W_rot = diag(r) · blocks(M q), the rebuild's reference."""
        rows = self.row_scale.shape[0]
        signs = unpack_codes(self.codes, self.length, rows).double().view(rows, -1, self.D) * 2 - 1
        return (signs @ self.mapping.double().T).flatten(1) * self.row_scale.double()[:, None]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def poison_allocator(size: int) -> None:
    """Leave NaN-filled blocks in the caching allocator, so an output element the kernel never
    writes (torch.empty reuses them) shows up as NaN."""
    blocks = [torch.full((size,), float("nan"), device="cuda", dtype=torch.float32) for _ in range(2)]
    del blocks


def check_correctness(log) -> list[dict]:
    """Triton vs reference at real sizes (fresh inputs each); raises if any check fails."""
    checks = []
    cases = [(4096, 4096, 2.4, 1, torch.bfloat16), (1024, 4096, 2.0, 4, torch.float16),
             (14336, 4096, 3.0, 16, torch.bfloat16), (4096, 14336, 2.4, 256, torch.bfloat16),
             (8192, 8192, 2.4, 64, torch.float16), (1024, 4096, 2.4, 3, torch.float32),
             (28672, 8192, 2.4, 1, torch.bfloat16), (8192, 28672, 3.0, 8, torch.bfloat16),
             (14336, 4096, 2.0, 2, torch.float16)]
    for rows, features, bits, batch, dtype in cases:
        if not _runs_here():
            continue
        layer = LiftedLayer(rows, features, bits)
        x = torch.randn(batch, features, device="cuda").to(dtype)
        bias = torch.randn(rows, device="cuda").to(dtype)
        lifted = layer.lift(x)
        lifted_ref = layer.lift_reference(x)
        poison_allocator(batch * rows * 4)
        y_out = lifted_matmul_triton(lifted_ref, layer.codes, layer.row_scale, bias)
        y_ref = lifted_matmul_reference(lifted_ref.float(), layer.codes, layer.row_scale, bias.float())
        matmul_errors = [relative_error(y_out, y_ref)]
        if batch <= triton_lut.MAX_TOKENS:  # the GEMM above and the lookup kernel must both be right
            matmul_errors.append(relative_error(
                triton_lut.lookup_matmul(lifted_ref, layer.codes, layer.row_scale, bias), y_ref))
        op_out = lifted_matmul(lift_activation(x, layer.signs, layer.left, layer.right, layer.mapping),
                               layer.codes, layer.row_scale, bias)
        entry = dict(rows=rows, features=features, bits=bits, batch=batch, dtype=str(dtype),
                     lift_error=relative_error(lifted, lifted_ref.float()),
                     matmul_error=max(matmul_errors), op_error=relative_error(op_out, y_ref))
        entry["ok"] = all(e < CHECK_BOUNDS[dtype] for e in (entry["lift_error"], entry["matmul_error"], entry["op_error"]))
        checks.append(entry)
        log(f"check {entry}")
    checks += check_every_config(log)
    checks += check_layouts(log)
    checks += check_fused_decode(log)
    checks += check_prefill(log, LATTICES)
    return checks


def run_checks_in_processes(jobs: int, log) -> list[dict]:
    """:func:`check_correctness` split over ``jobs`` processes of this script on this GPU
    (``--checks-only --shard i/jobs``); their checks, merged in shard order.

    Compiling the tuning candidates is most of the checks' time and runs on one CPU core per process,
    so N processes take about 1/N of it (the GPU work is small). The autotuners' picks that the shards
    wrote to Triton's disk cache are deleted again: the shards time their candidates at the same time
    on one GPU, so those picks mean nothing. Their compiled kernels stay in the cache, so the timings
    that follow in this process compile little.

    Returns:
        the checks, as :func:`check_correctness` returns them.
    Raises:
        RuntimeError: a shard left no results (its stderr's end is in the message).
    """
    started = time.time()
    checks = []
    with tempfile.TemporaryDirectory() as scratch:
        errors = [open(Path(scratch, f"{i}.err"), "w") for i in range(jobs)]
        children = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--checks-only", "--shard",
                                      f"{i}/{jobs}", "--out", str(Path(scratch, str(i)))],
                                     stdout=subprocess.DEVNULL, stderr=errors[i]) for i in range(jobs)]
        exit_codes = [child.wait() for child in children]
        for i, (error, code) in enumerate(zip(errors, exit_codes)):
            error.close()
            results = Path(scratch, str(i), "kernels_checks.json")
            if not results.exists():
                raise RuntimeError(f"check shard {i}/{jobs} exited with {code} and wrote no results: "
                                   + Path(scratch, f"{i}.err").read_text()[-3000:])
            checks += json.loads(results.read_text())["checks"]
    for picks in Path(triton.knobs.cache.dir).rglob("*.autotune.json"):
        if picks.stat().st_mtime >= started:
            picks.unlink()
    for entry in checks:
        log(f"check {entry}")
    log(f"checks: {len(checks)} in {jobs} processes, {time.time() - started:.0f} s")
    return checks


def check_every_config(log, kernel_names: tuple = ("gemm", "lookup")) -> list[dict]:
    """Each tuning candidate of the named matmul kernels (the ±1 GEMM, the lookup kernel) that the
    autotuner may run on a problem, fixed, on decode and multi-token problems: the autotuner runs
    whichever is fastest, so every one must be right (2-word ±1-GEMM steps at 128-token blocks gave
    NaN on an H200: NOTES_kernels.md round 11). Each config runs three times, at 1, a few and
    automatic splits (the 16-bit output written directly, or fp32 partials reduced): a race shows up
    as an error that moves between runs."""
    gemm = lambda layer, lifted, bias, config, attempt: lifted_matmul_triton(  # noqa: E731
        lifted, layer.codes, layer.row_scale, bias, splits=(1, 3, None)[attempt], config=config)
    lookup = lambda layer, lifted, bias, config, attempt: triton_lut.lookup_matmul(  # noqa: E731
        lifted, layer.codes, layer.row_scale, bias, splits=(1, 5, None)[attempt], config=config)
    gemm_configs = lambda batch: _prune_configs(_TUNING_CONFIGS, {"BLOCK_B": token_block(batch)})  # noqa: E731
    # GEMM problems: 128-token blocks (16-bit and fp32), a 16-token block, 8-token blocks in each dtype.
    kernels = [("gemm", gemm, gemm_configs, [(4096, 4096, 256, DTYPE), (4096, 14336, 128, DTYPE),
                                             (4096, 4096, 128, torch.float32), (4096, 14336, 12, DTYPE),
                                             (4096, 14336, 1, DTYPE), (4096, 14336, 8, torch.float16),
                                             (1024, 4096, 5, torch.float32)], True),
               ("lookup", lookup, lambda batch: triton_lut._TUNING_CONFIGS,
                [(4096, 14336, 1, DTYPE), (1024, 4096, 8, DTYPE)], False)]
    checks = []
    for name, run, tuning_configs, problems, with_bias in kernels:
        if name not in kernel_names:
            continue
        for rows, features, batch, dtype in problems:
            if not _runs_here():
                continue
            configs = tuning_configs(batch)
            layer = LiftedLayer(rows, features, 2.4)
            lifted = layer.lift(torch.randn(batch, features, device="cuda", dtype=dtype))
            bias = torch.randn(rows, device="cuda", dtype=dtype) if with_bias else None
            y_ref = lifted_matmul_reference(lifted.float(), layer.codes, layer.row_scale,
                                            None if bias is None else bias.float())
            ran = 0
            for cfg in configs:
                config = cfg.all_kwargs()
                errors = []
                try:
                    for attempt in range(3):
                        poison_allocator(batch * rows * 4)
                        errors.append(relative_error(run(layer, lifted, bias, config, attempt), y_ref))
                except Exception as exc:  # e.g. out of shared memory for this tile: the autotuner skips it too
                    log(f"check {name} {config} did not run: {exc!r}"[:300])
                    continue
                ran += 1
                entry = dict(rows=rows, features=features, bits=2.4, batch=batch, dtype=str(dtype),
                             config=dict(config, kernel=name), lift_error=0.0, matmul_error=max(errors), op_error=0.0)
                entry["ok"] = all(e < CHECK_BOUNDS[dtype] for e in errors)
                checks.append(entry)
                log(f"check {entry}")
            if not ran:  # the autotuner would have nothing to run
                checks.append(dict(rows=rows, features=features, bits=2.4, batch=batch, dtype=str(dtype),
                                   config=f"no {name} config runs", lift_error=0.0, matmul_error=float("nan"),
                                   op_error=0.0, ok=False))
                log(f"check {checks[-1]}")
    return checks


def check_layouts(log) -> list[dict]:
    """The registered ±1 matmul (lookup kernel up to LOOKUP_MAX_TOKENS tokens, else the GEMM) on inputs
    the other checks never build: a lifted activation and a bias with stride 2 at 1/2/3/17/64 tokens in
    each dtype (the lookup path read them as contiguous), and an output of more than 2**31 elements
    (32800 tokens × 65536 rows, 4.3 GB in fp16), compared at its first and last 64 tokens (the GEMM's
    output offset was int32 and wrapped there)."""
    checks = []
    if _runs_here():
        for dtype, tokens in itertools.product((torch.float16, torch.bfloat16, torch.float32), (1, 2, 3, 17, 64)):
            layer = LiftedLayer(1000, 1000, 2.4)
            lifted = torch.randn(tokens, 2 * layer.length, device="cuda").to(dtype)[:, ::2]
            bias = torch.randn(2 * 1000, device="cuda").to(dtype)[::2]
            y_ref = lifted_matmul_reference(lifted.float(), layer.codes, layer.row_scale, bias.float())
            error = relative_error(_lifted_matmul_cuda(lifted, layer.codes, layer.row_scale, bias), y_ref)
            checks.append(dict(rows=1000, features=1000, bits=2.4, batch=tokens, dtype=str(dtype),
                               config="stride-2 lifted and bias", lift_error=0.0, matmul_error=error,
                               op_error=0.0, ok=error < CHECK_BOUNDS[dtype]))
            log(f"check {checks[-1]}")
    if _runs_here():
        rows, tokens, length = 65536, 32800, 64
        codes = random_packed_codes(rows, length, device="cuda")
        row_scale = torch.rand(rows, device="cuda") + 0.5
        lifted = torch.randn(tokens, length, device="cuda", dtype=torch.float16)
        out = _lifted_matmul_cuda(lifted, codes, row_scale, None)
        errors = [relative_error(out[ends], lifted_matmul_reference(lifted[ends].float(), codes, row_scale, None))
                  for ends in (slice(0, 64), slice(tokens - 64, tokens))]
        del out
        checks.append(dict(rows=rows, features=length, bits="—", batch=tokens, dtype=str(torch.float16),
                           config="output > 2**31 elements", lift_error=0.0, matmul_error=max(errors),
                           op_error=0.0, ok=max(errors) < CHECK_BOUNDS[torch.float16]))
        log(f"check {checks[-1]}")
    return checks


def decode_layer_ops(bits: float = 2.4):
    """One Llama-3-8B decoder layer's LiftQuant work as two callables of (x_4096, x_14336): the fused
    ops (what the passes install: group ops for q/k/v and gate/up) and the base-op composition."""
    q, o, gate, down = (LiftedLayer(4096, 4096, bits), LiftedLayer(4096, 4096, bits),
                        LiftedLayer(14336, 4096, bits), LiftedLayer(4096, 14336, bits))
    groups = [(q, [(q.codes, q.row_scale), q.sibling_weights(1024), q.sibling_weights(1024)]),
              (gate, [(gate.codes, gate.row_scale), gate.sibling_weights(14336)])]

    def group_args(x, layer, members):
        n = len(members)
        return (x, None, [layer.signs] * n, [layer.left] * n, [layer.right] * n, [layer.mapping] * n,
                [c for c, _ in members], [r for _, r in members], [None] * n)

    def fused(x, h):
        outs = [torch.ops.lift_ao.lifted_linear_group(*group_args(x, layer, members)) for layer, members in groups]
        outs += [torch.ops.lift_ao.lifted_linear(inp, layer.signs, layer.left, layer.right, layer.mapping, layer.codes,
                                                 layer.row_scale, None) for inp, layer in ((x, o), (h, down))]
        return outs

    def composed(x, h):
        outs = [compose_group(*group_args(x, layer, members)) for layer, members in groups]
        outs += [lifted_matmul(lift_activation(inp, layer.signs, layer.left, layer.right, layer.mapping),
                               layer.codes, layer.row_scale, None) for inp, layer in ((x, o), (h, down))]
        return outs

    return fused, composed


def check_fused_decode(log) -> list[dict]:
    """The fused ops' decode path (rotation, tables from u, one lookup launch per shared lift with its
    split reduction inside) against the base-op composition, at Llama-3-8B sizes."""
    checks = []
    fused, composed = decode_layer_ops()
    for batch in (1, 2, 16):  # the lookup path at 1-2, the ±1 GEMM path at 16
        if not _runs_here():
            continue
        x = torch.randn(batch, 4096, device="cuda", dtype=DTYPE)
        h = torch.randn(batch, 14336, device="cuda", dtype=DTYPE)
        want = composed(x, h)
        errors = []
        for _ in range(3):  # a race in the split reduction shows up as an error that moves between runs
            poison_allocator(batch * 14336 * 4)
            got = fused(x, h)
            errors.append(max(relative_error(a, b) for a, b in zip(_flat(got), _flat(want))))
        entry = dict(rows="llama3-8b layer", features=4096, bits=2.4, batch=batch, dtype=str(DTYPE),
                     config="fused decode ops", lift_error=0.0, matmul_error=max(errors), op_error=0.0)
        entry["ok"] = max(errors) < 1e-2
        checks.append(entry)
        log(f"check {entry}")
    return checks


def check_prefill(log, lattices) -> list[dict]:
    """The prefill path at real sizes: each rebuild tuning config, fixed, against the float64 W_rot
    (the autotuner may pick any; the row padding must come back zero), then the fused ops' rebuilt-
    weight branch against the reference chain (one linear; a q/k/v-like group against the ±1-GEMM
    composition), and the group's ±1 GEMM branch (16 and 5 tokens) against the same composition."""
    checks = []
    for bits in lattices:
        if not _runs_here():
            continue
        layer = LiftedLayer(4096, 14336, bits)
        kp = layer.padded_features
        want = layer.rotated_weight_float64()
        for cfg in triton_dequant._TUNING_CONFIGS:
            config = cfg.all_kwargs()
            poison_allocator(layer.rebuild_bytes() // 4)
            try:
                weight = layer.rebuild(config)
            except Exception as exc:  # e.g. out of registers for this tile: the autotuner skips it too
                log(f"check rebuild {config} did not run: {exc!r}"[:300])
                continue
            error = relative_error(weight[:, :kp], want)
            entry = dict(rows=4096, features=14336, bits=bits, batch=0, dtype=str(DTYPE),
                         config=dict(config, kernel="rebuild"), lift_error=0.0, matmul_error=error, op_error=0.0)
            entry["ok"] = error < 5e-3 and bool((weight[:, kp:] == 0).all())
            checks.append(entry)
            log(f"check {entry}")
    for rows, features, bits, batch, dtype in [(4096, 14336, 2.4, 256, torch.bfloat16),
                                               (14336, 4096, 3.0, 64, torch.float16),
                                               (1024, 4096, 2.0, 300, torch.bfloat16),
                                               (4096, 4096, 2.4, 17, torch.float32)]:
        if not _runs_here():
            continue
        layer = LiftedLayer(rows, features, bits)
        x = torch.randn(batch, features, device="cuda").to(dtype)
        bias = torch.randn(rows, device="cuda").to(dtype)
        poison_allocator(batch * rows * 4)
        y = layer.prefill(x, bias)
        y_ref = lifted_matmul_reference(layer.lift_reference(x.float()), layer.codes, layer.row_scale, bias.float())
        entry = dict(rows=rows, features=features, bits=bits, batch=batch, dtype=str(dtype), config="prefill path",
                     lift_error=0.0, matmul_error=0.0, op_error=relative_error(y, y_ref))
        entry["ok"] = entry["op_error"] < CHECK_BOUNDS[dtype]
        checks.append(entry)
        log(f"check {entry}")
    q = LiftedLayer(4096, 4096, 2.4)
    members = [(q.codes, q.row_scale), q.sibling_weights(1024), q.sibling_weights(1024)]
    # The prefill group (rebuilt weights, within bf16 of the composition) and the ±1 GEMM group (one lift
    # per shared lift, as the composition: its values exactly, fp32 included).
    for batch, dtype, path, bound in [(max(256, REBUILD_MIN_TOKENS), DTYPE, "fused prefill group op", 1e-2),
                                      (16, DTYPE, "fused ±1 GEMM group op", 1e-6),
                                      (5, torch.float32, "fused ±1 GEMM group op", 1e-6)]:
        if not _runs_here():
            continue
        x = torch.randn(batch, 4096, device="cuda", dtype=dtype)
        group_args = (x, None, [q.signs] * 3, [q.left] * 3, [q.right] * 3, [q.mapping] * 3, [c for c, _ in members],
                      [r for _, r in members], [None, torch.randn(1024, device="cuda", dtype=dtype), None])
        poison_allocator(batch * 4096 * 8)
        errors = [relative_error(a, b)
                  for a, b in zip(_lifted_linear_group_cuda(*group_args), compose_group(*group_args))]
        entry = dict(rows="q/k/v group", features=4096, bits=2.4, batch=batch, dtype=str(dtype), config=path,
                     lift_error=0.0, matmul_error=0.0, op_error=max(errors))
        entry["ok"] = max(errors) < bound
        checks.append(entry)
        log(f"check {entry}")
    return checks


def _flat(outputs) -> list[torch.Tensor]:
    return [t for item in outputs for t in (item if isinstance(item, list) else [item])]


# K of the decode-tables study: Llama-3-8B (hidden, MLP) and Qwen2.5-1.5B (hidden, MLP).
DECODE_STUDY_FEATURES = {"llama3-8b": (4096, 14336), "qwen2.5-1.5b": (1536, 8960)}
DECODE_LAYER_TOKENS = (1, 4, 8, 16)  # the lookup path at 1; the ±1 GEMM path at 4-16


def _distinct_factorisations(features: int) -> list[tuple[float, "LiftedLayer"]]:
    """(bits, 16-row layer) of the study lattices, one per distinct (k1, k2) at this K (2.0 and 3.0
    bits, d = 16 and 8, factor every study K alike)."""
    layers = {}
    for bits in LATTICES:
        layer = LiftedLayer(16, features, bits)
        layers.setdefault(layer.factors, (bits, layer))
    return list(layers.values())


def _tables_float64(x, layer, words, block) -> torch.Tensor:
    """(8·words, 16, block) float64 tables: Rᵀ pad(signs ⊙ x) → blockwise M → signed 4-sums."""
    f64 = torch.float64
    lifted = lift_activation_reference(x.to(f64), layer.signs.to(f64), layer.left.to(f64), layer.right.to(f64),
                                       layer.mapping.to(f64))
    padded = torch.zeros(block, 32 * words, dtype=f64, device=x.device)
    padded[:x.shape[0], :lifted.shape[-1]] = lifted
    signs = ((torch.arange(16, device=x.device)[:, None] >> torch.arange(4, device=x.device)) & 1).to(f64) * 2 - 1
    return torch.einsum("it,bgt->gib", signs, padded.view(block, 8 * words, 4))


def decode_tables(x, signs, left, right, mapping, words, block, zero_counters=None):
    """What the fused decode ops run per shared lift before the lookup: the rotation, then the tables from u
    (M made fp32 and contiguous first, as the fused ops do: the tables kernel reads it before its PDL wait)."""
    mapping = mapping.to(torch.float32).contiguous()
    return triton_lut.lift_tables(rotate_triton(x, signs, left, right), mapping, words, block, zero_counters)


def check_decode_tables(log) -> list[dict]:
    """The decode tables (rotation + tables from u) against the float64 tables at every study K ×
    lattice × 1..LOOKUP_MAX_TOKENS tokens (bf16: tf32 products, ~1e-3 like the rotation alone; one
    fp32 case per K at 2.4 bits: fp32 products); the launch must also zero the split counters."""
    checks = []
    bounds = {torch.bfloat16: 5e-3, torch.float32: 2e-5}
    for features in [k for pair in DECODE_STUDY_FEATURES.values() for k in pair]:
        for bits, layer in _distinct_factorisations(features):
            words = words_per_row(layer.length)
            cases = [(tokens, DTYPE) for tokens in range(1, LOOKUP_MAX_TOKENS + 1)] + [(1, torch.float32)]
            for tokens, dtype in cases if bits == 2.4 else cases[:LOOKUP_MAX_TOKENS]:
                block = triton_lut.token_block(tokens)
                x = torch.randn(tokens, features, device=layer.signs.device).to(dtype)
                poison_allocator(block * 8 * words * 16)
                counters = torch.full((4096,), 7, dtype=torch.int32, device=x.device)
                tables = decode_tables(x, layer.signs, layer.left, layer.right, layer.mapping, words, block, counters)
                error = (relative_error(tables, _tables_float64(x, layer, words, block))
                         if int(counters.abs().sum()) == 0 else float("nan"))
                entry = dict(rows="decode tables", features=features, bits=bits, batch=tokens, dtype=str(dtype),
                             config=f"(k1, k2) = {layer.factors}, rotation + tables from u", lift_error=error,
                             matmul_error=0.0, op_error=0.0)
                entry["ok"] = error < bounds[dtype]  # nan fails
                checks.append(entry)
                log(f"check {entry}")
    return checks


def study_decode(log, save) -> dict:
    """Time of one 8B decoder layer's LiftQuant work (2.4 bits, fused ops vs the base-op composition) at
    DECODE_LAYER_TOKENS tokens (1-2: the lookup path; 3-16: the ±1 GEMM path), each timed twice in the
    order fused, composed, composed, fused and the faster of each pair kept (the first capture at a new
    token count once measured 23 µs slow on the H100: NOTES_kernels.md, round 14); then per model K ×
    lattice × token count the rotation alone and the decode tables (rotation + tables from u).
    ``save(study)`` after each number, so a call cut off at its time limit still leaves what it measured."""
    fused, composed = decode_layer_ops()
    study = dict(layer=[], tables=[])
    for tokens in DECODE_LAYER_TOKENS:
        x = torch.randn(tokens, 4096, device="cuda", dtype=DTYPE)
        h = torch.randn(tokens, 14336, device="cuda", dtype=DTYPE)
        times = [bench_us(lambda: f(x, h)) for f in (fused, composed, composed, fused)]
        entry = dict(tokens=tokens, fused_us=min(times[0], times[3]), composed_us=min(times[1], times[2]), times=times)
        study["layer"].append(entry)
        log(f"decode layer (2.4 bits) {entry}")
        save(study)
    for model, features_pair in DECODE_STUDY_FEATURES.items():
        for features in features_pair:
            for bits, layer in _distinct_factorisations(features):
                words = words_per_row(layer.length)
                for tokens in range(1, LOOKUP_MAX_TOKENS + 1):
                    inp = torch.randn(tokens, features, device="cuda", dtype=DTYPE)
                    args = (inp, layer.signs, layer.left, layer.right, layer.mapping, words, triton_lut.token_block(tokens))
                    entry = dict(model=model, features=features, bits=bits, factors=layer.factors, tokens=tokens,
                                 rotate_us=bench_us(lambda: rotate_triton(*args[:4])),
                                 tables_us=bench_us(lambda: decode_tables(*args)))
                    study["tables"].append(entry)
                    log(f"tables {entry}")
                    save(study)
    return study


def decode_markdown(result: dict) -> str:
    """kernels_decode.md: the --decode-study tables and the decode checks."""
    study = result["decode_study"]
    lines = [f"# lift_ao decode: one 8B layer at 1-16 tokens and the per-lift tables on {result['device']}", "",
             f"Command: `{result['command']}`  ",
             f"torch {result['torch']}, triton {result['triton']}, {result['date']}; µs = median of do_bench over a "
             "CUDA-graph replay (L2 flushed).", "",
             "## One Llama-3-8B layer's LiftQuant work (2.4 bits): fused ops vs the base-op composition", "",
             "| tokens | fused ops µs | composition µs | composition / fused |", "|---|---|---|---|"]
    lines += [f"| {e['tokens']} | {e['fused_us']:.1f} | {e['composed_us']:.1f} | {e['composed_us'] / e['fused_us']:.2f} |"
              for e in study["layer"]]
    lines += ["",
             "## Tables of one shared lift (rotation, then tables from u)", "",
             "| model | K | bits | (k1, k2) | tokens | rotation µs | rotation + tables µs |", "|---|---|---|---|---|---|---|"]
    for e in study["tables"]:
        lines.append(f"| {e['model']} | {e['features']} | {e['bits']} | {tuple(e['factors'])} | {e['tokens']} | "
                     f"{e['rotate_us']:.1f} | {e['tables_us']:.1f} |")
    lines += ["", "## Checks (decode tables against float64 under `lift`; the fused layer against the composition "
              "under `matmul`)", "", "| N×K | bits | batch | dtype / config | lift | matmul | op | ok |",
              "|---|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['rows']}×{c['features']} | {c['bits']} | {c['batch']} | {c['dtype']} {c.get('config', '')} "
                     f"| {c['lift_error']:.1e} | {c['matmul_error']:.1e} | {c['op_error']:.1e} | {c['ok']} |")
    return "\n".join(lines) + "\n"


def check_compile(log) -> dict:
    """torch.compile(fullgraph=True) over both ops on CUDA: no graph break, same result."""
    layer = LiftedLayer(512, 1000, 2.4)
    x = torch.randn(3, 1000, device="cuda", dtype=DTYPE)

    def forward(x):
        lifted = torch.ops.lift_ao.lift_activation(x, layer.signs, layer.left, layer.right, layer.mapping)
        return torch.ops.lift_ao.lifted_matmul(lifted, layer.codes, layer.row_scale, None)

    try:
        compiled = torch.compile(forward, fullgraph=True)
        err = relative_error(compiled(x), forward(x))
        result = dict(ok=err < 1e-3, error=err)
    except Exception as exc:  # recorded, not fatal: timings matter more than this probe
        result = dict(ok=False, error=repr(exc)[:500])
    log(f"compile {result}")
    return result


def int4_linear(weight: torch.Tensor, log):
    """torchao int4 weight-only (tile_packed_to_4d, group 128) Linear, or None when torchao fails."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="cuda", dtype=DTYPE)
        linear.weight.data.copy_(weight)
        quantize_(linear, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        return linear
    except Exception as exc:  # the comparison is lost, the rest of the run is not
        log(f"torchao int4 unavailable: {exc!r}")
        return None


def sweep_configs(log) -> list[dict]:
    """Every tuning candidate (plus a few wider ones), fixed, on the decode shapes that matter most."""
    extra = [triton.Config({"BLOCK_N": 16, "BLOCK_W": 8}, num_warps=1, num_stages=4),
             triton.Config({"BLOCK_N": 32, "BLOCK_W": 16}, num_warps=2, num_stages=3),
             triton.Config({"BLOCK_N": 64, "BLOCK_W": 16}, num_warps=4, num_stages=3)]
    sweep = []
    for rows, features, batch in [(28672, 8192, 1), (8192, 28672, 1), (4096, 4096, 1), (28672, 8192, 16)]:
        layer = LiftedLayer(rows, features, 2.4)
        lifted = layer.lift(torch.randn(batch, features, device="cuda", dtype=DTYPE))
        for cfg in _TUNING_CONFIGS + extra:
            config = cfg.all_kwargs()
            try:
                us = bench_us(lambda: lifted_matmul_triton(lifted, layer.codes, layer.row_scale, None, config=config))
            except Exception as exc:  # a config that does not compile is a finding, not a crash
                log(f"sweep {rows}x{features} b{batch} {config}: failed {exc!r}"[:300])
                continue
            sweep.append(dict(rows=rows, features=features, batch=batch, config=config, us=us))
            log(f"sweep {rows}x{features} b{batch} {config}: {us:.1f}us")
        del layer
    return sweep


def study_lookup(log) -> list[dict]:
    """The table-lookup decode kernel, every config × split count, beside the ±1 GEMM (2.4 bits), at
    1 and 2 tokens; at 4 and 8 every config with the automatic split count, to place the crossover
    ``triton_register.LOOKUP_MAX_TOKENS``."""
    study = []
    for rows, features in [(28672, 8192), (8192, 28672), (14336, 4096), (4096, 4096), (1024, 4096)]:
        layer = LiftedLayer(rows, features, 2.4)
        for batch in (1, 2, 4, 8):
            lifted = layer.lift(torch.randn(batch, features, device="cuda", dtype=DTYPE))
            base = dict(rows=rows, features=features, batch=batch, bytes=layer.code_bytes())
            study.append(dict(base, kernel="gemm", us=bench_us(
                lambda: lifted_matmul_triton(lifted, layer.codes, layer.row_scale, None))))
            tables = lambda: triton_lut.build_tables(lifted, words_per_row(layer.length), triton.next_power_of_2(batch))
            study.append(dict(base, kernel="tables", us=bench_us(tables)))
            for cfg in triton_lut._TUNING_CONFIGS:
                config = cfg.all_kwargs()
                for splits in (None, 1, 2, 4, 8, 16) if batch <= 2 else (None,):
                    us = bench_us(lambda: triton_lut.lookup_matmul(lifted, layer.codes, layer.row_scale, None,
                                                                     splits=splits, config=config))
                    study.append(dict(base, kernel="lookup", config=config, splits=splits, us=us))
            gemm, tables_entry, *lookups = [e for e in study if e["rows"] == rows and e["batch"] == batch]
            best = min(lookups, key=lambda e: e["us"])
            log(f"lookup {rows}x{features} b{batch}: gemm {gemm['us']:.1f}us tables {tables_entry['us']:.1f}us; "
                f"lookup {best['us']:.1f}us (BLOCK_N {best['config']['BLOCK_N']}, splits {best['splits']}, "
                f"{best['bytes'] / best['us'] / 1e3:.0f} GB/s)")
        del layer
    return study


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"28672x8192,4096x4096"`` → [(28672, 8192), (4096, 4096)] (N×K; "x" or "×")."""
    shapes = [item.replace("×", "x").split("x") for item in text.split(",")]
    if not all(len(shape) == 2 and all(n.strip().isdigit() for n in shape) for shape in shapes):
        raise SystemExit(f"--shapes {text!r}: expected a comma list of NxK, e.g. 28672x8192,4096x4096")
    return [(int(n), int(k)) for n, k in shapes]


def time_shapes(copy_gbs: float, log, shapes: list[tuple[int, int]], save) -> list[dict]:
    """:func:`time_shape` for each (N, K) of ``shapes`` in order, ``save`` after each."""
    rows_out = []
    for rows, features in shapes:
        rows_out += time_shape(rows, features, BATCHES, LATTICES, copy_gbs, log, with_int4=True)
        save(rows_out)
    return rows_out


def time_shape(rows: int, features: int, batches, lattices, copy_gbs: float, log, with_int4: bool) -> list[dict]:
    """bf16, optionally int4, and each lattice's kernels at one (N, K) over the batches: the registered
    ``lifted_matmul`` alone and after the lift; at PREFILL_BATCHES and beyond 256 also the prefill path,
    its rotation, and (once per lattice) the rebuild kernel alone."""
    entries = []
    weight = torch.randn(rows, features, device="cuda", dtype=DTYPE) / math.sqrt(features)
    int4 = int4_linear(weight, log) if with_int4 else None
    layers = {bits: LiftedLayer(rows, features, bits) for bits in lattices}
    rebuild_us = {bits: bench_us(layer.rebuild) for bits, layer in layers.items()}
    for batch in batches:
        x = torch.randn(batch, features, device="cuda", dtype=DTYPE)
        act_bytes = 2 * batch * (features + rows)
        bf16_us = bench_us(lambda: x @ weight.T)
        base = dict(rows=rows, features=features, batch=batch)
        shape_entries = [dict(base, method="bf16", us=bf16_us, bytes=2 * rows * features + act_bytes)]
        if int4 is not None:
            with torch.no_grad():
                int4_us = bench_us(lambda: int4(x))
            int4_bytes = rows * features // 2 + 2 * 2 * rows * (features // 128) + act_bytes
            shape_entries.append(dict(base, method="int4", us=int4_us, bytes=int4_bytes))
        for bits, layer in layers.items():
            lifted = layer.lift(x)
            # What the registered op runs: the lookup kernel for few tokens, else the ±1 GEMM.
            matmul_us = bench_us(lambda: _lifted_matmul_cuda(lifted, layer.codes, layer.row_scale, None))
            lift_us = bench_us(lambda: layer.lift(x))
            both_us = bench_us(lambda: _lifted_matmul_cuda(layer.lift(x), layer.codes, layer.row_scale, None))
            best = (f"lookup {triton_lut._lookup_tuned.best_config}" if batch <= LOOKUP_MAX_TOKENS
                    else _lifted_matmul_tuned.best_config)
            matmul_bytes = layer.code_bytes() + 2 * batch * (layer.length + rows)
            entry = dict(base, method=f"lift{bits}", bits=bits, us=matmul_us, bytes=matmul_bytes,
                         lift_us=lift_us, lift_matmul_us=both_us, config=str(best))
            if batch in PREFILL_BATCHES or batch > 256:
                rotated = torch.empty(batch, padded_columns(layer.padded_features), device="cuda", dtype=DTYPE)
                entry.update(
                    prefill_us=bench_us(lambda: layer.prefill(x)),
                    rotate_us=bench_us(lambda: rotate_triton(x, layer.signs, layer.left, layer.right,
                                                             out=rotated[:, :layer.padded_features])),
                    rebuild_us=rebuild_us[bits], rebuild_gbs=layer.rebuild_bytes() / rebuild_us[bits] / 1e3,
                    rebuild_config=str(triton_dequant._rebuild_tuned.best_config))
            shape_entries.append(entry)
        for entry in shape_entries:
            entry["gbs"] = entry["bytes"] / entry["us"] / 1e3
            entry["copy_fraction"] = entry["gbs"] / copy_gbs
        log(" | ".join(f"{e['method']} {e['us']:.1f}us {e['gbs']:.0f}GB/s"
                       + (f" prefill {e['prefill_us']:.1f}us" if "prefill_us" in e else "") for e in shape_entries)
            + f"  <- {rows}x{features} b{batch}")
        entries += shape_entries
    del weight, int4, layers
    torch.cuda.empty_cache()
    return entries


def study_prefill(copy_gbs: float, log) -> list[dict]:
    """The prefill path at 2.4 bits on the 8B MLP shapes, batch 16 to 1024, beside bf16 and the lift
    + ±1 GEMM: where the rebuilt weight starts to pay (REBUILD_MIN_TOKENS)."""
    entries = []
    for rows, features in [(4096, 14336), (14336, 4096)]:
        entries += time_shape(rows, features, PREFILL_BATCHES + [1024], {2.4: LATTICES[2.4]}, copy_gbs, log,
                              with_int4=False)
    return entries


def time_variants(log) -> list[dict]:
    """Split-K counts at batch 1 (the automatic choice vs fixed ones), for the notes."""
    variants = []
    for rows, features in [(1024, 4096), (28672, 8192), (8192, 28672)]:
        layer = LiftedLayer(rows, features, 2.4)
        lifted = layer.lift(torch.randn(1, features, device="cuda", dtype=DTYPE))
        for splits in (None, 1, 4, 8, 16):
            us = bench_us(lambda: lifted_matmul_triton(lifted, layer.codes, layer.row_scale, None, splits=splits))
            variants.append(dict(rows=rows, features=features, batch=1, bits=2.4, splits=splits,
                                 us=us, config=str(_lifted_matmul_tuned.best_config)))
            log(f"variant {rows}x{features} splits={splits}: {us:.1f}us {variants[-1]['config']}")
    return variants


def markdown(result: dict) -> str:
    timed = result["timings"]
    lines = [f"# lift_ao kernels on {result['device']}", "",
             f"Command: `{result['command']}`  ", f"torch {result['torch']}, triton {result['triton']}, "
             f"copy bandwidth {result['copy_gbs']:.0f} GB/s (read+write), {result['date']}", "",
             "µs = median of do_bench over a CUDA-graph replay (L2 flushed); GB/s = minimal bytes / time; %copy = GB/s / copy bandwidth. "
             "lift columns time the registered `lifted_matmul` CUDA kernel alone (x̃ given; the table-lookup kernel "
             f"up to {LOOKUP_MAX_TOKENS} tokens, the ±1 GEMM above); `+lift` is lift_activation + lifted_matmul.", "",
             "| N×K | batch | bf16 µs | int4 µs | int4 %copy | " + " | ".join(
                 f"{b} µs | {b} %copy | {b} +lift µs | {b} vs int4 | {b} vs bf16" for b in LATTICES) + " |",
             "|" + "---|" * (5 + 5 * len(LATTICES))]
    keyed = {(e["rows"], e["features"], e["batch"], e["method"]): e for e in timed}
    for rows, features in SHAPES:
        for batch in BATCHES:
            bf16 = keyed.get((rows, features, batch, "bf16"))
            if bf16 is None:
                continue
            int4 = keyed.get((rows, features, batch, "int4"))
            cells = [f"{rows}×{features}", str(batch), f"{bf16['us']:.1f}",
                     f"{int4['us']:.1f}" if int4 else "-", f"{100 * int4['copy_fraction']:.0f}%" if int4 else "-"]
            for bits in LATTICES:
                e = keyed[(rows, features, batch, f"lift{bits}")]
                cells += [f"{e['us']:.1f}", f"{100 * e['copy_fraction']:.0f}%", f"{e['lift_matmul_us']:.1f}",
                          f"{int4['us'] / e['us']:.2f}×" if int4 else "-", f"{bf16['us'] / e['us']:.2f}×"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += prefill_table(timed, LATTICES)
    lines += ["", "## Correctness at real sizes (relative error vs kernels/reference.py)", ""]
    if not result["checks"]:
        lines += ["Not run in this call (`--skip-checks`): see the `--checks-only` call of the same commit.", ""]
    lines += ["| N×K | bits | batch | dtype | lift | matmul | registered ops | ok |", "|---|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['rows']}×{c['features']} | {c['bits']} | {c['batch']} | {c['dtype']} "
                     f"{c.get('config', '')} | {c['lift_error']:.1e} | {c['matmul_error']:.1e} | {c['op_error']:.1e} | {c['ok']} |")
    lines += ["", f"torch.compile(fullgraph=True) over both ops: {result['compile']}", "",
              "## Config sweep (2.4 bits, lifted_matmul µs, automatic split-K)", "",
              "| N×K | batch | config | µs |", "|---|---|---|---|"]
    for v in result["sweep"]:
        lines.append(f"| {v['rows']}×{v['features']} | {v['batch']} | {v['config']} | {v['us']:.1f} |")
    lines += ["", "## Split-K variants (2.4 bits, batch 1, lifted_matmul µs)", "",
              "| N×K | splits | µs | config |", "|---|---|---|---|"]
    for v in result["variants"]:
        lines.append(f"| {v['rows']}×{v['features']} | {v['splits'] or 'auto'} | {v['us']:.1f} | {v['config']} |")
    return "\n".join(lines) + "\n"


def prefill_table(timed: list[dict], lattices) -> list[str]:
    """Markdown lines: the prefill path beside the lift + ±1 GEMM and bf16, where it was timed."""
    keyed = {(e["rows"], e["features"], e["batch"], e["method"]): e for e in timed}
    lines = ["", "## Prefill path (fused ops from REBUILD_MIN_TOKENS tokens): rotation + rebuilt weight + cuBLAS", "",
             f"REBUILD_MIN_TOKENS = {REBUILD_MIN_TOKENS}. `±1` = lift_activation + lifted_matmul (the ±1 GEMM); "
             "`rebuilt` = the whole prefill path; `rotate` and `rebuild` its two Triton kernels alone "
             "(rebuild GB/s: codes read + bf16 weight written).", "",
             "| N×K | batch | bf16 µs | " + " | ".join(
                 f"{b} ±1 µs | {b} rebuilt µs | {b} rebuilt / bf16 | {b} rotate µs | {b} rebuild µs | {b} rebuild GB/s"
                 for b in lattices) + " |",
             "|" + "---|" * (3 + 6 * len(lattices))]
    for (rows, features, batch, method), bf16 in keyed.items():
        entries = [keyed.get((rows, features, batch, f"lift{b}")) for b in lattices]
        if method != "bf16" or not all(e and "prefill_us" in e for e in entries):
            continue
        cells = [f"{rows}×{features}", str(batch), f"{bf16['us']:.1f}"]
        for e in entries:
            cells += [f"{e['lift_matmul_us']:.1f}", f"{e['prefill_us']:.1f}", f"{e['prefill_us'] / bf16['us']:.2f}×",
                      f"{e['rotate_us']:.1f}", f"{e['rebuild_us']:.1f}", f"{e['rebuild_gbs']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def prefill_markdown(result: dict) -> str:
    """kernels_prefill.md: the --prefill-study table and its checks."""
    lines = [f"# lift_ao prefill path on {result['device']}", "", f"Command: `{result['command']}`  ",
             f"torch {result['torch']}, triton {result['triton']}, copy bandwidth {result['copy_gbs']:.0f} GB/s, "
             f"{result['date']}; µs = median of do_bench over a CUDA-graph replay (L2 flushed)."]
    lines += prefill_table(result["timings"], {2.4: LATTICES[2.4]})
    lines += ["", "## Checks", "", "| N×K | bits | batch | dtype / config | error | ok |", "|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['rows']}×{c['features']} | {c['bits']} | {c['batch']} | {c['dtype']} {c.get('config', '')} "
                     f"| {max(c['matmul_error'], c['op_error']):.1e} | {c['ok']} |")
    return "\n".join(lines) + "\n"


def warn_if_failed(checks: list[dict], log) -> None:
    """Log a warning before any timing when a correctness check failed (the timings still run)."""
    if not all(c["ok"] for c in checks):
        log("CORRECTNESS FAILED: timings below are of a wrong kernel")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="two shapes only (smoke run)")
    parser.add_argument("--shapes", default=None, metavar="NxK,...",
                        help="time only these N×K (e.g. 4096x4096,1024x4096); the full table (all seven, ~515 s "
                             "on an H100 with 8 check processes) nearly fills one 10-minute device call")
    parser.add_argument("--checks-only", action="store_true",
                        help="only the correctness checks and the compile check (~3 min on an H100 in 8 processes, "
                             "over 9 in one); exits non-zero if one fails")
    parser.add_argument("--skip-checks", action="store_true",
                        help="with --shapes: time without the checks, for a table split over calls after one "
                             "--checks-only call of the same commit (the table says they were not run here)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that run the checks (each compiles on its own CPU core; default "
                             "min(8, CPUs)); 1 runs them in this process")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="internal (--jobs): run the I-th of N parts of the checks, without the compile check")
    parser.add_argument("--sweep", action="store_true", help="first time every tuning config on decode shapes")
    parser.add_argument("--decode-study", action="store_true",
                        help="only the decode checks (fused decode ops, decode tables), one 8B decoder layer "
                             "(fused ops vs the composition), and the rotation and tables alone at "
                             "Llama-3-8B / Qwen2.5-1.5B K (kernels_decode.json / .md)")
    parser.add_argument("--lookup-study", action="store_true",
                        help="only the lookup kernel's checks and its configs × splits (writes kernels_lookup.json)")
    parser.add_argument("--prefill-study", action="store_true",
                        help="only the prefill checks and the prefill path at 2.4 bits, 2 shapes × batch 16-1024 "
                             "(writes kernels_prefill.json / .md; ~1-2 min)")
    args = parser.parse_args()
    if args.skip_checks and (args.checks_only or not args.shapes):
        parser.error("--skip-checks needs --shapes (a full table runs its own checks) and not --checks-only")
    if args.jobs < 1 or (args.shard is not None and not args.checks_only):
        parser.error("--jobs must be >= 1, and --shard goes with --checks-only")
    if args.shard is not None:
        global _SHARD
        _SHARD = tuple(int(part) for part in args.shard.split("/"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "kernels.log", "w")

    def log(message: str):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    torch.manual_seed(0)
    started = time.time()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  command="python benchmarks/kernel_speed.py " + " ".join(sys.argv[1:]))
    if args.shard is None:  # a shard only checks, next to the others
        result["copy_gbs"] = copy_bandwidth()
        log(f"{result['device']}: copy {result['copy_gbs']:.0f} GB/s")
    if args.prefill_study:
        result["checks"] = check_prefill(log, {2.4: LATTICES[2.4]})
        warn_if_failed(result["checks"], log)
        result["timings"] = study_prefill(result["copy_gbs"], log)
        result["seconds"] = time.time() - started
        (out_dir / "kernels_prefill.json").write_text(json.dumps(result, indent=1))
        (out_dir / "kernels_prefill.md").write_text(prefill_markdown(result))
        print(prefill_markdown(result))
        return
    if args.decode_study:
        # Only the decode kernels' checks: the full set (every tuning config of every kernel) took the
        # whole of a 130 s call on an H200 before any timing.
        result["checks"] = check_fused_decode(log) + check_decode_tables(log)
        warn_if_failed(result["checks"], log)

        def save_decode(study):
            result["decode_study"] = study
            result["seconds"] = time.time() - started
            (out_dir / "kernels_decode.json").write_text(json.dumps(result, indent=1))
            (out_dir / "kernels_decode.md").write_text(decode_markdown(result))

        save_decode(study_decode(log, save_decode))
        print(decode_markdown(result))
        return
    if args.lookup_study:
        # Only the lookup kernel's checks: the full set took 250 s of an H100 call (round 16).
        result["checks"] = check_every_config(log, ("lookup",)) + check_fused_decode(log)
        warn_if_failed(result["checks"], log)
        result["lookup_study"] = study_lookup(log)
        result["seconds"] = time.time() - started
        (out_dir / "kernels_lookup.json").write_text(json.dumps(result, indent=1))
        return
    if args.skip_checks:
        result["checks"], result["compile"] = [], "not run in this call (--skip-checks)"
    else:
        result["checks"] = (check_correctness(log) if args.jobs == 1 or args.shard is not None
                            else run_checks_in_processes(args.jobs, log))
        warn_if_failed(result["checks"], log)
        result["compile"] = check_compile(log) if args.shard is None else {"ok": True, "note": "run by --jobs' parent"}
    if args.checks_only:
        result["seconds"] = time.time() - started
        (out_dir / "kernels_checks.json").write_text(json.dumps(result, indent=1))
        failed = [c for c in result["checks"] if not c["ok"]] + ([] if result["compile"].get("ok") else [result["compile"]])
        if failed:
            sys.exit(f"{len(failed)} checks failed: {failed}")
        return
    result["variants"] = []
    result["sweep"] = sweep_configs(log) if args.sweep else []

    def save(timings):
        """Write what exists so far, so a run cut off at its time limit still leaves results."""
        result["timings"] = timings
        result["seconds"] = time.time() - started
        (out_dir / "kernels.json").write_text(json.dumps(result, indent=1))
        (out_dir / "kernels.md").write_text(markdown(result))

    # Largest first: they carry the targets, and a run cut off at its limit keeps them.
    shapes = (parse_shapes(args.shapes) if args.shapes else SHAPES[:2] if args.quick
              else sorted(SHAPES, key=lambda s: -s[0] * s[1]))
    save(time_shapes(result["copy_gbs"], log, shapes, save))
    result["variants"] = time_variants(log)
    save(result["timings"])
    print(markdown(result))


if __name__ == "__main__":
    main()
