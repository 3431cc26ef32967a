"""Prefill as one GEMM that rebuilds each weight tile in registers: a candidate for the prefill path,
timed on the GPU against the shipped one (rotation, rebuilt bf16 weight, cuBLAS) and bf16 cuBLAS.

    python benchmarks/prefill_fused_study.py --out $OUT    # every config checked, then timed (~5–8 min)

At 256 tokens the shipped path costs 3–4× bf16 (``kernels_h100.md``): the rebuild writes the whole
bf16 weight that cuBLAS then reads back. Here (NOTES_kernels.md, round 12, "Prefill: the arithmetic
for a fused rebuild-GEMM") each program owns BLOCK_N rows × BLOCK_T tokens and, per K step of BLOCKS
lattice blocks, builds the (BLOCK_N·BLOCKS, D) ±1 tile from the codes as the rebuild kernel does
(:mod:`lift_ao.kernels.triton_dequant`), multiplies it by Mᵀ (d padded to DP) on the tensor cores,
and uses the (BLOCK_N, BLOCKS·DP) result as the A operand of the main product with the rotated
activation u, gathered per block with zeros at e ≥ d. The weight never leaves registers.

The kernel lives in this study, not in ``lift_ao.kernels``, until it measures faster than the
shipped path. The CPU test (``tests/test_prefill_fused_study.py``) checks it in fp16 only: the
Triton interpreter returns wrong products for a bf16 dot whose operand was converted inside the
kernel, so bf16 is checked here, on the GPU, before any timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch
import triton
import triton.language as tl

from lift_ao.kernels.triton_dequant import block_signs
from lift_ao.kernels.triton_matmul import _MINUS_ONE_PAIR, _SIGN_BITS_PAIR, _bit_of_column, _code_word_offset

__all__ = ["CONFIGS", "rebuild_gemm"]


@triton.jit
def _rebuild_gemm_kernel(
    u_ptr, codes_ptr, scale_ptr, mapping_ptr, bias_ptr, out_ptr,
    T, N, n_blocks, words_total, stride_u, stride_out,
    d: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr,
    MINUS_ONE_PAIR: tl.constexpr, SIGN_BITS_PAIR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCKS: tl.constexpr,
):
    """out[t, n] = r[n] · Σ_b Σ_e u[t, b·d + e] (M q_{n,b})[e] (+ bias[n]) for BLOCK_N rows × BLOCK_T tokens.

    u (T, ≥ n_blocks·d) fp16/bf16; codes (⌈N/32⌉, words_total/4, 32, 4) int32 contiguous; scale (N,)
    fp32; mapping (d, D) fp32 contiguous; out (T, N) in u's dtype.
    """
    TILE: tl.constexpr = BLOCK_N * BLOCKS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tile = tl.arange(0, TILE)
    tile_rows = tl.program_id(0) * BLOCK_N + tile // BLOCKS          # tile row r·BLOCKS + j: block j of row r
    code_row = codes_ptr + _code_word_offset(tile_rows[:, None].to(tl.int64), 0, words_total // 4)
    bit = _bit_of_column(tl.arange(0, 32 * CHUNKS))
    e = tl.arange(0, DP)
    mapping_t = tl.load(mapping_ptr + e[None, :] * D + bit[:, None], mask=(bit < D)[:, None] & (e < d)[None, :],
                        other=0.0).to(tl.float16)
    k = tl.arange(0, BLOCKS * DP)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for first_block in range(0, n_blocks, BLOCKS):
        blocks = first_block + tile % BLOCKS
        signs = block_signs(code_row, blocks, (tile_rows < N) & (blocks < n_blocks), words_total, D, CHUNKS,
                            MINUS_ONE_PAIR, SIGN_BITS_PAIR)
        weights = tl.dot(signs, mapping_t).reshape(BLOCK_N, BLOCKS * DP).to(u_ptr.dtype.element_ty)
        block_of_k = first_block + k // DP
        e_of_k = k % DP
        activation = tl.load(u_ptr + tokens[None, :].to(tl.int64) * stride_u + (block_of_k * d + e_of_k)[:, None],
                             mask=((e_of_k < d) & (block_of_k < n_blocks))[:, None] & (tokens < T)[None, :],
                             other=0.0)
        acc = tl.dot(weights, activation, acc)
    acc = acc * tl.load(scale_ptr + rows, mask=rows < N, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + tokens[None, :].to(tl.int64) * stride_out + rows[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & (tokens < T)[None, :])


# (BLOCK_N, BLOCK_T, K columns per step, warps); BLOCKS = K columns / DP. 16 configs × 3 lattices
# compile in ~3 min, so one `device` call checks and times them all.
CONFIGS = [dict(BLOCK_N=n, BLOCK_T=t, K_STEP=k, num_warps=w, num_stages=3)
           for n in (64, 128) for t in (64, 128) for k in (32, 64) for w in (4, 8)]
INTERPRETER_CONFIG = dict(BLOCK_N=16, BLOCK_T=16, K_STEP=32, num_warps=4, num_stages=1)


def rebuild_gemm(u: torch.Tensor, n_blocks: int, packed_codes: torch.Tensor, row_scale: torch.Tensor,
                 mapping: torch.Tensor, bias: Optional[torch.Tensor], config: dict) -> torch.Tensor:
    """``y = u · W_rotᵀ (+ b)`` with W_rot rebuilt tile by tile inside the GEMM.

    Args:
        u: (T, ≥ n_blocks·d) fp16 / bf16 rotated activation (``rotate_triton(..., out=)``).
        n_blocks: Kp / d lattice blocks per row.
        packed_codes: packed_shape(N, n_blocks·D) int32 (layout of :mod:`lift_ao.packing`).
        row_scale: (N,) row scales; mapping: (d, D) lattice matrix M; bias: (N,) or None.
        config: one of :data:`CONFIGS` (or :data:`INTERPRETER_CONFIG`).
    Returns:
        (T, N) in u.dtype, accumulated in fp32.
    """
    d, D = mapping.shape
    tokens, rows = u.shape[0], row_scale.shape[0]
    out = torch.empty(tokens, rows, dtype=u.dtype, device=u.device)
    dp = max(16, triton.next_power_of_2(d))
    launch = {key: value for key, value in config.items() if key != "K_STEP"}
    grid = (triton.cdiv(rows, config["BLOCK_N"]), triton.cdiv(tokens, config["BLOCK_T"]))
    _rebuild_gemm_kernel[grid](
        u, packed_codes.contiguous(), row_scale.to(torch.float32).contiguous(), mapping.to(torch.float32).contiguous(),
        bias if bias is not None else row_scale, out, tokens, rows, n_blocks, 4 * packed_codes.shape[1], u.stride(0),
        out.stride(0), d=d, D=D, DP=dp, CHUNKS=max(32, triton.next_power_of_2(D)) // 32, HAS_BIAS=bias is not None,
        MINUS_ONE_PAIR=_MINUS_ONE_PAIR[torch.float16], SIGN_BITS_PAIR=_SIGN_BITS_PAIR,
        BLOCKS=max(1, config["K_STEP"] // dp), **launch)
    return out


def study(say, save) -> list[dict]:
    """Per shape × bit-width at 256 tokens (bf16): check every config against the float64 product of
    the rebuilt weight, then time the passing ones beside the shipped path and bf16 cuBLAS;
    ``save(results)`` after each shape, so a call cut off at its time limit keeps what it measured."""
    sys.path.insert(0, os.path.dirname(__file__))
    import kernel_speed as ks
    from lift_ao.kernels.triton_lift import rotate_triton

    results = []
    tokens = 256
    for rows, features in [(28672, 8192), (4096, 14336), (14336, 4096)]:
        for bits in ks.LATTICES:
            layer = ks.LiftedLayer(rows, features, bits)
            x = torch.randn(tokens, features, device="cuda", dtype=ks.DTYPE)
            u = torch.zeros(tokens, layer.padded_features, device="cuda", dtype=ks.DTYPE)
            rotate_triton(x, layer.signs, layer.left, layer.right, out=u)
            reference = u.double() @ layer.rotated_weight_float64().T
            n_blocks = layer.padded_features // layer.d
            dense_w = torch.randn(rows, features, device="cuda", dtype=ks.DTYPE)
            entry = dict(rows=rows, features=features, bits=bits, tokens=tokens,
                         bf16_us=ks.bench_us(lambda: x @ dense_w.T), shipped_us=ks.bench_us(lambda: layer.prefill(x)),
                         configs=[])
            for config in CONFIGS:
                try:
                    out = rebuild_gemm(u, n_blocks, layer.codes, layer.row_scale, layer.mapping, None, config)
                except triton.runtime.errors.OutOfResources as error:
                    say(f"{rows}x{features} {bits} {config}: {error}")
                    continue
                error = ((out.double() - reference).norm() / reference.norm()).item()
                us = (ks.bench_us(lambda: rebuild_gemm(u, n_blocks, layer.codes, layer.row_scale, layer.mapping, None,
                                                       config)) if error < 1e-2 else None)
                entry["configs"].append(dict(config=config, error=error, us=us))
                say(f"{rows}x{features} {bits} {config}: error {error:.1e}, {us} us")
            timed = [c for c in entry["configs"] if c["us"] is not None]
            entry["best"] = min(timed, key=lambda c: c["us"]) if timed else None
            say(f"{rows}x{features} {bits}: bf16 {entry['bf16_us']:.1f} us, shipped {entry['shipped_us']:.1f} us, "
                f"fused best {entry['best']}")
            results.append(entry)
            save(results)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    log = open(os.path.join(args.out, "prefill_fused.log"), "w")

    def say(message: str):
        print(message, flush=True)
        log.write(message + "\n")
        log.flush()

    def save(results: list[dict]):
        with open(os.path.join(args.out, "prefill_fused.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), command=" ".join(sys.argv), results=results), f,
                      indent=1)

    study(say, save)


if __name__ == "__main__":
    main()
