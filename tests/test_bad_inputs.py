"""Bad input gets a clear error naming the fix; nothing is silently changed.

One matrix: every user-facing entry point × (wrong type, wrong range, NaN/Inf, empty model, model
without linear layers, unsupported module, CUDA without a GPU). Checkpoint corruption (truncated,
tampered, wrong version or lattice) is in test_io.py, a resume directory of another run in
test_resume.py.

Not ours to check: torchao's ``quantize_`` itself treats a model without linears as nothing to do,
and moves the model to ``device=`` before our handler runs (so a missing GPU fails inside torch).
"""

import math
import re

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, token_batch
from torchao.quantization import quantize_

import lift_ao
from lift_ao import (
    BudgetError, CheckpointError, Lattice, LatticeError, LiftQuantTensor, liftquant, load_quantized, plan,
    save_quantized,
)
from lift_ao.cli import main as cli_main
from lift_ao.config import LiftQuantConfig
from lift_ao.packing import packed_shape
from lift_ao.search import nearest_codes
from lift_ao.sensitivity import measure_sensitivity
from lift_ao.transform import make_rotation, rotate

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
L = Lattice.load("16/8")


def linear(weight=None) -> torch.nn.Sequential:
    """A one-Linear model (16 -> 8), optionally with a given weight."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    if weight is not None:
        model[0].weight = torch.nn.Parameter(weight, requires_grad=False)
    return model


def nan_weight() -> torch.Tensor:
    w = torch.randn(8, 16)
    w[3, 5] = math.nan
    return w


def inf_llama() -> torch.nn.Module:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = math.inf
    return model


def with_extra_state() -> torch.nn.Module:
    class Stateful(torch.nn.Linear):
        def get_extra_state(self):
            return {"step": 3}

        def set_extra_state(self, state):
            pass

    return Stateful(16, 8)


def matmul_args(lifted=None, row_scale=None, bias=None) -> tuple:
    """lift_ao::lifted_matmul's arguments for 8 rows of 128 code bits, with one replaced."""
    codes = torch.zeros(packed_shape(8, 128), dtype=torch.int32)
    return (torch.ones(2, 128) if lifted is None else lifted, codes, torch.ones(8) if row_scale is None else row_scale,
            bias)


def quantized_llama() -> torch.nn.Module:
    return lift_ao.quantize(tiny_llama(), liftquant(bits=2.4), progress=False)


def saved_checkpoint(tmp_path):
    model = linear()
    lift_ao.quantize(model, liftquant(lattice="16/8"), progress=False)
    save_quantized(model, tmp_path)
    return tmp_path


