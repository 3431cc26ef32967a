"""Hessian-aware rounding of rotated weight rows: block LDLQ, then Gauss-Seidel refinement passes.

The rounding step of :func:`lift_ao.calibrate` (one call per group of sibling linears, with their
shared Hessian), kept apart from the block streaming around it:

* **Block LDLQ.** In the rotated domain (``u = Rᵀx``, ``H = E[u uᵀ]``), the blocks of d columns are
  coded left to right with the lattice search, and each block's error is fed back to the columns not
  yet coded through the Cholesky factor of ``H⁻¹`` (GPTQ's update with a d-column vector quantizer, as
  in QuIP#'s block LDLQ). Rows are normalised to unit RMS first, as data-free encoding does, so the
  feedback acts in the domain the lattice was trained for; the row scale is then refitted by least
  squares in the H-metric, ``r = ⟨w, ŵ⟩_H / ⟨ŵ, ŵ⟩_H``. With ``H ∝ I`` no error is fed back and the
  codes are those of the data-free encoding.
* **Refinement** (``refine_passes``). LDLQ codes each block before the later blocks' errors exist;
  Gauss-Seidel passes then revisit every block at its optimum given all the others and keep the new
  code in the rows where the exact H-weighted error falls (:func:`_refine_blocks`).
"""

from __future__ import annotations

import torch

from lift_ao.encode import unit_rms_rows
from lift_ao.lattice import Lattice
from lift_ao.search import nearest_codes

__all__ = ["DEFAULT_REFINE_PASSES", "default_refine_passes", "hessian_encode_rows"]


# Gauss-Seidel passes of calibrate after block LDLQ (hessian_encode_rows' refine_passes). LDLQ codes each
# block before it sees the later blocks' errors; revisiting every block given all the others lowered the
# H-weighted error of SmolLM2's layers by 2.5-3.7 % in two passes, and perplexity with block fine-tuning
# 19.98 -> 19.55, -2.2 % [-4.1, -0.2] (CPU, 16384 tokens, 48/20, 32 windows;
# benchmarks/results/accuracy_refine_16k_cpu.md), for about twice LDLQ's search time.
DEFAULT_REFINE_PASSES = 2


def default_refine_passes(end_to_end: bool) -> int:
    """The refinement passes to run when the user names none: :data:`DEFAULT_REFINE_PASSES`, or 0 when
    the end-to-end stage (:func:`lift_ao.finetune_end_to_end`) follows the block stage.

    Measured on the built-in model's two best GPU recipes (262144 block tokens, 1024 end-to-end steps,
    200 windows): with the passes the held-out KL after the block stage fell 3-4 %, but perplexity moved
    -0.0 % (±0.5 %) at 2.4 and 3.0 bits: the end-to-end stage recovers what the better rounding gives,
    and the passes cost ~4 minutes on the GPU (benchmarks/results/accuracy_w200_refine_h200.md).
    """
    return 0 if end_to_end else DEFAULT_REFINE_PASSES


