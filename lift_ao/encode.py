"""Encoding rotated weight rows into lattice codes and row scales.

Each rotated row is normalised to unit RMS (the lattices were fitted to N(0,1) coordinates), cut
into blocks of ``d``, and every block is coded by the nearest-neighbour search. The row scale is then
refitted by least squares, ``r = <w, ŵ> / <ŵ, ŵ>`` with ŵ the decoded unit-scale row, which is the
optimal scale for the chosen codes (it shrinks slightly towards zero relative to the RMS).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lift_ao.lattice import Lattice
from lift_ao.search import nearest_codes

__all__ = ["encode_rows"]

# Rows encoded per step: bounds the search's working set and paces the progress bar.
_BLOCKS_PER_STEP = 1 << 16


def encode_rows(rotated: torch.Tensor, lattice: Lattice, *, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Code rotated weight rows.

    Args:
        rotated: (N, Kp) float32, Kp a multiple of ``lattice.d``.
        lattice: the lattice (``M`` on the same device as ``rotated``).
        progress: show a tqdm bar over row chunks.
    Returns:
        codes: (N, Kp·D/d) bool, True = +1, block-major (D bits per block).
        row_scale: (N,) float32.
    """
    n, kp = rotated.shape
    if kp % lattice.d:
        raise ValueError(f"rotated rows have {kp} columns, not a multiple of the block length {lattice.d}")
    rows_per_step = max(1, _BLOCKS_PER_STEP * lattice.d // kp)
    codes = torch.empty(n, kp // lattice.d * lattice.D, dtype=torch.bool, device=rotated.device)
    row_scale = torch.empty(n, dtype=torch.float32, device=rotated.device)
    steps = range(0, n, rows_per_step)
    for start in tqdm(steps, desc="encode", unit="chunk", leave=False, disable=not progress):
        rows = rotated[start : start + rows_per_step]
        rms = rows.pow(2).mean(1).sqrt()
        # An all-zero row codes anything with a zero scale; divide by 1 to stay finite.
        unit = rows / torch.where(rms > 0, rms, torch.ones_like(rms))[:, None]
        block_codes = nearest_codes(unit.reshape(-1, lattice.d), lattice)
        decoded = lattice.decode(block_codes).view(rows.shape)
        norm2 = decoded.pow(2).sum(1)
        row_scale[start : start + rows.shape[0]] = (rows * decoded).sum(1) / norm2.clamp_min(1e-30)
        codes[start : start + rows.shape[0]] = block_codes.view(rows.shape[0], -1)
    return codes, row_scale
