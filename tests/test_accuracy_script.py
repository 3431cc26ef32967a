"""benchmarks/accuracy.py's bookkeeping (no model run): the table of recorded rows, resumed rows, α checks."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import accuracy  # noqa: E402

import lift_ao  # noqa: E402


def _row(method: str, **extra) -> dict:
    return dict(method=method, bits_per_weight=2.5157, model_bytes=146772296, perplexity=15.6678, quantize_seconds=85.2,
                device="NVIDIA H100 80GB HBM3", load_average_before=[1.0, 1, 1], load_average_after=[1.0, 1, 1],
                lattices=[method.rsplit("-", 1)[1]], eval_weights="dequantized (dense)", **extra)


def _write(path: Path, rows: dict) -> None:
    path.write_text(json.dumps(dict(rows=rows, windows=8, context=512, command="python benchmarks/accuracy.py",
                                    machine="vm: H100")))


def test_a_resumed_row_says_its_time_is_a_part(tmp_path):
    _write(tmp_path / "acc.json", {"lift-cal-fte-48/20": _row("lift-cal-fte-48/20", alpha=0.25, resumed=True),
                                   "lift-cal-ft-72/24": _row("lift-cal-ft-72/24", alpha=0.25, refine_passes=2,
                                                             resumed=False)})
    accuracy.main(["--rows", "lift-cal-fte-48/20,lift-cal-ft-72/24", "--out", str(tmp_path / "acc")])
    lines = (tmp_path / "acc.md").read_text().splitlines()
    assert any(line.startswith("| lift-cal-fte-48/20 (48/20) | 2.516 | 146.8 | 15.67 |  | 85 (resumed) |") for line in lines)
    assert any(line.startswith("| lift-cal-ft-72/24 (72/24) | 2.516 | 146.8 | 15.67 |  | 85 |") for line in lines)


def test_re_rendering_keeps_the_recorded_machine_and_command(tmp_path):
    """Rendering recorded rows again (nothing to measure) on another machine must not name this one."""
    _write(tmp_path / "acc.json", {"lift-cal-fte-48/20": _row("lift-cal-fte-48/20", alpha=0.25)})
    accuracy.main(["--rows", "lift-cal-fte-48/20", "--alpha", "0.25", "--out", str(tmp_path / "acc")])
    text = (tmp_path / "acc.md").read_text()
    assert "Machine: vm: H100." in text and "Commands: `python benchmarks/accuracy.py`" in text
    assert json.loads((tmp_path / "acc.json").read_text())["machine"] == "vm: H100"


@pytest.mark.parametrize("recorded, options", [
    ({}, ["--alpha", "0.25", "--refine-passes", "0"]),  # nothing recorded: α 0.5
    ({"alpha": 0.25}, []),  # nothing recorded: LDLQ alone, while a lift-cal-ft row now refines twice
    ({"alpha": 0.25, "refine_passes": 2}, ["--refine-passes", "1"]),
])
def test_rows_measured_with_other_calibration_settings_are_refused(tmp_path, recorded, options):
    _write(tmp_path / "acc.json", {"lift-cal-ft-48/20": _row("lift-cal-ft-48/20", **recorded)})
    with pytest.raises(SystemExit, match="measured with other settings"):
        accuracy.main(["--rows", "lift-cal-ft-48/20", *options, "--out", str(tmp_path / "acc")])
    accuracy.main(["--rows", "lift-cal-ft-48/20", "--alpha", str(recorded.get("alpha", 0.5)), "--refine-passes",
                   str(recorded.get("refine_passes", 0)), "--out", str(tmp_path / "acc")])  # its own settings: kept
    assert (tmp_path / "acc.md").is_file()


def test_rows_recorded_with_their_requested_settings_answer_only_the_same_request(tmp_path):
    """New rows record every setting that changes them (`requested`): an end-to-end or calibration
    option that differs is refused by name, an execution option (--device) is not."""
    recipe = ["--rows", "lift-cal-fte-48/20", "--e2e-steps", "1024", "--e2e-unquantized-lr", "1e-4", "--guided"]
    requested = accuracy._requested("lift-cal-fte-48/20", accuracy._parser().parse_args(recipe))
    assert requested["e2e_steps"] == 1024 and requested["guided"] and requested["refine_passes"] == 0
    _write(tmp_path / "acc.json", {"lift-cal-fte-48/20": _row("lift-cal-fte-48/20", requested=requested)})
    for changed in (["--e2e-steps", "2048"], ["--e2e-unquantized-lr", "3e-4"], ["--calibration-tokens", "8192"]):
        with pytest.raises(SystemExit, match=f"other settings.*{changed[0][2:].replace('-', '_')}"):
            accuracy.main([*recipe, *changed, "--out", str(tmp_path / "acc")])
    with pytest.raises(SystemExit, match=r"other settings.*guided"):
        accuracy.main([*recipe[:-1], "--out", str(tmp_path / "acc")])
    accuracy.main([*recipe, "--device", "cpu", "--out", str(tmp_path / "acc")])  # the same request: kept
    assert (tmp_path / "acc.md").is_file()


def test_plan_rows_measured_with_another_window_are_refused(tmp_path):
    _write(tmp_path / "acc.json", {"lift-cal-fte-plan-48/20": _row("lift-cal-fte-plan-48/20", alpha=0.25)})  # ±0.4
    with pytest.raises(SystemExit, match="--plan-window"):
        accuracy.main(["--rows", "lift-cal-fte-plan-48/20", "--plan-window", "1.0", "--out", str(tmp_path / "acc")])
    accuracy.main(["--rows", "lift-cal-fte-plan-48/20", "--out", str(tmp_path / "acc")])
    assert "within ±0.4 bits of the uniform plan's rate" in (tmp_path / "acc.md").read_text()


def test_each_calibrated_row_gets_its_default_refine_passes():
    """Two passes for block-stage rows, none before the end-to-end stage (lift_ao.rounding.default_refine_passes);
    --refine-passes sets every row's. (That calibrate receives them: the plan and end-to-end tests below.)"""
    settings = lambda row, passes=None: accuracy._calibration_settings(  # noqa: E731
        row, argparse.Namespace(alpha=0.25, refine_passes=passes, plan_window=1.0))
    assert settings("lift-cal-ft-48/20") == {"alpha": 0.25, "refine_passes": 2}
    assert settings("lift-cal-fte-plan-48/20") == {"alpha": 0.25, "refine_passes": 0, "rate_window": 1.0}
    assert settings("lift-cal-fte-48/20", 1)["refine_passes"] == settings("lift-cal-48/20", 1)["refine_passes"] == 1


