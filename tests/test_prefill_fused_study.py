"""The fused rebuild-GEMM prefill candidate (benchmarks/prefill_fused_study.py) under the Triton
interpreter, in fp16 (the interpreter's bf16 dot of an in-kernel-converted operand is wrong, so the
study checks bf16 on the GPU before timing), against the float64 product of the rotated weight."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from checks import random_codes, rotated_weight_float64  # noqa: E402
from prefill_fused_study import INTERPRETER_CONFIG, rebuild_gemm  # noqa: E402


@pytest.mark.parametrize("d,D,rows,tokens,k_step", [(10, 24, 19, 5, 32), (14, 30, 37, 33, 16), (16, 48, 20, 17, 64),
                                                    (24, 72, 16, 3, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rebuild_gemm_equals_the_float64_product_of_the_rotated_weight(d, D, rows, tokens, k_step, with_bias):
    g = torch.Generator().manual_seed(d * 1000 + rows + tokens + with_bias)
    n_blocks = 7                                    # K steps with a partial last one at every k_step
    mapping = torch.randn(d, D, generator=g) / d**0.5
    bits, codes = random_codes(rows, n_blocks * D, g)
    scale = torch.rand(rows, generator=g) + 0.5
    bias = torch.randn(rows, generator=g).to(torch.float16) if with_bias else None
    u = torch.randn(tokens, n_blocks * d + 3, generator=g).to(torch.float16)   # a padded row, as the prefill's

    out = rebuild_gemm(u, n_blocks, codes, scale, mapping, bias, dict(INTERPRETER_CONFIG, K_STEP=k_step))

    want = u[:, :n_blocks * d].double() @ rotated_weight_float64(bits, mapping, scale).T + (0 if bias is None else bias.double())
    assert out.shape == (tokens, rows) and out.dtype == torch.float16
    assert ((out.double() - want).norm() / want.norm()).item() < 2e-3
