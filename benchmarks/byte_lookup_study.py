"""Study (written, checked on CPU, not yet timed on a GPU): the batch-1 lookup with one table load
per code byte instead of one per nibble.

    python benchmarks/byte_lookup_study.py --out DIR   # GPU: check against the shipped lookup, then time both

Why (NOTES_kernels.md, round 17): under ncu the shipped nibble lookup waits on L1 hits for more than
half of its warp cycles and issues 6.2 instructions per 4 code bits. A byte-indexed table halves the
loads. A full 256-entry table spans 4–8 L1 lines, so the 32 lanes' random entries would cost 2–4×
today's L1 wavefronts (L1 is at 70 %); but v(~b) = −v(b) for a byte b of ±1 codes, so 128 fp16
entries (256 bytes, 2 lines) hold the group: one load per byte at 2 wavefronts, today's wavefronts per
bit with 44 % fewer loads per step (20 against 36). Offline sm_90 SASS has 201 instructions per
4-word step against the shipped 194 (6.3 per nibble against 6.1: the index, the 64-bit address and
the sign flip take two each), so it trades a few issue slots for fewer loads. Prediction: 0–15 % at
28672×8192 (2.4 bits), a gain only if L1 latency per load is what the warps wait on. Tables double
(L × 32 bytes a token) and entries are fp16 (relative error ~2e-4 against the fp32 nibble tables).

Layout: bit t of byte m of code word w is lifted position 32w + 8m + t (as in :mod:`lift_ao.packing`);
byte group G = 4w + m holds table[G, i] = v(i | 128) = Σ_t (2·bit_t(i | 128) − 1)·x̃[8G + t]; a byte
with bit 7 set reads +table[G, b & 127], one without reads −table[G, ~b & 127].

This prototype covers one token, no bias, fp32 output accumulated with atomics (zeroed first); the
shipped kernel's siblings, split counters and token blocks would follow only if it pays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from lift_ao.kernels import triton_lut  # noqa: E402
from lift_ao.kernels.triton_lut import _load_quad  # noqa: E402
from lift_ao.kernels.triton_matmul import _code_word_offset  # noqa: E402


def byte_tables(lifted: torch.Tensor, words: int) -> torch.Tensor:
    """(4·words, 128) fp16 sign-symmetric byte tables of one token's x̃ (L,), zero past L."""
    x = torch.zeros(32 * words, dtype=torch.float64, device=lifted.device)
    x[: lifted.numel()] = lifted.double().reshape(-1)
    entries = torch.arange(128, device=lifted.device) | 128
    signs = (((entries[:, None] >> torch.arange(8, device=lifted.device)) & 1) * 2 - 1).double()  # (128, 8)
    return (x.reshape(4 * words, 8) @ signs.T).to(torch.float16).contiguous()


