"""Lattices: the (d, D, M) codebooks of LiftQuant.

A lattice maps a ±1 code ``q`` of length ``D`` to the point ``M @ q`` in R^d. Its codebook has 2^D
points and costs ``D / d`` bits per coordinate, so any rational bit-width is reachable.

Shipped lattices live in ``lift_ao/lattices/lq_{D}_{d}.safetensors``: one tensor ``M`` (d×D,
float32) and string metadata ``d``, ``D``, ``mse`` (per coordinate on N(0,1)), ``command`` (what
produced it) and ``seed``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import torch

__all__ = ["Lattice", "LatticeError"]


class LatticeError(ValueError):
    """A lattice was asked for that does not exist or cannot be built."""


def _lattice_dir():
    return resources.files("lift_ao") / "lattices"


@dataclass(frozen=True, eq=False)
class Lattice:
    """A LiftQuant lattice ``(d, D, M)``.

    Args:
        d: block length in weight space (coordinates per block).
        D: code length in lifted space (bits per block).
        M: mapping matrix, shape (d, D), float32. Codebook = {M q : q ∈ {−1,+1}^D}.
        mse: measured mean squared error per coordinate on N(0,1) (NaN when unknown).
        metadata: free-form strings (training command, seed, ...), kept in checkpoints.
    """

    d: int
    D: int
    M: torch.Tensor
    mse: float = float("nan")
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.d, int) and isinstance(self.D, int) and 0 < self.d < self.D):
            raise LatticeError(f"a lattice needs integers 0 < d < D, got d={self.d!r}, D={self.D!r}")
        if tuple(self.M.shape) != (self.d, self.D):
            raise LatticeError(f"M must have shape (d, D) = ({self.d}, {self.D}), got {tuple(self.M.shape)}")
        if not torch.isfinite(self.M).all():
            raise LatticeError(f"lattice {self.name}: M has NaN/Inf entries")
        object.__setattr__(self, "M", self.M.detach().to(torch.float32).contiguous())

    @property
    def name(self) -> str:
        """``"D/d"``, e.g. ``"24/10"`` (the paper writes LQ-24/10)."""
        return f"{self.D}/{self.d}"

    @property
    def bits(self) -> float:
        """Bits per weight, ``D / d``."""
        return self.D / self.d

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex, 16 chars) of (d, D, M's float32 bytes): identifies the codebook exactly."""
        h = hashlib.sha256(f"{self.d},{self.D},".encode())
        h.update(self.M.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device) -> "Lattice":
        """The same lattice with ``M`` on ``device``."""
        return Lattice(self.d, self.D, self.M.to(device), self.mse, dict(self.metadata))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook points of codes.

        Args:
            codes: (..., D) bool (True = +1) or ±1 numbers.
        Returns:
            (..., d) float32 points ``M q``.
        """
        q = codes.to(torch.float32) * 2 - 1 if codes.dtype == torch.bool else codes.to(torch.float32)
        return q @ self.M.to(q.device).T

    # ----- shipped lattices -------------------------------------------------------------------

    @staticmethod
    def file_name(D: int, d: int) -> str:
        return f"lq_{D}_{d}.safetensors"

    def save(self, path) -> None:
        """Write this lattice as safetensors (tensor ``M`` plus string metadata)."""
        from safetensors.torch import save_file

        meta = {k: str(v) for k, v in self.metadata.items()}
        meta.update(d=str(self.d), D=str(self.D), mse=repr(float(self.mse)))
        save_file({"M": self.M.cpu().contiguous()}, str(path), metadata=meta)

    @classmethod
    def from_file(cls, path) -> "Lattice":
        """Read a lattice written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            M = f.get_tensor("M")
        d, D, mse = int(meta.pop("d")), int(meta.pop("D")), float(meta.pop("mse", "nan"))
        return cls(d, D, M, mse, meta)

    @classmethod
    def load(cls, name: str) -> "Lattice":
        """A shipped lattice by name: ``"24/10"``, ``"LQ-24/10"`` or ``"lq_24_10"``."""
        key = str(name).upper().removeprefix("LQ-").removeprefix("LQ_").replace("_", "/")
        try:
            D, d = (int(v) for v in key.split("/"))
        except ValueError:
            raise LatticeError(f"unknown lattice name {name!r}: write it as 'D/d', e.g. '24/10'") from None
        return _load_shipped(D, d)

    @classmethod
    def shipped(cls) -> list["Lattice"]:
        """All shipped lattices, sorted by bits then by d."""
        out = []
        for entry in _lattice_dir().iterdir():
            if entry.name.startswith("lq_") and entry.name.endswith(".safetensors"):
                D, d = (int(v) for v in entry.name[3:-12].split("_"))
                out.append(_load_shipped(D, d))
        return sorted(out, key=lambda lat: (lat.bits, lat.d))

    @classmethod
    def for_bits(cls, bits: float, round: str = "down") -> "Lattice":
        """The shipped lattice for a requested bit-width.

        Rule: ``round="down"`` (default) takes the largest shipped rate ≤ ``bits`` (so a memory
        target is never exceeded); ``round="nearest"`` takes the closest rate. Among lattices with
        the same rate, the one with the lowest measured MSE wins. Raises :class:`LatticeError` when
        ``bits`` is not a finite number or lies outside [smallest rate, largest rate + 0.5].
        """
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
            raise LatticeError(f"bits must be a finite number, got {bits!r}")
        if round not in ("down", "nearest"):
            raise LatticeError(f"round must be 'down' or 'nearest', got {round!r}")
        lattices = cls.shipped()
        lo, hi = lattices[0].bits, lattices[-1].bits
        if not lo - 1e-9 <= bits <= hi + 0.5:
            raise LatticeError(
                f"bits={bits} is outside the supported range [{lo:.3g}, {hi:.3g}] of the shipped "
                f"lattices ({', '.join(lat.name for lat in lattices)}); train another with "
                f"`python -m lift_ao.lattice train --d ... --D ...`"
            )
        if round == "down":
            candidates = [lat for lat in lattices if lat.bits <= bits + 1e-9]
            rate = max(lat.bits for lat in candidates)
        else:
            rate = min((lat.bits for lat in lattices), key=lambda b: (abs(b - bits), b))
            candidates = lattices
        same_rate = [lat for lat in candidates if abs(lat.bits - rate) < 1e-9]
        return min(same_rate, key=lambda lat: lat.mse)


@lru_cache(maxsize=None)
def _load_shipped(D: int, d: int) -> Lattice:
    entry = _lattice_dir() / Lattice.file_name(D, d)
    if not entry.is_file():
        raise LatticeError(
            f"no shipped lattice {D}/{d}; shipped: {', '.join(lat.name for lat in Lattice.shipped())}"
        )
    with resources.as_file(entry) as path:
        return Lattice.from_file(path)
