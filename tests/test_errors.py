"""Bad input gets a clear error naming the fix; nothing is silently changed."""

import math

import pytest
import torch
from tiny_models import tiny_llama

import lift_ao
from lift_ao import Lattice, LatticeError, LiftQuantTensor, liftquant


@pytest.mark.parametrize("bits", [0.5, 9.0, -2.4, math.nan, math.inf])
def test_bits_outside_the_supported_range(bits):
    with pytest.raises(LatticeError, match="outside the supported range|finite number"):
        liftquant(bits=bits)


@pytest.mark.parametrize("bits", ["2.4", None, True, [2.4]])
def test_bits_not_a_number(bits):
    with pytest.raises((LatticeError, ValueError), match="finite number|exactly one"):
        liftquant(bits=bits)


def test_unknown_lattice_name():
    with pytest.raises(LatticeError, match="no shipped lattice|unknown lattice"):
        liftquant(lattice="99/7")
    with pytest.raises(LatticeError, match="unknown lattice name"):
        Lattice.load("two point four")


@pytest.mark.parametrize("bad,match", [(math.nan, "NaN/Inf"), (math.inf, "NaN/Inf")])
def test_nan_or_inf_weight_names_the_module(bad, match):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    before = model.model.layers[1].mlp.up_proj.weight.clone()
    with pytest.raises(ValueError, match=match) as info:
        lift_ao.quantize(model, liftquant(bits=2.4), progress=False)
    assert "model.layers.1.mlp.up_proj" in str(info.value)
    # The bad module is left as it was (its NaN/Inf included), so the user can inspect it.
    after = model.model.layers[1].mlp.up_proj.weight
    assert not isinstance(after, LiftQuantTensor) and torch.equal(after.nan_to_num(), before.nan_to_num())


def test_non_float_weight():
    with pytest.raises(TypeError, match="floating point"):
        LiftQuantTensor.from_hp(torch.ones(4, 8, dtype=torch.int32), Lattice.load("24/10"))


@pytest.mark.parametrize("shape", [(16,), (2, 4, 8)])
def test_weight_must_be_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        LiftQuantTensor.from_hp(torch.randn(*shape), Lattice.load("24/10"))


def test_no_linear_layers():
    with pytest.raises(ValueError, match="no nn.Linear"):
        lift_ao.quantize(torch.nn.Sequential(torch.nn.Embedding(4, 4)), liftquant(bits=2.4), progress=False)


def test_wrong_config_type():
    with pytest.raises(TypeError, match="liftquant"):
        lift_ao.quantize(tiny_llama(), {"bits": 2.4}, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_requested_without_gpu():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        lift_ao.quantize(tiny_llama(), liftquant(bits=2.4), device="cuda", progress=False)


def test_activation_with_wrong_width():
    w = LiftQuantTensor.from_hp(torch.randn(8, 20), Lattice.load("24/10"))
    with pytest.raises(ValueError, match="expects 20"):
        torch.nn.functional.linear(torch.randn(2, 30), w)