@triton.jit
def _byte_lookup_kernel(table_ptr, codes_ptr, scale_ptr, out_ptr, N, words_total, words_per_split, quads_per_row,
                        BLOCK_N: tl.constexpr):
    """out[n] += r[n] · Σ over this program's K split of ±table entries; table (groups, 128) int16
    (fp16 bits), codes as in :func:`lift_ao.kernels.triton_lut._lookup_kernel`, one row per thread."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    code_ptrs = codes_ptr + _code_word_offset(rows, 0, quads_per_row)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    word_begin = pid_k * words_per_split
    word_end = tl.minimum(word_begin + words_per_split, words_total)
    last = word_end - 4
    upcoming = _load_quad(code_ptrs, word_begin, quads_per_row, row_ok)
    for step in range(word_begin, word_end, 4):
        word0 = tl.multiple_of(step, 4)
        words = upcoming
        upcoming = _load_quad(code_ptrs, tl.multiple_of(tl.minimum(word0 + 4, last), 4), quads_per_row, row_ok)
        step_table = table_ptr + word0 * 512
        for w in tl.static_range(4):
            word = words[w].to(tl.int32, bitcast=True)
            # Per word, not per byte: each byte whose bit 7 is clear complemented (0x7f masks of the
            # bytes whose bit 7 is clear, from bit 7 moved to bit 0 times 0x7f), so every byte's low
            # 7 bits are its entry.
            clear = ((~word >> 7) & 0x01010101) * 127
            entries = word ^ clear
            for m in tl.static_range(4):
                entry = (entries >> (8 * m)) & 127
                bits = tl.load(step_table + (4 * w + m) * 128 + entry, eviction_policy="evict_last")
                value = bits.to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
                # bit 7 of byte m clear → flip the sign (−table[~b & 127]): bit 8m + 6 of ``clear``
                # moved to bit 31 (in 32-bit registers: a 16-bit flip costs byte permutes).
                flip = (clear << (25 - 8 * m)) & (-2147483648)
                total += (value ^ flip).to(tl.float32, bitcast=True)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    tl.atomic_add(out_ptr + rows, total * scale, mask=row_ok)


def byte_lookup(tables: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, out: torch.Tensor,
                splits: int, config: dict) -> torch.Tensor:
    """``out = r ⊙ (Q · x̃)`` for one token from its :func:`byte_tables`.

    Args:
        tables: (4·words, 128) fp16; codes: packed (⌈N/32⌉, words/4, 32, 4) int32; row_scale: (N,) fp32.
        out: (N,) fp32, overwritten; splits: K splits; config: ``{"BLOCK_N", "num_warps", ...}``.
    Returns:
        ``out``.
    """
    quads = codes.shape[1]
    per_split = 4 * triton.cdiv(quads, splits)
    out.zero_()
    _byte_lookup_kernel[(triton.cdiv(row_scale.shape[0], config["BLOCK_N"]), triton.cdiv(quads, per_split // 4))](
        tables.view(torch.int16), codes, row_scale, out, row_scale.shape[0], 4 * quads, per_split, quads, **config)
    return out


# The shipped lookup's multi-warp configs (one row per thread, 64 registers) and its 1-warp one.
CONFIGS = [{"BLOCK_N": 128, "num_warps": 4, "maxnreg": 64}, {"BLOCK_N": 256, "num_warps": 8, "maxnreg": 64},
           {"BLOCK_N": 32, "num_warps": 1}]
SHAPES = [(28672, 8192), (8192, 28672), (14336, 4096), (6144, 4096), (4096, 4096)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("byte_lookup_study.py times kernels on a CUDA GPU")
    import kernel_speed as ks
    from lift_ao.packing import words_per_row
    from lift_ao.kernels.triton_matmul import sm_count

    results = []
    for rows, features in SHAPES:
        layer = ks.LiftedLayer(rows, features, 2.4)
        lifted = torch.randn(1, layer.length, device="cuda") * (4 / math.sqrt(layer.length))
        words = words_per_row(layer.length)
        nibble_tables = triton_lut.build_tables(lifted, words, 1)
        tables = byte_tables(lifted[0], words)
        shipped = lambda: triton_lut.lookup_siblings(nibble_tables, 1, [layer.codes], [layer.row_scale], [None],
                                                     torch.float32)[0]
        reference = shipped()[0]
        splits = triton_lut._split_count(rows, words, sm_count(lifted.device))
        out = torch.empty(rows, device="cuda")
        entry = dict(rows=rows, features=features, bits=2.4, splits=splits, code_mb=layer.code_bytes() / 1e6,
                     shipped_us=ks.bench_us(shipped), zero_us=ks.bench_us(out.zero_), byte={})
        for config in CONFIGS:
            error = ks.relative_error(byte_lookup(tables, layer.codes, layer.row_scale, out, splits, config), reference)
            us = ks.bench_us(lambda: byte_lookup(tables, layer.codes, layer.row_scale, out, splits, config))
            entry["byte"][config["BLOCK_N"]] = dict(us=us, error=error, ok=error < 2e-3)
        results.append(entry)
        print(entry, flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "byte_lookup.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                              command=" ".join(sys.argv), results=results), indent=1))


if __name__ == "__main__":
    main()