def hessian_encode_rows(
    rotated: torch.Tensor, hessian: torch.Tensor, lattice: Lattice, *, damping: float = 0.01,
    refine_passes: int = 0, beam_width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code rotated weight rows with block-LDLQ error feedback (the calibrated :func:`lift_ao.encode.encode_rows`).

    Args:
        rotated: (N, Kp) float32 rotated rows, Kp a multiple of ``lattice.d``.
        hessian: (Kp, Kp) symmetric PSD proxy ``E[u uᵀ]`` of the rotated inputs.
        lattice: the lattice (``M`` on ``rotated``'s device).
        damping: added to H's diagonal, as a fraction of its mean diagonal (GPTQ's percdamp).
        refine_passes: Gauss-Seidel passes over the blocks after LDLQ (:func:`_refine_blocks`); each
            lowers (never raises) every row's error in the H-metric, at about LDLQ's cost per pass.
        beam_width: the nearest-code search's beam (None: the lattice's default).
    Returns:
        codes: (N, Kp·D/d) bool, True = +1, block-major.
        row_scale: (N,) float32.
    """
    n, kp = rotated.shape
    d = lattice.d
    _check_count("refine_passes", refine_passes)
    if kp % d:
        raise ValueError(f"rotated rows have {kp} columns, not a multiple of the block length {d}")
    if hessian.shape != (kp, kp):
        raise ValueError(f"hessian must be ({kp}, {kp}) for rows of {kp} columns, got {tuple(hessian.shape)}")
    h = hessian.to(rotated.device, torch.float64)
    mean_diagonal = h.diagonal().mean()
    h = h + (damping * mean_diagonal if mean_diagonal > 0 else 1.0) * torch.eye(kp, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H⁻¹: row block j of U holds how block j's error moves the later columns.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    target = unit_rms_rows(rotated)
    codes = torch.empty(n, kp // d, lattice.D, dtype=torch.bool, device=rotated.device)
    decoded = torch.empty_like(target)
    # One column block of N rows is a small search: on CPU split it into one chunk per thread so the
    # search runs its chunks in parallel, single-threaded each (intra-op threads stall under load).
    chunk = -(-n // torch.get_num_threads()) if rotated.device.type == "cpu" else None
    for j, start in enumerate(range(0, kp, d)):
        stop = start + d
        codes[:, j] = nearest_codes(target[:, start:stop], lattice, chunk_size=chunk, beam_width=beam_width)
        decoded[:, start:stop] = lattice.decode(codes[:, j])
        if stop < kp:
            error = target[:, start:stop] - decoded[:, start:stop]
            feedback = torch.linalg.solve_triangular(u[start:stop, start:stop], u[start:stop, stop:], upper=True)
            target[:, stop:] -= error @ feedback.to(torch.float32)
    row_scale = _row_scale(rotated, decoded, h)
    for _ in range(refine_passes):
        # A zero row (a pruned neuron) has scale 0: its unit-scale target is 0, not 0/0.
        unit = rotated / torch.where(row_scale == 0, 1.0, row_scale)[:, None]
        _refine_blocks(unit, decoded, codes, h, lattice, chunk, beam_width)
        row_scale = _row_scale(rotated, decoded, h)
    return codes.flatten(1), row_scale.to(torch.float32)


def _check_count(name: str, value) -> None:
    """Raise ValueError unless ``value`` is an int >= 0 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _row_scale(rotated: torch.Tensor, decoded: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(N,) float64 least-squares scales s minimising (w − s·ŵ)ᵀ H (w − s·ŵ) per row, for rows w =
    ``rotated`` (N, Kp) and their unit-scale codebook points ŵ = ``decoded`` (N, Kp); H (Kp, Kp) float64.
    Against the original rows, not LDLQ's fed-back targets."""
    hd = decoded.double() @ h
    return (rotated.double() * hd).sum(1) / (decoded.double() * hd).sum(1).clamp_min(1e-30)


def _refine_blocks(target: torch.Tensor, decoded: torch.Tensor, codes: torch.Tensor, h: torch.Tensor,
                   lattice: Lattice, chunk, beam_width: int | None) -> None:
    """One Gauss-Seidel pass lowering e ᵀH e, e = target − decoded, per row, block by block (in place).

    With the other blocks fixed, e ᵀH e as a function of block j's point c is
    (c − c*)ᵀ H_jj (c − c*) + const, c* = c_j + H_jj⁻¹ (H e)_j its unconstrained optimum; the lattice
    point nearest c* (Euclidean, as LDLQ searches) replaces c_j only in rows where that exact
    quadratic says it is lower, so no row's error rises. LDLQ decided block j before seeing the later
    blocks' errors; this revisits each block given all the others.

    Args:
        target: (N, Kp) rows at unit scale (rotated rows / row scales).
        decoded: (N, Kp) their current codebook points; updated.
        codes: (N, Kp/d, D) bool codes of ``decoded``; updated.
        h: (Kp, Kp) float64 damped Hessian.
    """
    d = lattice.d
    error_h = (target.double() - decoded.double()) @ h  # (H e) per row, kept current
    for j, start in enumerate(range(0, decoded.shape[1], d)):
        block = slice(start, start + d)
        h_jj = h[block, block]
        current = decoded[:, block].double()
        optimum = current + torch.linalg.solve(h_jj, error_h[:, block].T).T
        candidate_codes = nearest_codes(optimum.to(torch.float32), lattice, chunk_size=chunk, beam_width=beam_width)
        candidate = lattice.decode(candidate_codes)
        new_error, old_error = candidate.double() - optimum, current - optimum
        better = ((new_error @ h_jj) * new_error).sum(1) < ((old_error @ h_jj) * old_error).sum(1)
        step = torch.where(better[:, None], candidate.double() - current, torch.zeros_like(current))
        decoded[:, block] = torch.where(better[:, None], candidate.to(decoded.dtype), decoded[:, block])
        codes[:, j] = torch.where(better[:, None], candidate_codes, codes[:, j])
        error_h -= step @ h[block, :]
