"""Bad input to the ops and to a weight built from given parts gets a clear error; empty input an empty result.

The rotation's factors must be square (P1 (k1, k1), P2 (k2, k2), signs (k1·k2,)): every user reads k1
and k2 off their first dimension. No weight has K = 0 (quantizing refuses empty weights), so an
activation of 0 features is a wrong-K activation. The Triton wrappers' own device check is in
test_kernels_triton.py (it needs a process without the interpreter).
"""

import pytest
import torch
import torch.nn.functional as F

from lift_ao.lattice import Lattice
from lift_ao.tensor import LiftQuantTensor

LATTICE = Lattice.load("24/10")


def weight(rows: int = 8, features: int = 20) -> LiftQuantTensor:
    return LiftQuantTensor.from_random_codes((rows, features), LATTICE, dtype=torch.float32, device="cpu",
                                             generator=torch.Generator().manual_seed(0))


def parts(w: LiftQuantTensor) -> list:
    return [getattr(w, n) for n in w.tensor_data_names]


def lift(x: torch.Tensor, w: LiftQuantTensor) -> torch.Tensor:
    return torch.ops.lift_ao.lift_activation(x, w.input_signs, w.rotation_left, w.rotation_right, w.mapping)


def lifted_linear(x: torch.Tensor, w: LiftQuantTensor) -> torch.Tensor:
    return torch.ops.lift_ao.lifted_linear(x, w.input_signs, w.rotation_left, w.rotation_right, w.mapping,
                                           w.packed_codes, w.row_scale, None)


# The 20-feature weight's factors are (4, 4) and (5, 5): replacements for (left, right), what the error names.
BAD_FACTORS = [
    ((4, 5), (5, 5), r"rotation_left must be a square \(k1, k1\) matrix, got \(4, 5\)"),
    ((4, 4), (6, 5), r"rotation_right must be a square \(k2, k2\) matrix, got \(6, 5\)"),
    ((5, 4), (4, 4), r"rotation_left must be a square \(k1, k1\) matrix, got \(5, 4\)"),  # k1·k2 still 20
    ((16,), (5, 5), r"rotation_left must be a square \(k1, k1\) matrix, got \(16,\)"),
]


@pytest.mark.parametrize("left,right,message", BAD_FACTORS)
def test_a_weight_with_non_square_rotation_factors_is_refused(left, right, message):
    """LiftQuantTensor(...) is what load_quantized, the HF loader and calibration build a weight with."""
    g = torch.Generator().manual_seed(1)
    codes, scale, mapping, signs, _, _ = parts(weight())
    with pytest.raises(ValueError, match=message):
        LiftQuantTensor(codes, scale, mapping, signs, torch.randn(left, generator=g), torch.randn(right, generator=g),
                        torch.Size([8, 20]), torch.float32)


@pytest.mark.parametrize("left,right,message", BAD_FACTORS)
def test_the_lift_op_refuses_non_square_rotation_factors(left, right, message):
    g = torch.Generator().manual_seed(2)
    w = weight()
    with pytest.raises(ValueError, match=message):
        torch.ops.lift_ao.lift_activation(torch.randn(3, 20, generator=g), w.input_signs,
                                          torch.randn(left, generator=g), torch.randn(right, generator=g), w.mapping)


def test_a_weight_with_signs_not_of_the_rotations_size_is_refused():
    codes, scale, mapping, signs, left, right = parts(weight())
    with pytest.raises(ValueError, match=r"signs must be \(20,\) = k1·k2 for factors \(4, 4\) and \(5, 5\), got \(21"):
        LiftQuantTensor(codes, scale, mapping, torch.ones(21), left, right, torch.Size([8, 20]), torch.float32)


@pytest.mark.parametrize("op", [lift, lifted_linear], ids=["lift_activation", "lifted_linear"])
@pytest.mark.parametrize("features", [0, 21])
def test_ops_refuse_an_activation_of_no_features_as_of_too_many(op, features):
    """The ops see Kp = 20, not K: more features than Kp is the wrong K they can tell, and so is none."""
    x = torch.randn(3, features, generator=torch.Generator().manual_seed(features))
    with pytest.raises(ValueError, match=f"activation has {features} input features, the weight expects 1 to 20"):
        op(x, weight())


@pytest.mark.parametrize("features", [0, 7])
def test_linear_refuses_an_activation_of_no_features_as_of_too_few(features):
    with pytest.raises(ValueError, match=f"linear: input has {features} features, the weight expects 20"):
        F.linear(torch.zeros(3, features), weight())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 20), (2, 0, 20)])
def test_zero_tokens_give_an_empty_output_of_the_activations_dtype(shape, dtype):
    w = weight()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    lead = shape[:-1]
    for out, features in [(lift(x, w), w.code_length), (lifted_linear(x, w), 8), (F.linear(x, w), 8),
                          (F.linear(x, w, torch.ones(8)), 8)]:
        assert out.shape == (*lead, features) and out.dtype == dtype


def test_a_weight_passed_to_a_dynamic_compile_is_rebuilt_from_symbolic_sizes():
    """torch.compile(dynamic=True) rebuilds a weight input from symbolic sizes: the constructor's factor check
    runs in eager mode only (comparing symbolic sizes bound the signs' size to the factors' product, which
    Dynamo then failed to bind for the second weight shape)."""
    linear = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True, backend="aot_eager", dynamic=True)
    for rows, features in ((64, 20), (64, 36), (32, 100)):
        w, x = weight(rows, features), torch.randn(2, features, generator=torch.Generator().manual_seed(rows))
        assert torch.allclose(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
