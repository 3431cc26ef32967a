"""The command line: `lift-ao bench` (one quantized linear against the dense one), `lift-ao quantize`'s options and report."""

import json

import pytest
import torch

from lift_ao import cli


def test_bench_reports_both_timings_and_the_exact_sizes(capsys):
    assert cli.main(["bench", "--shape", "48", "70", "--batch", "3", "--lattice", "24/10",
                     "--dtype", "float32", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lattice"] == "24/10" and report["shape"] == [48, 70] and report["batch"] == 3
    assert report["dense_us"] > 0 and report["liftquant_us"] > 0
    assert report["speedup"] == report["dense_us"] / report["liftquant_us"]
    assert report["dense_bytes"] == 48 * 70 * 4
    # 70 inputs pad to 70 (d = 10): 168 code bits = 8 words per row (two 16-byte quads), plus row
    # scales, M and the rotation.
    assert report["quantized_bytes"] > 48 * 8 * 4 + 48 * 4


def test_bench_rejects_a_non_positive_shape(capsys):
    assert cli.main(["bench", "--shape", "0", "64", "--device", "cpu"]) == 2
    assert "--shape and --batch must be positive" in capsys.readouterr().err


def test_quantize_rejects_a_non_positive_beam_width(capsys):
    assert cli.main(["quantize", "--beam-width", "0", "--device", "cpu", "--skip-eval"]) == 2
    assert "beam_width must be a positive int" in capsys.readouterr().err


def _budget() -> int:
    """Bytes of the tiny Llama halfway between every linear at 16/8 and at 24/10: a mix of widths fits best
    (measured: 8 layers at 32/16, 6 at 48/20)."""
    import lift_ao
    from tiny_models import tiny_llama

    uniform = [lift_ao.plan(tiny_llama(), 10**12, allocation="uniform", lattices=[lift_ao.Lattice.load(name)]).model_bytes
               for name in ("16/8", "24/10")]
    return sum(uniform) // 2


def test_quantize_plans_a_memory_budget(tmp_path, capsys):
    """--memory-budget instead of --bits: a lattice per layer, planned from the calibration tokens'
    activations, and the report lists them; the model fits the budget."""
    from test_resume import run_cli

    import lift_ao

    assert run_cli(tmp_path / "out", "--json", "--memory-budget", str(_budget()), lattice=None) == 0
    report = json.loads(capsys.readouterr().out)
    model = lift_ao.load_quantized(tmp_path / "out")
    lattices = [m.weight.lattice.name for m in model.modules() if isinstance(getattr(m, "weight", None), lift_ao.LiftQuantTensor)]
    assert report["memory_budget"] == str(_budget()) and report["lattice"] is None
    assert report["lattices"] == {name: lattices.count(name) for name in set(lattices)} and len(report["lattices"]) > 1
    assert report["bytes_after"] <= _budget() and lift_ao.footprint(model) <= _budget()
    assert "over_budget_bytes" not in report


def test_quantize_keeps_room_in_the_budget_for_what_the_end_to_end_stage_tunes(tmp_path, capsys):
    """--e2e-tune-mapping/--e2e-tune-rotation store an M and rotation factors per group of siblings: the
    plan keeps room for them, so the tuned model still fits --memory-budget."""
    from test_resume import run_cli
    from tiny_models import token_batch

    import lift_ao

    budget = _budget()
    # 16 sequences of 64 tokens: the tuned state beats the calibrated one on the held-out ones and is kept.
    assert run_cli(tmp_path / "out", "--json", "--memory-budget", str(budget), "--calibrate", "--e2e-steps", "8",
                   "--e2e-tune-mapping", "--e2e-tune-rotation", lattice=None,
                   calibration_tokens=lambda tokenizer, count: token_batch(0, batch=16, length=64)) == 0
    report = json.loads(capsys.readouterr().out)
    model = lift_ao.load_quantized(tmp_path / "out")
    weights = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), lift_ao.LiftQuantTensor)]
    assert len({id(w.mapping) for w in weights}) > len(report["lattices"]), "M is not tuned per group: the test shows nothing"
    assert report["bytes_after"] == lift_ao.footprint(model) <= budget


def test_quantize_says_when_a_model_is_over_its_budget_after_all(tmp_path, monkeypatch, capsys):
    """The plan counts what every stage stores; should a model still end over --memory-budget (a planning
    bug), it is said with the bytes over, never silent."""
    from test_resume import run_cli

    import lift_ao

    footprint = lift_ao.footprint
    monkeypatch.setattr(lift_ao, "footprint", lambda x: footprint(x) + (10**6 if isinstance(x, torch.nn.Module) else 0))
    assert run_cli(tmp_path / "out", "--json", "--memory-budget", str(_budget()), lattice=None) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["over_budget_bytes"] == report["bytes_after"] - _budget() > 0
    assert "which its plan did not foresee" in captured.err


