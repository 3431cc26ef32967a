"""Nearest-neighbour search in a LiftQuant codebook ``{M q : q ∈ {−1,+1}^D}``.

Three searches, all batched over blocks, chunked (bounded memory) and written as plain torch so the
same code runs on CPU and CUDA (device = ``x.device``):

- :func:`nearest_codes` — the fast search the quantizer uses: a beam (K-best) tree search on the
  Cholesky form of the error, a few bits at a time, then single-bit-flip descent.
- :func:`enumerate_codes` — the paper's heuristic, every padding ``p ∈ {±1}^(D−d)``; the reference
  the fast search is measured against (cost 2^(D−d) candidates per block).
- :func:`exhaustive_codes` — the true nearest neighbour over all 2^D codes (D ≤ 20 only).

Codes are returned as bool tensors, True = +1.

The quadratic form: with ``q ∈ {±1}^D``, ``||w − M q||² = qᵀ G q − 2 bᵀ q + ||w||²`` where
``G = MᵀM`` and ``b = Mᵀ w``. Since ``||q||² = D`` is constant, ``G`` may be replaced by
``A = G + λI`` (full rank) and the error becomes ``||R (q − c)||² + const`` with ``A = RᵀR``
(Cholesky, R upper triangular) and ``c = A⁻¹ b``. Row i of ``R (q − c)`` only involves bits
``j ≥ i``, so the error splits into non-negative terms that can be summed from the last bit up:
a tree search. Deciding bits in groups of g makes each step a small matmul against the table of
all 2^g patterns, which is what keeps it fast on a CPU. (Greedy bit-flip descent and sampled
paddings alone were measured and lose 5–40% MSE against the enumeration: see
benchmarks/NOTES_search.md.)

Bit flips: keeping ``s = G q − b`` (= ``−Mᵀ r`` for the residual ``r = w − M q``), flipping bit i
changes the error by ``4 (G_ii − q_i s_i)``, for all i at once in O(D) per block; after flipping
i, ``s ← s − 2 q_i G[:, i]``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch

from lift_ao.lattice import Lattice, LatticeError

__all__ = ["nearest_codes", "default_beam_width", "check_beam_width", "enumerate_codes", "exhaustive_codes", "code_errors"]

# Largest D for which the exhaustive search is allowed (2^20 codes per block).
MAX_EXHAUSTIVE_D = 20

# Fast-search settings, chosen by measurement (benchmarks/NOTES_search.md). The tree search decides
# the bits in groups: the first group of _FIRST_GROUP_BITS bits from the root, then groups of
# _GROUP_BITS, keeping the _BEAM_WIDTH best partial codes after each group. The λ of the
# regularised form G + λI is an MMSE-like choice, about the expected error per coordinate:
# _RIDGE_PER_SHANNON · 2^(−2·bits) (trained lattices land at 1.3–1.5× the Shannon bound).
_FIRST_GROUP_BITS = 8
_GROUP_BITS = 4
#
# Default beam width per lattice (benchmarks/results/encode_beam_cpu.md: same 20k N(0,1) blocks for
# every K, MSE relative to K = 32). D < 40: K = 64 gains only 0.4-1.0% (24/10 0.4%, 32/16 0.5%,
# 24/8 0.8%, 32/10 1.0%), so K stays 32 and those codes are unchanged. D ≥ 40: K = 64 gains
# 1.1-2.0% (48/24 1.1%, 40/16 1.2%, 48/20 1.5%, 48/16 2.0%) and K = 128 only 0.4-0.8% more at
# twice the cost again, so K = 64 there: ~2× the CPU time of K = 32, ~1.6× on an H100 (K = 32 → 128
# measured 2.5-3× there). A lattice that records its own beam width (metadata ``beam_width``,
# e.g. one trained with ``--beam-width``) uses that.
_BEAM_WIDTH = 32
_WIDE_BEAM_WIDTH = 64
_WIDE_BEAM_MIN_D = 40
_RIDGE_PER_SHANNON = 1.4
_MAX_FLIP_STEPS = 16


def _check_input(x: torch.Tensor, lattice: Lattice) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, {lattice.d}), got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != lattice.d:
        raise ValueError(
            f"x must have shape (B, d) = (B, {lattice.d}) for lattice {lattice.name}, got {tuple(x.shape)}; "
            f"reshape the weights into blocks of {lattice.d} first"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    # NaN/Inf blocks would get an arbitrary code. Checked where it costs nothing: on a GPU the check is a
    # host sync per call of the LDLQ loop, whose weights quantize/calibrate have already checked.
    if x.device.type == "cpu" and not torch.isfinite(x).all():
        raise ValueError("x holds NaN/Inf values; no lattice point is nearest to them (fix the weights first)")
    return x.to(torch.float32)


def _check_chunk(chunk_size, default: int) -> int:
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def code_errors(x: torch.Tensor, codes: torch.Tensor, lattice: Lattice) -> torch.Tensor:
    """Squared error of each block under its code.

    Args:
        x: (B, d) float blocks.
        codes: (B, D) bool (True = +1) or ±1 codes.
        lattice: the lattice.
    Returns:
        (B,) float32 ``||x_b − M q_b||²``.
    """
    x = _check_input(x, lattice)
    return (x - lattice.decode(codes.to(x.device))).square().sum(dim=1)


# ----- per-lattice tables ---------------------------------------------------------------------


class _Uncached:
    """Passes a value through ``lru_cache`` without making it part of the key.

    The table caches are keyed by the lattice's fingerprint (and device); a :class:`Lattice` hashes
    by identity, and ``lattice.to(device)`` (done per weight by the encoder) makes a new object, so
    keying on it rebuilt the tables for every weight.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other) -> bool:
        return isinstance(other, _Uncached)


