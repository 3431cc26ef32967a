"""benchmarks/e2e_speed.py on CPU with a tiny model: both variants timed, no compilation inside the timed runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import e2e_speed  # noqa: E402


def test_eager_and_compiled_runs_are_timed_after_their_compilation(tmp_path):
    e2e_speed.main(["--shape", "tiny", "--layers", "1", "--steps", "8", "--sequences", "32", "--length", "32",
                    "--variants", "eager,compile", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "e2e_speed.json").read_text())
    assert list(doc["variants"]) == ["eager", "compile"] and doc["held_out_sequences"] == 8 and doc["layers"] == 1
    for variant in doc["variants"].values():
        # A graph compiled inside the timed runs (e.g. guards on a tensor's address) would be timed as steps.
        assert variant["graphs_compiled_while_timed"] == 0
        # A step's time is a difference of two runs' times, which this machine's noise can make negative; a check's
        # time is one run's wall time.
        assert variant["check_seconds"] > 0 and math.isfinite(variant["step_seconds"])
    table = (tmp_path / "e2e_speed.md").read_text()
    assert "| eager |" in table and "| compile |" in table


def test_a_variant_whose_steps_are_below_the_noise_is_not_priced():
    doc = dict(shape="tiny", layers=1, device_name="CPU", command="c", sequences=32, length=32, held_out_sequences=8,
               steps=8, variants=dict(eager=dict(check_seconds=0.01, step_seconds=0.002, compile_seconds=0.0,
                                                 graphs_compiled_while_timed=0),
                                      compile=dict(check_seconds=0.09, step_seconds=-0.01, compile_seconds=1.5,
                                                   graphs_compiled_while_timed=0)))
    rows = [line for line in e2e_speed.markdown(doc).splitlines() if line.startswith("| eager") or line.startswith("| compile")]
    # eager: 0 + 1024 * 0.002 + 65 * 0.01 = 2.698 s
    assert rows == ["| eager | 0.002 | 0.010 | 0 | 3 | 1.00 | 0 |", "| compile | -0.010 | 0.090 | 2 | below noise |  | 0 |"]


@pytest.mark.parametrize("arguments, message", [(["--steps", "6"], "must be multiples of 4"),
                                                (["--sequences", "30"], "must be multiples of 4"),
                                                (["--variants", "eager,compiled"], "unknown variants ['compiled']")])
def test_bad_settings_are_refused_before_the_model_is_built(arguments, message):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "e2e_speed.py"), "--shape", "tiny", *arguments],
                         capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr
