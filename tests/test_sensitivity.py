"""lift_ao.measure_sensitivity: leave-one-group-out KL gains turned into planner scores."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import lift_ao
from lift_ao.budget import _lattice_mse
from lift_ao.lattice import Lattice
from tiny_models import tiny_gpt2, tiny_llama, tiny_qwen2, token_batch, train_with_dropout

LATTICE = "24/10"
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.fixture(scope="module")
def measured():
    reference = tiny_llama(0)
    with torch.no_grad():  # sharper next-token distributions: KL gains far above float32 rounding
        reference.lm_head.weight.mul_(30.0)
    model = lift_ao.quantize(copy.deepcopy(reference), lift_ao.liftquant(lattice=LATTICE), progress=False)
    tokens = token_batch(1, batch=6, length=16)
    return reference, model, tokens, lift_ao.measure_sensitivity(model, reference, tokens, batch_size=4, progress=False)


def _kl(model, reference, tokens) -> float:
    """KL(reference ‖ model) per token, in float64 sums, with the model's own ops."""
    with torch.no_grad():
        target = F.log_softmax(reference(tokens).logits.double(), -1).flatten(0, 1)
        logits = F.log_softmax(model(tokens).logits.double(), -1).flatten(0, 1)
    return float(F.kl_div(logits, target, log_target=True, reduction="sum")) / tokens.numel()


def test_scores_are_each_groups_gain_over_its_lattice_mse(measured):
    """Per group of siblings (q/k/v, o, gate/up, down of each block): the layers' scores × MSE, split by
    parameters, are the group's gain measured directly (its weights put back at full precision, the
    model run with its LiftQuant ops, float64 sums), raised to a fifth of the mean gain per group."""
    reference, model, tokens, scores = measured
    assert set(scores) == {f"model.layers.{b}.{name}" for b in range(2) for group in GROUPS for name in group}
    base = _kl(model, reference, tokens)
    groups = [[f"model.layers.{block}.{name}" for name in group] for block in range(2) for group in GROUPS]
    gains = []
    for names in groups:
        restored = copy.deepcopy(model)
        for name in names:
            restored.get_submodule(name).weight = reference.get_submodule(name).weight
        gains.append(base - _kl(restored, reference, tokens))
    floor = 0.2 * sum(gains) / len(gains)
    assert 0 < sum(gain < floor for gain in gains) < len(gains)  # measured 4 of 8: raw gains and the floor both checked
    mse = _lattice_mse(Lattice.load(LATTICE))
    for names, gain in zip(groups, gains):
        params = sum(reference.get_submodule(n).weight.numel() for n in names)
        per_parameter = [scores[n] * mse / reference.get_submodule(n).weight.numel() for n in names]
        assert per_parameter == pytest.approx([max(gain, floor) / params] * len(names), rel=1e-3), names


def test_scores_of_models_in_training_mode_are_measured_without_dropout(measured):
    """Both models are measured in eval mode (their dropout would make the scores vary run to run) and
    given their modes back: with dropout 0.5 in training mode the scores are the dropout-free ones."""
    reference, model, tokens, scores = measured
    reference, model = copy.deepcopy(reference), copy.deepcopy(model)
    modes = train_with_dropout(reference, model)
    again = lift_ao.measure_sensitivity(model, reference, tokens, batch_size=4, progress=False)
    assert again == scores and [[m.training for m in net.modules()] for net in (reference, model)] == modes


def test_a_plan_from_measured_scores_codes_the_most_sensitive_group_widest(measured):
    """liftquant(memory_budget=..., scores=...) plans from the given scores: the group with the largest
    gain per parameter gets a rate at least that of every other layer."""
    reference, _, _, scores = measured
    uniform = lift_ao.plan(reference, 10**12, allocation="uniform", lattices=[Lattice.load(LATTICE)])
    config = lift_ao.liftquant(memory_budget=uniform.model_bytes, scores=scores)
    planned = lift_ao.plan(reference, config.memory_budget, scores=config.scores)
    model = lift_ao.quantize(copy.deepcopy(reference), config, progress=False)
    got = {name: module.weight.lattice.name for name, module in model.named_modules()
           if isinstance(getattr(module, "weight", None), lift_ao.LiftQuantTensor)}
    assert got == planned.lattices() and len(set(got.values())) > 1
    per_parameter = {n: s / reference.get_submodule(n).weight.numel() for n, s in scores.items()}
    top = max(per_parameter, key=per_parameter.get)
    bits = {layer.name: layer.bits for layer in planned.layers}
    assert bits[top] == max(bits.values())


def test_bad_inputs_are_refused(measured):
    reference, model, tokens, _ = measured
    with pytest.raises(ValueError, match="no LiftQuant weights"):
        lift_ao.measure_sensitivity(reference, reference, tokens)
    for other in (model, tiny_qwen2(0), tiny_gpt2(0)):  # quantized; other widths; other names
        with pytest.raises(ValueError, match="reference lacks full-precision linears"):
            lift_ao.measure_sensitivity(model, other, tokens)
    with pytest.raises(ValueError, match="token ids"):
        lift_ao.measure_sensitivity(model, reference, tokens.float())
    same = copy.deepcopy(reference)  # the quantized model's own values in full precision: every gain is 0
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), lift_ao.LiftQuantTensor):
            same.get_submodule(name).weight = torch.nn.Parameter(module.weight.dequantize())
    with pytest.raises(ValueError, match="nothing to plan on"):
        lift_ao.measure_sensitivity(model, same, tokens)
    with pytest.raises(ValueError, match="scores= and rate_window= only apply with memory_budget"):
        lift_ao.liftquant(bits=2.4, scores={})


