"""Bit packing of ±1 codes into int32 words, rows interleaved in groups of 32 (format version 3).

Bits of a row: a row of ``L`` code bits is held by ``W = 4·ceil(L / 128)`` int32 words; bit ``j`` of
the row is bit ``j % 32`` (least significant first) of the row's word ``j // 32``; a set bit means
+1, a clear bit −1. Bits past ``L`` are zero, so a row costs ``L`` bits plus less than 128 bits of
padding (under 1.3 % for K ≥ 4096 at 2.4 bits).

Rows in memory: the packed codes of ``N`` rows are one int32 tensor of shape
``(⌈N/32⌉, W/4, 32, 4)`` — group of 32 rows, quad (4 consecutive words of a row), row within the
group, word within the quad — so word ``w`` of row ``n`` is at flat offset

    ((n // 32) · W/4 + w // 4) · 128 + (n % 32) · 4 + w % 4.

Rows ``N..32⌈N/32⌉−1`` of the last group are zero. Why: the decode kernel (:mod:`kernels.triton_lut`)
gives each thread one row and loads that row's next quad (16 bytes) per step; with rows interleaved,
the 32 lanes of a warp read 512 contiguous bytes (4 L1 wavefronts) instead of 32 quads 4·W bytes apart
(32 wavefronts): 72.4 → 58.4 µs at 28672×8192 standalone on the H100 (benchmarks/NOTES_kernels.md,
round 3), 18.1 → 17.0 µs per lookup call inside a decode graph on the H200 (round 7b).
The cost is the padding of N to a multiple of 32 rows (none for the usual LLM shapes). The 4-D shape
also makes code that assumes the row-major (N, W) words of format 2 fail on the shape, not read
wrong bits. ``N`` itself is not in the packed tensor: callers pass it (the row scales' length, or
the weight's shape).
"""

from __future__ import annotations

import torch

__all__ = ["GROUP_ROWS", "check_packed", "interleave_rows", "pack_codes", "pack_row_words", "packed_shape",
           "random_packed_codes", "row_words", "unpack_codes", "words_from_uint32", "words_per_row"]

_BITS = 32
_WORDS_PER_QUAD = 4
# Rows interleaved together: one warp of the decode kernel, one row per lane.
GROUP_ROWS = 32


