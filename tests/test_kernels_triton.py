"""Triton kernels vs float64 references, run on CPU through Triton's interpreter (tests/conftest.py).

Shapes are tiny (the interpreter is slow) but cover what breaks bit-level kernels: code lengths that
are not multiples of 32 (partial last word), row counts that are not multiples of the tile, K that
needs padding to Kp, d/D that are not powers of two, token counts 1/3/17, split-K, bias or none.
"""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from checks import random_codes  # noqa: E402
from lift_ao.packing import pack_codes, unpack_codes, words_per_row  # noqa: E402
from lift_ao.transform import make_rotation, rotate  # noqa: E402
from lift_ao.kernels.reference import lift_activation_reference, lifted_matmul_reference  # noqa: E402
from lift_ao.kernels.triton_lift import lift_activation_triton, rotate_triton  # noqa: E402
from lift_ao.kernels import triton_lut, triton_matmul  # noqa: E402
from lift_ao.kernels.triton_lut import (  # noqa: E402
    MAX_TOKENS, build_tables, lift_tables, lookup_matmul, lookup_siblings, split_counter_count, token_block)
from lift_ao.kernels.triton_matmul import dependent_launch, lifted_matmul_triton  # noqa: E402
from lift_ao.kernels.triton_register import (  # noqa: E402
    _lifted_linear_cuda, _lifted_linear_group_cuda, _lifted_matmul_cuda)