@lru_cache(maxsize=64)
def _null_space_tables(fingerprint: str, carried: _Uncached, device: torch.device):
    """(pseudo-inverse as (d, D) so that ``u = x @ it`` is M⁺x, null-space basis N (D−d, D)).

    ``[M; N]⁻¹ [w; p] = M⁺ w + Nᵀ p`` when N's rows are an orthonormal basis of M's null space,
    which is what the SVD gives. Computed in float64 once per lattice and device.
    """
    lattice = carried.value
    M = lattice.M.detach().cpu().to(torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)
    pinv_t = (Vh[: lattice.d].T / S) @ U.T  # (D, d)
    null_basis = Vh[lattice.d :]  # (D − d, D)
    return pinv_t.T.contiguous().to(device, torch.float32), null_basis.to(device, torch.float32)


@dataclass(frozen=True)
class _TreeLevel:
    """One group of bits ``[start, end)`` (in tree order) of the beam search, with its tables."""

    start: int
    end: int
    patterns: torch.Tensor  # (2^n, n) ±1: every assignment of the group's n bits
    R_group_t: torch.Tensor  # (n, n): R[start:end, start:end]ᵀ
    pattern_proj: torch.Tensor  # (n, 2^n): R_group @ patternsᵀ, so t @ it = (R_groupᵀ t)·pattern
    pattern_quad: torch.Tensor  # (2^n,): ||R_group · pattern||²
    R_above_t: torch.Tensor  # (n, start): R[:start, start:end]ᵀ, this group's effect on rows above
    pattern_above: torch.Tensor  # (2^n, start): patterns @ R_above_t


@dataclass(frozen=True)
class _TreeTables:
    perm: torch.Tensor  # (D,) tree position -> bit index
    center_map: torch.Tensor  # (d, D): x @ it = c = (G + λI)⁻¹ Mᵀ x, in tree order
    levels: tuple  # _TreeLevel, root first
    M: torch.Tensor  # (d, D)
    G: torch.Tensor  # (D, D) MᵀM in bit order, for the bit-flip polish
    G_diag: torch.Tensor  # (D,)


def _bit_order(A: torch.Tensor) -> list[int]:
    """Tree order of the bits: the last position (decided first) gets the most reliable bit.

    Greedy, as in sorted/V-BLAST detection: among the undecided bits, the one with the smallest
    diagonal of the inverse of A restricted to them (the smallest conditional error variance) is
    decided next.
    """
    remaining = list(range(A.shape[0]))
    decided_first = []
    while remaining:
        inverse_diag = torch.linalg.inv(A[remaining][:, remaining]).diagonal()
        decided_first.append(remaining.pop(int(torch.argmin(inverse_diag))))
    return decided_first[::-1]


def _group_sizes(D: int) -> list[int]:
    sizes = [min(_FIRST_GROUP_BITS, D)]
    while sum(sizes) < D:
        sizes.append(min(_GROUP_BITS, D - sum(sizes)))
    return sizes


