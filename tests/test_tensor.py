"""LiftQuantTensor: the op against a float64 reference, tensor ops, autograd, compile."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lift_ao
from lift_ao import Lattice, LiftQuantTensor
from lift_ao.packing import packed_shape, unpack_codes, words_per_row
from lift_ao.tensor import SHARED_DATA_NAMES
from lift_ao.transform import unrotate


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_relative_error(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Relative error in norm: float32 sums reorder with thread count and matmul shape, so single
    entries near a cancellation may differ by more than any fixed per-entry tolerance."""
    rel = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert rel < tol, f"relative error {rel:.3g} >= {tol:g}"


def dense_reference_float64(w: LiftQuantTensor) -> torch.Tensor:
    """The weight the codes stand for, built in float64 from first principles."""
    n, k = w.shape
    q = unpack_codes(w.packed_codes, w.code_length, n).view(n, -1, w.code_bits).double() * 2 - 1
    rows = (q @ w.mapping.double().T).flatten(1) * w.row_scale.double()[:, None]
    return unrotate(rows, w.input_signs.double(), w.rotation_left.double(), w.rotation_right.double(), k)


@pytest.fixture(scope="module")
def lattice():
    return Lattice.load("16/8")


@pytest.fixture(scope="module")
def quantized(lattice):
    weight = torch.randn(37, 53, generator=_gen(0))
    return weight, LiftQuantTensor.from_hp(weight, lattice)


def test_codes_are_exactly_D_over_d_bits_per_weight_plus_row_padding(quantized, lattice):
    weight, w = quantized
    assert w.shape == weight.shape and w.dtype == weight.dtype
    assert w.code_length == w.padded_in_features // lattice.d * lattice.D
    assert w.packed_codes.shape == packed_shape(37, w.code_length) == (2, words_per_row(w.code_length) // 4, 32, 4)
    assert words_per_row(w.code_length) * 32 - w.code_length < 128


def test_quantization_error_matches_the_lattice_mse(quantized, lattice):
    weight, w = quantized
    rel_mse = ((dense_reference_float64(w) - weight.double()).pow(2).sum() / weight.double().pow(2).sum()).item()
    # Gaussian weights stay Gaussian after rotation: the error per coordinate is the lattice's MSE
    # (a little lower, because the row scale is refitted), and padding columns add none.
    assert 0.6 * lattice.mse < rel_mse < 1.1 * lattice.mse


def test_dequantize_matches_float64_reference(quantized):
    _, w = quantized
    torch.testing.assert_close(w.dequantize().double(), dense_reference_float64(w), rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 17)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_float64_reference(quantized, dtype, tol, lead, with_bias):
    _, w = quantized
    g = _gen(hash((lead, with_bias)) % 2**31)
    x = torch.randn(*lead, 53, generator=g).to(dtype)
    bias = torch.randn(37, generator=g).to(dtype) if with_bias else None
    y = F.linear(x, w, bias)
    assert y.dtype == dtype and y.shape == (*lead, 37)
    ref = x.double() @ dense_reference_float64(w).T + (bias.double() if with_bias else 0)
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < tol


def test_linear_takes_its_arguments_by_keyword_too(quantized):
    _, w = quantized
    g = _gen(3)
    x, bias = torch.randn(3, 53, generator=g), torch.randn(37, generator=g)
    expected = F.linear(x, w, bias)
    for call in (lambda: F.linear(x, w, bias=bias), lambda: F.linear(x, weight=w, bias=bias),
                 lambda: F.linear(input=x, weight=w, bias=bias)):
        assert torch.equal(call(), expected)


def test_nn_linear_forward_and_activation_gradient(quantized):
    weight, w = quantized
    linear = torch.nn.Linear(53, 37)
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    x = torch.randn(4, 53, generator=_gen(1), dtype=torch.float32, requires_grad=True)
    linear(x).pow(2).sum().backward()
    x_ref = x.detach().double().requires_grad_()
    (x_ref @ dense_reference_float64(w).T + linear.bias.detach().double()).pow(2).sum().backward()
    assert_relative_error(x.grad, x_ref.grad, 1e-5)
    assert linear.bias.grad is not None and linear.bias.grad.shape == (37,)


def test_tensor_ops_keep_data(quantized):
    _, w = quantized
    for other in (w.detach(), w.clone(), w.to("cpu"), w.contiguous()):
        assert isinstance(other, LiftQuantTensor)
        assert torch.equal(other.packed_codes, w.packed_codes) and torch.equal(other.row_scale, w.row_scale)
    half = w.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.row_scale.dtype == torch.float32
    assert torch.equal(half.packed_codes, w.packed_codes)
    assert "16/8" in repr(w)


def test_copy_and_state_dict_round_trip(quantized, lattice):
    _, w = quantized
    src = torch.nn.Linear(53, 37)
    src.weight = torch.nn.Parameter(w, requires_grad=False)
    dst = torch.nn.Linear(53, 37)
    dst.weight = torch.nn.Parameter(
        LiftQuantTensor.from_hp(torch.randn(37, 53, generator=_gen(5)), lattice), requires_grad=False
    )
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.weight.packed_codes, w.packed_codes)
    assert torch.equal(dst.weight.row_scale, w.row_scale)
    x = torch.randn(2, 53, generator=_gen(6))
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1e-25, 1e20, 1e37])
def test_tiny_and_huge_weights_code_as_well_as_unit_ones(lattice, scale):
    """The row RMS in float32 underflowed (|w| < ~1e-23) or overflowed (> ~1e19): every block coded as zero;
    the row scale's Σ w·ŵ in float32 overflowed above ~1e36 (an infinite scale)."""
    w = torch.randn(8, 40, generator=_gen(8))
    error = lambda s: ((LiftQuantTensor.from_hp(w * s, lattice).dequantize().double() - w.double() * s).norm()  # noqa: E731
                       / (w.double() * s).norm()).item()
    assert error(scale) == pytest.approx(error(1.0), rel=1e-3)