from lift_ao.kernels.fused_ops import lifted_linear_group  # noqa: E402
from lift_ao.lattice import Lattice  # noqa: E402
from lift_ao.tensor import LiftQuantTensor  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# ‖out − ref‖ / ‖ref‖ bounds: the output's own rounding dominates for 16-bit types; fp32 runs as a
# two-term bf16 split (~16 mantissa bits).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _interpreter_bf16_dot(monkeypatch):
    """Triton 3.9's interpreter multiplies bf16 dot operands as their raw uint16 bits; upcast them.

    Only the interpreter's emulation of ``tl.dot`` is patched; the kernels are unchanged.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16:
            a = interpreter.TensorHandle(interpreter._convert_float(a.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
        if b.dtype == tl.bfloat16:
            b = interpreter.TensorHandle(interpreter._convert_float(b.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed elements)"
    return float((out.double() - ref).norm() / ref.norm())


def _float64_matmul(lifted: torch.Tensor, signs: torch.Tensor, row_scale=None, bias=None) -> torch.Tensor:
    """The ±1 matmul in float64 from the code bits: r ⊙ (Q x̃) (+ b); ``signs`` (N, L) bool (True = +1),
    ``lifted`` (..., L); without ``row_scale`` r = 1."""
    out = lifted.double() @ (signs.double() * 2 - 1).T
    if row_scale is not None:
        out = out * row_scale.double()
    return out if bias is None else out + bias.double()


# kernel → (function, ‖out − ref‖/‖ref‖ bounds): the lookup kernel sums fp32 tables, so only the
# output's own rounding remains.
KERNELS = {"gemm": (lifted_matmul_triton, TOLERANCE),
           "lookup": (lookup_matmul, {**TOLERANCE, torch.float32: 1e-6})}


def _seed(*parts) -> int:
    """A fixed seed per parameter combination (Python's str hash changes between processes)."""
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,tokens", [("gemm", 1), ("gemm", 3), ("gemm", 17),
                                           ("lookup", 1), ("lookup", 3), ("lookup", MAX_TOKENS)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rows,length,splits", [(21, 70, 1), (37, 150, 2), (70, 1100, 2), (5, 97, None)])
def test_lifted_matmul_kernels_match_float64(dtype, kernel, tokens, with_bias, rows, length, splits):
    """Partial last word and quad, rows past the tile, split-K, bias or none, every dtype. The ±1
    GEMM splits K in whole 16-word steps, so of the two split cases only 1100 bits (35 words) splits
    there (32 + 3 words); the lookup kernel splits both."""
    g = torch.Generator().manual_seed(_seed(kernel, str(dtype), tokens, with_bias, rows, length))
    signs, codes = random_codes(rows, length, g)
    lifted = torch.randn(tokens, length, generator=g).to(dtype)
    row_scale = torch.rand(rows, generator=g) + 0.5
    bias = torch.randn(rows, generator=g).to(dtype) if with_bias else None
    function, tolerance = KERNELS[kernel]

    out = function(lifted, codes, row_scale, bias, splits=splits)

    ref = _float64_matmul(lifted, signs, row_scale, bias)
    assert out.shape == (tokens, rows) and out.dtype == dtype
    assert _relative_error(out, ref) < tolerance[dtype]
    reference = lifted_matmul_reference(lifted, codes, row_scale, bias)
    assert _relative_error(out, reference.double()) < 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("kernel,tokens", [("gemm", 3), ("lookup", 2)])
@pytest.mark.parametrize("start,end", [(32, 70), (5, 40), (33, 70)])
def test_kernels_on_row_slices(kernel, tokens, start, end):
    """Row slices of a weight (whole groups: views; other boundaries: regrouped) give the rows of the
    whole weight's float64 product."""
    g = torch.Generator().manual_seed(_seed("slices", kernel, start, end))
    weight = LiftQuantTensor.from_random_codes((70, 100), Lattice.load("24/10"), dtype=torch.bfloat16, device="cpu",
                                               generator=g)
    part = weight[start:end]
    length = weight.code_length
    signs = unpack_codes(weight.packed_codes, length, 70).double() * 2 - 1
    lifted = torch.randn(tokens, length, generator=g).to(torch.bfloat16)
    function, tolerance = KERNELS[kernel]
    out = function(lifted, part.packed_codes, part.row_scale, None)
    ref = (lifted.double() @ signs[start:end].T) * weight.row_scale[start:end].double()
    assert out.shape == (tokens, end - start)
    assert _relative_error(out, ref) < tolerance[torch.bfloat16]


def test_lookup_tables_hold_signed_sums():
    g = torch.Generator().manual_seed(4)
    lifted = torch.randn(3, 37, generator=g)
    tables = build_tables(lifted, words=4, token_block=4)   # 128 positions: 37 real, the rest zero
    padded = torch.zeros(4, 128, dtype=torch.float64)
    padded[:3, :37] = lifted.double()
    entry = torch.arange(16)
    signs = ((entry[:, None] >> torch.arange(4)) & 1).double() * 2 - 1               # (16, 4)
    expected = torch.einsum("it,bgt->gib", signs, padded.view(4, 32, 4))            # (32, 16, 4)
    assert tables.shape == (32, 16, 4)
    assert (tables.double() - expected).abs().max() < 1e-6


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_tables_start_group_aligned_and_misaligned_tables_are_refused(block):
    """The lookup kernel ORs an entry's offset into its group's address, so tables must start
    aligned to one group (64·block bytes); a copy at another offset is refused, not misread."""
    g = torch.Generator().manual_seed(block)
    signs, codes = random_codes(5, 100, g)
    lifted = torch.randn(block, 100, generator=g)
    tables = build_tables(lifted, words_per_row(100), block)
    assert tables.data_ptr() % (64 * block) == 0
    shifted = torch.empty(tables.numel() + 1)[1:].view_as(tables)
    shifted.copy_(tables)
    assert shifted.data_ptr() % 64 == 4    # 4 bytes past an allocation (aligned to ≥ 64 bytes)
    with pytest.raises(ValueError, match="aligned"):
        lookup_siblings(shifted, block, [codes], [torch.ones(5)], [None], torch.float32)
    out, = lookup_siblings(tables, block, [codes], [torch.ones(5)], [None], torch.float32)
    ref = _float64_matmul(lifted, signs)
    assert _relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("config", [c.all_kwargs() for c in triton_lut._TUNING_CONFIGS],
                         ids=lambda c: f"n{c['BLOCK_N']}")
@pytest.mark.parametrize("splits", [1, 2, 7])
@pytest.mark.parametrize("tokens", [2, MAX_TOKENS])
def test_every_lookup_tuning_config_matches_float64(config, splits, tokens):
    """The autotuner may run any candidate: each (block rows; warps and registers are the
    interpreter's) over 7 quads in one split, in uneven splits (4 + 3 quads) and in splits of one
    quad (the prefetch clamped to the split's last quad), with rows past the last block. At 8 tokens
    the last program of a row block sums 4 partials a round, so 7 splits take two rounds, the second
    partly masked."""
    g = torch.Generator().manual_seed(_seed("configs", config["BLOCK_N"], splits, tokens))
    rows, length = 45, 870   # 28 words: 7 quads
    signs, codes = random_codes(rows, length, g)
    lifted = torch.randn(tokens, length, generator=g)
    row_scale = torch.rand(rows, generator=g) + 0.5
    out = lookup_matmul(lifted, codes, row_scale, None, splits=splits, config=config)
    ref = _float64_matmul(lifted, signs, row_scale)
    assert _relative_error(out, ref) < 1e-6


_GEMM_TILES = sorted({(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"]) for c in triton_matmul._TUNING_CONFIGS})


@pytest.mark.parametrize("tile", _GEMM_TILES, ids=lambda t: f"n{t[0]}_w{t[1]}")
@pytest.mark.parametrize("tokens,splits", [(3, 1), (12, 3), (70, 1), (70, 3)])
def test_every_gemm_tile_matches_float64(tile, tokens, splits):
    """Each (rows, words) tile the ±1 GEMM's autotuner may pick (warps and stages are the GPU's),
    at partial 8-, 16- and 128-token blocks, into the output directly and through split partials:
    900 code bits make 29 words, so every tile has a partial last step and rows past N."""
    block_n, block_w = tile
    g = torch.Generator().manual_seed(_seed("gemm tiles", block_n, block_w, tokens, splits))
    rows, length = 45, 900
    signs, codes = random_codes(rows, length, g)
    lifted = torch.randn(tokens, length, generator=g)
    row_scale = torch.rand(rows, generator=g) + 0.5
    bias = torch.randn(rows, generator=g)
    out = lifted_matmul_triton(lifted, codes, row_scale, bias, splits=splits,
                               config={"BLOCK_N": block_n, "BLOCK_W": block_w})
    ref = _float64_matmul(lifted, signs, row_scale, bias)
    assert _relative_error(out, ref) < TOLERANCE[torch.float32]


def test_lookup_matmul_rejects_bad_input():
    codes = pack_codes(torch.zeros(4, 100, dtype=torch.bool))
    with pytest.raises(ValueError, match="at most"):
        lookup_matmul(torch.randn(MAX_TOKENS + 1, 100), codes, torch.ones(4), None)
    with pytest.raises(ValueError, match="codes of 4 rows must be"):  # format 2: rows one after another
        lookup_matmul(torch.randn(1, 100), torch.zeros(4, 4, dtype=torch.int32), torch.ones(4), None)
    with pytest.raises(ValueError, match="codes of 33 rows must be"):  # one group holds 32 rows
        lookup_matmul(torch.randn(1, 100), codes, torch.ones(33), None)


@pytest.mark.parametrize("tokens", [2, 17])
def test_cuda_entry_picks_a_kernel_by_token_count(tokens):
    """Few tokens take the lookup kernel, more the ±1 GEMM; both give the reference's result."""
    g = torch.Generator().manual_seed(tokens)
    signs, codes = random_codes(19, 150, g)
    lifted = torch.randn(tokens, 150, generator=g).to(torch.float16)
    out = _lifted_matmul_cuda(lifted, codes, torch.ones(19), None)
    ref = _float64_matmul(lifted, signs)
    assert _relative_error(out, ref) < TOLERANCE[torch.float16]


def test_lifted_matmul_keeps_leading_dims_and_strides():
    g = torch.Generator().manual_seed(1)
    signs, codes = random_codes(9, 40, g)
    wide = torch.randn(2, 3, 80, generator=g, dtype=torch.float32).to(torch.float16)
    lifted = wide[..., ::2]  # non-contiguous last dim
    out = lifted_matmul_triton(lifted, codes, torch.ones(9), None)
    ref = _float64_matmul(lifted, signs)
    assert out.shape == (2, 3, 9)
    assert _relative_error(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_strided_activations_and_bias_at_every_token_count(tokens):
    """The lookup path (≤ 2 tokens) read the activation and both paths read the bias as if contiguous."""
    g = torch.Generator().manual_seed(tokens)
    signs, codes = random_codes(37, 40, g)
    lifted = torch.randn(tokens, 80, generator=g)[:, ::2]
    bias = torch.randn(74, generator=g)[::2]
    scale = torch.rand(37, generator=g) + 0.5
    out = _lifted_matmul_cuda(lifted, codes, scale, bias)
    assert _relative_error(out, _float64_matmul(lifted, signs, scale, bias)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("tokens", [1, 3, 256])  # lookup, lift + ±1 GEMM, rebuilt weight
def test_float64_activations_keep_float32_precision(tokens):
    """fp64 activations ran at bf16/fp16/tf32 precision on the CUDA paths above 2 tokens (3e-3 off)."""
    g = torch.Generator().manual_seed(41)
    w = LiftQuantTensor.from_hp(torch.randn(37, 40, generator=g), Lattice.load("24/10"))
    x = torch.randn(tokens, 40, generator=g, dtype=torch.float64)
    out = _lifted_linear_cuda(x, w.input_signs, w.rotation_left, w.rotation_right, w.mapping, w.packed_codes,
                              w.row_scale, None)
    assert out.dtype == torch.float64
    assert _relative_error(out, x @ w.dequantize(torch.float64).T) < TOLERANCE[torch.float32]


def test_cuda_entry_rejects_mismatched_codes():
    lifted = torch.randn(2, 70, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not match"):
        _lifted_matmul_cuda(lifted, torch.zeros(4, 2, dtype=torch.int32), torch.ones(4), None)


@pytest.mark.parametrize("tokens", [2, 3])
def test_cuda_entries_check_scales_and_biases_as_the_reference_does(tokens):
    """The CUDA entries checked only the codes: a bias of 2N (or shorter than N: read past its end) and (N, 2)
    row scales were accepted and read as if right; the group entry likewise per sibling."""
    g = torch.Generator().manual_seed(40)
    _, codes = random_codes(37, 40, g)
    lifted, scale = torch.randn(tokens, 40, generator=g), torch.rand(37, generator=g) + 0.5
    for bad_scale, bad_bias in [(scale, torch.zeros(74)), (scale, torch.zeros(30)), (scale[:, None].expand(37, 2), None)]:
        with pytest.raises(ValueError, match="must be \\(N,\\)"):
            _lifted_matmul_cuda(lifted, codes, bad_scale, bad_bias)
    with pytest.raises(ValueError, match="must be floating point"):
        _lifted_matmul_cuda(lifted.to(torch.int32), codes, scale, None)
    rotation = make_rotation(16, 8, seed=0)
    mapping = torch.randn(8, 20, generator=g)
    _, sibling_codes = random_codes(5, 40, g)
    with pytest.raises(ValueError, match="bias must be \\(N,\\)"):
        _lifted_linear_group_cuda(torch.randn(tokens, 16, generator=g), None, [rotation.signs], [rotation.left],
                                  [rotation.right], [mapping], [sibling_codes], [torch.ones(5)], [torch.zeros(1)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("features,d,D,column_splits", [
    (37, 10, 24, 1), (1100, 10, 24, 2), (64, 16, 32, 1), (300, 6, 21, 1), (4200, 12, 36, 4), (45, 14, 30, 1)])
def test_lift_activation_matches_float64(dtype, tokens, features, d, D, column_splits):
    """(k1, k2) = (25, 44) and (60, 70): u's columns split over 2 and 4 programs."""
    g = torch.Generator().manual_seed(features * 131 + d)
    rotation = make_rotation(features, d, seed=3)
    mapping = torch.linalg.qr(torch.randn(D, d, generator=g)).Q.T.contiguous() * 1.3  # orthonormal rows, scaled
    x = torch.randn(tokens, features, generator=g).to(dtype)

    out = lift_activation_triton(x, rotation.signs, rotation.left, rotation.right, mapping, column_splits=column_splits)

    f64 = torch.float64
    ref = lift_activation_reference(x.to(f64), rotation.signs.to(f64), rotation.left.to(f64),
                                    rotation.right.to(f64), mapping.to(f64))
    assert out.shape == ref.shape and out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("k2,token_bucket,fixed,splits", [
    (239, 1, 0, {1, 2, 4, 8}), (239, 64, 0, {1, 2, 4, 8}), (239, 128, 0, {1}), (82, 16, 0, {1, 2, 4}),
    (44, 1, 0, {1, 2}), (12, 1, 0, {1}), (239, 256, 4, {4}), (82, 1, 2, {2})])
def test_rotation_tunes_column_splits_that_tile_u_for_few_tokens(k2, token_bucket, fixed, splits):
    """The autotuner's candidates: every power-of-two split of the 32-column chunks up to 64 tokens,
    one split above, only the caller's when fixed; each row tile with each split."""
    from lift_ao.kernels.triton_lift import _ROTATE_CONFIGS, _ROW_TILES, _prune_rotate_configs

    kept = _prune_rotate_configs(_ROTATE_CONFIGS, dict(k2=k2, token_bucket=token_bucket, fixed_splits=fixed))
    assert {c.kwargs["COLUMN_SPLITS"] for c in kept} == splits
    assert len(kept) == len(splits) * len(_ROW_TILES)


def test_every_autotuner_times_with_the_spin_timer():
    """The four kernels' autotuners come from ``triton_matmul.autotune``: ``quick_bench`` times their
    candidates (do_bench's own timer picked by host jitter; NOTES_kernels.md round 16)."""
    from lift_ao.kernels import triton_dequant, triton_lift

    tuners = (triton_lift._rotate_tuned, triton_lut._lookup_tuned, triton_matmul._lifted_matmul_tuned,
              triton_dequant._rebuild_tuned)
    assert all(tuner.do_bench is triton_matmul.quick_bench for tuner in tuners)


def test_autotune_caches_timings_on_disk(monkeypatch):
    """The helper asks Triton to keep each key's timings in its cache directory (Triton itself turns
    that off under the interpreter, so the request is what can be checked here)."""
    requested = {}
    monkeypatch.setattr(triton, "autotune", lambda **kwargs: requested.update(kwargs))
    prune = lambda configs, named_args, **kwargs: configs  # noqa: E731

    triton_matmul.autotune([], ["N"], prune)

    assert requested["cache_results"] is True and requested["do_bench"] is triton_matmul.quick_bench
    assert requested["prune_configs_by"] == {"early_config_prune": prune} and requested["key"] == ["N"]


@pytest.mark.parametrize("rows_per_program", [16, 32, 64])
@pytest.mark.parametrize("features,d,column_splits", [(4200, 12, 1), (4200, 12, 2), (1100, 10, 1), (37, 10, 1)])
def test_rotation_row_blocks_match_float64(rows_per_program, features, d, column_splits):
    """Every row-block size the autotuner may pick: (k1, k2) = (60, 70) is 4, 2 or 1 blocks of rows of U
    (the last one partly masked), (25, 44) and (5, 8) fewer rows than one block."""
    g = torch.Generator().manual_seed(features + rows_per_program)
    rotation = make_rotation(features, d, seed=5)
    x = torch.randn(3, features, generator=g).to(torch.bfloat16)
    config = {"BLOCK_I": rows_per_program, "BLOCK_A": 32, "num_warps": 4, "num_stages": 1}

    out = rotate_triton(x, rotation.signs, rotation.left, rotation.right, column_splits=column_splits, config=config)

    f64 = torch.float64
    ref = rotate(x.to(f64), rotation.signs.to(f64), rotation.left.to(f64), rotation.right.to(f64))
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _relative_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("column_splits", [0, 3, 4])
def test_rotation_refuses_column_splits_that_do_not_tile_u(column_splits):
    rotation = make_rotation(1100, 10, seed=3)  # k2 = 44: 64 padded columns, at most 2 programs of 32
    with pytest.raises(ValueError, match="column_splits"):
        rotate_triton(torch.randn(2, 1100), rotation.signs, rotation.left, rotation.right, column_splits=column_splits)


@pytest.mark.parametrize("lift", [lift_activation_triton, lift_activation_reference])
def test_lift_without_signs_takes_them_from_x(lift):
    """``input_signs=None`` (scale folding put the signs into x) gives the same x̃."""
    g = torch.Generator().manual_seed(11)
    rotation = make_rotation(45, 14, seed=1)
    mapping = torch.randn(14, 30, generator=g) / 14**0.5
    x = torch.randn(3, 45, generator=g)

    folded = lift(x * rotation.signs[:45], None, rotation.left, rotation.right, mapping)
    expected = lift(x, rotation.signs, rotation.left, rotation.right, mapping)
    assert _relative_error(folded, expected.double()) < 1e-6


def test_lift_then_matmul_equals_reference_pipeline():
    g = torch.Generator().manual_seed(7)
    features, d, D, rows = 50, 10, 24, 12
    rotation = make_rotation(features, d, seed=0)
    mapping = torch.randn(d, D, generator=g) / d**0.5
    length = rotation.padded_features // d * D
    signs, codes = random_codes(rows, length, g)
    x = torch.randn(17, features, generator=g).to(torch.bfloat16)
    scale, bias = torch.rand(rows, generator=g) + 0.5, torch.randn(rows, generator=g).to(torch.bfloat16)

    out = lifted_matmul_triton(lift_activation_triton(x, rotation.signs, rotation.left, rotation.right, mapping),
                               codes, scale, bias)
    ref = lifted_matmul_reference(lift_activation_reference(x, rotation.signs, rotation.left, rotation.right, mapping),
                                  codes, scale, bias)
    assert _relative_error(out, ref.double()) < 2 * TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("tokens", [1, 2, 5, 17])
def test_cuda_group_kernel_decodes_each_shared_lift_once_and_matches_the_composition(tokens, monkeypatch):
    """q/k/v-like siblings: two share a transform, the third has its own. Decoding (≤ 2 tokens) builds
    tables once per lift and makes one lookup call per lift; more tokens lift once per lift and run
    one ±1 GEMM per sibling; every token count gives the reference composition's
    outputs (x̃ kept in fp32 by the fused decode: within twice the fp16 bound)."""
    import lift_ao.kernels.triton_lut as lut
    from lift_ao.kernels import triton_register

    g = torch.Generator().manual_seed(21 + tokens)
    features, d, D = 60, 10, 24
    shared, other = make_rotation(features, d, seed=0), make_rotation(features, d, seed=1)
    mapping = torch.randn(d, D, generator=g) / d**0.5
    length = shared.padded_features // d * D
    siblings = [(shared, 13), (shared, 7), (other, 9)]
    codes = [random_codes(rows, length, g)[1] for _, rows in siblings]
    scales = [torch.rand(rows, generator=g) + 0.5 for _, rows in siblings]
    args = (torch.randn(tokens, features, generator=g).to(torch.float16), None,
            [r.signs for r, _ in siblings], [r.left for r, _ in siblings], [r.right for r, _ in siblings],
            [mapping] * 3, codes, scales, [None, torch.randn(7, generator=g).to(torch.float16), None])
    calls = {"lift_tables": 0, "lookup_siblings": 0, "lift_activation_triton": 0, "lifted_matmul_triton": 0}
    for name in calls:
        module = lut if name in ("lift_tables", "lookup_siblings") else triton_register
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _name=name, _f=original, **k: calls.__setitem__(
            _name, calls[_name] + 1) or _f(*a, **k))

    out = _lifted_linear_group_cuda(*args)

    lookup, gemm = (2, 0) if tokens <= 2 else (0, 2)
    assert calls == {"lift_tables": lookup, "lookup_siblings": lookup, "lift_activation_triton": gemm,
                     "lifted_matmul_triton": 3 if gemm else 0}
    for got, want in zip(out, lifted_linear_group(*args)):  # CPU: the reference ops' composition
        assert got.shape == want.shape
        assert _relative_error(got, want.double()) < 2 * TOLERANCE[torch.float16]


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("features,d,D", [(37, 10, 24), (45, 14, 30), (300, 6, 21)])
def test_lift_tables_equal_the_tables_of_the_float64_lift(tokens, features, d, D):
    """Tables built from the rotated activation (D not a multiple of 4 included: groups of 4 positions
    straddle lattice blocks) equal the signed sums of the float64 lift; the launch zeroes the split
    counters it is given."""
    g = torch.Generator().manual_seed(_seed("lift_tables", tokens, features, d, D))
    rotation = make_rotation(features, d, seed=2)
    mapping = torch.randn(d, D, generator=g) / d**0.5
    x = torch.randn(tokens, features, generator=g)
    length = rotation.padded_features // d * D
    words = words_per_row(length)

    counters = torch.full((150,), 7, dtype=torch.int32)   # more than the tables kernel has programs × 64

    tables = lift_tables(rotate_triton(x, rotation.signs, rotation.left, rotation.right), mapping, words,
                         token_block(tokens), zero_counters=counters)

    assert int(counters.abs().sum()) == 0   # zeroed for the lookup launch that follows

    f64 = torch.float64
    lifted = lift_activation_reference(x.to(f64), rotation.signs.to(f64), rotation.left.to(f64),
                                       rotation.right.to(f64), mapping.to(f64))
    padded = torch.zeros(token_block(tokens), 32 * words, dtype=f64)
    padded[:tokens, :length] = lifted
    entry = torch.arange(16)
    signs = ((entry[:, None] >> torch.arange(4)) & 1).double() * 2 - 1
    expected = torch.einsum("it,bgt->gib", signs, padded.view(padded.shape[0], 8 * words, 4))
    assert tables.shape == expected.shape
    assert (tables.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    # M is read before the kernel waits for the rotation (PDL): no conversion may run in between.
    rotated = rotate_triton(x, rotation.signs, rotation.left, rotation.right)
    for bad in (mapping.half(), mapping.T.contiguous().T):
        with pytest.raises(ValueError, match="fp32 and contiguous"):
            lift_tables(rotated, bad, words, token_block(tokens))


@pytest.mark.parametrize("splits", [1, 3, None])
def test_lookup_siblings_one_launch_with_split_reduction_inside(splits):
    """Four siblings (three per launch, bias on two) with split-K reduced inside the launch: each equals
    its float64 product."""
    g = torch.Generator().manual_seed(_seed("siblings", splits))
    length, tokens = 300, 2
    rows = [40, 7, 33, 70]
    signs, codes = zip(*(random_codes(n, length, g) for n in rows))
    scales = [torch.rand(n, generator=g) + 0.5 for n in rows]
    biases = [torch.randn(n, generator=g).to(torch.bfloat16) if i % 2 else None for i, n in enumerate(rows)]
    lifted = torch.randn(tokens, length, generator=g).to(torch.bfloat16)
    tables = build_tables(lifted, words_per_row(length), token_block(tokens))

    outs = lookup_siblings(tables, tokens, list(codes), scales, biases, torch.bfloat16, splits=splits,
                           counters=torch.zeros(split_counter_count(rows), dtype=torch.int32))
    with pytest.raises(ValueError, match="split counters"):
        lookup_siblings(tables, tokens, list(codes), scales, biases, torch.bfloat16,
                        counters=torch.zeros(split_counter_count(rows) - 1, dtype=torch.int32))

    for out, sign, scale, bias in zip(outs, signs, scales, biases):
        ref = _float64_matmul(lifted, sign, scale, bias)
        assert out.shape == ref.shape and out.dtype == torch.bfloat16
        assert _relative_error(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_cuda_lifted_linear_matches_the_reference_chain(tokens):
    g = torch.Generator().manual_seed(_seed("lifted_linear", tokens))
    features, d, D, rows = 45, 14, 30, 19
    rotation = make_rotation(features, d, seed=4)
    mapping = torch.randn(d, D, generator=g) / d**0.5
    length = rotation.padded_features // d * D
    _, codes = random_codes(rows, length, g)
    scale, bias = torch.rand(rows, generator=g) + 0.5, torch.randn(rows, generator=g).to(torch.float16)
    x = torch.randn(tokens, features, generator=g).to(torch.float16)

    out = _lifted_linear_cuda(x, rotation.signs, rotation.left, rotation.right, mapping, codes, scale, bias)

    ref = lifted_matmul_reference(lift_activation_reference(x, rotation.signs, rotation.left, rotation.right,
                                                            mapping), codes, scale, bias)
    assert out.shape == (tokens, rows)
    assert _relative_error(out, ref.double()) < 2 * TOLERANCE[torch.float16]


@pytest.mark.parametrize("shape", [(0, 60), (2, 0, 60), (2, 3, 60)])
def test_cuda_group_op_keeps_leading_dimensions_and_empty_inputs(shape):
    """The fused group op on a (batch, sequence, K) activation (6 tokens: the ±1 GEMM path) and on
    empty ones returns (..., N_s) per sibling, equal to the reference composition."""
    g = torch.Generator().manual_seed(_seed("group shapes", *shape))
    rotation = make_rotation(60, 10, seed=0)
    mapping = torch.randn(10, 24, generator=g) / 10**0.5
    length = rotation.padded_features // 10 * 24
    codes = [random_codes(rows, length, g)[1] for rows in (13, 7)]
    scales = [torch.rand(rows, generator=g) + 0.5 for rows in (13, 7)]
    x = torch.randn(*shape, generator=g).to(torch.float16)
    args = (x, None, [rotation.signs] * 2, [rotation.left] * 2, [rotation.right] * 2, [mapping] * 2, codes, scales,
            [None, None])

    out = _lifted_linear_group_cuda(*args)

    for got, want, rows in zip(out, lifted_linear_group(*args), (13, 7)):
        assert got.shape == (*shape[:-1], rows) == want.shape
        if got.numel():
            assert _relative_error(got, want.double()) < 2 * TOLERANCE[torch.float16]


@pytest.mark.parametrize("group", [lifted_linear_group, _lifted_linear_group_cuda])
def test_group_op_rejects_sibling_lists_of_different_lengths(group):
    rotation = make_rotation(20, 10, seed=0)
    mapping = torch.randn(10, 24)
    codes = random_codes(3, rotation.padded_features // 10 * 24, torch.Generator().manual_seed(0))[1]
    x = torch.randn(1, 20)
    with pytest.raises(ValueError, match="G ≥ 1 entries"):
        group(x, None, [rotation.signs] * 2, [rotation.left] * 2, [rotation.right] * 2, [mapping] * 2,
              [codes], [torch.ones(3)], [None])


@pytest.mark.parametrize("capability,setting,expected", [
    ((9, 0), None, {"launch_pdl": True}), ((10, 0), "1", {"launch_pdl": True}),
    ((9, 0), "0", {}), ((8, 0), None, {})])
def test_dependent_launch_only_on_hopper_and_newer_unless_turned_off(monkeypatch, capability, setting, expected):
    """Programmatic dependent launch needs sm_90+; LIFT_AO_PDL=0 turns it off; CPU never uses it."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if setting is None:
        monkeypatch.delenv("LIFT_AO_PDL", raising=False)
    else:
        monkeypatch.setenv("LIFT_AO_PDL", setting)
    assert dependent_launch(torch.device("cuda")) == expected
    assert dependent_launch(torch.device("cpu")) == {}


def test_gemm_autotuner_keeps_a_config_that_fits_hopper_shared_memory():
    """At the largest token block, for 16-bit and fp32 (two-operand) activations, some config the
    autotuner keeps compiles for sm_90 within its 227 KB of shared memory per block; else every
    candidate fails to launch and the op raises OutOfResources (as calibration on CUDA once did)."""
    script = Path(__file__).with_name("hopper_shared_memory.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "128"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(shared) == {"128 bf16", "128 fp32"}
    for key, sizes in shared.items():
        assert min(sizes) <= 232448, f"{key}: every kept config needs more shared memory than sm_90 has: {sizes}"


def test_triton_wrappers_refuse_cpu_tensors_without_the_interpreter():
    """Without TRITON_INTERPRET, CPU tensors reached Triton's launcher: "0 active drivers" (no GPU) or
    a pointer error. Every public wrapper names the fix instead, before any work (zero tokens too);
    lift_activation_triton through the rotate_triton it starts with."""
    script = """if True:
        import torch
        from lift_ao.kernels.triton_dequant import rebuild_rotated_weight
        from lift_ao.kernels.triton_lift import lift_activation_triton, rotate_triton
        from lift_ao.kernels.triton_lut import build_tables, lift_tables, lookup_matmul, lookup_siblings
        from lift_ao.kernels.triton_matmul import lifted_matmul_triton, reduce_splits
        from lift_ao.packing import packed_shape
        from lift_ao.transform import make_rotation
        r, M, scale = make_rotation(20, 10), torch.randn(10, 24), torch.ones(8)
        codes = torch.zeros(packed_shape(8, 48), dtype=torch.int32)
        for call in [lambda: lifted_matmul_triton(torch.randn(0, 48), codes, scale, None),
                     lambda: reduce_splits(torch.zeros(2, 3, 8), torch.zeros(3, 8)),
                     lambda: rotate_triton(torch.randn(3, 20), r.signs, r.left, r.right),
                     lambda: lift_activation_triton(torch.randn(3, 20), r.signs, r.left, r.right, M),
                     lambda: rebuild_rotated_weight(codes, scale, M, 20, torch.float32),
                     lambda: build_tables(torch.randn(3, 48), 2, 8),
                     lambda: lift_tables(torch.randn(3, 20), M, 2, 8),
                     lambda: lookup_matmul(torch.randn(3, 48), codes, scale, None),
                     lambda: lookup_siblings(torch.zeros(16, 16, 1), 1, [codes], [scale], [None], torch.float32)]:
            try:
                call()
                print("ran")
            except Exception as e:
                print(type(e).__name__, e)
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    names = ["lifted_matmul_triton", "reduce_splits", "rotate_triton", "rotate_triton", "rebuild_rotated_weight",
             "build_tables", "lift_tables", "lookup_matmul", "lookup_siblings"]
    lines = done.stdout.strip().splitlines()[-len(names):]
    for name, line in zip(names, lines, strict=True):
        assert line.startswith(f"ValueError {name}: the tensors are on cpu; the Triton kernels need a CUDA device"), line
        assert "torch.ops.lift_ao" in line and "TRITON_INTERPRET=1" in line, line
