"""End-to-end fine-tuning of the scales (lift_ao.finetune_end_to_end) after calibration."""

import copy
import json

import pytest
import torch

import lift_ao
from lift_ao.calibration import calibrate
from lift_ao.finetune import held_out_rows, teacher_samples
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


def _kl(model, teacher, tokens) -> float:
    """KL(teacher ‖ model) per token of the models as they run (LiftQuant ops, not dense weights)."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(tokens).logits.float(), -1).flatten(0, 1)
        logits = torch.log_softmax(model(tokens).logits.float(), -1).flatten(0, 1)
    return torch.nn.functional.kl_div(logits, target, log_target=True, reduction="batchmean").item()


def test_end_to_end_lowers_the_kl_and_the_held_out_logit_error(runs):
    model, calibrated, tuned, (before, after) = runs
    # Measured: KL on the 8 held-out calibration sequences 6.99e-4 -> 6.34e-4; relative logit error
    # on other text 0.2547 -> 0.2380.
    assert after < 0.93 * before, (before, after)
    held = token_batch(0, batch=64, length=32)[held_out_rows(64, 0.125)]
    assert _kl(calibrated, model, held) == pytest.approx(before, rel=1e-3)
    assert _kl(tuned, model, held) == pytest.approx(after, rel=1e-3)  # the factors folded in are those reported
    other_text = token_batch(1, batch=16, length=32)
    assert _logit_error(model, tuned, other_text) < 0.97 * _logit_error(model, calibrated, other_text)


def test_factors_that_only_fit_the_training_sequences_are_not_kept(runs):
    model, calibrated, _, _ = runs
    tokens = token_batch(0, batch=4, length=32)
    train, held = tokens[:3], tokens[3:]
    assert held_out_rows(4, 0.125).tolist() == [2]  # so the third sequence is held out
    settings = dict(steps=32, lr=0.2, batch_size=3, progress=False)
    # Selecting on a training sequence (held out = a copy of train[0]) keeps factors that overfit:
    # measured KL on the training sequences 6.9e-4 -> 5.1e-4, on the unseen one 7.4e-4 -> 2.3e-3.
    overfit = copy.deepcopy(calibrated)
    lift_ao.finetune_end_to_end(overfit, model, torch.cat([train[:2], train[:1], train[2:]]), check_every=32, **settings)
    assert _kl(overfit, model, train) < 0.8 * _kl(calibrated, model, train)
    assert _kl(overfit, model, held) > 2 * _kl(calibrated, model, held)
    # Selecting on the unseen sequence keeps nothing worse than the calibrated factors there.
    guarded = copy.deepcopy(calibrated)
    before, after = lift_ao.finetune_end_to_end(guarded, model, torch.cat([train[:2], held, train[2:]]), check_every=4,
                                                **settings)
    assert after <= before == pytest.approx(_kl(calibrated, model, held), rel=1e-3)
    assert _kl(guarded, model, held) == pytest.approx(after, rel=1e-3)


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


@pytest.mark.parametrize("sequences, fraction, rows", [(64, 0.125, [4, 12, 20, 28, 36, 44, 52, 60]), (4, 0.125, [2]),
                                                       (2, 0.9, [1]), (10, 0.3, [1, 5, 8])])
def test_held_out_rows_are_spread_over_the_sequences(sequences, fraction, rows):
    assert held_out_rows(sequences, fraction).tolist() == rows


@pytest.mark.parametrize("options", [{"steps": -1}, {"steps": 1.5}, {"steps": True}, {"steps": 2, "lr": 0.0},
                                     {"steps": 2, "batch_size": 0}, {"steps": 2, "held_out": 0.0},
                                     {"steps": 2, "held_out": 1.0}, {"steps": 2, "check_every": 0}])
def test_bad_settings_are_refused(runs, options):
    model, calibrated, _, _ = runs
    with pytest.raises(ValueError, match="steps" if "held_out" not in options and "check_every" not in options
                       else "held_out"):
        lift_ao.finetune_end_to_end(calibrated, model, token_batch(), **options)


def test_bad_tokens_and_unquantized_models_are_refused(runs):
    model, calibrated, _, _ = runs
    with pytest.raises(ValueError, match="token ids"):
        lift_ao.finetune_end_to_end(calibrated, model, torch.randn(2, 8), steps=1)
    with pytest.raises(ValueError, match="at least 2 sequences"):
        lift_ao.finetune_end_to_end(calibrated, model, token_batch(0, batch=1), steps=1)
    with pytest.raises(ValueError, match="no LiftQuant weights"):
        lift_ao.finetune_end_to_end(copy.deepcopy(model), model, token_batch(), steps=1)


def test_command_line_tunes_end_to_end(tmp_path):
    from test_resume import run_cli

    assert run_cli(tmp_path / "tuned", "--calibrate", "--e2e-steps", "4") == 0
    assert run_cli(tmp_path / "bad", "--calibrate", "--e2e-steps", "-1") == 2


@pytest.mark.parametrize("option", [("--e2e-held-out", "1.0"), ("--e2e-held-out", "0"), ("--e2e-tokens", "1000")])
def test_command_line_refuses_bad_end_to_end_options_before_calibrating(tmp_path, monkeypatch, option):
    from test_resume import run_cli

    import lift_ao.calibration
    monkeypatch.setattr(lift_ao.calibration, "calibrate", lambda *a, **k: pytest.fail("calibrated before refusing"))
    assert run_cli(tmp_path / "bad", "--calibrate", "--e2e-steps", "2", *option) == 2


def test_command_line_end_to_end_stage_takes_its_own_tokens(tmp_path, monkeypatch, capsys):
    """--e2e-tokens: the block stage gets --calibration-tokens, the end-to-end stage a longer prefix of
    the same text (its first sequences are the block stage's), with --e2e-held-out of it held out;
    the report says what it used."""
    from test_resume import run_cli

    text = token_batch(seed=5, batch=48, length=32)
    asked = []
    prefix = lambda tokenizer, count: asked.append(count) or text[:count // 32]
    held_out = {}
    tune = lift_ao.finetune_end_to_end
    monkeypatch.setattr(lift_ao, "finetune_end_to_end", lambda model, teacher, tokens, **options: held_out.update(
        tokens=tokens, **options) or tune(model, teacher, tokens, **options))

    assert run_cli(tmp_path / "tuned", "--json", "--calibrate", "--calibration-tokens", "128", "--e2e-steps", "2",
                   "--e2e-tokens", "1536", "--e2e-held-out", "0.25", calibration_tokens=prefix) == 0

    report = json.loads(capsys.readouterr().out)
    assert asked == [128, 1536]
    assert torch.equal(held_out["tokens"], text) and held_out["held_out"] == 0.25
    assert (report["calibration_tokens"], report["e2e_tokens"], report["e2e_held_out"]) == (128, 1536, 0.25)


def _sample_without_cache(teacher, prompts, length, batch_size, seed):
    """The reference sampler: the whole sequence re-run for every token, the same seeded draws."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for batch in prompts.split(batch_size):
        while batch.shape[1] < length:
            with torch.no_grad():
                probabilities = torch.softmax(teacher(batch).logits[:, -1].float(), -1)
            batch = torch.cat([batch, torch.multinomial(probabilities, 1, generator=generator)], 1)
        sequences.append(batch)
    return torch.cat(sequences)


def test_teacher_samples_are_the_teachers_own_draws():
    teacher = tiny_llama().double().train()
    prompts = token_batch(3, batch=5, length=4)
    samples = teacher_samples(teacher, prompts, 20, batch_size=2, seed=7, progress=False)
    assert teacher.training  # the mode it came in with
    teacher.eval()
    assert torch.equal(samples, _sample_without_cache(teacher, prompts, 20, batch_size=2, seed=7))
    other = teacher_samples(teacher, prompts, 20, batch_size=2, seed=8, progress=False)
    assert torch.equal(other[:, :4], prompts) and (other[:, 4:] != samples[:, 4:]).float().mean() > 0.5


@pytest.mark.parametrize("prompts, length, batch_size", [(torch.randn(2, 4), 8, 2), (token_batch(0, 2, 4)[0], 8, 2),
                                                         (token_batch(0, 2, 4), 4, 2), (token_batch(0, 2, 4), 8, 0)])
def test_teacher_samples_refuse_bad_settings(prompts, length, batch_size):
    with pytest.raises(ValueError, match="prompts|length"):
        teacher_samples(tiny_llama(), prompts, length, batch_size=batch_size, progress=False)


def test_samples_are_trained_on_and_never_held_out(runs, monkeypatch):
    """samples=N: N prompts cut from the training sequences only (never from held-out ones) are
    continued by the teacher and spread among the training batches; the held-out KL is unchanged."""
    import lift_ao.finetune as finetune

    model, calibrated, _, _ = runs
    tokens = token_batch(0, batch=16, length=32)
    held = held_out_rows(16, 0.125)
    asked, trained_on = [], []
    sample = finetune.teacher_samples
    monkeypatch.setattr(finetune, "teacher_samples", lambda teacher, prompts, length, **options: asked.append(
        (prompts, length)) or sample(teacher, prompts, length, **options))
    loss = finetune._distillation_loss
    monkeypatch.setattr(finetune, "_distillation_loss", lambda m, w, t, batch: trained_on.append(batch) or loss(m, w, t, batch))
    settings = dict(steps=4, lr=1e-2, batch_size=6, check_every=4, progress=False)
    without = lift_ao.finetune_end_to_end(copy.deepcopy(calibrated), model, tokens, **settings)
    trained_on.clear()
    with_samples = lift_ao.finetune_end_to_end(copy.deepcopy(calibrated), model, tokens, samples=6, prompt_tokens=8,
                                               **settings)

    (prompts, length), = asked
    assert prompts.shape == (6, 8) and length == 32
    chunks = lambda rows: {tuple(c.tolist()) for c in tokens[rows].reshape(-1, 8)}
    training_rows = [i for i in range(16) if i not in held.tolist()]
    assert {tuple(p.tolist()) for p in prompts} <= chunks(training_rows)
    assert not {tuple(p.tolist()) for p in prompts} & chunks(held)
    assert with_samples[0] == pytest.approx(without[0], rel=1e-12)  # the same held-out sequences
    # Calls: the held-out batch (before), the 4 training steps (one pass over 14 + 6 rows), the held-out check.
    assert [len(b) for b in trained_on] == [2, 6, 6, 6, 2, 2]
    seen = [tuple(r.tolist()) for r in torch.cat(trained_on[1:5])]
    assert len(seen) == 20 and sorted(s for s in seen if s in chunks_of_rows(tokens, training_rows)) == sorted(
        tuple(r.tolist()) for r in tokens[training_rows])
    samples = [i for i, s in enumerate(seen) if s not in chunks_of_rows(tokens, range(16))]
    assert samples == [1, 5, 8, 11, 15, 18]  # spread among the real rows (ties go to real rows)
    assert with_samples[1] != without[1]


def chunks_of_rows(tokens, rows) -> set:
    return {tuple(tokens[i].tolist()) for i in rows}


def test_interleaving_spreads_both_sets_evenly():
    from lift_ao.finetune import _interleaved

    real, extra = torch.arange(3)[:, None], 10 + torch.arange(6)[:, None]
    assert _interleaved(real, extra).flatten().tolist() == [10, 0, 11, 12, 1, 13, 14, 2, 15]
    assert torch.equal(_interleaved(real, extra[:0]), real)


@pytest.mark.parametrize("options", [{"samples": -1}, {"samples": True}, {"samples": 2, "prompt_tokens": 0},
                                     {"samples": 2, "prompt_tokens": 32}])
def test_bad_sample_settings_are_refused(runs, options):
    model, calibrated, _, _ = runs
    with pytest.raises(ValueError, match="samples"):
        lift_ao.finetune_end_to_end(calibrated, model, token_batch(0, batch=4, length=32), steps=1, **options)
