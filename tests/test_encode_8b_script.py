"""benchmarks/encode_8b.py (data-free encode time of Llama-3-8B shapes) runs end to end on CPU.

Tiny settings: one layer, every shape divided by 128, so the test checks the script (shapes,
bookkeeping, extrapolation, output files), not the speed; the real run is on one GPU.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import encode_8b  # noqa: E402


def test_layer_shapes_are_llama3_8b_and_scale():
    full = encode_8b.layer_shapes()
    assert full["q_proj"] == (4096, 4096) and full["k_proj"] == (1024, 4096)
    assert full["gate_proj"] == (14336, 4096) and full["down_proj"] == (4096, 14336)
    # 218.1M weights per layer, 6.98G in 32 layers (lm_head and embeddings excluded).
    assert sum(n * k for n, k in full.values()) == 218_103_808
    assert encode_8b.layer_shapes(128)["up_proj"] == (112, 32)
    with pytest.raises(ValueError, match="scale"):
        encode_8b.layer_shapes(0)


def test_summary_extrapolates_only_when_layers_are_missing():
    rows = [dict(seconds=3.0, weights=10), dict(seconds=1.0, weights=10), dict(seconds=1.0, weights=10)]
    part = encode_8b.summarize(rows, 32)
    assert part["extrapolated"] and part["seconds_model_extrapolated"] == pytest.approx(5.0 * 32 / 3)
    assert part["seconds_model_steady_state"] == pytest.approx(3.0 + 1.0 * 31)
    whole = encode_8b.summarize(rows, 3)
    assert not whole["extrapolated"] and whole["seconds_model"] == 5.0 and whole["weights_per_second"] == 6.0


def test_smoke_run_writes_results(tmp_path):
    result = encode_8b.main(["--device", "cpu", "--layers", "1", "--scale", "128", "--out", str(tmp_path)])
    assert result["settings"]["lattice"] == "48/20" and result["settings"]["beam_width"] >= 1
    assert result["path"] == "LiftQuantTensor.from_hp"
    assert [r["count"] for r in result["per_shape"].values()] == [1] * 7
    assert result["per_layer"][0]["weights"] == 218_103_808 // 128**2
    assert result["summary"]["extrapolated"] and result["summary"]["seconds_model_extrapolated"] > 0
    stored = json.loads((tmp_path / "encode_8b.json").read_text())
    assert stored["settings"] == result["settings"]
    assert "EXTRAPOLATED" in (tmp_path / "encode_8b.md").read_text()
