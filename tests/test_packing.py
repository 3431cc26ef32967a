import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lift_ao.packing import pack_codes, unpack_codes, words_per_row


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 5), length=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_is_bit_exact(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2, (rows, length), generator=g).bool()
    packed = pack_codes(codes)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words_per_row(length))
    assert torch.equal(unpack_codes(packed, length), codes)


def test_layout_is_lsb_first_and_pads_with_zeros():
    codes = torch.zeros(1, 40, dtype=torch.bool)
    codes[0, [0, 3, 31, 32, 39]] = True
    packed = pack_codes(codes)
    assert packed[0, 0].item() == (1 | 1 << 3) - 2**31  # bit 31 set → negative int32
    assert packed[0, 1].item() == 1 | 1 << 7


def test_unpack_rejects_wrong_word_count():
    import pytest

    with pytest.raises(ValueError, match="int32 with|int32 for"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 32)
