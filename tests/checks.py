"""Assertions and inputs shared by the test modules."""

import torch

from lift_ao import LiftQuantTensor
from lift_ao.packing import random_packed_codes, unpack_codes


def assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same state-dict keys, and every tensor (each LiftQuant weight's every part) bit-identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        x, y = sa[key], sb[key]
        if isinstance(x, LiftQuantTensor):
            assert isinstance(y, LiftQuantTensor) and x.dtype == y.dtype
            for part in x.tensor_data_names:
                assert torch.equal(getattr(x, part), getattr(y, part)), (key, part)
        else:
            assert torch.equal(x, y), key


def random_codes(rows: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fair random codes (:func:`lift_ao.packing.random_packed_codes`) and their bits:
    ((rows, length) bool, packed int32)."""
    packed = random_packed_codes(rows, length, generator=generator)
    return unpack_codes(packed, length, rows), packed


def rotated_weight_float64(bits: torch.Tensor, mapping: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """W_rot[n, b·d:(b+1)·d] = r_n · M q_{n,b} in float64, from (N, L) bool codes (True = +1) and the
    (d, D) lattice matrix: the rotated-domain weight the prefill paths multiply u by."""
    f64 = torch.float64
    q = bits.to(f64).view(bits.shape[0], -1, mapping.shape[1]) * 2 - 1
    return (q @ mapping.to(f64).T).flatten(1) * row_scale.to(f64)[:, None]