def words_per_row(code_length: int) -> int:
    """Number of int32 words holding ``code_length`` bits: whole quads of 4 words."""
    return -(-code_length // (_BITS * _WORDS_PER_QUAD)) * _WORDS_PER_QUAD


def packed_shape(rows: int, code_length: int) -> tuple[int, int, int, int]:
    """Shape of the packed codes of ``rows`` rows of ``code_length`` bits: (⌈N/32⌉, W/4, 32, 4)."""
    return (-(-rows // GROUP_ROWS), words_per_row(code_length) // _WORDS_PER_QUAD, GROUP_ROWS, _WORDS_PER_QUAD)


def check_packed(packed: torch.Tensor, rows: int, code_length: int, context: str = "") -> None:
    """Raise ValueError unless ``packed`` holds ``rows`` rows of ``code_length`` bits: int32 of
    :func:`packed_shape` (a row-major format-2 (N, W) tensor fails here). ``context`` starts the
    message (who checks, and where the sizes come from)."""
    expected = packed_shape(rows, code_length)
    if packed.dtype != torch.int32 or tuple(packed.shape) != expected:
        raise ValueError(f"{context + ': ' if context else ''}packed codes of {rows} rows must be {expected} int32 "
                         f"for {rows} rows of {code_length} bits, got {packed.dtype} of shape {tuple(packed.shape)}")


def pack_row_words(codes: torch.Tensor) -> torch.Tensor:
    """The words of each row, rows not yet interleaved.

    Args:
        codes: (N, L) bool, True = +1.
    Returns:
        (N, words_per_row(L)) int32, row n's words in order (bits as in the module docstring).
    """
    if codes.dtype != torch.bool or codes.dim() != 2:
        raise TypeError(f"pack_codes expects a 2-D bool tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    n, length = codes.shape
    words = words_per_row(length)
    padded = torch.zeros(n, words * _BITS, dtype=torch.int64, device=codes.device)
    padded[:, :length] = codes.to(torch.int64)
    weights = torch.ones(_BITS, dtype=torch.int64, device=codes.device) << torch.arange(_BITS, device=codes.device)
    return words_from_uint32((padded.view(n, words, _BITS) * weights).sum(-1))


def interleave_rows(words: torch.Tensor) -> torch.Tensor:
    """Row-major words → the packed layout (rows past N zero).

    Args:
        words: (N, W) int32, W a multiple of 4 (e.g. :func:`pack_row_words`, or format-2 packed codes).
    Returns:
        (⌈N/32⌉, W/4, 32, 4) int32, contiguous.
    """
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] % _WORDS_PER_QUAD:
        raise ValueError(f"row words must be (N, 4·quads) int32, got {words.dtype} of shape {tuple(words.shape)}")
    n, width = words.shape
    quads = width // _WORDS_PER_QUAD
    full, rest = divmod(n, GROUP_ROWS)
    packed = words.new_zeros(-(-n // GROUP_ROWS), quads, GROUP_ROWS, _WORDS_PER_QUAD)
    # Assigned through transposed views: no staging copy besides the result.
    packed[:full] = words[:full * GROUP_ROWS].reshape(full, GROUP_ROWS, quads, _WORDS_PER_QUAD).transpose(1, 2)
    if rest:
        packed[full, :, :rest] = words[full * GROUP_ROWS:].reshape(rest, quads, _WORDS_PER_QUAD).transpose(0, 1)
    return packed


def row_words(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of :func:`interleave_rows`.

    Args:
        packed: (⌈N/32⌉, W/4, 32, 4) int32.
        rows: N, the rows it holds.
    Returns:
        (N, W) int32, row-major (a view of ``packed`` only when W = 4).
    """
    if (packed.dtype != torch.int32 or packed.dim() != 4 or packed.shape[0] != -(-rows // GROUP_ROWS)
            or tuple(packed.shape[2:]) != (GROUP_ROWS, _WORDS_PER_QUAD)):
        raise ValueError(
            f"packed codes of {rows} rows must be (⌈N/32⌉ = {-(-rows // GROUP_ROWS)}, quads, 32, 4) int32, got "
            f"{packed.dtype} of shape {tuple(packed.shape)}"
        )
    groups, quads = packed.shape[:2]
    return packed.transpose(1, 2).reshape(groups * GROUP_ROWS, quads * _WORDS_PER_QUAD)[:rows]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack sign bits.

    Args:
        codes: (N, L) bool, True = +1.
    Returns:
        (⌈N/32⌉, words_per_row(L)/4, 32, 4) int32 (layout in the module docstring).
    """
    return interleave_rows(pack_row_words(codes))


def random_packed_codes(rows: int, code_length: int, *, generator=None, device=None) -> torch.Tensor:
    """Uniformly random codes, already packed, for speed and memory measurements (no search).

    Args:
        rows: N; code_length: L, bits per row.
        generator: a torch.Generator on ``device`` (None: the default one).
        device: where the words are drawn and live.
    Returns:
        packed_shape(N, L) int32, the bits past L zero as :func:`pack_codes` leaves them.
    """
    words = words_per_row(code_length)
    values = torch.randint(0, 2**32, (rows, words), generator=generator, dtype=torch.int64, device=device)
    valid_bits = (code_length - _BITS * torch.arange(words, dtype=torch.int64, device=device)).clamp(0, _BITS)
    return interleave_rows(words_from_uint32(values & ((1 << valid_bits) - 1)))


def words_from_uint32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit word values held in int64 (any shape, each in [0, 2³²)) → the same bits as
    int32 (two's complement), the dtype of packed codes."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def unpack_codes(packed: torch.Tensor, code_length: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: packed_shape(N, code_length) int32.
        code_length: L, bits per row.
        rows: N, the rows to return (the padding rows of the last group are dropped).
    Returns:
        (N, L) bool, True = +1.
    """
    check_packed(packed, rows, code_length)
    shifts = torch.arange(_BITS, dtype=torch.int32, device=packed.device)
    bits = (row_words(packed, rows).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :code_length].bool()
