"""Paired perplexity comparisons between rows of accuracy.py results files (e.g. two runs of one row with
different settings, each written to its own --out), window by window:

    python benchmarks/paired.py RESULTS.json:ROW BASELINE.json:ROW [RESULTS.json:ROW BASELINE.json:ROW ...]

prints a Markdown table with, per pair, the first row's perplexity over the second's and its ~95 %
interval. Both rows must have been evaluated on the same windows (same --windows and --context) by a
version of accuracy.py that records per-window NLLs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import relative_change  # noqa: E402


def _row(spec: str) -> tuple[str, dict]:
    """``path.json:row name`` → (the spec, the row's dict)."""
    path, sep, name = spec.partition(".json:")
    if not sep:
        raise SystemExit(f"{spec!r}: expected RESULTS.json:ROW, e.g. benchmarks/results/accuracy.json:reference")
    rows = json.loads(Path(path + ".json").read_text())["rows"]
    if name not in rows:
        raise SystemExit(f"{path}.json has no row {name!r}; it has {sorted(rows)}")
    return spec, rows[name]


def main(argv=None) -> str:
    """Print (and return) the comparison table of the pairs in ``argv``."""
    specs = sys.argv[1:] if argv is None else argv
    if not specs or len(specs) % 2:
        raise SystemExit(__doc__)
    lines = ["| row | baseline | windows | perplexity | baseline's | ratio − 1 [~95 %] |", "|---|---|---:|---:|---:|---|"]
    for (spec, row), (base_spec, base) in zip(*[map(_row, specs)] * 2):
        try:
            change = relative_change(row, base)
        except ValueError as error:
            raise SystemExit(f"{spec} vs {base_spec}: {error}") from None
        lines.append(f"| {spec} | {base_spec} | {row['eval']['windows']} | {row['perplexity']:.3f} | "
                     f"{base['perplexity']:.3f} | {change} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
