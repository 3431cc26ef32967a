"""The decode tables launch (kernels/triton_lift.py ``rotate_lift_tables``) under Triton's interpreter:
the lookup tables of x̃ = lift(Rᵀ pad(signs ⊙ x)) straight from x, against float64 and against the
two-launch path ``lift_tables(rotate_triton(...))``, and the fused ops that take it."""

import zlib

import pytest
import torch

from lift_ao.packing import pack_codes, words_per_row
from lift_ao.transform import make_rotation, padded_in_features
from lift_ao.kernels import triton_lift, triton_register
from lift_ao.kernels.fused_ops import lifted_linear, lifted_linear_group
from lift_ao.kernels.reference import lift_activation_reference
from lift_ao.kernels.triton_lift import ROTATE_TABLES_CONFIGS, _rotate_tables_plan, rotate_lift_tables, rotate_triton
from lift_ao.kernels.triton_lut import lift_tables, token_block
from lift_ao.kernels.triton_register import LOOKUP_MAX_TOKENS, _lifted_linear_cuda, _lifted_linear_group_cuda

# max |tables − ref| / max |ref| against the float64 tables of the same (rounded) activation: tf32
# products for 16-bit activations on the GPU (the interpreter's are exact fp32), fp32 for fp32.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-3, torch.float32: 1e-5}
# (K, d, D, signs given): K = 37, 100 not multiples of d; (k1, k2) = (5, 8), (7, 8), (8, 13), (15, 20),
# (25, 28): d does not divide k2 for 45/14 (d > k2: every block straddles rows of U), 100/8, 300/6
# and 700/10; D = 21, 30 not multiples of 4 (groups straddle two lattice blocks).
SHAPES = [(37, 10, 24, True), (45, 14, 30, False), (100, 8, 16, True), (300, 6, 21, True), (700, 10, 24, False)]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _problem(features, d, D, tokens, dtype, with_signs):
    g = torch.Generator().manual_seed(_seed(features, d, D, tokens, str(dtype), with_signs))
    rotation = make_rotation(features, d, seed=3)
    mapping = torch.randn(d, D, generator=g) / d**0.5
    x = torch.randn(tokens, features, generator=g).to(dtype)
    words = words_per_row(rotation.padded_features // d * D)
    return rotation, rotation.signs if with_signs else None, mapping, x, words


def _tables_float64(x, signs, rotation, mapping, words, block):
    """Signed 4-sums of the float64 lift of x, zero past L and past the tokens: (8·words, 16, block)."""
    f64 = torch.float64
    lifted = lift_activation_reference(x.to(f64), None if signs is None else signs.to(f64), rotation.left.to(f64),
                                       rotation.right.to(f64), mapping.to(f64))
    padded = torch.zeros(block, 32 * words, dtype=f64)
    padded[:x.shape[0], :lifted.shape[-1]] = lifted
    signs_of_entry = ((torch.arange(16)[:, None] >> torch.arange(4)) & 1).double() * 2 - 1
    return torch.einsum("it,bgt->gib", signs_of_entry, padded.view(block, 8 * words, 4))


def _relative_max_error(tables, ref) -> float:
    assert torch.isfinite(tables).all(), "non-finite entries (unwritten tables)"
    return float((tables.double() - ref).abs().max() / ref.abs().max())


class _LaunchCounter:
    """Stands in for a Triton kernel in a module's namespace: counts launches and keeps the last one's
    keyword arguments (the interpreter computes tf32 products exactly, so the precision rule is
    checked on what was passed), then runs it."""

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
    """Launch counters of the fused tables kernel, the rotation and the tables-from-u kernel."""
    from lift_ao.kernels import triton_lut

    counters = {}
    for module, name in ((triton_lift, "_rotate_lift_tables_kernel"), (triton_lift, "_rotate_kernel"),
                         (triton_lut, "_lift_tables_kernel")):
        counters[name] = _LaunchCounter(getattr(module, name))
        monkeypatch.setattr(module, name, counters[name])
    return counters


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", range(1, LOOKUP_MAX_TOKENS + 1))
@pytest.mark.parametrize("features,d,D,with_signs", SHAPES)
def test_tables_match_float64_and_the_two_launch_path(features, d, D, with_signs, tokens, dtype, launches):
    """One launch (precision by dtype), the float64 tables, and the tables rotate_triton + lift_tables give."""
    rotation, signs, mapping, x, words = _problem(features, d, D, tokens, dtype, with_signs)
    block = token_block(tokens)

    tables = rotate_lift_tables(x, signs, rotation.left, rotation.right, mapping, words, block)

    fused = launches["_rotate_lift_tables_kernel"]
    assert fused.launches == 1 and launches["_rotate_kernel"].launches == 0
    assert fused.keywords["PRECISION"] == ("ieee" if dtype == torch.float32 else "tf32")
    assert tables.shape == (8 * words, 16, block) and tables.dtype == torch.float32
    assert _relative_max_error(tables, _tables_float64(x, signs, rotation, mapping, words, block)) < TOLERANCE[dtype]
    two_launches = lift_tables(rotate_triton(x, signs, rotation.left, rotation.right), mapping, words, block)
    assert _relative_max_error(tables, two_launches.double()) < 1e-5


@pytest.mark.parametrize("config", ROTATE_TABLES_CONFIGS, ids=lambda c: f"G{c['BLOCK_G']}w{c['num_warps']}")
@pytest.mark.parametrize("features,d,D,with_signs", SHAPES)
@pytest.mark.parametrize("small_tiles", [False, True])
def test_every_config_matches_float64(features, d, D, with_signs, config, small_tiles, monkeypatch):
    """Each candidate config (the benchmark times them all, so each must be right), 2 tokens of a
    token block of 4 (tokens 2, 3 read no activation); with small tiles every loop over V's row chunks
    and P2's column chunks takes several steps."""
    if small_tiles:
        monkeypatch.setattr(triton_lift, "_TILE_PER_WARP", 4)
    rotation, signs, mapping, x, words = _problem(features, d, D, 2, torch.float32, with_signs)

    tables = rotate_lift_tables(x, signs, rotation.left, rotation.right, mapping, words, 4, config=config)

    assert _relative_max_error(tables, _tables_float64(x, signs, rotation, mapping, words, 4)) < 1e-5
    assert (tables[..., 2:] == 0).all()


@pytest.mark.parametrize("config", ROTATE_TABLES_CONFIGS, ids=lambda c: f"G{c['BLOCK_G']}w{c['num_warps']}")
@pytest.mark.parametrize("k1,k2,d,D", [(48, 5, 6, 13), (40, 3, 4, 6)])
def test_a_program_spanning_more_than_16_rows_of_u(k1, k2, d, D, config):
    """k1 > k2 (make_rotation keeps k1 ≤ k2, the kernel does not need it): a program's blocks span
    more rows of U than one 16-row product (up to ~50 with d = 6 > k2 = 5; 17 at BLOCK_G = 16 for the
    second shape, where the bound on ROWS must count the first block's offset in its row)."""
    g = torch.Generator().manual_seed(_seed("tall", k1, k2, config["BLOCK_G"], config["num_warps"]))
    left, right = (torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q.float() for k in (k1, k2))
    rotation = type("Rotation", (), dict(left=left, right=right))
    signs = torch.randint(0, 2, (k1 * k2,), generator=g).float() * 2 - 1
    mapping = torch.randn(d, D, generator=g) / d**0.5
    x = torch.randn(1, k1 * k2 - 3, generator=g)
    words = words_per_row(k1 * k2 // d * D)

    tables = rotate_lift_tables(x, signs, left, right, mapping, words, 1, config=config)

    assert _relative_max_error(tables, _tables_float64(x, signs, rotation, mapping, words, 1)) < 1e-5


def test_zeroes_the_split_counters():
    rotation, signs, mapping, x, words = _problem(100, 8, 16, 1, torch.bfloat16, True)
    counters = torch.full((1000,), 7, dtype=torch.int32)   # more than its programs zero in one step (64 each)

    rotate_lift_tables(x, signs, rotation.left, rotation.right, mapping, words, 1, zero_counters=counters)

    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("features,d,D", [(4096, 10, 24), (14336, 10, 24), (4096, 16, 32), (14336, 8, 24),
                                          (1536, 10, 24), (8960, 16, 32), (45, 14, 30), (300, 6, 21)])
@pytest.mark.parametrize("config", ROTATE_TABLES_CONFIGS, ids=lambda c: f"G{c['BLOCK_G']}w{c['num_warps']}")
def test_plan_covers_every_program(features, d, D, config):
    """Host bounds, checked for every program of real and test shapes: the rotated values a program's
    positions need lie in its FLAT values from its first block on, and in its ROWS rows of U."""
    kp, k1, k2 = padded_in_features(features, d)
    plan = _rotate_tables_plan(k1, k2, d, D, **config)
    positions, length = 4 * plan["BLOCK_G"], kp // d * D
    for first in range(0, length, positions):
        last = min(first + positions, length) - 1
        first_flat = first // D * d
        end_flat = (last // D + 1) * d
        assert end_flat - first_flat <= plan["FLAT"]
        assert (end_flat - 1) // k2 - first_flat // k2 < plan["ROWS"]
    assert plan["FLAT"] % plan["FLAT_CHUNK"] == 0 and plan["K1_PADDED"] % plan["BLOCK_A"] == 0


@pytest.mark.parametrize("tokens", [1, LOOKUP_MAX_TOKENS, LOOKUP_MAX_TOKENS + 1])
def test_fused_ops_decode_in_one_tables_launch_and_match_the_composition(tokens, launches):
    """The fused ops' CUDA functions (run here on CPU): at ≤ LOOKUP_MAX_TOKENS tokens one tables launch per
    shared lift and no rotation or tables-from-u launch; every token count matches the reference
    composition (x̃ kept in fp32 by the fused decode: within twice the fp16 bound)."""
    g = torch.Generator().manual_seed(_seed("fused", tokens))
    features, d, D = 60, 10, 30
    shared, other = make_rotation(features, d, seed=0), make_rotation(features, d, seed=1)
    mapping = torch.randn(d, D, generator=g) / d**0.5
    length = shared.padded_features // d * D
    rows = [13, 7, 9]
    codes = [pack_codes(torch.rand(n, length, generator=g) < 0.5) for n in rows]
    scales = [torch.rand(n, generator=g) + 0.5 for n in rows]
    bias = [None, torch.randn(7, generator=g).to(torch.float16), None]
    x = torch.randn(tokens, features, generator=g).to(torch.float16)
    group_args = (x, None, [shared.signs, shared.signs, other.signs], [shared.left, shared.left, other.left],
                  [shared.right, shared.right, other.right], [mapping] * 3, codes, scales, bias)
    single_args = (x, other.signs, other.left, other.right, mapping, codes[2], scales[2], None)

    outs = _lifted_linear_group_cuda(*group_args) + [_lifted_linear_cuda(*single_args)]

    decode = tokens <= LOOKUP_MAX_TOKENS
    assert launches["_rotate_lift_tables_kernel"].launches == (3 if decode else 0)
    assert launches["_lift_tables_kernel"].launches == 0
    if decode:
        assert launches["_rotate_kernel"].launches == 0
    wanted = lifted_linear_group(*group_args) + [lifted_linear(*single_args)]  # CPU: the reference ops
    for got, want in zip(outs, wanted):
        assert got.shape == want.shape
        assert float((got.double() - want.double()).norm() / want.double().norm()) < 4e-3