def test_a_single_activation_vector_backpropagates_into_the_bias(quantized):
    """As nn.Linear: a 1-D input with a bias that needs its gradient (the bias gradient crashed)."""
    _, w = quantized
    bias = torch.randn(37, generator=_gen(9), requires_grad=True)
    F.linear(torch.randn(53, generator=_gen(10)), w, bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.ones(37))


def test_an_empty_row_slice_dequantizes(quantized):
    _, w = quantized
    assert w[7:7].dequantize().shape == (0, 53)


def test_copy_leaves_weights_that_shared_its_constants_alone(lattice):
    """Weights with the same K, lattice and seed share M and the rotation (one cached copy): copying
    another seed's weight into one of them (load_state_dict) must change that one only."""
    gen = _gen(7)
    a, b = (LiftQuantTensor.from_hp(torch.randn(37, 53, generator=gen), lattice, seed=0) for _ in range(2))
    src = LiftQuantTensor.from_hp(torch.randn(37, 53, generator=gen), lattice, seed=1)
    assert a.rotation_left is b.rotation_left and a.mapping is b.mapping  # shared, as the footprint counts
    b_before = b.dequantize()
    a.copy_(src)
    assert torch.equal(a.dequantize(), src.dequantize())
    assert torch.equal(b.dequantize(), b_before)
    fresh = LiftQuantTensor.from_hp(torch.randn(37, 53, generator=gen), lattice, seed=0)
    assert torch.equal(fresh.rotation_left, b.rotation_left) and not torch.equal(fresh.rotation_left, src.rotation_left)
    with pytest.raises(ValueError, match="same config"):
        a.copy_(LiftQuantTensor.from_hp(torch.randn(37, 64, generator=gen), lattice))