NO_LINEAR = "no nn.Linear layer to quantize"
# (entry point, call taking tmp_path, expected exception, message pattern naming the problem or fix)
CASES = [
    # liftquant / LiftQuantConfig
    ("liftquant", lambda p: liftquant(bits="2.4"), LatticeError, "finite number"),
    ("liftquant", lambda p: liftquant(bits=True), LatticeError, "finite number"),
    ("liftquant", lambda p: liftquant(bits=[2.4]), LatticeError, "finite number"),
    ("liftquant", lambda p: liftquant(), ValueError, "exactly one of bits"),
    ("liftquant", lambda p: liftquant(bits=2.4, lattice="24/10"), ValueError, "exactly one of bits"),
    ("liftquant", lambda p: liftquant(bits=0.5), LatticeError, "outside the supported range"),
    ("liftquant", lambda p: liftquant(bits=9.0), LatticeError, "outside the supported range"),
    ("liftquant", lambda p: liftquant(bits=-2.4), LatticeError, "outside the supported range"),
    ("liftquant", lambda p: liftquant(bits=math.nan), LatticeError, "finite number"),
    ("liftquant", lambda p: liftquant(bits=math.inf), LatticeError, "finite number"),
    ("liftquant", lambda p: liftquant(bits=2.4, round="up"), LatticeError, "'down' or 'nearest'"),
    ("liftquant", lambda p: liftquant(lattice="24/10", round="up"), ValueError, "round= picks the lattice for bits"),
    ("liftquant", lambda p: liftquant(memory_budget="1GiB", round="nearest"), ValueError, "round= picks the lattice"),
    ("liftquant", lambda p: liftquant(memory_budget="1GiB", allocation="uniform", rate_window=0.3), BudgetError,
     "drop rate_window"),
    ("liftquant", lambda p: liftquant(bits=2.4, seed=-1), ValueError, "non-negative int"),
    ("liftquant", lambda p: liftquant(bits=2.4, seed="0"), ValueError, "non-negative int"),
    ("liftquant", lambda p: liftquant(lattice="99/7"), LatticeError, "no shipped lattice 99/7; shipped: "),
    ("liftquant", lambda p: liftquant(lattice=24), LatticeError, "write it as 'D/d'"),
    ("liftquant", lambda p: liftquant(memory_budget="lots"), BudgetError, "not a size"),
    ("liftquant", lambda p: liftquant(memory_budget=-5), BudgetError, "must be positive"),
    ("liftquant", lambda p: liftquant(memory_budget=math.nan), BudgetError, "int number of bytes"),
    ("liftquant", lambda p: liftquant(bits=2.4, reserve="1GiB"), ValueError, "only apply with memory_budget"),
    # torchao's quantize_ with our config: what the module handler decides
    ("quantize_", lambda p: quantize_(linear(nan_weight()), liftquant(bits=2.4)), ValueError, r"Linear.weight \(8, 16\): .*NaN/Inf"),
    ("quantize_", lambda p: quantize_(linear(), liftquant(memory_budget="1GiB")), ValueError, "call lift_ao.quantize"),
    # lift_ao.quantize
    ("quantize", lambda p: lift_ao.quantize("model", liftquant(bits=2.4)), TypeError, "must be a torch.nn.Module"),
    ("quantize", lambda p: lift_ao.quantize(linear(), {"bits": 2.4}), TypeError, r"lift_ao.liftquant\(...\)"),
    ("quantize", lambda p: lift_ao.quantize(linear(), liftquant(bits=2.4), filter_fn=3), TypeError, "callable"),
    ("quantize", lambda p: lift_ao.quantize(linear(), liftquant(bits=2.4), device="gpu"), ValueError, "'cpu', 'cuda'"),
    ("quantize", lambda p: lift_ao.quantize(linear(), liftquant(bits=2.4), resume_dir=3), TypeError, "directory path"),
    ("quantize", lambda p: lift_ao.quantize(linear(nan_weight()), liftquant(bits=2.4)), ValueError, r"^0: .*NaN/Inf"),
    ("quantize", lambda p: lift_ao.quantize(torch.nn.Sequential(), liftquant(bits=2.4)), ValueError, NO_LINEAR),
    ("quantize", lambda p: lift_ao.quantize(torch.nn.Embedding(4, 4), liftquant(bits=2.4)), ValueError, NO_LINEAR),
    ("quantize", lambda p: lift_ao.quantize(torch.nn.Conv2d(3, 3, 3), liftquant(bits=2.4)), ValueError, NO_LINEAR),
    ("quantize", lambda p: lift_ao.quantize(linear(), liftquant(bits=2.4), filter_fn=lambda m, n: False), ValueError, "check filter_fn"),
    ("quantize", lambda p: lift_ao.quantize(linear().to("meta"), liftquant(bits=2.4)), ValueError, "meta device"),
    ("quantize", lambda p: lift_ao.quantize(linear(), liftquant(bits=2.4), calibration=torch.zeros(1, 4)), ValueError, "memory_budget"),
    # LiftQuantTensor.from_hp
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.randn(8, 16), "16/8"), TypeError, r"Lattice.load\('24/10'\)"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.randn(8, 16).numpy(), L), ValueError, "2-D linear weights"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.ones(8, 16, dtype=torch.int32), L), TypeError, "floating point"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.randn(16), L), ValueError, "2-D"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.randn(2, 8, 16), L), ValueError, "2-D"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.randn(0, 16), L), ValueError, "empty weight"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.randn(8, 16), L, seed=-1), ValueError, "non-negative int"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.randn(8, 16), L, seed=2**43), ValueError, "below 2\\*\\*43"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(nan_weight(), L, name="mlp.up"), ValueError, "mlp.up: .*NaN/Inf"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.full((8, 16), -math.inf), L), ValueError, "NaN/Inf"),
    ("from_hp", lambda p: LiftQuantTensor.from_hp(torch.randn(8, 16, device="meta"), L), ValueError, "meta device"),
    # save_quantized / load_quantized
    ("save_quantized", lambda p: save_quantized("model", p), TypeError, "must be a torch.nn.Module"),
    ("save_quantized", lambda p: save_quantized(linear(), None), TypeError, "directory path"),
    ("save_quantized", lambda p: save_quantized(linear(), saved_checkpoint(p) / "lift_ao.safetensors"), ValueError, "is a file"),
    ("save_quantized", lambda p: save_quantized(linear().to("meta"), p), ValueError, "meta device"),
    ("save_quantized", lambda p: save_quantized(with_extra_state(), p), TypeError, "_extra_state is a dict: .*tensors only"),
    ("load_quantized", lambda p: load_quantized(None), TypeError, "directory path"),
    ("load_quantized", lambda p: load_quantized(saved_checkpoint(p), "llama"), TypeError, "must be a torch.nn.Module"),
    ("load_quantized", lambda p: load_quantized(p, linear()), CheckpointError, r"no checkpoint .*save_quantized"),
    ("load_quantized", lambda p: load_quantized(saved_checkpoint(p)), CheckpointError, "no config.json; pass the model"),
    ("load_quantized", lambda p: load_quantized(saved_checkpoint(p), torch.nn.Sequential()), CheckpointError, "has no '0.weight'"),
    ("load_quantized", lambda p: load_quantized(saved_checkpoint(p), torch.nn.Sequential(torch.nn.Linear(32, 8))), CheckpointError, "shape"),
    ("load_quantized", lambda p: load_quantized(saved_checkpoint(p), linear(), device="gpu"), ValueError, "'cpu', 'cuda'"),
    # Lattice
    ("Lattice.for_bits", lambda p: Lattice.for_bits("2.4"), LatticeError, "finite number"),
    ("Lattice.for_bits", lambda p: Lattice.for_bits(math.nan), LatticeError, "finite number"),
    ("Lattice.for_bits", lambda p: Lattice.for_bits(100), LatticeError, r"outside the supported range .*lattice train"),
    ("Lattice.load", lambda p: Lattice.load(None), LatticeError, "write it as 'D/d'"),
    ("Lattice.load", lambda p: Lattice.load("two point four"), LatticeError, "write it as 'D/d'"),
    ("Lattice.load", lambda p: Lattice.load("24/11"), LatticeError, "no shipped lattice 24/11; shipped: "),
    ("Lattice", lambda p: Lattice(10, 8, torch.zeros(10, 8)), LatticeError, "0 < d < D"),
    ("Lattice", lambda p: Lattice(2, 4, torch.full((2, 4), math.nan)), LatticeError, "NaN/Inf"),
    ("nearest_codes", lambda p: nearest_codes(torch.tensor([[math.nan] + [0.0] * 7]), L), ValueError, "NaN/Inf"),
    ("nearest_codes", lambda p: nearest_codes(torch.zeros(2, 8), Lattice(8, 16, L.M, L.mse, {"beam_width": "0"})),
     LatticeError, "records beam_width '0'"),
    ("rotate", lambda p: rotate(torch.randn(2, 60), *(lambda r: (r.signs, r.left, r.right))(make_rotation(50, 10, 0))),
     ValueError, "60 features for a rotation of 50"),
    ("lifted_matmul", lambda p: torch.ops.lift_ao.lifted_matmul(*matmul_args(row_scale=torch.ones(8, 1))), ValueError,
     r"row_scale must be \(N,\)"),
    ("lifted_matmul", lambda p: torch.ops.lift_ao.lifted_matmul(*matmul_args(bias=torch.ones(1))), ValueError,
     r"bias must be \(N,\)"),
    ("lifted_matmul", lambda p: torch.ops.lift_ao.lifted_matmul(*matmul_args(lifted=torch.ones(2, 128, dtype=torch.int32))),
     ValueError, "floating point"),
    # plan
    ("plan", lambda p: plan(42, "1GiB"), TypeError, r"takes an nn.Module, a transformers config"),
    ("plan", lambda p: plan(tiny_llama(), "lots"), BudgetError, "not a size"),
    ("plan", lambda p: plan(tiny_llama(), -1), BudgetError, "must be positive"),
    ("plan", lambda p: plan(tiny_llama(), math.inf), BudgetError, "int number of bytes"),
    ("plan", lambda p: plan(tiny_llama(), 10), BudgetError, "too small.*Raise the budget"),
    ("plan", lambda p: plan(torch.nn.Sequential(), "1GiB"), BudgetError, "no linear layer"),
    ("plan", lambda p: plan(torch.nn.Conv2d(3, 3, 3), "1GiB"), BudgetError, "no linear layer"),
    ("plan", lambda p: plan(tiny_llama(), "1GiB", allocation="greedy"), BudgetError, "allocation must be one of"),
    ("plan", lambda p: plan(inf_llama(), "1GiB"), BudgetError, r"q_proj'\]: .*NaN/Inf.*fix the checkpoint"),
    # configs and the torchao handler
    ("liftquant", lambda p: liftquant(bits=2.4, include_lm_head="no"), ValueError, "include_lm_head must be True or False"),
    ("LiftQuantConfig", lambda p: LiftQuantConfig(memory_budget="24GiB"), ValueError, "pass lattice=None"),
    ("LiftQuantConfig", lambda p: LiftQuantConfig(lattice="24/10", allocation="bogus"), ValueError,
     "allocation=.* only apply with memory_budget"),
    ("quantize_", lambda p: quantize_(tiny_gpt2(), liftquant(bits=2.4), filter_fn=lambda m, n: n.endswith("c_attn")),
     TypeError, r"transposed .*lift_ao.quantize\(model, config\)"),
    # measure_sensitivity
    ("measure_sensitivity", lambda p: measure_sensitivity(quantized_llama(), tiny_llama(), token_batch().bool()),
     ValueError, "LongTensor"),
    ("measure_sensitivity", lambda p: measure_sensitivity(quantized_llama(), tiny_llama(), token_batch(), batch_size=0),
     ValueError, "batch_size must be a positive int"),
]