@lru_cache(maxsize=64)
def _tree_tables(fingerprint: str, carried: _Uncached, device: torch.device) -> _TreeTables:
    """Cholesky form of the search: ``qᵀ(G + λI)q − 2bᵀq = ||R(q − c)||² + const`` (q ∈ ±1^D).

    Computed in float64 once per lattice and device; stored in float32 on ``device``.
    """
    lattice = carried.value
    M = lattice.M.detach().cpu().to(torch.float64)
    D = lattice.D
    ridge = _RIDGE_PER_SHANNON * 2 ** (-2 * lattice.bits)
    A = M.T @ M + ridge * torch.eye(D, dtype=torch.float64)
    perm = torch.tensor(_bit_order(A))
    A_tree = A[perm][:, perm]
    R = torch.linalg.cholesky(A_tree).T  # upper triangular, A_tree = RᵀR
    center_map = M[:, perm] @ torch.linalg.inv(A_tree)

    def f32(t):
        return t.to(device, torch.float32).contiguous()

    levels, end = [], D
    for n in _group_sizes(D):
        start = end - n
        patterns = ((torch.arange(2**n)[:, None] >> torch.arange(n)) & 1).to(torch.float64) * 2 - 1
        R_group = R[start:end, start:end]
        R_above_t = R[:start, start:end].T
        levels.append(
            _TreeLevel(
                start, end, f32(patterns), f32(R_group.T), f32(R_group @ patterns.T),
                f32((patterns @ R_group.T).square().sum(1)), f32(R_above_t), f32(patterns @ R_above_t),
            )
        )
        end = start
    M_device = lattice.M.to(device)
    G = M_device.T @ M_device
    return _TreeTables(
        perm.to(device), f32(center_map), tuple(levels), M_device, G.contiguous(), G.diagonal().contiguous()
    )


# ----- fast search ----------------------------------------------------------------------------


def _beam_search(x: torch.Tensor, tables: _TreeTables, beam_width: int) -> torch.Tensor:
    """Beam (K-best) tree search on ``||R(q − c)||²``, groups of bits at a time.

    Args:
        x: (B, d) float32 blocks.
        tables: the lattice's :class:`_TreeTables`.
        beam_width: partial codes kept after each group but the last (K).
    Returns:
        (B, D) ±1 float codes in bit order: the best complete code reached by the beam.
    """
    B = x.shape[0]
    c = x @ tables.center_map  # (B, D) real centre, tree order
    cost = torch.zeros(B, 1, dtype=x.dtype, device=x.device)
    # above[b, k, i] = Σ_{decided j} R[i, j] (q_j − c_j) for the rows i still to decide.
    above = None
    history = []
    for level in tables.levels:
        start, end, width = level.start, level.end, cost.shape[1]
        target = (c[:, start:end] @ level.R_group_t)[:, None, :]
        if above is not None:
            target = target - above[:, :, start:end]
        target = target.expand(B, width, end - start).reshape(B * width, end - start)
        # ||R_g p − t||² = ||R_g p||² − 2 (R_gᵀ t)·p + ||t||², for every pattern p at once.
        score = torch.addmm(level.pattern_quad, target, level.pattern_proj, alpha=-2).view(B, width, -1)
        score += (cost + target.square().sum(1).view(B, width))[:, :, None]
        n_patterns = score.shape[2]
        if start == 0:
            # Last group: only the single best complete code is needed (a min, not a top-K).
            cost, flat = score.view(B, -1).min(dim=1, keepdim=True)
        else:
            keep = min(beam_width, width * n_patterns)
            cost, flat = torch.topk(score.view(B, -1), keep, dim=1, largest=False, sorted=False)
        parent, pattern = flat // n_patterns, flat % n_patterns
        history.append((parent, pattern, level))
        if start > 0:
            new_above = level.pattern_above[pattern] - (c[:, start:end] @ level.R_above_t)[:, None, :]
            if above is not None:
                new_above += torch.gather(above[:, :, :start], 1, parent[:, :, None].expand(-1, -1, start))
            above = new_above
    # Walk back up the tree to spell out the winning code.
    codes_tree = torch.empty(B, len(tables.perm), dtype=x.dtype, device=x.device)
    lineage = torch.zeros(B, 1, dtype=torch.long, device=x.device)
    for parent, pattern, level in reversed(history):
        codes_tree[:, level.start : level.end] = level.patterns[torch.gather(pattern, 1, lineage)[:, 0]]
        lineage = torch.gather(parent, 1, lineage)
    codes = torch.empty_like(codes_tree)
    codes[:, tables.perm] = codes_tree
    return codes


def _descend_single_flips(q: torch.Tensor, s: torch.Tensor, G: torch.Tensor, G_diag: torch.Tensor):
    """Greedy steepest descent with single-bit flips, in place on ±1 codes ``q`` and ``s = Gq − b``.

    q, s: (R, D). Each step flips, in every row that can still improve, the bit with the most
    negative gain ``G_ii − q_i s_i`` (a quarter of the change in squared error); stops when no row
    improves or after ``_MAX_FLIP_STEPS`` steps.
    """
    rows = torch.arange(q.shape[0], device=q.device)
    for _ in range(_MAX_FLIP_STEPS):
        gain, bit = torch.min(G_diag - q * s, dim=1)
        improving = gain < -1e-5
        if not bool(improving.any()):
            break
        rows_i, bit_i = rows[improving], bit[improving]
        q_old = q[rows_i, bit_i]
        s[rows_i] -= (2 * q_old)[:, None] * G[bit_i]
        q[rows_i, bit_i] = -q_old


