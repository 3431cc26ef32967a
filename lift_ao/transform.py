"""The input transform: a randomized Kronecker rotation of the input dimension.

Real weights are not i.i.d. Gaussian; rotating the input dimension by a random orthogonal matrix
spreads outliers so that each block of ``d`` weights looks Gaussian, which is what the lattices were
trained for. The rotation is ``R = diag(s) · (P1 ⊗ P2)`` with ``s`` random signs and ``P1`` (k1×k1),
``P2`` (k2×k2) orthogonal: a normalised Hadamard matrix when the size is a power of two, otherwise a
Haar-random orthogonal matrix. Applying it costs O(K·(k1 + k2)) = O(K·√K) instead of O(K²).

The input dimension K is zero-padded to ``Kp = k1·k2``, a multiple of the lattice's block length
``d``. Because ``R`` is orthogonal, ``W x = (W_pad R)(Rᵀ x_pad)``: rows of ``W`` and activations are
transformed by the *same* map ``rotate(v) = Rᵀ pad(v)``; the padding never reaches the user.

The rotation depends only on (K, d, seed), so every linear that reads the same activation (q/k/v,
gate/up) gets an identical transform and the activation needs transforming once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Rotation", "check_rotation", "make_rotation", "rotate", "unrotate", "padded_in_features"]

# A factorisation k1·k2 is accepted when k1 ≥ √Kp / _MAX_IMBALANCE; otherwise Kp grows by another d.
_MAX_IMBALANCE = 4


def _balanced_factor(n: int) -> int:
    """Largest divisor of n that is ≤ √n."""
    for k in range(math.isqrt(n), 0, -1):
        if n % k == 0:
            return k
    return 1


def padded_in_features(in_features: int, block: int) -> tuple[int, int, int]:
    """Padded input size and its Kronecker factors.

    Returns (Kp, k1, k2): the smallest Kp ≥ in_features that is a multiple of ``block`` and factors as
    k1·k2 with k1 ≤ k2 ≤ _MAX_IMBALANCE²·k1 (so the rotation stays O(K·√K)).
    """
    if in_features < 1 or block < 1:
        raise ValueError(f"in_features and block must be positive, got {in_features}, {block}")
    kp = -(-in_features // block) * block
    while True:
        k1 = _balanced_factor(kp)
        if k1 * _MAX_IMBALANCE >= math.isqrt(kp) or kp < 64:
            return kp, k1, kp // k1
        kp += block


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Hadamard for powers of two, else Haar-random orthogonal (QR of a Gaussian, sign-fixed)."""
    if n & (n - 1) == 0:
        return _hadamard(n)
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    # One thread: LAPACK's blocked QR rounds differently with more (at n = 461, 1 of 212521 float32
    # factors changed between 1 and 2 threads), and a seed must give the same rotation everywhere.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, r = torch.linalg.qr(gaussian)
    finally:
        torch.set_num_threads(threads)
    return (q * torch.sign(torch.diagonal(r))).contiguous()  # LAPACK's Q is column-major


def check_rotation(signs: Optional[torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> None:
    """Raise ValueError unless ``left`` is (k1, k1), ``right`` (k2, k2) and ``signs`` (if given) (k1·k2,):
    :func:`rotate`, :func:`unrotate` and the kernels each read k1 and k2 off one dimension of the factors,
    so another shape gave a result of the wrong length or a shape error deep inside."""
    for name, factor, k in (("rotation_left", left, "k1"), ("rotation_right", right, "k2")):
        if factor.dim() != 2 or factor.shape[0] != factor.shape[1]:
            raise ValueError(f"{name} must be a square ({k}, {k}) matrix, got {tuple(factor.shape)}")
    kp = left.shape[0] * right.shape[0]
    if signs is not None and tuple(signs.shape) != (kp,):
        raise ValueError(f"the rotation's signs must be ({kp},) = k1·k2 for factors {tuple(left.shape)} and "
                         f"{tuple(right.shape)}, got {tuple(signs.shape)}")


@dataclass(frozen=True, eq=False)
class Rotation:
    """A Kronecker rotation of a padded input dimension.

    Attributes:
        signs: (Kp,) float32 of ±1.
        left: (k1, k1) float32 orthogonal (P1).
        right: (k2, k2) float32 orthogonal (P2).
    """

    signs: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self):
        check_rotation(self.signs, self.left, self.right)

    @property
    def padded_features(self) -> int:
        return self.signs.shape[0]


SEED_LIMIT = 2**43  # the generator's seed, seed·1_000_003 + Kp, must fit in 63 bits


def check_seed(seed, what: str = "seed") -> None:
    """Raise ValueError unless ``seed`` is an int in [0, :data:`SEED_LIMIT`) (a bool is not)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{what} must be a non-negative int below 2**43, got {seed!r}")


def make_rotation(in_features: int, block: int, seed: int = 0) -> Rotation:
    """The deterministic rotation for an input size, lattice block length and seed (float32, CPU)."""
    kp, k1, k2 = padded_in_features(in_features, block)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + kp)
    signs = torch.randint(0, 2, (kp,), generator=g, dtype=torch.int64) * 2 - 1
    left, right = _orthogonal(k1, g), _orthogonal(k2, g)
    return Rotation(signs.to(torch.float32), left.to(torch.float32), right.to(torch.float32))


def rotate(v: torch.Tensor, signs: Optional[torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``Rᵀ pad(v)`` along the last dimension.

    Args:
        v: (..., K) with K ≤ Kp.
        signs, left, right: the rotation (see :class:`Rotation`), same dtype as the computation;
            ``signs=None`` when ``v`` already carries them (scale folding multiplied them in upstream).
    Returns:
        (..., Kp), same dtype as ``v``.
    """
    k1, k2 = left.shape[0], right.shape[0]
    kp = k1 * k2
    if v.shape[-1] > kp:  # a negative pad would crop silently
        raise ValueError(f"rotate: {v.shape[-1]} features for a rotation of {kp}; make the rotation for this width")
    v = torch.nn.functional.pad(v, (0, kp - v.shape[-1]))
    if signs is not None:
        v = v * signs
    # (P1 ⊗ P2)ᵀ vec(V) = vec(P1ᵀ V P2) for row-major vec.
    out = torch.matmul(left.T, v.unflatten(-1, (k1, k2))) @ right
    return out.flatten(-2)


def unrotate(u: torch.Tensor, signs: Optional[torch.Tensor], left: torch.Tensor, right: torch.Tensor, in_features: int) -> torch.Tensor:
    """Adjoint of :func:`rotate`: ``R u`` cropped to the first ``in_features``; its inverse too when the
    factors are orthogonal (as :func:`make_rotation`'s are; fine-tuned ones need not be).

    Args:
        u: (..., Kp).
        signs: as in :func:`rotate` (None: leave them to the caller).
        left, right: (k1, k1) and (k2, k2) factors, or stacks of them (..., k1, k1) that broadcast
            against u's leading dimensions (one rotation per weight of a stack).
    Returns:
        (..., in_features).
    """
    k1, k2 = left.shape[-1], right.shape[-1]
    out = (torch.matmul(left, u.unflatten(-1, (k1, k2))) @ right.transpose(-1, -2)).flatten(-2)
    if signs is not None:
        out = out * signs
    return out[..., :in_features]
