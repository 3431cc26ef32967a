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

__all__ = ["Lattice", "LatticeError", "train_lattice", "measure_mse"]


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
        # A copy: the caller may change its tensor in place (train_lattice's Adam does), and the search's
        # tables are cached by M's values at first use.
        object.__setattr__(self, "M", self.M.detach().to(torch.float32).clone(memory_format=torch.contiguous_format))

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


# ----- training -------------------------------------------------------------------------------


def _orthonormal_rows(d: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """(d, D) float32 with orthonormal rows (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(D, d, generator=gen, dtype=torch.float64))
    return q.T.to(torch.float32).contiguous()


def measure_mse(
    lattice: Lattice, n_vectors: int = 200_000, *, seed: int = 1234, device=None, beam_width: int | None = None
) -> float:
    """MSE per coordinate of ``lattice`` on ``n_vectors`` fresh N(0,1) vectors, with ``nearest_codes``.

    Args:
        lattice: the lattice to measure.
        n_vectors: number of d-dimensional Gaussian vectors (blocks).
        seed: seed of the vectors (fixed so measurements are comparable).
        device: where to run (default: where ``lattice.M`` lives).
        beam_width: the search's beam width (None = the lattice's default).
    Returns:
        mean of ``||w − M q||² / d`` over the vectors.
    """
    from lift_ao.search import nearest_codes

    device = torch.device(device) if device is not None else lattice.M.device
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_vectors, lattice.d, generator=gen).to(device)
    lat = lattice.to(device)
    codes = nearest_codes(w, lat, beam_width=beam_width)
    return float((w - lat.decode(codes)).square().double().mean())


# Up to this D the trainer uses the whole codebook (2^D points) in the soft-min and exact nearest
# neighbours in the Lloyd steps; above it, candidates around the encoder's code.
MAX_EXACT_TRAIN_D = 18


def _softmin_loss(w: torch.Tensor, points: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-min (log-sum-exp) of the per-block squared error over candidate points.

    w: (B, d); points: (B, K, d) candidate codebook points per block, or (K, d) shared by all
    blocks (the whole codebook). Returns the mean over blocks of
    ``−(1/T) log Σ_k exp(−T ||w − p_k||²)``.
    """
    if points.dim() == 2:
        # ||w||² − 2 w·p + ||p||² as one matmul: (B, K) without a (B, K, d) intermediate.
        err = torch.addmm(points.square().sum(1), w, points.T, alpha=-2) + w.square().sum(1, keepdim=True)
    else:
        err = (w[:, None, :] - points).square().sum(dim=2)
    return (-torch.logsumexp(-temperature * err, dim=1) / temperature).mean()


def _exact_codes(w: torch.Tensor, lattice: Lattice, chunk: int = 4096, beam_width: int | None = None) -> torch.Tensor:
    """(B, D) ±1 float codes of the true nearest neighbours when D ≤ ``MAX_EXACT_TRAIN_D``
    (``exhaustive_codes`` in chunks of blocks, so memory stays ``chunk · 2^D`` floats), else of
    ``nearest_codes`` (the production encoder) with ``beam_width``."""
    from lift_ao.search import exhaustive_codes, nearest_codes

    if lattice.D > MAX_EXACT_TRAIN_D:
        return nearest_codes(w, lattice, beam_width=beam_width).float() * 2 - 1
    return torch.cat([exhaustive_codes(w[i : i + chunk], lattice) for i in range(0, len(w), chunk)]).float() * 2 - 1


def _flip_candidates(w: torch.Tensor, M: torch.Tensor, beam_width: int | None) -> torch.Tensor:
    """(B, D + 1, D) ±1 soft-min candidates of each block above ``MAX_EXACT_TRAIN_D``: the code of
    :func:`_exact_codes` (the encoder's) and its D single-bit flips. No gradient flows through them."""
    d, D = M.shape
    with torch.no_grad():
        q = _exact_codes(w, Lattice(d, D, M.detach()), beam_width=beam_width)
        flips = 1 - 2 * torch.eye(D, device=w.device)  # (D, D): row i flips bit i
        return torch.cat([q[:, None, :], q[:, None, :] * flips[None]], dim=1)