def _nearest_chunk(x: torch.Tensor, tables: _TreeTables, beam_width: int) -> torch.Tensor:
    q = _beam_search(x, tables, beam_width)
    # The beam's cost is the true error up to a constant (λ(||q||² − D) = 0), but a beam can drop
    # the optimum on the way: a single-flip polish fixes the cheap cases (0.03–0.05% MSE, measured).
    _descend_single_flips(q, q @ tables.G - x @ tables.M, tables.G, tables.G_diag)
    return q > 0


def default_beam_width(lattice: Lattice) -> int:
    """The beam width K that :func:`nearest_codes` uses for ``lattice`` when none is given.

    A lattice trained or fine-tuned for a given search records it (metadata ``beam_width``,
    ``python -m lift_ao.lattice train --beam-width K``): its M and stated MSE belong to that search.
    Otherwise ``_WIDE_BEAM_WIDTH`` for D ≥ ``_WIDE_BEAM_MIN_D`` and ``_BEAM_WIDTH`` below (see there
    for the measurements).

    Args:
        lattice: the lattice (its ``D`` and ``metadata``).
    Returns:
        K, a positive int.
    """
    stored = lattice.metadata.get("beam_width")
    if stored is not None:
        try:
            return check_beam_width(int(stored))
        except ValueError:
            raise LatticeError(f"lattice {lattice.name} records beam_width {stored!r} in its metadata, not a positive "
                               "int: retrain or re-save the lattice with --beam-width K") from None
    return _WIDE_BEAM_WIDTH if lattice.D >= _WIDE_BEAM_MIN_D else _BEAM_WIDTH


def check_beam_width(beam_width, lattice: Lattice | None = None) -> int | None:
    """Validate a beam width; with a lattice, resolve None to the lattice's default.

    Args:
        beam_width: None or a positive int (partial codes kept per block after each group of bits).
        lattice: the lattice, for the default; without one, None stays None (a config checked
            before its lattice is known).
    Returns:
        the beam width K to use (or None, see above). Raises ValueError for anything but None or a
        positive int.
    """
    if beam_width is None:
        return default_beam_width(lattice) if lattice is not None else None
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(
            f"beam_width must be a positive int (partial codes kept per block, e.g. 32 or 128) or None "
            f"for the lattice's default (default_beam_width), got {beam_width!r}"
        )
    return beam_width


def nearest_codes(
    x: torch.Tensor, lattice: Lattice, *, chunk_size: int | None = None, beam_width: int | None = None
) -> torch.Tensor:
    """Fast (near-)nearest codes: the production search of the quantizer.

    Beam search over a tree: the error is written as ``||R(q − c)||² + const`` (Cholesky of the
    regularised Gram matrix ``MᵀM + λI``; adding λI changes nothing since ``||q||² = D``), bits are
    decided in groups (most reliable first), keeping the best partial codes after each group;
    then single-bit-flip descent on the best code. Deterministic; same torch code on CPU and CUDA.

    Args:
        x: (B, d) float blocks (any float dtype; computed in float32 on ``x.device``).
        lattice: the lattice (its M is moved to ``x.device``).
        chunk_size: blocks per chunk (bounds memory; None = 2048 on CPU, where cache-sized chunks
            are fastest, 65536 elsewhere, where fewer kernel launches are). Results do not depend
            on it.
        beam_width: partial codes kept per block after each group of bits (K); None = the
            lattice's :func:`default_beam_width`. Wider finds closer codes, at roughly linear cost.
    Returns:
        (B, D) bool codes, True = +1.
    """
    x = _check_input(x, lattice)
    chunk = _check_chunk(chunk_size, 2048 if x.device.type == "cpu" else 65536)
    beam = check_beam_width(beam_width, lattice)
    tables = _tree_tables(lattice.fingerprint, _Uncached(lattice), x.device)
    out = torch.empty(x.shape[0], lattice.D, dtype=torch.bool, device=x.device)

    def encode(start: int) -> None:
        out[start : start + chunk] = _nearest_chunk(x[start : start + chunk], tables, beam)

    starts = range(0, x.shape[0], chunk)
    workers = torch.get_num_threads() if x.device.type == "cpu" else 1
    if workers <= 1 or len(starts) <= 1:
        for start in starts:
            encode(start)
        return out
    # On CPU, parallelise over chunks (one single-threaded chunk per worker thread) rather than
    # inside each of the many small ops: intra-op threads meet at a barrier after every op, and
    # when the cores are shared with other processes a descheduled thread stalls them all
    # (measured 5–15x slower than one thread under load). torch ops release the GIL, so the
    # workers run in parallel. The thread count is restored afterwards.
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(encode, starts))
    finally:
        torch.set_num_threads(workers)
    return out


