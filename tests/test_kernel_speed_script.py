"""benchmarks/kernel_speed.py's split of the checks over processes (--jobs / --shard), on CPU."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import kernel_speed  # noqa: E402


@pytest.mark.parametrize("count", [1, 3, 8])
def test_the_shards_run_every_unit_of_check_work_once(count, monkeypatch):
    owners = {}
    for index in range(count):
        monkeypatch.setattr(kernel_speed, "_SHARD", (index, count))
        monkeypatch.setattr(kernel_speed, "_check_units", itertools.count())
        for unit in range(33):  # the checks' units on a GPU: 9 cases, 9 config problems, 2 layouts, 3 decode, 10 prefill
            if kernel_speed._runs_here():
                owners.setdefault(unit, []).append(index)
    assert owners == {unit: [unit % count] for unit in range(33)}


@pytest.mark.parametrize("arguments", [["--shard", "0/2"], ["--jobs", "0", "--checks-only"]])
def test_shard_without_checks_only_and_no_jobs_are_refused(arguments):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_speed.py"), *arguments], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "--jobs must be >= 1, and --shard goes with --checks-only" in run.stderr
