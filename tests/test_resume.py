"""Resumable quantization: a run killed at any point resumes from its directory, bit-identically.

The kill test drives the real command (``lift-ao quantize --out DIR``) in a subprocess and SIGKILLs
it when the output directory shows finished layers (polling, so no test-only code path ships).
"""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from checks import assert_bit_identical
from tiny_models import tiny_llama, token_batch

import lift_ao
from lift_ao import CheckpointError, liftquant, load_quantized
from lift_ao import calibration, cli
from lift_ao.cli import PARTIAL_DIR
from lift_ao.io import CHECKPOINT_NAME, SHARD_SUFFIX

LATTICE = "16/8"  # the fastest 2-bit search: these tests are about bookkeeping, not accuracy

# The subprocess runs this file's run_cli: the real command with only the model loader swapped.
DRIVER = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_resume; sys.exit(test_resume.run_cli(*sys.argv[1:]))"


class _Tokenizer:
    def save_pretrained(self, directory):
        pass


def run_cli(out, *extra, calibration_tokens=None, lattice=LATTICE) -> int:
    """``lift-ao quantize --out OUT --lattice LATTICE`` (None: no --lattice) on the tiny Llama
    (``--calibrate``: on random calibration tokens, by default 4 sequences of 32 whatever the count asked;
    ``calibration_tokens(tokenizer, count)`` replaces that)."""
    args = ["quantize", "--skip-eval", *(["--lattice", lattice] if lattice else []), "--device", "cpu",
            "--out", str(out), *extra]
    calibration_tokens = calibration_tokens or (lambda tokenizer, count: token_batch(seed=5, batch=4, length=32))
    with mock.patch.object(cli, "_load_model", lambda spec, device: (tiny_llama(), _Tokenizer())), \
            mock.patch.object(calibration, "builtin_calibration_tokens", calibration_tokens):
        return cli.main(args)


def _quantize(resume_dir=None):
    return lift_ao.quantize(tiny_llama(), liftquant(lattice=LATTICE), progress=False, resume_dir=resume_dir)


@pytest.fixture(scope="module")
def reference():
    return _quantize()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A resume directory holding every layer of the reference run (tests work on copies)."""
    directory = tmp_path_factory.mktemp("finished")
    _quantize(resume_dir=directory)
    return directory


def _shards(partial: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in partial.glob(f"*{SHARD_SUFFIX}")}


def _run_until(out: Path, shards: int, *extra: str, timeout: float = 120.0) -> None:
    """Start the command and SIGKILL it as soon as at least ``shards`` layers (blocks) are on disk."""
    log = out.parent / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(out), *extra], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while len(_shards(out / PARTIAL_DIR)) < shards:
            assert proc.poll() is None, f"finished before it could be killed: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sigkilled_command_resumes_bit_identically(reference, tmp_path):
    n_layers = len(lift_ao.quantizable_linears(tiny_llama(), liftquant(lattice=LATTICE)))
    out = tmp_path / "out"
    _run_until(out, 1)
    first = _shards(out / PARTIAL_DIR)
    assert 1 <= len(first) < n_layers and not (out / CHECKPOINT_NAME).exists()
    _run_until(out, len(first) + 3)
    second = _shards(out / PARTIAL_DIR)
    assert len(second) < n_layers and not (out / CHECKPOINT_NAME).exists()
    # Finished layers were loaded, not encoded and written again.
    assert all(second[name] == mtime for name, mtime in first.items())
    assert run_cli(out) == 0
    assert_bit_identical(reference, load_quantized(out, tiny_llama(seed=1)))
    assert not (out / PARTIAL_DIR).exists() and not list(out.glob("*.tmp"))


def test_sigkilled_calibrated_command_resumes_bit_identically(tmp_path):
    # Calibration keeps one shard per decoder block; the tiny Llama has two.
    uninterrupted = tmp_path / "uninterrupted"
    assert run_cli(uninterrupted, "--calibrate") == 0
    out = tmp_path / "out"
    _run_until(out, 1, "--calibrate")
    first = _shards(out / PARTIAL_DIR)
    assert len(first) == 1 and not (out / CHECKPOINT_NAME).exists()
    assert run_cli(out, "--calibrate") == 0
    assert_bit_identical(load_quantized(uninterrupted, tiny_llama(seed=1)), load_quantized(out, tiny_llama(seed=1)))
    assert not (out / PARTIAL_DIR).exists()


def test_half_written_and_corrupt_shards_are_redone(reference, finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    shards = sorted(run.glob(f"*{SHARD_SUFFIX}"))
    data = shards[0].read_bytes()
    # A kill mid-write leaves only a temporary file; a disk fault could leave a short or altered shard.
    (run / ".lift_ao-killed.tmp").write_bytes(data[: len(data) // 2])
    shards[0].write_bytes(data[: len(data) // 2])
    tampered = bytearray(shards[1].read_bytes())
    tampered[-1] ^= 0xFF
    shards[1].write_bytes(bytes(tampered))
    with pytest.warns(UserWarning, match="redoing") as caught:
        resumed = _quantize(resume_dir=run)
    messages = [str(w.message) for w in caught]
    assert any(str(shards[0]) in m and "truncated" in m for m in messages)
    assert any(str(shards[1]) in m and "SHA-256" in m for m in messages)
    assert_bit_identical(reference, resumed)
    assert shards[0].read_bytes() == data and not list(run.glob("*.tmp"))


@pytest.mark.parametrize("change", [dict(lattice="24/10"), dict(seed=1), dict(weights_seed=2)])
def test_directory_of_another_run_is_refused(finished, tmp_path, change):
    run = shutil.copytree(finished, tmp_path / "run")
    model = tiny_llama(seed=change.pop("weights_seed", 0))
    config = liftquant(lattice=change.pop("lattice", LATTICE), **change)
    with pytest.raises(CheckpointError, match="another directory|another resume_dir") as info:
        lift_ao.quantize(model, config, progress=False, resume_dir=run)
    assert "overwrite" in str(info.value)
    assert _shards(run) == _shards(finished)  # nothing of the other run was touched


def test_overwrite_redoes_the_layers_of_another_model_of_the_same_shapes(finished, tmp_path):
    """The manifest records shapes, not values: another model's shards are found layer by layer (refused
    above), and overwrite=True redoes them instead, as it discards a run of other settings."""
    run = shutil.copytree(finished, tmp_path / "run")
    other = lift_ao.quantize(tiny_llama(seed=1), liftquant(lattice=LATTICE), progress=False)
    assert_bit_identical(other, lift_ao.quantize(tiny_llama(seed=1), liftquant(lattice=LATTICE), progress=False,
                                                 resume_dir=run, overwrite=True))
    assert_bit_identical(other, lift_ao.quantize(tiny_llama(seed=1), liftquant(lattice=LATTICE), progress=False,
                                                 resume_dir=run))  # now its own shards


def test_cli_refuses_another_run_and_overwrite_starts_over(finished, tmp_path, capsys):
    shutil.copytree(finished, tmp_path / PARTIAL_DIR)
    assert run_cli(tmp_path, "--seed", "1") == 2
    assert "--overwrite" in capsys.readouterr().err and not (tmp_path / CHECKPOINT_NAME).exists()
    assert run_cli(tmp_path, "--seed", "1", "--overwrite") == 0
    assert (tmp_path / CHECKPOINT_NAME).exists() and not (tmp_path / PARTIAL_DIR).exists()
