"""Property-based tests (hypothesis) over shapes, dtypes, shipped lattices and available devices.

Packing is bit-exact; ``F.linear`` on a LiftQuantTensor matches a float64 dense reference within a
rounding bound; save/load is bit-exact; quantizing never changes a module it was told to skip.
Examples are few and small (derandomized, so every run checks the same cases) to keep this file fast.
"""

import tempfile

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_llama
from torchao.quantization import quantize_

import lift_ao
from lift_ao import Lattice, LiftQuantTensor, liftquant, load_quantized, save_quantized
from lift_ao.packing import pack_codes, packed_shape, unpack_codes
from lift_ao.transform import rotate, unrotate

LATTICES = st.sampled_from(["16/8", "24/10", "25/10", "21/6"])  # d = 8, 10, 10, 6; 2 to 3.5 bits
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
DEVICES = st.sampled_from(["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
SEEDS = st.integers(0, 2**31 - 1)
FEW = settings(max_examples=12, deadline=None, derandomize=True)


def _randn(shape, seed, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.integers(0, 70), length=st.integers(1, 300), seed=SEEDS)
def test_pack_unpack_round_trip_is_bit_exact(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2, (rows, length), generator=g).bool()
    packed = pack_codes(codes)
    assert packed.dtype == torch.int32 and packed.shape == packed_shape(rows, length)
    assert torch.equal(unpack_codes(packed, length, rows), codes)


def _dense_and_lift_float64(w: LiftQuantTensor, x: torch.Tensor):
    """(W as float64 (N, K), |lift(x)| in float64 (B, L)) from the stored codes, scales and factors."""
    f64 = lambda t: t.detach().cpu().to(torch.float64)  # noqa: E731
    n, d, D = w.shape[0], w.block_size, w.code_bits
    signs, left, right, M = f64(w.input_signs), f64(w.rotation_left), f64(w.rotation_right), f64(w.mapping)
    codes = unpack_codes(w.packed_codes.cpu(), w.code_length, n).view(n, -1, D).to(torch.float64) * 2 - 1
    dense = unrotate((codes @ M.T).flatten(1) * f64(w.row_scale)[:, None], signs, left, right, w.shape[1])
    lifted = (rotate(f64(x), signs, left, right).unflatten(-1, (-1, d)) @ M).flatten(-2)
    return dense, lifted.abs()


@FEW
@given(n=st.integers(1, 24), k=st.integers(1, 96), batch=st.integers(1, 3), bias=st.booleans(), lattice=LATTICES,
       dtype=DTYPES, device=DEVICES, seed=SEEDS)
def test_linear_matches_float64_dense_reference(n, k, batch, bias, lattice, dtype, device, seed):
    w = LiftQuantTensor.from_hp(_randn((n, k), seed, dtype, device), Lattice.load(lattice), seed=seed % 7)
    x = _randn((batch, k), seed + 1, dtype, device)
    b = _randn((n,), seed + 2, dtype, device) if bias else None
    y = F.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (batch, n) and y.device.type == device
    dense, lifted_abs = _dense_and_lift_float64(w, x)
    reference = x.cpu().to(torch.float64) @ dense.T + (b.cpu().to(torch.float64) if bias else 0)
    # Rounding bound: the lifted activation is rounded to `dtype` (relative eps) and summed with ±1
    # codes in float32 (≤ L·eps32 relative to Σ|lifted|), then scaled and rounded to `dtype` again.
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    magnitude = w.row_scale.cpu().abs().to(torch.float64) * lifted_abs.sum(-1, keepdim=True)
    bound = (eps + 4 * w.code_length * eps32) * magnitude + eps * (reference.abs() + magnitude)
    assert ((y.cpu().to(torch.float64) - reference).abs() <= bound).all()


def _linear(k, n, bias, dtype, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias)).to(dtype)


@FEW
@given(n=st.integers(1, 24), k=st.integers(1, 64), bias=st.booleans(), lattice=LATTICES, dtype=DTYPES, seed=SEEDS)
def test_save_load_round_trip_is_bit_exact(n, k, bias, lattice, dtype, seed):
    model = _linear(k, n, bias, dtype, seed)
    lift_ao.quantize(model, liftquant(lattice=lattice, seed=seed % 7), progress=False)
    with tempfile.TemporaryDirectory() as directory:
        save_quantized(model, directory)
        loaded = load_quantized(directory, _linear(k, n, bias, dtype, seed + 1))
    a, b = model[0].weight, loaded[0].weight
    assert isinstance(b, LiftQuantTensor) and (a.shape, a.dtype) == (b.shape, b.dtype)
    for part in a.tensor_data_names:
        assert torch.equal(getattr(a, part), getattr(b, part)), part
    if bias:
        assert loaded[0].bias.dtype == dtype and torch.equal(model[0].bias, loaded[0].bias)


_LINEAR_NAMES = [name for name, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)]


@settings(max_examples=6, deadline=None, derandomize=True)
@given(chosen=st.sets(st.sampled_from(_LINEAR_NAMES), max_size=3), include_lm_head=st.booleans(),
       use_torchao=st.booleans())
def test_quantize_never_changes_a_skipped_module(chosen, include_lm_head, use_torchao):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = liftquant(lattice="16/8", include_lm_head=include_lm_head)
    selected = lambda module, name: name in chosen  # noqa: E731
    if use_torchao:  # torchao's quantize_ follows filter_fn alone (it cannot see names: no lm_head rule)
        quantize_(model, config, filter_fn=selected)
        coded = chosen
    else:
        coded = chosen if include_lm_head else chosen - {"lm_head"}
        assume(coded)  # lift_ao.quantize refuses a selection without linear layers (test_bad_inputs.py)
        lift_ao.quantize(model, config, filter_fn=selected, progress=False)
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in coded and key.endswith(".weight"):
            assert isinstance(value, LiftQuantTensor), key
        else:
            assert not isinstance(value, LiftQuantTensor) and value.dtype == before[key].dtype, key
            assert torch.equal(value, before[key]), key