def _cosine_lr(lr: float, progress: float) -> float:
    """Adam's learning rate at ``progress`` ∈ [0, 1]: cosine decay to 5% of ``lr``, so the last
    steps refine instead of jittering around the optimum."""
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lattice(
    d: int,
    D: int,
    *,
    seed: int = 0,
    restarts: int = 2,
    adam_steps: int = 300,
    batch: int = 8192,
    lr: float = 3e-3,
    temperature: float = 10.0,
    temperature_start: float | None = None,
    lloyd_steps: int = 30,
    lloyd_vectors: int = 200_000,
    eval_vectors: int = 200_000,
    max_seconds: float | None = None,
    device=None,
    command: str = "",
    log=print,
    beam_width: int | None = None,
    init: Lattice | None = None,
) -> Lattice:
    """Fit a lattice's M to i.i.d. N(0,1) vectors (least MSE under ``nearest_codes``).

    Per restart (seeded ``seed + restart``): M starts with orthonormal rows; ``adam_steps`` Adam
    steps (cosine-decayed learning rate) on the soft-min of the per-block squared error, its
    temperature going geometrically from ``temperature_start`` (default: ``temperature``) to
    ``temperature`` (optional annealing; measured no better than a constant temperature, see
    benchmarks/NOTES_search.md). The soft-min runs over the whole codebook when
    ``D ≤ MAX_EXACT_TRAIN_D``; above, over the code found by ``nearest_codes`` and its D
    single-bit flips. Then ``lloyd_steps`` Lloyd steps: codes Q of ``lloyd_vectors`` fresh vectors
    W from the exact nearest neighbour (D ≤ ``MAX_EXACT_TRAIN_D``) or ``nearest_codes``, then
    ``M = Wᵀ Q (QᵀQ)⁻¹`` (least squares; with exact codes each step cannot raise the MSE on its
    sample). The MSE is measured on held-out vectors after the Adam phase and every 5 Lloyd
    steps; the best M over all phases and restarts is returned.

    Args:
        d, D: block length and code length (0 < d < D).
        seed: base seed (restart r uses ``seed + r``); the same seed gives the same lattice.
        restarts, adam_steps, batch, lr, temperature, temperature_start, lloyd_steps,
            lloyd_vectors: as above (with the whole codebook, the batch is capped at 2^28 / 2^D
            blocks so the (batch, 2^D) error matrix stays ≤ 1 GiB).
        eval_vectors: fresh vectors for the stored ``mse`` (measured with ``nearest_codes``).
        max_seconds: optional wall-clock budget; each restart gets an equal share, its Adam phase
            stops at 80% of the share (its learning-rate and temperature schedules follow the
            elapsed fraction of that time when it runs ahead of the step count) and its Lloyd
            phase at 100%. The steps actually done are
            recorded in the metadata (results are deterministic only when the budget is not hit).
        device: where to train (default CPU).
        command: the command line that produced it (stored in metadata).
        log: a print-like callable for progress (None = silent).
        beam_width: beam width of ``nearest_codes`` for the soft-min candidates, the Lloyd codes and
            every MSE measurement (D > ``MAX_EXACT_TRAIN_D``). When given, it is stored in the
            metadata as ``beam_width`` and becomes the lattice's default
            (:func:`lift_ao.search.default_beam_width`): M is fitted to that search.
        init: start every restart from this lattice's M (same d, D; fine-tuning) instead of
            orthonormal rows; recorded in the metadata by name and fingerprint.
    Returns:
        the trained :class:`Lattice`; ``mse`` is its measured MSE per coordinate on
        ``eval_vectors`` fresh N(0,1) vectors, metadata holds command, seed and training settings.
    """
    import time

    from lift_ao.search import _all_sign_vectors

    from lift_ao.search import check_beam_width

    if not (isinstance(d, int) and isinstance(D, int) and 0 < d < D):
        raise LatticeError(f"train_lattice needs integers 0 < d < D, got d={d!r}, D={D!r}")
    check_beam_width(beam_width)
    if init is not None and (init.d, init.D) != (d, D):
        raise LatticeError(f"init lattice {init.name} does not have d={d}, D={D}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    log = log or (lambda *args: None)
    share = (max_seconds / restarts) if max_seconds else float("inf")
    exact = D <= MAX_EXACT_TRAIN_D
    codebook = _all_sign_vectors(D, device) if exact else None  # (2^D, D)
    batch = min(batch, max(1, 2**28 >> D)) if exact else batch
    t_start = temperature if temperature_start is None else temperature_start
    best_M, best_mse, done = None, float("inf"), []

    def held_out_mse(M):
        # Held-out vectors during training use a different seed from the final measurement.
        return measure_mse(
            Lattice(d, D, M.detach()), min(eval_vectors, 50_000), seed=10_000 + seed, device=device, beam_width=beam_width
        )

    for restart in range(restarts):
        began = time.monotonic()
        gen = torch.Generator().manual_seed(seed + restart)
        M = (init.M.clone() if init is not None else _orthonormal_rows(d, D, gen)).to(device).requires_grad_(True)
        opt = torch.optim.Adam([M], lr=lr)
        adam_done = 0
        for adam_done in range(1, adam_steps + 1):
            # Progress through the schedules: by steps, or by time when the budget is the tighter
            # limit, so a cut-short run still ends with a small learning rate and a hard soft-min.
            progress = max((adam_done - 1) / max(1, adam_steps - 1), (time.monotonic() - began) / (0.8 * share))
            if progress > 1:
                break
            opt.param_groups[0]["lr"] = _cosine_lr(lr, progress)
            T = t_start * (temperature / t_start) ** progress
            w = torch.randn(batch, d, generator=gen).to(device)
            if exact:
                points = codebook @ M.T  # (2^D, d)
            else:
                points = _flip_candidates(w, M, beam_width) @ M.T  # (B, D + 1, d)
            loss = _softmin_loss(w, points, T)
            opt.zero_grad()
            loss.backward()
            opt.step()
        M = M.detach()
        mse = held_out_mse(M)
        log(f"[{D}/{d}] restart {restart}: adam ({adam_done} steps) mse {mse:.5f}")
        if mse < best_mse:
            best_M, best_mse = M.clone(), mse
        lloyd_done = 0
        for lloyd_done in range(1, lloyd_steps + 1):
            w = torch.randn(lloyd_vectors, d, generator=gen).to(device)
            q = _exact_codes(w, Lattice(d, D, M), beam_width=beam_width)
            M_new = torch.linalg.solve(q.T.double() @ q.double(), q.T.double() @ w.double()).T  # (d, D)
            if not torch.isfinite(M_new).all():
                break
            M = M_new.float().contiguous()
            over_time = time.monotonic() - began > share
            if lloyd_done % 5 == 0 or lloyd_done == lloyd_steps or over_time:
                mse = held_out_mse(M)
                log(f"[{D}/{d}] restart {restart}: lloyd step {lloyd_done} mse {mse:.5f}")
                if mse < best_mse:
                    best_M, best_mse = M.clone(), mse
            if over_time:
                break
        done.append(f"{adam_done}+{lloyd_done}")
    lattice = Lattice(d, D, best_M.cpu())
    mse = measure_mse(lattice, eval_vectors, device=device, beam_width=beam_width)
    extra = {}
    if beam_width is not None:
        extra["beam_width"] = beam_width
    if init is not None:
        extra["init"] = f"{init.name} fingerprint {init.fingerprint}"
    metadata = dict(
        command=command or f"train_lattice(d={d}, D={D}, seed={seed})",
        seed=seed,
        restarts=restarts,
        adam_steps=adam_steps,
        batch=batch,
        lr=lr,
        temperature=temperature,
        temperature_start=t_start,
        softmin_candidates="whole codebook" if exact else "nearest_codes + single flips",
        lloyd_steps=lloyd_steps,
        lloyd_vectors=lloyd_vectors,
        lloyd_codes="exhaustive" if exact else "nearest_codes",
        steps_done="adam+lloyd per restart: " + ", ".join(done),
        mse_eval=f"nearest_codes on {eval_vectors} fresh N(0,1) vectors, seed 1234"
        + (f", beam width {beam_width}" if beam_width is not None else ""),
        **extra,
    )
    return Lattice(d, D, best_M.cpu(), mse, metadata)


def _lattice_arg(value: str) -> Lattice:
    """A lattice named on the command line: a ``.safetensors`` path or a shipped name ``D/d``."""
    return Lattice.from_file(value) if str(value).endswith(".safetensors") else Lattice.load(value)


def _listing() -> list[dict]:
    """One row per shipped lattice (bits, then d): name, d, D, bits, measured MSE, the Shannon bound
    2^(−2·bits) and the search's default beam width."""
    from lift_ao.search import default_beam_width

    return [{"name": lat.name, "d": lat.d, "D": lat.D, "bits": lat.bits, "mse": lat.mse,
             "shannon_mse": 2 ** (-2 * lat.bits), "beam_width": default_beam_width(lat)} for lat in Lattice.shipped()]


def main(argv=None) -> int:
    """``python -m lift_ao.lattice`` / ``lift-ao lattice``: ``train`` a lattice, or ``list`` the shipped ones.

    Returns:
        the exit code (0; argparse exits with 2 on bad arguments).
    """
    import argparse
    import json
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog="lift-ao lattice", description="LiftQuant lattices")
    sub = parser.add_subparsers(dest="verb", required=True)
    listing = sub.add_parser("list", help="the shipped lattices: rate, MSE against the Shannon bound, beam width")
    listing.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    train = sub.add_parser("train", help="train a lattice (d, D) on N(0,1) vectors and save it")
    train.add_argument("--d", type=int, required=True, help="block length")
    train.add_argument("--D", type=int, required=True, help="code length (bits per block)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--restarts", type=int, default=2)
    train.add_argument("--adam-steps", type=int, default=300)
    train.add_argument("--batch", type=int, default=8192)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--temperature", type=float, default=10.0, help="soft-min temperature at the end of Adam")
    train.add_argument("--temperature-start", type=float, default=None, help="at the start (annealed geometrically)")
    train.add_argument("--lloyd-steps", type=int, default=30)
    train.add_argument("--lloyd-vectors", type=int, default=200_000)
    train.add_argument("--eval-vectors", type=int, default=200_000, help="fresh vectors for the stored mse")
    train.add_argument("--max-seconds", type=float, default=None, help="wall-clock budget (see train_lattice)")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    train.add_argument("--beam-width", type=int, default=None,
                       help="search beam width used in training and stored as the lattice's default")
    train.add_argument("--init", default=None, help="start from this lattice (shipped name 'D/d' or a .safetensors file)")
    train.add_argument("--out", default=None, help="output file (default lift_ao/lattices/lq_{D}_{d}.safetensors)")
    args = parser.parse_args(argv)
    if args.verb == "list":
        rows = _listing()
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"{'lattice':>8} {'bits':>6} {'mse':>8} {'Shannon':>8} {'beam':>5}")
            for row in rows:
                print(f"{row['name']:>8} {row['bits']:6.3f} {row['mse']:8.5f} {row['shannon_mse']:8.5f} "
                      f"{row['beam_width']:5d}")
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" in argv:  # where the file goes does not change the lattice: keep it out of the record
        del argv[argv.index("--out") : argv.index("--out") + 2]
    command = "python -m lift_ao.lattice " + " ".join(shlex.quote(a) for a in argv)
    lattice = train_lattice(
        args.d, args.D, seed=args.seed, restarts=args.restarts, adam_steps=args.adam_steps,
        batch=args.batch, lr=args.lr, temperature=args.temperature, temperature_start=args.temperature_start,
        lloyd_steps=args.lloyd_steps, lloyd_vectors=args.lloyd_vectors, eval_vectors=args.eval_vectors,
        max_seconds=args.max_seconds, device=device, command=command, beam_width=args.beam_width,
        init=_lattice_arg(args.init) if args.init else None,
    )
    out = args.out or str(_lattice_dir() / Lattice.file_name(args.D, args.d))
    lattice.save(out)
    print(f"{lattice.name}: mse {lattice.mse:.5f} (Shannon {2 ** (-2 * lattice.bits):.5f}) -> {out}")
    return 0


if __name__ == "__main__":
    # Run the copy imported as lift_ao.lattice, so that lift_ao.search sees the same Lattice class.
    from lift_ao.lattice import main as _package_main

    raise SystemExit(_package_main())
