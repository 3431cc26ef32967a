"""The decode rotation kernel (kernels/triton_lift.py ``_rotate_decode_kernel``) under Triton's interpreter:
u = Rᵀ pad(signs ⊙ x) against float64, and when ``rotate_triton`` takes it."""

import zlib

import pytest
import torch

from lift_ao.packing import pack_codes  # noqa: E402
from lift_ao.transform import make_rotation, padded_in_features, rotate  # noqa: E402
from lift_ao.kernels import triton_lift  # noqa: E402
from lift_ao.kernels.triton_lift import _decode_plan, rotate_triton  # noqa: E402
from lift_ao.kernels.triton_register import LOOKUP_MAX_TOKENS, _lifted_linear_cuda  # noqa: E402

# ‖u − ref‖ / ‖ref‖ against the float64 rotation of the same (rounded) activation: tf32 products for
# 16-bit activations (10-bit mantissas, ~5e-4 on GPU), exact fp32 for fp32 ones.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-3, torch.float32: 1e-5}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output (unwritten elements)"
    return float((out.double() - ref).norm() / ref.norm())


def _rotate_float64(x: torch.Tensor, signs, rotation) -> torch.Tensor:
    f64 = torch.float64
    return rotate(x.to(f64), None if signs is None else signs.to(f64), rotation.left.to(f64), rotation.right.to(f64))


class _LaunchCounter:
    """Stands in for a Triton kernel in triton_lift's namespace: counts launches and keeps the last
    one's keyword arguments (the interpreter computes tf32 products exactly, so the precision rule
    is checked on what was passed), then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.keywords = kernel, 0, {}

    def __getitem__(self, grid):
        def launch(*args, **keywords):
            self.launches += 1
            self.keywords = keywords
            return self.kernel[grid](*args, **keywords)
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Launch counters of the decode kernel and the chunked kernel (the one the interpreter runs)."""
    counters = {name: _LaunchCounter(getattr(triton_lift, name)) for name in ("_rotate_decode_kernel", "_rotate_kernel")}
    for name, counter in counters.items():
        monkeypatch.setattr(triton_lift, name, counter)
    return counters


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", range(1, LOOKUP_MAX_TOKENS + 1))
@pytest.mark.parametrize("features,d,with_signs", [(37, 10, True), (100, 8, False), (300, 6, True), (64, 16, True),
                                                   (45, 14, False)])
def test_decode_rotation_matches_float64(dtype, tokens, features, d, with_signs, launches):
    """K not a multiple of d (37, 100, 45) and k1 ≠ k2 included; signs given or already in x."""
    g = torch.Generator().manual_seed(_seed(dtype, tokens, features, d, with_signs))
    rotation = make_rotation(features, d, seed=2)
    signs = rotation.signs if with_signs else None
    x = torch.randn(tokens, features, generator=g).to(dtype)

    u = rotate_triton(x, signs, rotation.left, rotation.right, decode=True)

    assert launches["_rotate_decode_kernel"].launches == 1 and launches["_rotate_kernel"].launches == 0
    assert launches["_rotate_decode_kernel"].keywords["PRECISION"] == ("ieee" if dtype == torch.float32 else "tf32")
    assert u.shape == (tokens, rotation.padded_features) and u.dtype == torch.float32
    assert _relative_error(u, _rotate_float64(x, signs, rotation)) < TOLERANCE[dtype]


def test_decode_rotation_writes_into_out_with_a_row_stride():
    """``out=`` with padded rows (as the prefill GEMM's operand) and a 16-bit dtype: only [:, :Kp] written."""
    g = torch.Generator().manual_seed(5)
    rotation = make_rotation(45, 14, seed=0)
    kp = rotation.padded_features
    x = torch.randn(2, 45, generator=g).to(torch.bfloat16)
    padded = torch.full((2, kp + 7), 7.0, dtype=torch.bfloat16)

    rotate_triton(x, rotation.signs, rotation.left, rotation.right, out=padded[:, :kp], decode=True)

    assert (padded[:, kp:] == 7.0).all()
    assert _relative_error(padded[:, :kp], _rotate_float64(x, rotation.signs, rotation)) < 1e-2  # bf16 storage


def test_rotate_triton_takes_the_chunked_kernel_without_decode_or_when_v_does_not_fit(launches, monkeypatch):
    g = torch.Generator().manual_seed(9)
    rotation = make_rotation(100, 8, seed=1)
    x = torch.randn(1, 100, generator=g)
    want = _rotate_float64(x, rotation.signs, rotation)

    without = rotate_triton(x, rotation.signs, rotation.left, rotation.right)
    monkeypatch.setattr(triton_lift, "_DECODE_MAX_TILE", 128)  # this (k1, k2) pads to 16 × 16 = 256
    too_large = rotate_triton(x, rotation.signs, rotation.left, rotation.right, decode=True)

    assert launches["_rotate_decode_kernel"].launches == 0 and launches["_rotate_kernel"].launches == 2
    for u in (without, too_large):
        assert _relative_error(u, want) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("features,d,fits", [(4096, 8, True), (4096, 10, True), (14336, 20, True), (14336, 8, True),
                                             (8192, 14, True), (8960, 24, True), (1536, 10, True),
                                             (14336, 24, False), (28672, 10, False), (28672, 6, False)])
def test_decode_plan_at_real_shapes(features, d, fits):
    """Which shipped (K, d) factorisations the decode kernel holds in registers, and its grid: 16-row
    blocks of U times column chunks, at most 32 programs a token."""
    _, k1, k2 = padded_in_features(features, d)
    plan = _decode_plan(k1, k2)
    assert (plan is not None) == fits
    if plan is not None:
        programs = -(-k1 // plan["BLOCK_I"]) * -(-k2 // plan["BLOCK_J"])
        assert 4 <= programs <= 32 and plan["K1_PADDED"] >= k1 and plan["K2_PADDED"] >= k2


@pytest.mark.parametrize("tokens", [1, LOOKUP_MAX_TOKENS + 1])
def test_fused_decode_takes_the_decode_rotation(tokens, launches):
    """The fused op's lookup path (≤ LOOKUP_MAX_TOKENS tokens) rotates with the decode kernel; more tokens don't."""
    g = torch.Generator().manual_seed(tokens)
    features, d, D, rows = 40, 10, 24, 8
    rotation = make_rotation(features, d, seed=0)
    length = rotation.padded_features // d * D
    codes = pack_codes(torch.rand(rows, length, generator=g) < 0.5)
    x = torch.randn(tokens, features, generator=g).to(torch.float16)

    _lifted_linear_cuda(x, rotation.signs, rotation.left, rotation.right, torch.randn(d, D, generator=g), codes,
                        torch.rand(rows, generator=g) + 0.5, None)

    assert launches["_rotate_decode_kernel"].launches == int(tokens <= LOOKUP_MAX_TOKENS)
