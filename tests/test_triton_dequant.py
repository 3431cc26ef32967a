"""The prefill path: the rotated-domain weight rebuild kernel and the fused ops' rebuilt-weight branch,
against float64 references, on CPU through Triton's interpreter (tests/conftest.py).

Shapes are tiny but cover what breaks the kernel: shipped lattices with D not dividing 32 (blocks start
mid-word) and D > 32 (several 32-bit chunks a block), d not a power of two, row counts and block counts
that are not multiples of the tile, K not a multiple of d, and the zero padding of the GEMM operands.
"""

import zlib

import pytest
import torch

pytest.importorskip("triton")

from lift_ao.lattice import Lattice  # noqa: E402
from checks import random_codes, rotated_weight_float64  # noqa: E402
from lift_ao.packing import pack_codes, unpack_codes  # noqa: E402
from lift_ao.tensor import LiftQuantTensor  # noqa: E402
from lift_ao.transform import make_rotation  # noqa: E402
from lift_ao.kernels import triton_register  # noqa: E402
from lift_ao.kernels.fused_ops import lifted_linear_group  # noqa: E402
from lift_ao.kernels.reference import lift_activation_reference, lifted_matmul_reference  # noqa: E402
from lift_ao.kernels.triton_dequant import padded_columns, rebuild_rotated_weight  # noqa: E402

F64 = torch.float64
# ‖out − ref‖ / ‖ref‖ bounds of the rebuilt weight: the result's own rounding (the interpreter rounds
# fp32 → bf16 toward zero: ~3.4e-3 where the GPU's nearest rounding gives 1.7e-3) plus M in fp16.
REBUILD_TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 6e-3, torch.float32: 1e-6}
# Of a linear's output: u and W_rot each rounded to the activation dtype, then the output.
LINEAR_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _seed(*parts) -> int:
    """A fixed seed per parameter combination (Python's str hash changes between processes)."""
    return zlib.crc32(repr(parts).encode())


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed elements)"
    return float((out.double() - ref).norm() / ref.norm())


@pytest.fixture
def nan_filled_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floating tensors, so an element the kernel leaves unwritten
    (the GEMM operands' zero padding included) fails the finiteness checks."""
    original = torch.empty

    def empty(*args, **kwargs):
        tensor = original(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lattice,config", [
    ("24/10", None), ("16/8", {"ROWS": 16, "BLOCKS": 2}), ("32/16", {"ROWS": 1, "BLOCKS": 16}),
    ("72/24", None), ("25/10", {"ROWS": 2, "BLOCKS": 8})])
