"""End-to-end fine-tuning of the scales (lift_ao.finetune_end_to_end) after calibration."""

import copy

import pytest
import torch

import lift_ao
from lift_ao.calibration import calibrate
from test_calibrate_finetune import _logit_error, _quantized_state
from tiny_models import tiny_llama, token_batch

LATTICE, BATCH = "16/8", 8


@pytest.fixture(scope="module")
def runs():
    """The tiny Llama calibrated with block fine-tuning, then tuned end to end (64 steps)."""
    model = tiny_llama()
    tokens = token_batch(0, batch=64, length=32)
    calibrated = calibrate(copy.deepcopy(model), lift_ao.liftquant(lattice=LATTICE), tokens, batch_size=BATCH,
                           finetune_steps=16, progress=False)
    tuned = copy.deepcopy(calibrated)
    losses = lift_ao.finetune_end_to_end(tuned, model, tokens, steps=64, lr=1e-2, batch_size=BATCH, progress=False)
    return model, calibrated, tuned, losses


def test_end_to_end_lowers_the_kl_and_the_held_out_logit_error(runs):
    model, calibrated, tuned, (before, after) = runs
    # Measured: KL on the first batch 6.59e-4 -> 5.21e-4; held-out relative logit error 0.2547 -> 0.2398.
    assert after < 0.85 * before, (before, after)
    held_out = token_batch(1, batch=16, length=32)
    assert _logit_error(model, tuned, held_out) < 0.97 * _logit_error(model, calibrated, held_out)


def test_end_to_end_moves_only_the_scales_and_keeps_the_sharing(runs):
    _, calibrated, tuned, _ = runs
    before, after = _quantized_state(calibrated), _quantized_state(tuned)
    assert before.keys() == after.keys()
    for key in after:
        if key.endswith(("packed_codes", "mapping", "rotation_left", "rotation_right")):
            assert torch.equal(after[key], before[key]), key
    assert all(not torch.equal(after[k], before[k]) for k in after if k.endswith(("row_scale", "input_signs")))
    attention = tuned.model.layers[0].self_attn
    assert attention.q_proj.weight.input_signs is attention.k_proj.weight.input_signs  # one factor per group
    weight = tuned.model.layers[1].mlp.down_proj.weight
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.nn.functional.linear(x, weight), x @ weight.dequantize().T, rtol=1e-4, atol=1e-5)
    # The padding of the rotation keeps its ±1: only the first K entries carry scales.
    signs = weight.input_signs
    assert torch.equal(signs[weight.shape[1]:].abs(), torch.ones_like(signs[weight.shape[1]:]))


def test_zero_steps_change_nothing(runs):
    model, calibrated, _, _ = runs
    untouched = copy.deepcopy(calibrated)
    before, after = lift_ao.finetune_end_to_end(untouched, model, token_batch(0, batch=8, length=32), steps=0,
                                                progress=False)
    assert before == after
    state = _quantized_state(calibrated)
    assert all(torch.equal(v, state[k]) for k, v in _quantized_state(untouched).items())


@pytest.mark.parametrize("options", [{"steps": -1}, {"steps": 1.5}, {"steps": True}, {"steps": 2, "lr": 0.0},
                                     {"steps": 2, "batch_size": 0}])
def test_bad_settings_are_refused(runs, options):
    model, calibrated, _, _ = runs
    with pytest.raises(ValueError, match="steps"):
        lift_ao.finetune_end_to_end(calibrated, model, token_batch(), **options)


def test_bad_tokens_and_unquantized_models_are_refused(runs):
    model, calibrated, _, _ = runs
    with pytest.raises(ValueError, match="token ids"):
        lift_ao.finetune_end_to_end(calibrated, model, torch.randn(2, 8), steps=1)
    with pytest.raises(ValueError, match="no LiftQuant weights"):
        lift_ao.finetune_end_to_end(copy.deepcopy(model), model, token_batch(), steps=1)


def test_command_line_tunes_end_to_end(tmp_path):
    from test_resume import run_cli

    assert run_cli(tmp_path / "tuned", "--calibrate", "--e2e-steps", "4") == 0
    assert run_cli(tmp_path / "bad", "--calibrate", "--e2e-steps", "-1") == 2
