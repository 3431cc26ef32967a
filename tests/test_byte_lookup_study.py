"""benchmarks/byte_lookup_study.py: the byte-table lookup prototype against the float64 reference,
through Triton's interpreter (tests/conftest.py), so its GPU timing measures a correct kernel."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import byte_lookup_study as study  # noqa: E402
from lift_ao.kernels.reference import lifted_matmul_reference  # noqa: E402
from lift_ao.packing import pack_codes, words_per_row  # noqa: E402


@pytest.mark.parametrize("rows,length,splits", [(70, 1000, 1), (70, 1000, 2), (33, 264, 1)])
def test_byte_lookup_matches_float64(rows, length, splits):
    """Rows not a multiple of 32, codes ending inside a word (1000 = 31.25 words) and inside a quad,
    one and two K splits; the error is the fp16 rounding of the table entries."""
    g = torch.Generator().manual_seed(rows * length + splits)
    codes = pack_codes(torch.randint(0, 2, (rows, length), generator=g, dtype=torch.bool))
    row_scale = torch.rand(rows, generator=g) + 0.5
    lifted = torch.randn(length, generator=g)
    ref = lifted_matmul_reference(lifted.double()[None], codes, row_scale.double(), None)[0]

    tables = study.byte_tables(lifted, words_per_row(length))
    out = study.byte_lookup(tables, codes, row_scale, torch.empty(rows), splits, {"BLOCK_N": 32, "num_warps": 1})

    assert float((out.double() - ref).norm() / ref.norm()) < 1e-3


def test_byte_tables_are_sign_symmetric_sums():
    """Entry [G, i] = v(i | 128); the byte without bit 7 is its complement's negative."""
    lifted = torch.randn(40, generator=torch.Generator().manual_seed(0))
    tables = study.byte_tables(lifted, words_per_row(40)).double()
    x = torch.cat([lifted.double(), torch.zeros(24, dtype=torch.float64)])
    for group, byte in [(0, 0b10110001), (3, 0b11111111), (4, 0b10000000)]:
        signs = torch.tensor([1.0 if byte >> t & 1 else -1.0 for t in range(8)], dtype=torch.float64)
        assert torch.isclose(tables[group, byte & 127], (signs * x[8 * group: 8 * group + 8]).sum(), rtol=1e-3)