def test_quantize_measures_sensitivity_for_a_budget(tmp_path, monkeypatch, capsys):
    """--measure-sensitivity: lift_ao.calibrated_sensitivity on the calibration text after what the block
    and end-to-end stages read (16384 tokens), resumable under DIR/lift_ao.partial/sensitivity; calibrate
    then plans from those scores, within --rate-window."""
    from test_resume import run_cli
    from tiny_models import token_batch

    import lift_ao
    import lift_ao.budget
    import lift_ao.calibration

    text = token_batch(seed=5, batch=600, length=32)
    prefix = lambda tokenizer, count: text[:count // 32]  # noqa: E731
    seen, planned = {}, []
    measure = lift_ao.calibrated_sensitivity

    def calibrated_sensitivity(model, budget, tokens, score_tokens, **options):
        seen.update(budget=budget, tokens=tokens, score_tokens=score_tokens, **options)
        seen["scores"] = measure(model, budget, tokens, score_tokens, **options)
        return seen["scores"]

    monkeypatch.setattr(lift_ao, "calibrated_sensitivity", calibrated_sensitivity)
    calibrate = lift_ao.calibration.calibrate
    monkeypatch.setattr(lift_ao.calibration, "calibrate", lambda model, config, *a, **k: planned.append(config.scores) or
                        calibrate(model, config, *a, **k))
    plan, windows = lift_ao.budget.plan, []
    monkeypatch.setattr(lift_ao.budget, "plan", lambda *a, **k: windows.append(k["rate_window"]) or plan(*a, **k))
    assert run_cli(tmp_path / "out", "--json", "--memory-budget", str(_budget()), "--calibrate", "--calibration-tokens",
                   "128", "--e2e-tokens", "1024", "--measure-sensitivity", "--e2e-steps", "1", "--rate-window", "1.0",
                   lattice=None, calibration_tokens=prefix) == 0
    report = json.loads(capsys.readouterr().out)
    # The block stage read 4 sequences of 32, the end-to-end stage 32: the scores come from the next 512.
    assert torch.equal(seen["tokens"], text[:4]) and torch.equal(seen["score_tokens"], text[32:544])
    assert seen["checkpoint_dir"] == tmp_path / "out" / "lift_ao.partial" / "sensitivity"
    assert report["sensitivity_tokens"] == 512 * 32 and seen["budget"] == str(_budget())
    assert planned == [seen["scores"]]  # the one calibration of the model plans from the measured scores
    assert windows[-1] == report["rate_window"] == 1.0  # calibrate's plan (the last; measuring plans uniform)
    assert not (tmp_path / "out" / "lift_ao.partial").exists()  # removed with the rest once the model is saved


def test_quantize_refuses_conflicting_budget_options(tmp_path, capsys):
    from test_resume import run_cli

    assert run_cli(tmp_path / "a", "--memory-budget", "1MB") == 2  # run_cli also passes --lattice
    assert run_cli(tmp_path / "b", "--memory-budget", "1MB", "--bits", "2.4", lattice=None) == 2
    assert run_cli(tmp_path / "c", "--memory-budget", "1MB", "--measure-sensitivity", lattice=None) == 2
    assert run_cli(tmp_path / "d", "--calibrate", "--measure-sensitivity") == 2
    assert "--memory-budget" in capsys.readouterr().err
    assert run_cli(tmp_path / "e", "--rate-window", "1.0") == 2
    assert "add --memory-budget" in capsys.readouterr().err
    for options in (["--reserve", "1MB"], ["--kv-context", "64"]):
        assert run_cli(tmp_path / "f", *options) == 2
        assert f"{options[0]} keep room in a --memory-budget: add --memory-budget" in capsys.readouterr().err
    for options in (["--kv-batch", "2"], ["--kv-prefill", "1"]):
        assert run_cli(tmp_path / "g", "--memory-budget", "1MB", *options, lattice=None) == 2
        assert f"{options[0]} size the KV cache of --kv-context: add --kv-context" in capsys.readouterr().err
    for option in ("--kv-context", "--kv-batch", "--kv-prefill"):
        values = {"--kv-context": "64", option: "0"}
        assert run_cli(tmp_path / "h", "--memory-budget", "1MB", *(x for kv in values.items() for x in kv),
                       lattice=None) == 2
        assert f"{option} must be a positive number, got 0" in capsys.readouterr().err


def test_quantize_keeps_the_reserve_and_kv_cache_free_in_the_budget(tmp_path, capsys):
    """--reserve and --kv-context/--kv-batch (as `lift-ao plan` has them): the model is planned into what the
    budget leaves beside them, so a budget that much larger plans the same lattices as the bare budget."""
    from test_resume import run_cli
    from tiny_models import tiny_llama

    from lift_ao.budget import kv_cache_bytes

    kv = kv_cache_bytes(tiny_llama().config, 48, 3, torch.float32)  # the tiny Llama is float32
    assert run_cli(tmp_path / "bare", "--json", "--memory-budget", str(_budget()), lattice=None) == 0
    bare = json.loads(capsys.readouterr().out)
    assert run_cli(tmp_path / "kept", "--json", "--memory-budget", str(_budget() + 1000 + kv), "--reserve", "1000",
                   "--kv-context", "48", "--kv-batch", "3", lattice=None) == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["reserve_bytes"] == 1000 and kept["kv_cache_bytes"] == kv > 0
    assert kept["lattices"] == bare["lattices"] and len(kept["lattices"]) > 1
    assert kept["bytes_after"] == bare["bytes_after"] <= _budget() and "over_budget_bytes" not in kept


def test_quantize_reports_the_change_in_perplexity_window_by_window(tmp_path, capsys):
    """Before and after are scored on the same windows, so the report pairs them: the ratio of their
    perplexities with exp(mean ∓ 2 SE) of the per-window NLL differences."""
    from unittest import mock

    import numpy as np
    from test_resume import _Tokenizer
    from tiny_models import tiny_llama, token_batch

    path = tmp_path / "text.npy"
    np.save(path, token_batch(3, batch=1, length=32 * 6).flatten().numpy())
    with mock.patch.object(cli, "_load_model", lambda spec, device: (tiny_llama(), _Tokenizer())):
        assert cli.main(["quantize", "--lattice", "16/8", "--device", "cpu", "--json", "--text", str(path),
                         "--context", "32", "--windows", "0"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    after, before = (np.array(report[key]["window_nll"]) for key in ("perplexity_after", "perplexity_before"))
    differences = after - before
    assert len(differences) == 6 and differences.mean() > 0  # 2 bits cost something on every model
    se = differences.std(ddof=1) / np.sqrt(6)
    ratio = report["perplexity_ratio"]
    assert (ratio["ratio"], ratio["low"], ratio["high"]) == pytest.approx(
        (np.exp(differences.mean()), np.exp(differences.mean() - 2 * se), np.exp(differences.mean() + 2 * se)))
    assert f"{100 * (ratio['ratio'] - 1):+.1f} % [" in captured.err


@pytest.mark.parametrize("options, needs", [
    (["--alpha", "0.5"], "add --calibrate"), (["--finetune-steps", "4"], "add --calibrate"),
    (["--finetune-rotation"], "add --calibrate"), (["--code-rounds", "1"], "add --calibrate"),
    (["--e2e-steps", "8"], "add --calibrate"), (["--guided"], "add --calibrate"),
    (["--calibrate", "--e2e-held-out", "0.25"], "add --calibrate and --e2e-steps N"),
    (["--calibrate", "--e2e-tokens", "4096"], "add --calibrate and --e2e-steps N"),
    (["--calibrate", "--no-e2e-compile"], "add --calibrate and --e2e-steps N"),
    (["--calibrate", "--lm-head"], "drop --lm-head"),
])
def test_quantize_refuses_stage_options_it_would_ignore(tmp_path, capsys, options, needs):
    """Before any work: each was once accepted and silently ignored (or, --lm-head, crashed after calibrating)."""
    from test_resume import run_cli

    assert run_cli(tmp_path / "run", *options) == 2
    err = capsys.readouterr().err
    flag = options[-1] if options[-1].startswith("--") else options[-2]
    assert needs in err and flag.replace("--no-", "--") in err


@pytest.mark.parametrize("options, message", [
    (["--bits", "3.0", "--lattice", "24/10"], "--lattice replaces --bits"),
    (["--out", "FILE"], "is a file: give a directory"),
    (["--calibrate", "--finetune-rotation"], "give finetune_steps > 0"),
    (["--calibrate", "--finetune-steps", "-1"], "finetune_steps must be an int >= 0"),
    (["--calibrate", "--code-rounds", "-2"], "code_rounds must be an int >= 0"),
    (["--calibrate", "--refine-passes", "-1"], "refine_passes must be an int >= 0"),
    (["--calibrate", "--alpha", "1.5"], "alpha must be in [0, 1]"),
    (["--calibration-tokens", "4096"], "add one of them"),
    (["--calibrate", "--calibration-tokens", "512", "--e2e-steps", "4"], "at least 1024"),
    (["--calibrate", "--e2e-steps", "4", "--e2e-held-out", "1.5"], "--e2e-held-out must be in (0, 1)"),
    (["--overwrite"], "add --out DIR, or drop --overwrite"),  # was accepted and did nothing
    (["--skip-eval", "--text", "FILE", "--windows", "3"], "--text, --windows choose the evaluation that --skip-eval"),
])
def test_quantize_refuses_bad_settings_before_it_loads_the_model(tmp_path, monkeypatch, capsys, options, message):
    """Each was refused (or, --bits beside --lattice, silently dropped) only after the model loaded and the
    perplexity before, or a whole sensitivity calibration, had been measured."""
    (tmp_path / "FILE").write_text("")
    monkeypatch.setattr(cli, "_load_model", lambda spec, device: pytest.fail("loaded the model"))
    options = [str(tmp_path / o) if o == "FILE" else o for o in options]
    assert cli.main(["quantize", "--device", "cpu", *options]) == 2
    assert message in capsys.readouterr().err


def _eval(monkeypatch, capsys, tmp_path, *options, model=None):
    """``lift-ao eval --json`` on 64 random token ids with the tiny Llama (or ``model``); (exit code, stdout, stderr)."""
    import numpy as np
    from tiny_models import tiny_llama

    import lift_ao

    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 96, 64))
    model = model or tiny_llama()
    monkeypatch.setattr(cli, "_load_model", lambda spec, device: (model, None))
    monkeypatch.setattr(lift_ao, "load_quantized", lambda directory, device=None: model)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    code = cli.main(["eval", "--device", "cpu", "--text", str(tmp_path / "tokens.npy"), "--context", "16",
                     "--json", *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_of_a_checkpoint_prints_json_and_refuses_a_model_beside_it(monkeypatch, capsys, tmp_path):
    code, out, _ = _eval(monkeypatch, capsys, tmp_path, "--checkpoint", str(tmp_path))
    assert code == 0 and json.loads(out)["model"] == str(tmp_path)  # a Path was not JSON-serialisable
    code, _, err = _eval(monkeypatch, capsys, tmp_path, "--checkpoint", str(tmp_path), "--model", "builtin")
    assert code == 2 and "not both" in err


def test_eval_of_a_checkpoint_without_a_tokenizer_needs_token_ids(monkeypatch, capsys, tmp_path):
    """save_quantized writes no tokenizer: text needs one (was: a transformers error naming sentencepiece)."""
    from lift_ao.io import CHECKPOINT_NAME

    monkeypatch.setattr(cli, "_load_model", lambda spec, device: pytest.fail("loaded a model"))
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"")  # refused before it is read
    (tmp_path / "text.txt").write_text("some text")
    assert cli.main(["eval", "--device", "cpu", "--checkpoint", str(tmp_path), "--text", str(tmp_path / "text.txt")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
    code, out, _ = _eval(monkeypatch, capsys, tmp_path, "--checkpoint", str(tmp_path))  # token ids: no tokenizer
    assert code == 0 and json.loads(out)["tokens"] == 60


def test_eval_json_stays_strict_json_for_a_diverged_model(monkeypatch, capsys, tmp_path):
    from tiny_models import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    code, out, _ = _eval(monkeypatch, capsys, tmp_path, model=model)
    strict = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert code == 0 and strict["perplexity"] is None


def test_bench_and_plan_refuse_options_they_would_ignore(capsys):
    assert cli.main(["bench", "--shape", "48", "64", "--bits", "3.0", "--lattice", "24/10", "--device", "cpu"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["plan", "--preset", "llama3-70b", "--budget", "24GiB", "--context", "0"]) == 2
    assert "positive" in capsys.readouterr().err
    assert cli.main(["plan", "--preset", "llama3-70b", "--budget", "24GiB", "--allocation", "uniform",
                     "--rate-window", "0.1"]) == 2
    assert "drop rate_window" in capsys.readouterr().err


def test_lattice_list_and_help(capsys):
    """`lift-ao lattice` imported a `main` that lift_ao.lattice did not have: every call, --help included,
    ended in an ImportError."""
    assert cli.main(["lattice", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["48/20"]["bits"] == 2.4 and rows["48/20"]["beam_width"] == 64
    assert rows["48/20"]["mse"] > rows["48/20"]["shannon_mse"] == 2 ** -4.8
    assert cli.main(["lattice", "list"]) == 0
    assert "48/20" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["lattice", "--help"])
    assert exit_.value.code == 0 and "train" in capsys.readouterr().out
    assert cli.main(["lattice", "train", "--d", "0", "--D", "3"]) == 2  # bad input: exit 2 and the reason
    assert capsys.readouterr().err.startswith("lift-ao lattice: error: ")
