"""Encoding rotated weight rows into lattice codes and row scales.

Each rotated row is normalised to unit RMS (the lattices were fitted to N(0,1) coordinates), cut
into blocks of ``d``, and every block is coded by the nearest-neighbour search. The row scale is then
refitted by least squares, ``r = <w, ŵ> / <ŵ, ŵ>`` with ŵ the decoded unit-scale row, which is the
optimal scale for the chosen codes (it shrinks slightly towards zero relative to the RMS).

:func:`encode_weight` rotates, codes and packs a whole weight in row chunks, so its peak memory is
the weight, its packed codes and one chunk: never an N×Kp float32 copy or the N×L code bits.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lift_ao.lattice import Lattice
from lift_ao.packing import interleave_rows, pack_row_words, words_per_row
from lift_ao.search import nearest_codes
from lift_ao.transform import rotate

__all__ = ["encode_rows", "encode_weight", "unit_rms_rows"]

# Rows encoded per step: bounds the search's working set and paces the progress bar.
_BLOCKS_PER_STEP = 1 << 16


def _rows_per_step(kp: int, lattice: Lattice) -> int:
    return max(1, _BLOCKS_PER_STEP * lattice.d // kp)


def unit_rms_rows(rows: torch.Tensor) -> torch.Tensor:
    """(N, K) ``rows`` divided by their RMS (all-zero rows stay zero: they code anything at scale 0).

    The RMS is taken in float64: float32 squares underflow below |w| ~ 1e-23 and overflow above
    ~ 1e19, which made such rows look all-zero (every block coded as zero)."""
    rms = rows.double().pow(2).mean(1).sqrt().to(rows.dtype)
    return rows / torch.where(rms > 0, rms, torch.ones_like(rms))[:, None]


def encode_rows(
    rotated: torch.Tensor, lattice: Lattice, *, progress: bool = False, beam_width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code rotated weight rows.

    Args:
        rotated: (N, Kp) float32, Kp a multiple of ``lattice.d``.
        lattice: the lattice (``M`` on the same device as ``rotated``).
        progress: show a tqdm bar over row chunks.
        beam_width: the search's beam width (None = the lattice's default; see ``nearest_codes``).
    Returns:
        codes: (N, Kp·D/d) bool, True = +1, block-major (D bits per block).
        row_scale: (N,) float32.
    """
    n, kp = rotated.shape
    if kp % lattice.d:
        raise ValueError(f"rotated rows have {kp} columns, not a multiple of the block length {lattice.d}")
    rows_per_step = _rows_per_step(kp, lattice)
    codes = torch.empty(n, kp // lattice.d * lattice.D, dtype=torch.bool, device=rotated.device)
    row_scale = torch.empty(n, dtype=torch.float32, device=rotated.device)
    steps = range(0, n, rows_per_step)
    for start in tqdm(steps, desc="encode", unit="chunk", leave=False, disable=not progress):
        rows = rotated[start : start + rows_per_step]
        block_codes = nearest_codes(unit_rms_rows(rows).reshape(-1, lattice.d), lattice, beam_width=beam_width)
        decoded = lattice.decode(block_codes).view(rows.shape)
        norm2 = decoded.pow(2).sum(1)
        # Σ w·ŵ in float64: in float32 it overflows for rows above ~1e36 whose scale itself fits.
        row_scale[start : start + rows.shape[0]] = (rows.double() * decoded).sum(1) / norm2.clamp_min(1e-30)
        codes[start : start + rows.shape[0]] = block_codes.view(rows.shape[0], -1)
    return codes, row_scale


def encode_weight(
    weight: torch.Tensor, lattice: Lattice, signs: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
    *, progress: bool = False, beam_width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate, code and pack a weight, one chunk of rows at a time.

    Args:
        weight: (N, K) floating point (any dtype; each chunk is rotated in float32).
        lattice: the lattice (``M`` on ``weight``'s device).
        signs, left, right: the input rotation (:class:`lift_ao.transform.Rotation`), Kp = k1·k2.
        progress: show a tqdm bar over row chunks.
        beam_width: the search's beam width (None = the lattice's default; see ``nearest_codes``).
    Returns:
        packed_codes: packed_shape(N, L) int32, L = Kp·D/d (layout in :mod:`lift_ao.packing`).
        row_scale: (N,) float32.
    """
    n, kp = weight.shape[0], signs.shape[0]
    rows_per_step = _rows_per_step(kp, lattice)
    # Row-major words first (chunks need not be whole groups of 32 rows), interleaved at the end.
    words = torch.empty(n, words_per_row(kp // lattice.d * lattice.D), dtype=torch.int32, device=weight.device)
    row_scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    steps = range(0, n, rows_per_step)
    for start in tqdm(steps, desc="encode", unit="chunk", leave=False, disable=not progress):
        rows = rotate(weight[start : start + rows_per_step].detach().to(torch.float32), signs, left, right)
        codes, scale = encode_rows(rows, lattice, beam_width=beam_width)
        words[start : start + rows.shape[0]] = pack_row_words(codes)
        row_scale[start : start + rows.shape[0]] = scale
    return interleave_rows(words), row_scale
