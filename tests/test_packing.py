"""Packing layout; the bit-exact round trip over shapes is in test_properties.py."""

import pytest
import torch

from lift_ao.packing import pack_codes, unpack_codes


def test_layout_is_lsb_first_and_pads_with_zeros():
    codes = torch.zeros(1, 40, dtype=torch.bool)
    codes[0, [0, 3, 31, 32, 39]] = True
    packed = pack_codes(codes)
    assert packed[0, 0].item() == (1 | 1 << 3) - 2**31  # bit 31 set → negative int32
    assert packed[0, 1].item() == 1 | 1 << 7


def test_unpack_rejects_wrong_word_count():
    with pytest.raises(ValueError, match="int32 with|int32 for"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 32)