def test_a_dotted_out_name_keeps_its_tail(tmp_path):
    _write(tmp_path / "alpha_0.25.json", {"lift-cal-ft-48/20": _row("lift-cal-ft-48/20", alpha=0.25, refine_passes=2)})
    accuracy.main(["--rows", "lift-cal-ft-48/20", "--alpha", "0.25", "--out", str(tmp_path / "alpha_0.25")])
    assert (tmp_path / "alpha_0.25.md").is_file() and not (tmp_path / "alpha_0.md").exists()


def test_plan_scores_reach_the_plan_rows_config(tmp_path, monkeypatch):
    """--plan-scores FILE, --plan-window: the plan row calibrates with liftquant(memory_budget=..., scores=FILE's,
    rate_window=...) (and,
    being a block-stage row, the default two refinement passes)."""
    scores = {"model.layers.0.mlp.up_proj": 2.0}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    configs = []

    def calibrate(model, config, *args, **kwargs):
        configs.append(config)
        assert kwargs["refine_passes"] == 2 and kwargs["alpha"] == 0.25
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(accuracy, "calibrate", calibrate)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main(["--rows", "lift-cal-ft-plan-48/20", "--plan-scores", str(tmp_path / "scores.json"),
                       "--plan-window", "none", "--out", str(tmp_path / "acc")])
    assert configs[0].scores == scores and configs[0].memory_budget > 0 and configs[0].rate_window is None


