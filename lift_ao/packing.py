"""Bit packing of ±1 codes into int32 words.

Layout: a row of ``L`` code bits is stored in ``4·ceil(L / 128)`` int32 words; bit ``j`` of the row is
bit ``j % 32`` (least significant first) of word ``j // 32``; a set bit means +1, a clear bit −1.
Bits past ``L`` are zero. Rows are padded to whole 16-byte quads of words so the decode kernel
(:mod:`kernels.triton_lut`) loads 4 words per thread with one aligned vector load; a row costs ``L``
bits plus less than 128 bits of padding (under 1.3 % for K ≥ 4096 at 2.4 bits).
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "unpack_codes", "words_from_uint32", "words_per_row"]

_BITS = 32
_WORDS_PER_QUAD = 4


def words_per_row(code_length: int) -> int:
    """Number of int32 words holding ``code_length`` bits: whole quads of 4 words."""
    return -(-code_length // (_BITS * _WORDS_PER_QUAD)) * _WORDS_PER_QUAD


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack sign bits.

    Args:
        codes: (N, L) bool, True = +1.
    Returns:
        (N, words_per_row(L)) int32 words (layout in the module docstring).
    """
    if codes.dtype != torch.bool or codes.dim() != 2:
        raise TypeError(f"pack_codes expects a 2-D bool tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    n, length = codes.shape
    words = words_per_row(length)
    padded = torch.zeros(n, words * _BITS, dtype=torch.int64, device=codes.device)
    padded[:, :length] = codes.to(torch.int64)
    weights = torch.ones(_BITS, dtype=torch.int64, device=codes.device) << torch.arange(_BITS, device=codes.device)
    return words_from_uint32((padded.view(n, words, _BITS) * weights).sum(-1))


def words_from_uint32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit word values held in int64 (any shape, each in [0, 2³²)) → the same bits as
    int32 (two's complement), the dtype of packed codes."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def unpack_codes(packed: torch.Tensor, code_length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: (N, W) int32 words, W = words_per_row(code_length).
        code_length: L, bits per row.
    Returns:
        (N, L) bool, True = +1.
    """
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != words_per_row(code_length):
        raise ValueError(
            f"packed codes must be (N, {words_per_row(code_length)}) int32 for {code_length} bits per row, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    shifts = torch.arange(_BITS, dtype=torch.int32, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :code_length].bool()