def test_load_state_dict_across_logical_dtypes_and_into_an_unquantized_model(lattice):
    """As for plain weights, a bf16-cast quantized model takes its float32 state (the codes are the same;
    it was refused); an unquantized model says to quantize it first (it failed on a missing attribute)."""
    gen = _gen(14)
    src = torch.nn.Linear(53, 37, bias=False)
    src.weight = torch.nn.Parameter(LiftQuantTensor.from_hp(torch.randn(37, 53, generator=gen), lattice),
                                    requires_grad=False)
    dst = torch.nn.Linear(53, 37, bias=False)
    dst.weight = torch.nn.Parameter(LiftQuantTensor.from_hp(torch.randn(37, 53, generator=gen), lattice),
                                    requires_grad=False)
    dst.to(torch.bfloat16).load_state_dict(src.state_dict())
    assert dst.weight.dtype == torch.bfloat16 and torch.equal(dst.weight.packed_codes, src.weight.packed_codes)
    assert torch.equal(dst.weight.dequantize(), src.weight.dequantize().bfloat16())
    with pytest.raises(RuntimeError, match="plain tensor of shape .37, 53.: quantize the model with the same config"):
        torch.nn.Linear(53, 37, bias=False).load_state_dict(src.state_dict())


@pytest.mark.parametrize("start, end, view", [(5, 20, False), (0, 32, True), (32, 37, True), (32, None, True),
                                             (0, 33, False), (31, 37, False), (7, 7, False), (-3, None, False)])
def test_row_slice_keeps_whole_rows(quantized, start, end, view):
    """Slices of whole groups of 32 rows (or to the last row) are views; others regroup exactly."""
    _, w = quantized
    rows = range(37)[start:end]
    part = w[start:end]
    assert isinstance(part, LiftQuantTensor) and part.shape == (len(rows), 53)
    assert part.packed_codes.shape == packed_shape(len(rows), w.code_length)
    assert (part.packed_codes.untyped_storage().data_ptr() == w.packed_codes.untyped_storage().data_ptr()) == view
    unpacked = unpack_codes(w.packed_codes, w.code_length, 37)
    assert torch.equal(unpack_codes(part.packed_codes, w.code_length, len(rows)), unpacked[start:end])
    assert not unpack_codes(part.packed_codes, w.code_length, part.packed_codes.shape[0] * 32)[len(rows):].any()
    assert torch.equal(part.row_scale, w.row_scale[start:end])
    if rows:
        x = torch.randn(3, 53, generator=_gen(7))
        assert_relative_error(F.linear(x, part), F.linear(x, w)[:, start:end], 1e-6)
        assert torch.equal(part.dequantize(), w.dequantize()[start:end])


def test_copy_into_rows_reaches_the_weight_or_is_refused(lattice):
    """A view of whole groups of 32 rows takes a copy_ (a tensor-parallel loader's pattern); a regrouped copy
    refuses it (it wrote its scales into the weight and its codes into the copy: new scales on old codes)."""
    gen = _gen(11)
    w = LiftQuantTensor.from_hp(torch.randn(70, 53, generator=gen), lattice)
    src = LiftQuantTensor.from_hp(torch.randn(32, 53, generator=gen), lattice)
    before = w.dequantize()
    w[32:64].copy_(src)
    after = w.dequantize()
    assert torch.equal(after[32:64], src.dequantize()) and torch.equal(after[:32], before[:32])
    with pytest.raises(ValueError, match="do not start and end at groups of 32 rows"):
        w[1:5].copy_(LiftQuantTensor.from_hp(torch.randn(4, 53, generator=gen), lattice))
    with pytest.raises(ValueError, match="lattice matrix or rotation differs"):
        w[:32].copy_(LiftQuantTensor.from_hp(torch.randn(32, 53, generator=gen), lattice, seed=1))
    assert torch.equal(w.dequantize(), after)
    with pytest.raises(ValueError, match="do not start and end at groups of 32 rows"):  # rows of such a copy
        w[1:65][0:32].copy_(src)
    # A detached alias of rows is the same rows (their copy_ was accepted and never reached w, or wrote
    # codes decoded with another M into it).
    with pytest.raises(ValueError, match="do not start and end at groups of 32 rows"):
        w[1:5].detach().copy_(LiftQuantTensor.from_hp(torch.randn(4, 53, generator=gen), lattice))
    with pytest.raises(ValueError, match="lattice matrix or rotation differs"):
        torch.nn.Parameter(w[:32], requires_grad=False).copy_(
            LiftQuantTensor.from_hp(torch.randn(32, 53, generator=gen), lattice, seed=1))
    assert torch.equal(w.dequantize(), after)
    independent = copy.deepcopy(w[1:5])  # a weight of its own, no longer rows of w
    fresh = LiftQuantTensor.from_hp(torch.randn(4, 53, generator=gen), lattice)
    assert torch.equal(independent.copy_(fresh).dequantize(), fresh.dequantize())
    assert torch.equal(w.dequantize(), after)