@pytest.mark.parametrize("entry,call,error,match", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_gets_a_clear_error(entry, call, error, match, tmp_path):
    with pytest.raises(error, match=match):
        call(tmp_path)


@NO_GPU
@pytest.mark.parametrize("call", [
    lambda: lift_ao.quantize(linear(), liftquant(bits=2.4), device="cuda", progress=False),
    lambda: lift_ao.quantize(linear(), liftquant(bits=2.4), device=0, progress=False),
    lambda: load_quantized("unused", linear(), device="cuda"),
], ids=["quantize-cuda", "quantize-0", "load_quantized-cuda"])
def test_cuda_requested_without_gpu(call):
    with pytest.raises(ValueError, match="device='cpu'|use 'cpu'"):
        call()


def test_nan_weight_is_named_and_left_as_it_was():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = math.nan
    before = model.model.layers[1].mlp.up_proj.weight.clone()
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.up_proj: .*NaN/Inf"):
        lift_ao.quantize(model, liftquant(bits=2.4), progress=False)
    # The bad module keeps its weight (NaN included), so the user can inspect it.
    after = model.model.layers[1].mlp.up_proj.weight
    assert not isinstance(after, LiftQuantTensor) and torch.equal(after.nan_to_num(), before.nan_to_num())


def test_activation_with_wrong_width():
    w = LiftQuantTensor.from_hp(torch.randn(8, 20), Lattice.load("24/10"))
    with pytest.raises(ValueError, match="expects 20"):
        torch.nn.functional.linear(torch.randn(2, 30), w)


@pytest.mark.parametrize("argv,match", [
    (["quantize", "--bits", "99"], "outside the supported range"),
    (["quantize", "--lattice", "99/7"], "no shipped lattice 99/7"),
    (["quantize", "--seed", "-1"], "non-negative int"),
    (["quantize", "--device", "gpu"], "use 'cpu', 'cuda'"),
    (["quantize", "--model", "/nonexistent/model"], "not a directory; give a local Hugging Face model directory"),
    (["eval", "--checkpoint", "/nonexistent/ckpt"], "no checkpoint"),
    (["plan", "--preset", "llama3-8b", "--budget", "4 gigs"], "not a size"),
    pytest.param(["quantize", "--device", "cuda"], "no CUDA GPU", marks=NO_GPU),
])
def test_cli_bad_input_exits_2_with_the_reason(argv, match, capsys):
    assert cli_main(argv + ["--skip-eval"] if argv[0] == "quantize" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lift-ao {argv[0]}: error: ") and re.search(match, err), err


@pytest.mark.parametrize("argv", [["quantize", "--bits", "abc"], ["quantize", "--nope"], ["frobnicate"]])
def test_cli_malformed_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2 and "usage: lift-ao" in capsys.readouterr().err
