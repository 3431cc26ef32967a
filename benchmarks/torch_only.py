"""Import lift_ao's torch-only modules without ``lift_ao/__init__`` (which imports torchao).

The GPU machine used for training and encoder benchmarks has torch but no torchao and no network.
``lift_ao.lattice`` and ``lift_ao.search`` need only torch and safetensors, so this registers an
empty ``lift_ao`` package pointing at the source folder; ``import lift_ao.lattice`` then works.

    import torch_only; torch_only.install()   # before any lift_ao import
"""

import importlib.util
import sys
from pathlib import Path


def install() -> None:
    """Register a bare ``lift_ao`` package (no ``__init__`` code) unless lift_ao imports normally."""
    if "lift_ao" in sys.modules or importlib.util.find_spec("torchao") is not None:
        return
    package = Path(__file__).resolve().parents[1] / "lift_ao"
    # The real spec (so importlib.resources finds lift_ao/lattices/), but __init__ is never executed.
    spec = importlib.util.spec_from_file_location("lift_ao", package / "__init__.py", submodule_search_locations=[str(package)])
    sys.modules["lift_ao"] = importlib.util.module_from_spec(spec)


def refine(argv) -> None:
    """Resumable lattice training for long CPU runs (issue 9, 3.0 bits): Adam on the soft-min over
    the beam's code and its single flips (as ``train_lattice``; like it, exact codes at D ≤
    ``MAX_EXACT_TRAIN_D``), then Lloyd refits with a wide beam.

    Everything lives in ``--dir``: ``state.pt`` (M, Adam state, generator, step; written every
    ``--save-every`` Adam steps and after every Lloyd step, so a killed run resumes where it
    stopped), ``best.safetensors`` (the lowest held-out MSE so far, a loadable Lattice whose
    metadata records the command and ``beam_width``) and ``log.txt``. ``--init FILE`` starts from a
    lattice (with ``--adam-steps 0``: pure Lloyd continuation). The held-out MSE uses the same
    ``--holdout`` vectors (seed 10000 + seed) at ``--lloyd-beam`` every step; the final ``mse`` is
    ``measure_mse`` on ``--eval-vectors`` (seed 1234) at ``--lloyd-beam`` (the shipped width).
    """
    import argparse
    import math
    import shlex
    import time

    import torch

    from lift_ao.lattice import Lattice, _cosine_lr, _exact_codes, _flip_candidates, _orthonormal_rows, _softmin_loss, measure_mse

    ap = argparse.ArgumentParser(prog="torch_only.py refine")
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--D", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--init", default=None, help="start from this .safetensors lattice or shipped name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adam-steps", type=int, default=0)
    ap.add_argument("--adam-beam", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--temperature", type=float, default=10.0)
    ap.add_argument("--lloyd-steps", type=int, default=40)
    ap.add_argument("--lloyd-beam", type=int, default=256)
    ap.add_argument("--lloyd-vectors", type=int, default=50_000)
    ap.add_argument("--lloyd-memory", type=float, default=0.0,
                    help="keep this fraction of the previous steps' normal equations (averages Lloyd noise)")
    ap.add_argument("--holdout", type=int, default=10_000)
    ap.add_argument("--eval-vectors", type=int, default=200_000)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop the steps after this (then evaluate)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    d, D, dev = args.d, args.D, torch.device(args.device)
    command = "python benchmarks/torch_only.py refine " + " ".join(shlex.quote(a) for a in argv)
    state_path = out / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        log(f"resume: phase {st['phase']} step {st['step']} best {st['best_mse']:.5f}")
    else:
        gen = torch.Generator().manual_seed(args.seed)
        if args.init:
            init = Lattice.from_file(args.init) if args.init.endswith(".safetensors") else Lattice.load(args.init)
            assert (init.d, init.D) == (d, D), init.name
            M0 = init.M.clone()
        else:
            M0 = _orthonormal_rows(d, D, gen)
        st = dict(M=M0, phase="adam" if args.adam_steps else "lloyd", step=0, opt=None, gen=gen.get_state(),
                  best_M=None, best_mse=float("inf"), A=None, B=None, history=[], command=command)
    if st["phase"] == "eval" and st["step"] < args.lloyd_steps:
        st["phase"] = "lloyd"  # resumed with more Lloyd steps
    gen = torch.Generator().manual_seed(args.seed)
    gen.set_state(st["gen"])
    began = time.monotonic()

    def over_time():
        return args.max_seconds is not None and time.monotonic() - began > args.max_seconds

    def held_out(M, beam):
        return measure_mse(Lattice(d, D, M), args.holdout, seed=10_000 + args.seed, device=dev, beam_width=beam)

    def save(M_eval=None, mse=None):
        if M_eval is not None and mse < st["best_mse"]:
            st["best_M"], st["best_mse"] = M_eval.clone().cpu(), mse
            Lattice(d, D, st["best_M"], mse, dict(
                command=st["command"], beam_width=args.lloyd_beam, seed=args.seed,
                mse_eval=f"held-out {args.holdout} vectors (seed {10_000 + args.seed}), beam width {args.lloyd_beam}",
                steps_done=f"{st['phase']} {st['step']}")).save(out / "best.safetensors")
        st["gen"] = gen.get_state()
        torch.save(st, out / "state.tmp")
        (out / "state.tmp").replace(state_path)

    if st["phase"] == "adam":
        M = st["M"].to(dev).requires_grad_(True)
        opt = torch.optim.Adam([M], lr=args.lr)
        if st["opt"] is not None:
            opt.load_state_dict(st["opt"])
        while st["step"] < args.adam_steps and not over_time():
            progress = st["step"] / max(1, args.adam_steps - 1)
            opt.param_groups[0]["lr"] = _cosine_lr(args.lr, progress)
            w = torch.randn(args.batch, d, generator=gen).to(dev)
            loss = _softmin_loss(w, _flip_candidates(w, M, args.adam_beam) @ M.T, args.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            st["step"] += 1
            if st["step"] % args.save_every == 0 or st["step"] == args.adam_steps:
                st["M"], st["opt"] = M.detach().cpu().clone(), opt.state_dict()
                msg = f"adam {st['step']} loss {loss.item():.5f} lr {opt.param_groups[0]['lr']:.2e}"
                if st["step"] % (4 * args.save_every) == 0 or st["step"] == args.adam_steps:
                    mse = held_out(M.detach(), args.adam_beam)
                    msg += f" held-out mse (beam {args.adam_beam}) {mse:.5f}"
                log(msg)
                save()
        st["M"] = M.detach().cpu().clone()
        if st["step"] >= args.adam_steps:
            mse = held_out(st["M"].to(dev), args.lloyd_beam)
            log(f"adam done: held-out mse (beam {args.lloyd_beam}) {mse:.5f}")
            st["history"].append(("adam", st["step"], mse))
            st["phase"], st["step"], st["opt"] = "lloyd", 0, None
            save(st["M"], mse)
    if st["phase"] == "lloyd":
        M = st["M"].to(dev)
        if st["best_M"] is None:
            mse = held_out(M, args.lloyd_beam)
            log(f"lloyd start: held-out mse (beam {args.lloyd_beam}) {mse:.5f}")
            save(M, mse)
        while st["step"] < args.lloyd_steps and not over_time():
            t0 = time.monotonic()
            w = torch.randn(args.lloyd_vectors, d, generator=gen).to(dev)
            q = _exact_codes(w, Lattice(d, D, M), beam_width=args.lloyd_beam).double()
            A, B = q.T @ q, q.T @ w.double()
            if st["A"] is not None and args.lloyd_memory > 0:
                A, B = A + args.lloyd_memory * st["A"].to(dev), B + args.lloyd_memory * st["B"].to(dev)
            st["A"], st["B"] = A.cpu(), B.cpu()
            M = torch.linalg.solve(A, B).T.float().contiguous()
            st["M"], st["step"] = M.cpu().clone(), st["step"] + 1
            mse = held_out(M, args.lloyd_beam)
            st["history"].append(("lloyd", st["step"], mse))
            log(f"lloyd {st['step']} held-out mse (beam {args.lloyd_beam}) {mse:.5f} "
                f"({time.monotonic() - t0:.0f} s)")
            save(M, mse)
        if st["step"] >= args.lloyd_steps:
            st["phase"] = "eval"
            save()
    if args.eval_vectors:  # also when --max-seconds stopped the steps: evaluate the best so far
        best = Lattice.from_file(out / "best.safetensors")
        t0 = time.monotonic()
        mse = measure_mse(best.to(dev), args.eval_vectors, seed=1234, beam_width=args.lloyd_beam)
        meta = dict(best.metadata, mse_eval=f"nearest_codes, beam width {args.lloyd_beam}, on "
                    f"{args.eval_vectors} fresh N(0,1) vectors, seed 1234 (measure_mse, {args.device})")
        Lattice(d, D, best.M, mse, meta).save(out / "final.safetensors")
        gap = D / d + 0.5 * math.log2(mse)
        log(f"final: {best.name} mse {mse:.5f} gap {gap:.4f} bits on {args.eval_vectors} vectors at beam "
            f"{args.lloyd_beam} ({time.monotonic() - t0:.0f} s) -> {out / 'final.safetensors'}")


if __name__ == "__main__":
    # `python benchmarks/torch_only.py train --d 8 --D 16 ...` = `python -m lift_ao.lattice train ...`
    # on a machine without torchao (the stored command names the latter: same arguments, same result).
    # `python benchmarks/torch_only.py refine ...`: see refine().
    install()
    if sys.argv[1:2] == ["refine"]:
        refine(sys.argv[2:])
    else:
        from lift_ao.lattice import main

        sys.exit(main(sys.argv[1:]))
