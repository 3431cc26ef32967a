"""benchmarks/paired.py: rows of two accuracy.py results files compared window by window."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import paired  # noqa: E402


def _results(path: Path, **window_nlls) -> None:
    """A results file whose rows (name → per-window NLLs) were evaluated on the same 4 windows."""
    rows = {name: dict(perplexity=math.exp(sum(nll) / 4), eval=dict(
        perplexity=math.exp(sum(nll) / 4), nll=sum(nll) / 4, tokens=4 * 511, windows=4, context_length=512, stride=512,
        seconds=1.0, window_nll=nll)) for name, nll in window_nlls.items()}
    path.write_text(json.dumps(dict(rows=rows, windows=4, context=512)))


def test_rows_of_two_files_are_paired(tmp_path, capsys):
    _results(tmp_path / "a.json", reference=[2.0, 2.5, 3.0, 2.2], **{"lift-cal-fte-48/20": [2.1, 2.6, 3.1, 2.3]})
    # Differences to a's quantized row: -0.02, 0.00, -0.04, -0.02 nats (mean -0.02).
    _results(tmp_path / "b.json", **{"lift-cal-fte-48/20": [2.08, 2.6, 3.06, 2.28]})
    table = paired.main([f"{tmp_path}/b.json:lift-cal-fte-48/20", f"{tmp_path}/a.json:lift-cal-fte-48/20",
                         f"{tmp_path}/a.json:lift-cal-fte-48/20", f"{tmp_path}/a.json:reference"])
    assert capsys.readouterr().out.strip() == table
    first, second = table.splitlines()[2:]
    se = math.sqrt(sum((d + 0.02) ** 2 for d in (-0.02, 0.0, -0.04, -0.02)) / 3) / 2
    low, mid, high = (100 * (math.exp(-0.02 + k * se) - 1) for k in (-2, 0, 2))
    assert first.endswith(f"| 4 | {math.exp(2.505):.3f} | {math.exp(2.525):.3f} | {mid:+.1f} % [{low:+.1f}, {high:+.1f}] |")
    assert second.endswith("| +10.5 % [+10.5, +10.5] |")  # every window 0.1 nats worse


def test_unpairable_or_missing_rows_are_refused(tmp_path):
    _results(tmp_path / "a.json", reference=[2.0, 2.5, 3.0, 2.2])
    doc = json.loads((tmp_path / "a.json").read_text())
    doc["rows"]["old"] = dict(perplexity=9.0, eval=dict(doc["rows"]["reference"]["eval"], window_nll=[]))
    (tmp_path / "a.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match="no row 'missing'"):
        paired.main([f"{tmp_path}/a.json:missing", f"{tmp_path}/a.json:reference"])
    with pytest.raises(SystemExit, match="same windows"):
        paired.main([f"{tmp_path}/a.json:old", f"{tmp_path}/a.json:reference"])
    with pytest.raises(SystemExit, match="RESULTS.json:ROW"):
        paired.main([f"{tmp_path}/a.json", f"{tmp_path}/a.json:reference"])
    with pytest.raises(SystemExit):
        paired.main([f"{tmp_path}/a.json:reference"])  # pairs only
