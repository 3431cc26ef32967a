"""benchmarks/decode.py: each variant compiles under the Inductor settings the run started with."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decode  # noqa: E402


@pytest.fixture
def restored_compile_settings():
    """decode.main sets freezing and turns the compile caches off for the process: undo it, or the
    tests that run after this one compile frozen graphs (the passes' counters differ then)."""
    inductor, functorch = torch._inductor.config.save_config(), torch._functorch.config.save_config()
    yield
    torch._inductor.config.load_config(inductor)
    torch._functorch.config.load_config(functorch)


def test_a_variant_that_changes_inductor_settings_does_not_leak_them(tmp_path, monkeypatch, restored_compile_settings):
    # torchao's int4 quantize_ switches coordinate_descent_tuning on for the process; the variants
    # after it must not inherit that (it turned their frozen bf16 lm_head into a slow reduction).
    # int4 needs CUDA, so here the first variant plays its part.
    seen = {}

    def fake_measure(model_name, variant, args, device):
        seen[variant.name] = torch._inductor.config.coordinate_descent_tuning
        torch._inductor.config.coordinate_descent_tuning = not seen[variant.name]
        return decode.Result(model_name, variant.name, tokens_per_s=1.0, host_ms_per_token=1.0, frames_compiled=1)

    monkeypatch.setattr(decode, "measure", fake_measure)
    before = torch._inductor.config.coordinate_descent_tuning
    decode.main(["--smoke", "--variants", "bf16,lift2.4,lift2.0", "--out", str(tmp_path)])
    assert seen == {"bf16": before, "lift2.4": before, "lift2.0": before}
    assert torch._inductor.config.coordinate_descent_tuning == before
    assert (tmp_path / "decode_smoke.json").is_file()


def test_isolated_variants_are_measured_in_their_own_process(tmp_path, restored_compile_settings):
    # On CUDA each variant runs in a spawned process (later variants in one process ran slower than
    # alone on the H200); here one tiny variant makes the round trip: measured there, reported here.
    decode.main(["--smoke", "--isolate", "--variants", "lift2.4", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "decode_smoke.json").read_text())
    assert report["meta"]["isolated"] is True
    result, = report["results"]
    assert result["error"] is None and result["tokens_per_s"] > 0
    assert result["lift_ao_rewrites"].get("lift_fusion", 0) > 0  # the child installed the passes