def test_to_a_dtype_is_a_copy(quantized):
    """As for any tensor: a copy_ into the result must not reach the original (it shared codes and scales)."""
    _, w = quantized
    before = w.dequantize()
    half = w.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.mapping is w.mapping  # M and the rotation stay shared
    half.copy_(LiftQuantTensor.from_hp(torch.randn(37, 53, generator=_gen(12)), w.lattice).to(torch.bfloat16))
    assert torch.equal(w.dequantize(), before)


def test_row_slice_of_the_input_dimension_is_refused(quantized):
    _, w = quantized
    with pytest.raises(NotImplementedError, match="output rows only"):
        w[:, 3:10]


def test_zero_rows_get_zero_scale(lattice):
    weight = torch.randn(4, 24, generator=_gen(8))
    weight[2] = 0
    w = LiftQuantTensor.from_hp(weight, lattice)
    assert w.row_scale[2] == 0 and torch.isfinite(w.row_scale).all()


def test_storage_bits_per_weight(lattice):
    w = LiftQuantTensor.from_hp(torch.randn(256, 512, generator=_gen(9)), lattice)
    codes_bits = 8 * w.packed_codes.nbytes / (256 * 512)
    assert codes_bits == lattice.bits  # 512 = 64 blocks of 8, 128 bits: no padding at all
    assert w.storage_bytes() == sum(getattr(w, n).nbytes for n in w.tensor_data_names)
    assert math.isclose(w.bits_per_weight(), 8 * w.storage_bytes() / (256 * 512))


def test_compile_fullgraph_matches_eager(quantized):
    _, w = quantized
    linear = torch.nn.Linear(53, 37)
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    x = torch.randn(3, 53, generator=_gen(10))
    compiled = torch.compile(linear, fullgraph=True, backend="inductor")
    with torch.no_grad():
        assert_relative_error(compiled(x), linear(x), 1e-6)


def test_footprint_counts_shared_transform_once(lattice):
    q = LiftQuantTensor.from_hp(torch.randn(16, 53, generator=_gen(11)), lattice)
    k = LiftQuantTensor.from_hp(torch.randn(8, 53, generator=_gen(12)), lattice)
    shared = sum(getattr(q, n).nbytes for n in ("mapping", "input_signs", "rotation_left", "rotation_right"))
    assert lift_ao.footprint([q, k]) == q.storage_bytes() + k.storage_bytes() - shared


def test_moving_a_model_keeps_its_shared_mapping_and_rotation_shared(lattice):
    """model.to(device) moves each weight alone: every layer got its own copy of the M and rotation it
    shares with its siblings (footprint counted them per layer; the fused ops' same-tensor test failed).
    (That a copy is handed out again only while it holds its source's values needs a second real device.)"""
    gen = _gen(13)
    model = torch.nn.ModuleDict({n: torch.nn.Linear(53, 37, bias=False) for n in ("q", "k")})
    for linear in model.values():
        linear.weight = torch.nn.Parameter(LiftQuantTensor.from_hp(torch.randn(37, 53, generator=gen), lattice),
                                           requires_grad=False)
    q, k = model["q"].weight, model["k"].weight
    storage = lambda a, n: getattr(a, n).untyped_storage()  # noqa: E731  (each Parameter holds aliases)
    assert all(storage(q, n) is storage(k, n) for n in SHARED_DATA_NAMES)
    moved = copy.deepcopy(model).to("meta")
    mq, mk = moved["q"].weight, moved["k"].weight
    assert all(storage(mq, n) is storage(mk, n) and getattr(mq, n).is_meta for n in SHARED_DATA_NAMES)
    assert k.to("meta").mapping is q.to("meta").mapping
