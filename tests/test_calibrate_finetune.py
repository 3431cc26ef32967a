"""Intra-block fine-tuning of calibrated LiftQuant (lift_ao.calibrate(..., finetune_steps=N))."""

import copy

import pytest
import torch

import lift_ao
from lift_ao import calibration
from lift_ao.calibration import _block_inputs, _run_block, calibrate, finetune_block
from test_calibrate import crash_after_first_block
from tiny_models import tiny_llama, token_batch

LATTICE = "16/8"  # the cheapest search of the shipped lattices
STEPS, LR, BATCH, ROUNDS = 16, 1e-2, 8, 16
# Code flipping is measured against block LDLQ's codes: the Gauss-Seidel refinement, which also moves
# codes (and is tested in test_calibrate.py), stays off in this file.
LDLQ = dict(batch_size=BATCH, refine_passes=0, progress=False)


def _quantized_state(model) -> dict:
    return {f"{name}.{n}": getattr(m.weight, n) for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), lift_ao.LiftQuantTensor) for n in m.weight.tensor_data_names}


def _block_error(model, quantized, tokens) -> float:
    """Mean squared output error of quantized block 0 against the full-precision block 0 (same inputs)."""
    with torch.no_grad():
        inputs = _block_inputs(model, model.model.layers, tokens, BATCH, "cpu")
        target = _run_block(model.model.layers[0], inputs, "cpu")
        out = _run_block(quantized.model.layers[0], inputs, "cpu")
    return sum((o - t).pow(2).sum() for (o, _), (t, _) in zip(out, target)).item() / sum(t.numel() for t, _ in target)