def test_rebuilt_weight_matches_float64(lattice, config, dtype, nan_filled_empty):
    """Shipped lattices (blocks starting mid-word, several chunks a block at D = 72), odd N, K not a
    multiple of d, tiles past the last row and block; the row padding comes back zero. (Rows past one
    group of 32: test_rebuilt_row_slice_matches_float64.)"""
    lat = Lattice.load(lattice)
    g = torch.Generator().manual_seed(_seed(lattice, str(dtype)))
    rows = 13
    padded_features = make_rotation(7 * lat.d + 3, lat.d).padded_features   # K = 7d + 3 → Kp a multiple of d
    signs = torch.rand(rows, padded_features // lat.d * lat.D, generator=g) < 0.5
    row_scale = torch.rand(rows, generator=g) + 0.5

    out = rebuild_rotated_weight(pack_codes(signs), row_scale, lat.M, padded_features, dtype, config=config)

    ref = rotated_weight_float64(signs, lat.M, row_scale)
    assert out.shape == (rows, padded_columns(padded_features)) and out.dtype == dtype
    assert padded_columns(padded_features) % 64 == 0
    assert torch.equal(out[:, padded_features:], torch.zeros_like(out[:, padded_features:]))
    error = _relative_error(out[:, :padded_features], ref)
    assert error < REBUILD_TOLERANCE[dtype]
    # The bound catches one wrong code bit or a 1 % scale error (and so any systematic sign or scale bug).
    flipped = signs.clone()
    flipped[rows // 2, 0] ^= True
    assert _relative_error(rotated_weight_float64(flipped, lat.M, row_scale), ref) > 3 * REBUILD_TOLERANCE[dtype]
    assert _relative_error(ref * 1.01, ref) > REBUILD_TOLERANCE[dtype]


def test_rebuild_rejects_codes_too_short_for_the_features():
    lat = Lattice.load("24/10")
    codes = pack_codes(torch.zeros(3, 5 * 24, dtype=torch.bool))   # 4 words: 128 bits
    with pytest.raises(ValueError, match="not those of 3 rows of 60 features"):
        rebuild_rotated_weight(codes, torch.ones(3), lat.M, 60, torch.float16)   # 6 blocks need 144 bits
    with pytest.raises(ValueError, match="not those of 3 rows"):  # format 2: rows one after another
        rebuild_rotated_weight(torch.zeros(3, 4, dtype=torch.int32), torch.ones(3), lat.M, 50, torch.float16)


@pytest.mark.parametrize("start,end", [(32, 70), (5, 40)])
def test_rebuilt_row_slice_matches_float64(start, end):
    """A row slice of a weight (a view of whole groups, or regrouped rows) rebuilds its rows."""
    lat = Lattice.load("24/10")
    weight = LiftQuantTensor.from_random_codes((70, 53), lat, dtype=torch.float32, device="cpu",
                                               generator=torch.Generator().manual_seed(start))
    part = weight[start:end]
    out = rebuild_rotated_weight(part.packed_codes, part.row_scale, lat.M, weight.padded_in_features, torch.float32)
    signs = unpack_codes(weight.packed_codes, weight.code_length, 70)[start:end]
    ref = rotated_weight_float64(signs, lat.M, part.row_scale)
    assert _relative_error(out[:, :weight.padded_in_features], ref) < REBUILD_TOLERANCE[torch.float32]


def _count_calls(monkeypatch, module, name: str) -> dict:
    calls = {"count": 0}
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls["count"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _reference_linear(x, signs, left, right, mapping, codes, row_scale, bias) -> torch.Tensor:
    lifted = lift_activation_reference(x.to(F64), signs.to(F64), left.to(F64), right.to(F64), mapping.to(F64))
    return lifted_matmul_reference(lifted, codes, row_scale.to(F64), None if bias is None else bias.to(F64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,with_bias", [(17, True), (17, False), (64, True)])
def test_cuda_lifted_linear_prefill_branch_matches_the_reference(tokens, with_bias, dtype, monkeypatch):
    """From REBUILD_MIN_TOKENS tokens: rotation, rebuilt weight, GEMM; the reference chain's result."""
    monkeypatch.setattr(triton_register, "REBUILD_MIN_TOKENS", 17)
    rebuilds = _count_calls(monkeypatch, triton_register, "rebuild_rotated_weight")
    g = torch.Generator().manual_seed(_seed("prefill", tokens, with_bias, str(dtype)))
    lat = Lattice.load("24/10")
    features, rows = 45, 19
    rotation = make_rotation(features, lat.d, seed=4)
    _, codes = random_codes(rows, rotation.padded_features // lat.d * lat.D, g)
    row_scale = torch.rand(rows, generator=g) + 0.5
    bias = torch.randn(rows, generator=g).to(dtype) if with_bias else None
    x = torch.randn(1, tokens, features, generator=g).to(dtype)   # a leading dim, kept in the output

    out = triton_register._lifted_linear_cuda(x, rotation.signs, rotation.left, rotation.right, lat.M, codes,
                                              row_scale, bias)

    assert rebuilds["count"] == 1
    ref = _reference_linear(x, rotation.signs, rotation.left, rotation.right, lat.M, codes, row_scale, bias)
    assert out.shape == (1, tokens, rows) and out.dtype == dtype
    assert _relative_error(out, ref) < LINEAR_TOLERANCE[dtype]


def test_cuda_lifted_linear_below_the_threshold_keeps_the_pm1_gemm(monkeypatch):
    rebuilds = _count_calls(monkeypatch, triton_register, "rebuild_rotated_weight")
    g = torch.Generator().manual_seed(3)
    lat = Lattice.load("16/8")
    rotation = make_rotation(30, lat.d, seed=0)
    _, codes = random_codes(9, rotation.padded_features // lat.d * lat.D, g)
    x = torch.randn(triton_register.REBUILD_MIN_TOKENS - 1, 30, generator=g).to(torch.float16)

    out = triton_register._lifted_linear_cuda(x, rotation.signs, rotation.left, rotation.right, lat.M, codes,
                                              torch.ones(9), None)

    assert rebuilds["count"] == 0
    ref = _reference_linear(x, rotation.signs, rotation.left, rotation.right, lat.M, codes, torch.ones(9), None)
    assert _relative_error(out, ref) < LINEAR_TOLERANCE[torch.float16]


@pytest.mark.parametrize("tokens", [17, 64])
@pytest.mark.parametrize("folded", [False, True])
def test_cuda_group_prefill_rotates_each_shared_lift_once_and_matches_the_reference(tokens, folded, monkeypatch):
    """q/k/v-like siblings (two share a transform, the third has its own; bias on one): one rotation
    per shared lift, one rebuild per sibling, each output the reference op's. ``folded``: x already
    carries the shared transform's signs (the scale-folding pass), the third sibling's differ."""
    monkeypatch.setattr(triton_register, "REBUILD_MIN_TOKENS", 17)
    rotations = _count_calls(monkeypatch, triton_register, "rotate_triton")
    rebuilds = _count_calls(monkeypatch, triton_register, "rebuild_rotated_weight")
    g = torch.Generator().manual_seed(_seed("group prefill", tokens, folded))
    lat = Lattice.load("24/10")
    features = 60
    shared, other = make_rotation(features, lat.d, seed=0), make_rotation(features, lat.d, seed=1)
    length = shared.padded_features // lat.d * lat.D
    siblings = [(shared, 13), (shared, 7), (other, 9)]
    codes = [random_codes(rows, length, g)[1] for _, rows in siblings]
    scales = [torch.rand(rows, generator=g) + 0.5 for _, rows in siblings]
    biases = [None, torch.randn(7, generator=g).to(torch.float16), None]
    x = torch.randn(tokens, features, generator=g).to(torch.float16)
    folded_signs = shared.signs if folded else None
    x_in = x * shared.signs[:features].to(x.dtype) if folded else x
    args = (x_in, folded_signs, [r.signs for r, _ in siblings], [r.left for r, _ in siblings],
            [r.right for r, _ in siblings], [lat.M] * 3, codes, scales, biases)

    out = triton_register._lifted_linear_group_cuda(*args)

    assert rotations["count"] == 2 and rebuilds["count"] == 3
    for got, want, (rotation, rows), c, s, b in zip(out, lifted_linear_group(*args), siblings, codes, scales, biases):
        ref = _reference_linear(x, rotation.signs, rotation.left, rotation.right, lat.M, c, s, b)
        assert got.shape == want.shape == (tokens, rows)
        assert _relative_error(got, ref) < LINEAR_TOLERANCE[torch.float16]
