"""``lift-ao bench``: one quantized linear timed against the dense one, JSON on stdout."""

import json

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