def _logit_error(model, quantized, tokens) -> float:
    with torch.no_grad():
        reference = model(tokens).logits
        return ((quantized(tokens).logits - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module")
def runs():
    """The tiny Llama calibrated on 64 × 32 random tokens without and with fine-tuning (scales only)."""
    model, config = tiny_llama(), lift_ao.liftquant(lattice=LATTICE)
    tokens = token_batch(0, batch=64, length=32)
    plain = calibrate(copy.deepcopy(model), config, tokens, **LDLQ)
    tuned = calibrate(copy.deepcopy(model), config, tokens, finetune_steps=STEPS, finetune_lr=LR, **LDLQ)
    return model, config, tokens, plain, tuned


def _finetuned_with(runs, **options):
    """The runs' fine-tuned calibration with further fine-tuning ``options``."""
    model, config, tokens, _, _ = runs
    return calibrate(copy.deepcopy(model), config, tokens, finetune_steps=STEPS, finetune_lr=LR, **LDLQ, **options)


@pytest.fixture(scope="module")
def codes_tuned(runs):
    """The same calibration with the codes fine-tuned before the scales."""
    return _finetuned_with(runs, code_rounds=ROUNDS)


def test_code_finetuning_lowers_the_error_further(runs, codes_tuned):
    model, _, tokens, plain, tuned = runs
    held_out = token_batch(1, batch=16, length=32)
    # Measured: block 0 on the calibration tokens 1.081e-05 (none) -> 9.92e-06 (scales) -> 7.85e-06
    # (codes, then scales); held out 1.218e-05 -> 1.145e-05 -> 9.88e-06; logits 0.263 -> 0.255 -> 0.218.
    assert _block_error(model, codes_tuned, tokens) < 0.92 * _block_error(model, tuned, tokens)
    assert _block_error(model, codes_tuned, held_out) < 0.95 * _block_error(model, tuned, held_out)
    assert _logit_error(model, codes_tuned, held_out) < 0.95 * _logit_error(model, tuned, held_out)
    assert _logit_error(model, tuned, held_out) < _logit_error(model, plain, held_out)


def test_code_finetuning_flips_few_bits_and_keeps_the_format(runs, codes_tuned):
    _, _, _, plain, _ = runs
    before, after = _quantized_state(plain), _quantized_state(codes_tuned)
    assert before.keys() == after.keys()
    codes = [k for k in after if k.endswith("packed_codes")]
    flipped = sum(_set_bits(after[k] ^ before[k]) for k in codes if k.startswith("model.layers.0."))
    total = sum(after[k].numel() * 32 for k in codes if k.startswith("model.layers.0."))
    assert 0 < flipped < 0.05 * total, (flipped, total)  # a few percent of block 0's bits at most
    for key in codes:
        assert after[key].dtype == torch.int32 and after[key].shape == before[key].shape
    weight = codes_tuned.model.layers[0].mlp.down_proj.weight
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.nn.functional.linear(x, weight), x @ weight.dequantize().T, rtol=1e-4, atol=1e-5)


def _set_bits(words: torch.Tensor) -> int:
    return sum(int(((words >> i) & 1).sum()) for i in range(32))


def test_flip_curvature_is_the_exact_quadratic_term_of_a_linear_output_error():
    # Loss mean((x Wᵀ - t)²) is quadratic in the codes: flipping one bit changes it by exactly
    # -2·c·g + h with g the gradient and h the curvature at output gain 1/count.
    torch.manual_seed(0)
    rough = lift_ao.LiftQuantTensor.from_random_codes((6, 37), lift_ao.Lattice.load("24/10"), dtype=torch.float32,
                                                      device="cpu", generator=torch.Generator().manual_seed(0))
    weight = lift_ao.LiftQuantTensor(rough.packed_codes, *(getattr(rough, n).double() for n in rough.tensor_data_names[1:]),
                                     rough.shape, torch.float64)
    signs = calibration._code_signs(weight).double().requires_grad_()
    x, target = torch.randn(50, 37, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    sigma = weight.input_signs[:37].double()

    def loss(codes):
        dense = weight.row_scale.double()[:, None] * calibration._unit_weight(weight, codes) * sigma
        return (x @ dense.T - target).pow(2).mean()

    value = loss(signs)
    (grad,) = torch.autograd.grad(value, signs)
    curvature = calibration._flip_curvature(weight, sigma, weight.row_scale.double(), x,
                                            torch.full((6,), 1 / target.numel(), dtype=torch.float64))
    for index in [(0, 0, 0), (5, 3, 23), (2, 1, 7)]:
        flipped = signs.detach().clone()
        flipped[index] *= -1
        predicted = -2 * signs[index] * grad[index] + curvature[index]
        torch.testing.assert_close(loss(flipped) - value, predicted.detach(), rtol=1e-4, atol=1e-12)


def test_finetuning_lowers_block_output_error(runs):
    model, _, tokens, plain, tuned = runs
    held_out = token_batch(1, batch=16, length=32)
    # Measured: block 0 on the calibration tokens 1.081e-05 -> 9.92e-06 (-8%), on held-out tokens
    # 1.218e-05 -> 1.145e-05 (-6%); relative logit error on held-out tokens 0.263 -> 0.255.
    calibrated, finetuned = _block_error(model, plain, tokens), _block_error(model, tuned, tokens)
    assert finetuned < 0.95 * calibrated, (finetuned, calibrated)
    assert 5e-6 < finetuned < 2e-5
    held_calibrated, held_finetuned = _block_error(model, plain, held_out), _block_error(model, tuned, held_out)
    assert held_finetuned < 0.97 * held_calibrated, (held_finetuned, held_calibrated)
    # ... and the whole model's logits on held-out tokens.
    assert _logit_error(model, tuned, held_out) < _logit_error(model, plain, held_out)


def test_finetuning_keeps_the_codes_and_the_format(runs):
    _, _, _, plain, tuned = runs
    before, after = _quantized_state(plain), _quantized_state(tuned)
    assert before.keys() == after.keys()
    for key in after:  # (determinism: the resume test compares two runs bit for bit)
        if key.endswith(("mapping", "rotation_left", "rotation_right")) or \
                key.startswith("model.layers.0.") and key.endswith("packed_codes"):
            assert torch.equal(after[key], before[key]), key  # block 0: only the scales move
    changed = [k for k in after if k.endswith(("row_scale", "input_signs")) and not torch.equal(after[k], before[k])]
    assert len(changed) == 28  # every row scale and input scale of the 14 linears
    # Block 1 is coded from the fine-tuned block 0's outputs: its codes are not those of the plain run.
    assert not torch.equal(after["model.layers.1.mlp.up_proj.packed_codes"], before["model.layers.1.mlp.up_proj.packed_codes"])
    attention = tuned.model.layers[1].self_attn
    assert attention.q_proj.weight.input_signs is attention.v_proj.weight.input_signs  # siblings share
    # The folded scales keep F.linear and dequantize consistent.
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.nn.functional.linear(x, attention.q_proj.weight),
                               x @ attention.q_proj.weight.dequantize().T, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def rotation_tuned(runs):
    """The same fine-tuning with each group's rotation factors tuned too."""
    return _finetuned_with(runs, finetune_rotation=True)


def test_rotation_finetuning_lowers_the_error_and_keeps_siblings_sharing(runs, rotation_tuned):
    model, _, tokens, _, tuned = runs
    held_out = token_batch(1, batch=16, length=32)
    # Measured: block 0 on the calibration tokens 9.92e-06 (scales) -> 9.54e-06 (and rotation), held out
    # 1.145e-05 -> 1.108e-05; relative logit error on held-out tokens 0.255 -> 0.248.
    scales_only, with_rotation = _block_error(model, tuned, tokens), _block_error(model, rotation_tuned, tokens)
    assert with_rotation < 0.98 * scales_only, (with_rotation, scales_only)
    assert _logit_error(model, rotation_tuned, held_out) < _logit_error(model, tuned, held_out)
    before, after = _quantized_state(tuned), _quantized_state(rotation_tuned)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.rotation_left"],
                           before["model.layers.0.self_attn.q_proj.rotation_left"])
    attention = rotation_tuned.model.layers[0].self_attn
    assert attention.q_proj.weight.rotation_right is attention.v_proj.weight.rotation_right  # one lift for q/k/v
    assert attention.q_proj.weight.rotation_right is not attention.o_proj.weight.rotation_right  # per group
    # The factors are no longer orthogonal, and the op still computes the stored weight exactly.
    left = attention.o_proj.weight.rotation_left
    assert not torch.allclose(left @ left.T, torch.eye(left.shape[0]), atol=1e-4)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for linear in (attention.q_proj, attention.o_proj):
        torch.testing.assert_close(torch.nn.functional.linear(x, linear.weight), x @ linear.weight.dequantize().T,
                                   rtol=1e-4, atol=1e-5)


def test_finetune_block_lowers_its_loss_and_zero_steps_change_nothing():
    model, config = tiny_llama(seed=1), lift_ao.liftquant(lattice=LATTICE)
    tokens = token_batch(2, batch=16, length=32)
    quantized = calibrate(copy.deepcopy(model), config, tokens, batch_size=BATCH, progress=False)
    block, groups = quantized.model.layers[0], [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                 ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    with torch.no_grad():
        inputs = _block_inputs(model, model.model.layers, tokens, BATCH, "cpu")
        targets = _run_block(model.model.layers[0], inputs, "cpu")
        state = _quantized_state(quantized)
        before, after = finetune_block(block, groups, inputs, targets, steps=0, lr=LR, device="cpu")
    assert before == after
    assert all(torch.equal(v, _quantized_state(quantized)[k]) for k, v in state.items())
    with torch.no_grad():
        before, after = finetune_block(block, groups, inputs, targets, steps=STEPS, lr=LR, device="cpu")
    assert after < 0.95 * before, (before, after)  # on the first batch


def test_finetuned_calibration_resumes_bit_identically(tmp_path, monkeypatch):
    model, config = tiny_llama(), lift_ao.liftquant(lattice=LATTICE)
    tokens, held_out = token_batch(0, batch=16, length=32), token_batch(1, batch=4, length=32)
    options = dict(batch_size=BATCH, finetune_steps=4, finetune_lr=LR, code_rounds=2, progress=False)
    complete = calibrate(copy.deepcopy(model), config, tokens, checkpoint_dir=tmp_path / "complete", **options)

    crash_after_first_block(monkeypatch, lambda: calibrate(copy.deepcopy(model), config, tokens,
                                                           checkpoint_dir=tmp_path / "resumed", **options))
    tuned = []
    monkeypatch.setattr(calibration, "finetune_block", lambda *a, **k: tuned.append(1) or finetune_block(*a, **k))
    resumed = calibrate(copy.deepcopy(model), config, tokens, checkpoint_dir=tmp_path / "resumed", **options)
    assert len(tuned) == 1  # block 1 only
    expected, got = _quantized_state(complete), _quantized_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    with torch.no_grad():
        assert torch.equal(resumed(held_out).logits, complete(held_out).logits)

    # Other fine-tuning settings (or none) are another run: refused.
    for other in ({"finetune_steps": 5}, {"code_rounds": 3}, {"finetune_rotation": True}, {"guided": True}):
        with pytest.raises(lift_ao.CheckpointError):
            calibrate(copy.deepcopy(model), config, tokens, checkpoint_dir=tmp_path / "resumed", **(options | other))
    with pytest.raises(lift_ao.CheckpointError):
        calibrate(copy.deepcopy(model), config, tokens, checkpoint_dir=tmp_path / "resumed", batch_size=BATCH,
                  progress=False)


@pytest.mark.parametrize("options,match", [
    ({"finetune_steps": -1}, "finetune_steps"), ({"finetune_steps": 1.5}, "finetune_steps"),
    ({"finetune_steps": True}, "finetune_steps"), ({"finetune_steps": 2, "finetune_lr": 0.0}, "finetune_steps"),
    ({"code_rounds": -1}, "code_rounds"), ({"code_rounds": True}, "code_rounds"),
    ({"finetune_rotation": True}, "finetune_steps > 0")])
def test_bad_finetune_settings_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        calibrate(tiny_llama(), lift_ao.liftquant(lattice=LATTICE), token_batch(), **options)


def test_command_line_fine_tunes(tmp_path):
    from test_resume import run_cli

    assert run_cli(tmp_path / "plain", "--calibrate") == 0
    assert run_cli(tmp_path / "tuned", "--calibrate", "--finetune-steps", "2") == 0
    plain, tuned = lift_ao.load_quantized(tmp_path / "plain"), lift_ao.load_quantized(tmp_path / "tuned")
    q_plain, q_tuned = plain.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight
    assert torch.equal(q_plain.packed_codes, q_tuned.packed_codes)
    assert not torch.equal(q_plain.row_scale, q_tuned.row_scale)
    assert run_cli(tmp_path / "bad", "--calibrate", "--finetune-steps", "-1") == 2
    assert run_cli(tmp_path / "bad_rounds", "--calibrate", "--code-rounds", "-1") == 2
    assert run_cli(tmp_path / "rotated", "--calibrate", "--finetune-steps", "2", "--finetune-rotation") == 0
    mlp = lift_ao.load_quantized(tmp_path / "rotated").model.layers[0].mlp
    assert not torch.equal(mlp.up_proj.weight.rotation_left, q_plain.rotation_left)  # saved and loaded per group
    assert mlp.up_proj.weight.rotation_left is mlp.gate_proj.weight.rotation_left  # siblings share again
    assert run_cli(tmp_path / "bad_rotation", "--calibrate", "--finetune-rotation") == 2


def test_rotation_tuned_model_compiles_with_the_passes_and_matches_eager(rotation_tuned):
    """The passes (shared transform, scale folding, lift fusion) with tuned, non-orthogonal factors."""
    ids = token_batch(3, batch=1, length=16)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        eager, compiled = rotation_tuned(ids).logits, torch.compile(rotation_tuned, fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    done = {"shared_transform": 6, "lift_fusion": 14, "scale_folding": 4}
    # Inductor replays its own counters on FX-graph-cache hits, where the lift_ao mirror is kept.
    assert {name: torch._dynamo.utils.counters["inductor"][f"lift_ao_{name}"] for name in done} == done