# ----- reference searches ---------------------------------------------------------------------


def _all_sign_vectors(n: int, device) -> torch.Tensor:
    """(2^n, n) float ±1: every sign vector, in binary counting order."""
    if n == 0:
        return torch.ones(1, 0, dtype=torch.float32, device=device)
    bits = torch.arange(2**n, device=device)[:, None] >> torch.arange(n - 1, -1, -1, device=device)
    return (bits & 1).float() * 2 - 1


def enumerate_codes(
    x: torch.Tensor, lattice: Lattice, *, chunk_size: int | None = None, padding_chunk: int = 4096
) -> torch.Tensor:
    """The paper's search: every padding ``p ∈ {±1}^(D−d)``, ``q = sign([M; N]⁻¹ [x; p])``, best kept.

    N spans M's null space (SVD), so ``[M; N]⁻¹ [x; p] = M⁺ x + Nᵀ p``. Cost 2^(D−d) candidates
    per block: use it as a reference on samples, not in production.

    Args:
        x: (B, d) float blocks.
        lattice: the lattice.
        chunk_size: blocks per chunk (None = 256).
        padding_chunk: paddings evaluated at once per block chunk (bounds memory together with
            ``chunk_size``: ``chunk_size · padding_chunk · D`` floats).
    Returns:
        (B, D) bool codes, True = +1.
    """
    x = _check_input(x, lattice)
    chunk = _check_chunk(chunk_size, 256)
    pinv, null_basis = _null_space_tables(lattice.fingerprint, _Uncached(lattice), x.device)
    M = lattice.M.to(x.device)
    n_pad = lattice.D - lattice.d
    out = torch.empty(x.shape[0], lattice.D, dtype=torch.bool, device=x.device)
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        u = xc @ pinv
        best_err = torch.full((xc.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
        best_q = torch.zeros(xc.shape[0], lattice.D, dtype=x.dtype, device=x.device)
        for p_start in range(0, 2**n_pad, padding_chunk):
            count = min(padding_chunk, 2**n_pad - p_start)
            idx = torch.arange(p_start, p_start + count, device=x.device)
            pads = ((idx[:, None] >> torch.arange(n_pad - 1, -1, -1, device=x.device)) & 1).float() * 2 - 1
            q = (u[:, None, :] + (pads @ null_basis)[None] >= 0).to(x.dtype) * 2 - 1  # (b, p, D)
            err = (xc[:, None, :] - q @ M.T).square().sum(dim=2)
            e, i = err.min(dim=1)
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_q[better] = q[better, i[better]]
        out[start : start + chunk] = best_q > 0
    return out


def exhaustive_codes(x: torch.Tensor, lattice: Lattice, *, code_chunk: int = 65536) -> torch.Tensor:
    """True nearest neighbour by brute force over all 2^D codes (D ≤ 20 only).

    Args:
        x: (B, d) float blocks.
        lattice: the lattice; ``lattice.D`` must be ≤ 20.
        code_chunk: codes scored at once (bounds memory: ``B · code_chunk`` floats).
    Returns:
        (B, D) bool codes, True = +1. Ties go to the code that comes first in binary counting
        order (bit 0 most significant, −1 before +1).
    """
    x = _check_input(x, lattice)
    if lattice.D > MAX_EXHAUSTIVE_D:
        raise ValueError(
            f"exhaustive_codes enumerates 2^D codes and supports D ≤ {MAX_EXHAUSTIVE_D}; lattice "
            f"{lattice.name} has D={lattice.D}: use enumerate_codes or nearest_codes instead"
        )
    M = lattice.M.to(x.device)
    best_err = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    best_idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    codes = _all_sign_vectors(lattice.D, x.device)
    for start in range(0, codes.shape[0], code_chunk):
        points = codes[start : start + code_chunk] @ M.T  # (c, d)
        # ||x − p||² up to ||x||²: the ranking is what matters.
        err = points.square().sum(dim=1)[None] - 2 * (x @ points.T)
        e, i = err.min(dim=1)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_idx = torch.where(better, i + start, best_idx)
    return codes[best_idx] > 0
