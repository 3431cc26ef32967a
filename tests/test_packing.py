"""Packing layout; the bit-exact round trip over shapes is in test_properties.py."""

import pytest
import torch

from lift_ao.packing import (interleave_rows, pack_codes, pack_row_words, packed_shape, random_packed_codes, row_words,
                             unpack_codes, words_from_uint32)


def test_layout_is_lsb_first_and_pads_with_zeros():
    codes = torch.zeros(1, 40, dtype=torch.bool)
    codes[0, [0, 3, 31, 32, 39]] = True
    packed = pack_codes(codes)
    assert packed.shape == (1, 1, 32, 4)
    assert packed[0, 0, 0, 0].item() == (1 | 1 << 3) - 2**31  # bit 31 set → negative int32
    assert packed[0, 0, 0, 1].item() == 1 | 1 << 7
    assert packed.count_nonzero() == 2  # words 2, 3 of the quad and rows 1..31 of the group are padding


@pytest.mark.parametrize("row, bit", [(0, 0), (37, 200), (69, 299), (31, 128), (32, 127)])
def test_word_of_a_row_bit(row, bit):
    """Bit j of row n: bit j % 32 of flat word ((n // 32)·quads + w // 4)·128 + (n % 32)·4 + w % 4,
    w = j // 32 — what the kernels' _code_word_offset computes."""
    rows, length = 70, 300
    codes = torch.zeros(rows, length, dtype=torch.bool)
    codes[row, bit] = True
    packed = pack_codes(codes)
    quads = 3  # words_per_row(300) = 12
    assert packed.shape == (3, quads, 32, 4) == packed_shape(rows, length)
    word = bit // 32
    offset = ((row // 32) * quads + word // 4) * 128 + (row % 32) * 4 + word % 4
    flat = packed.flatten()
    assert flat.nonzero().flatten().tolist() == [offset]
    assert flat[offset].item() == words_from_uint32(torch.tensor(1 << bit % 32)).item()


@pytest.mark.parametrize("rows", [0, 1, 31, 32, 33, 70])
@pytest.mark.parametrize("length", [1, 100, 129, 300])
def test_round_trip_with_partial_groups_and_quads(rows, length):
    codes = torch.rand(rows, length, generator=torch.Generator().manual_seed(rows * 1000 + length)) < 0.5
    packed = pack_codes(codes)
    assert packed.dtype == torch.int32 and packed.shape == packed_shape(rows, length) and packed.is_contiguous()
    assert torch.equal(unpack_codes(packed, length, rows), codes)
    assert torch.equal(row_words(packed, rows), pack_row_words(codes))
    assert torch.equal(interleave_rows(row_words(packed, rows)), packed)
    # Rows past N and bits past L are zero.
    padded = row_words(packed, packed.shape[0] * 32)
    assert not padded[rows:].any()
    unpacked = (padded[:rows].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    assert not unpacked.flatten(1)[:, length:].any()


@pytest.mark.parametrize("rows, length", [(33, 129), (64, 300)])
def test_random_packed_codes_are_packed_codes(rows, length):
    """Random codes are what pack_codes makes of their bits (zero past L and past N), reproducible
    from the generator, and not degenerate (about half the bits set)."""
    packed = random_packed_codes(rows, length, generator=torch.Generator().manual_seed(rows))
    codes = unpack_codes(packed, length, rows)
    assert torch.equal(pack_codes(codes), packed)
    assert torch.equal(random_packed_codes(rows, length, generator=torch.Generator().manual_seed(rows)), packed)
    assert 0.45 < codes.float().mean().item() < 0.55


def test_unpack_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="int32 for 2 rows of 32 bits"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), 32, 2)  # format 2: rows one after another
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 4\) int32 for 33 rows"):
        unpack_codes(torch.zeros(1, 1, 32, 4, dtype=torch.int32), 32, 33)
    with pytest.raises(ValueError, match="row words must be"):
        interleave_rows(torch.zeros(2, 3, dtype=torch.int32))