def test_calibrated_sensitivity_measures_a_copy_calibrated_at_the_budgets_uniform_lattice(measured, tmp_path,
                                                                                        monkeypatch):
    """The scores are measure_sensitivity's of a copy calibrated at the lattice a uniform plan of the budget
    gives every layer; the model is left as it was; a restart with the checkpoint directory reads the
    kept scores instead of measuring, and other tokens, settings or models are measured again."""
    import lift_ao.sensitivity as sensitivity

    reference, _, tokens, _ = measured
    before = copy.deepcopy(reference.state_dict())
    calibration = token_batch(2, batch=8, length=16)
    budget = lift_ao.plan(reference, 10**12, allocation="uniform", lattices=[Lattice.load(LATTICE)]).model_bytes
    (lattice,) = set(lift_ao.plan(reference, budget, allocation="uniform").lattices().values())
    probe = lift_ao.calibrate(copy.deepcopy(reference), lift_ao.liftquant(lattice=lattice), calibration,
                              refine_passes=0, progress=False)  # the probe is block LDLQ alone
    expected = lift_ao.measure_sensitivity(probe, reference, tokens, progress=False)

    got = lift_ao.calibrated_sensitivity(reference, budget, calibration, tokens, checkpoint_dir=tmp_path, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(value, before[key]) for key, value in reference.state_dict().items())
    monkeypatch.setattr(sensitivity, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    monkeypatch.setattr(sensitivity, "measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    assert lift_ao.calibrated_sensitivity(reference, budget, calibration, tokens, checkpoint_dir=tmp_path,
                                          progress=False) == got
    measured_again = []
    monkeypatch.setattr(sensitivity, "calibrate", lambda model, *a, **k: model)
    monkeypatch.setattr(sensitivity, "measure_sensitivity", lambda *a, **k: measured_again.append(a[2]) or {})
    lift_ao.calibrated_sensitivity(reference, budget, calibration, tokens[:4], checkpoint_dir=tmp_path, progress=False)
    lift_ao.calibrated_sensitivity(reference, budget, calibration[:4], tokens, checkpoint_dir=tmp_path, progress=False)
    lift_ao.calibrated_sensitivity(reference, budget, calibration, tokens, alpha=0.5, checkpoint_dir=tmp_path,
                                   progress=False)
    other = copy.deepcopy(reference)  # another model of the same shapes
    with torch.no_grad():
        other.model.norm.weight.add_(0.01)
    lift_ao.calibrated_sensitivity(other, budget, calibration, tokens, alpha=0.5, checkpoint_dir=tmp_path,
                                   progress=False)
    other.config.rms_norm_eps *= 10  # the same weights, other settings
    lift_ao.calibrated_sensitivity(other, budget, calibration, tokens, alpha=0.5, checkpoint_dir=tmp_path,
                                   progress=False)
    # Other score tokens, calibration tokens, alpha, model or settings: measured again, not read from the directory.
    assert len(measured_again) == 5 and torch.equal(measured_again[0], tokens[:4])
    kept = json.loads((tmp_path / sensitivity.SCORES_FILE).read_text())  # as kept before settings were hashed
    del kept["identity"]["settings_sha256"]
    (tmp_path / sensitivity.SCORES_FILE).write_text(json.dumps(kept))
    lift_ao.calibrated_sensitivity(other, budget, calibration, tokens, alpha=0.5, checkpoint_dir=tmp_path,
                                   progress=False)
    assert len(measured_again) == 5


def test_calibrated_sensitivity_probes_at_the_lattice_the_budget_leaves_after_reserve_and_kv_cache(monkeypatch):
    """The probe's lattice is that of the uniform plan with the reserve and KV cache the real plan is given:
    it was the plan's without them, 24/10 here, where 2000 bytes of reserve or a cache of 8 tokens leave room
    for 32/16 only, the rate the real plan's window is then centred on."""
    import lift_ao.sensitivity as sensitivity

    reference = tiny_llama(0)
    budget = lift_ao.plan(reference, 10**12, allocation="uniform", lattices=[Lattice.load(LATTICE)]).model_bytes
    probed = []
    monkeypatch.setattr(sensitivity, "calibrate", lambda model, config, *a, **k: probed.append(config.lattice) or model)
    monkeypatch.setattr(sensitivity, "measure_sensitivity", lambda *a, **k: {})
    tokens = token_batch(2, batch=2, length=8)
    for settings in ({}, dict(reserve=2000), dict(kv_cache=dict(context=8))):
        lift_ao.calibrated_sensitivity(reference, budget, tokens, tokens, progress=False, **settings)
    assert budget == 97916 and probed == ["24/10", "32/16", "32/16"]


def test_calibration_tokens_after_a_prefix(monkeypatch):
    """builtin_calibration_tokens_after: the sequences that start after the first `skip` tokens (a partly
    read sequence is skipped whole), `count` tokens' worth at most; refused when the text has none left."""
    import lift_ao.calibration as calibration

    text = torch.arange(40 * 8).view(40, 8)  # 40 sequences of 8 tokens
    monkeypatch.setattr(calibration, "builtin_calibration_tokens", lambda tokenizer, count: text[:count // 8])
    assert torch.equal(calibration.builtin_calibration_tokens_after(None, 64, 32), text[8:12])
    assert torch.equal(calibration.builtin_calibration_tokens_after(None, 60, 32), text[8:11])  # 60 tokens: 7.5 sequences
    assert torch.equal(calibration.builtin_calibration_tokens_after(None, 300, 64), text[38:40])  # the text ends
    with pytest.raises(ValueError, match="no sequence after its first 320 tokens"):
        calibration.builtin_calibration_tokens_after(None, 320, 64)