def test_measured_plan_scores_come_from_calibrated_sensitivity(tmp_path, monkeypatch):
    """--plan-scores measured: lift_ao.calibrated_sensitivity of the reference at the row's budget, on the
    16384 calibration tokens after those the block and end-to-end stages read, resumable in the row's
    checkpoint directory; the plan row calibrates with its scores."""
    text = torch.arange(4000 * 512).remainder(1000).view(4000, 512)
    monkeypatch.setattr(accuracy, "builtin_calibration_tokens", lambda tokenizer, count: text[:count // 512])
    import lift_ao.calibration
    monkeypatch.setattr(lift_ao.calibration, "builtin_calibration_tokens", lambda tokenizer, count: text[:count // 512])
    calls, configs = [], []
    monkeypatch.setattr(accuracy, "calibrated_sensitivity", lambda *a, **k: calls.append((a, k)) or {"model.layers.0.mlp.up_proj": 3.0})

    def calibrate(model, config, *args, **kwargs):
        configs.append(config)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(accuracy, "calibrate", calibrate)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main(["--rows", "lift-cal-fte-plan-48/20", "--plan-scores", "measured", "--plan-budget", "147020000",
                       "--calibration-tokens", "8192", "--e2e-tokens", "65536", "--checkpoint-root", str(tmp_path / "ck"),
                       "--out", str(tmp_path / "acc")])
    (reference, budget, tokens, score_tokens), options = calls[0]
    assert budget == 147020000 and torch.equal(tokens, text[:16]) and torch.equal(score_tokens, text[128:160])
    assert options["checkpoint_dir"] == tmp_path / "ck" / "lift-cal-fte-plan-48/20" / "sensitivity"
    assert not isinstance(reference.model.layers[0].mlp.up_proj.weight, lift_ao.LiftQuantTensor)  # full precision
    assert configs[0].scores == {"model.layers.0.mlp.up_proj": 3.0} and configs[0].memory_budget == 147020000


def test_end_to_end_options_reach_the_stage_and_the_table(tmp_path, monkeypatch):
    """--e2e-tune-mapping / --e2e-tune-rotation reach finetune_end_to_end; a row recorded with them says
    so in the table's description of the end-to-end stage. Its block stage runs without refinement passes."""
    options, block_stage = [], []
    monkeypatch.setattr(accuracy, "calibrate", lambda *args, **kwargs: block_stage.append(kwargs))

    def finetune_end_to_end(*args, **kwargs):
        options.append(kwargs)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(accuracy, "finetune_end_to_end", finetune_end_to_end)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main(["--rows", "lift-cal-fte-48/20", "--e2e-steps", "8", "--e2e-tune-mapping", "--out", str(tmp_path / "run")])
    assert options[0]["tune_mapping"] is True and options[0]["tune_rotation"] is False and options[0]["steps"] == 8
    assert block_stage[0]["refine_passes"] == 0
    stage = dict(steps=1024, lr=0.003, batch_size=4, held_out=0.035, tokens=917504)
    _write(tmp_path / "acc.json", {"lift-cal-fte-48/20": _row("lift-cal-fte-48/20", alpha=0.25, calibration_tokens=262144,
                                                               end_to_end=dict(stage, tune_mapping=True,
                                                                               tune_rotation=True))})
    accuracy.main(["--rows", "lift-cal-fte-48/20", "--alpha", "0.25", "--out", str(tmp_path / "acc")])
    assert ("1024 steps of 4 sequences, peak lr 0.003, 0.035 of the sequences held out to pick the kept scales, over the "
            "first 917504 calibration tokens, each group's lattice matrix M tuned too (--e2e-tune-mapping; stored per "
            "group), each input transform's rotation factors tuned too") in (tmp_path / "acc.md").read_text()


def test_rows_are_compared_to_the_reference_window_by_window(tmp_path):
    """The "vs reference" column: exp(mean ± 2 SE) of the per-window NLL differences; blank for a row
    recorded without per-window NLLs."""
    def evaluated(window_nll):
        return dict(perplexity=1.0, nll=sum(window_nll) / 4, tokens=4 * 511, windows=4, context_length=512, stride=512,
                    seconds=1.0, window_nll=window_nll)

    reference = _row("lift-reference") | {"method": "reference", "lattices": [], "eval": evaluated([2.0, 2.5, 3.0, 2.2])}
    quantized = _row("lift-cal-ft-48/20", alpha=0.25, refine_passes=2) | {"eval": evaluated([2.1, 2.6, 3.1, 2.3])}
    _write(tmp_path / "acc.json", {"reference": reference, "lift-cal-ft-48/20": quantized,
                                   "lift-cal-ft-72/24": _row("lift-cal-ft-72/24", alpha=0.25, refine_passes=2)})
    accuracy.main(["--rows", "lift-cal-ft-48/20", "--alpha", "0.25", "--out", str(tmp_path / "acc")])
    lines = (tmp_path / "acc.md").read_text().splitlines()
    # Every window 0.1 nats worse: +10.5 %, with no spread.
    assert any(line.startswith("| lift-cal-ft-48/20 (48/20) | 2.516 | 146.8 | 15.67 | +10.5 % [+10.5, +10.5] |")
               for line in lines)
    assert any(line.startswith("| lift-cal-ft-72/24 (72/24) | 2.516 | 146.8 | 15.67 |  | 85 |") for line in lines)
