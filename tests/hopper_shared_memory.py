"""Shared memory of the ±1 GEMM's tuning configs compiled for sm_90 (Hopper), run as a script
without TRITON_INTERPRET (the interpreter's kernels cannot be compiled): prints one JSON object
``{"<BLOCK_B> <fp32|bf16>": [bytes of each config the autotuner keeps for that token block]}``.

Compilation needs no GPU: Triton's wheel carries ptxas. The signature marks pointers and the
integer arguments that are multiples of 16 at real sizes as 16-divisible, as Triton specializes
them at launch: that specialization is what lets the pipeline stage operands in shared memory.
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] == "0"
from lift_ao.kernels import triton_matmul  # noqa: E402

_TYPES = {"prepared_ptr": "*bf16", "codes_ptr": "*i32", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*fp32"}
_DIVISIBLE = ("N", "words_total", "words_per_split", "quads", "stride_prepared", "stride_out_split", "stride_out_b")


def shared_bytes(config: triton.Config, block_b: int, split_fp32: bool) -> int:
    kernel = triton_matmul._lifted_matmul_kernel
    names = kernel.arg_names
    constants = dict(config.kwargs, HAS_BIAS=False, SPLIT_FP32=split_fp32, OPERAND=tl.bfloat16,
                     MINUS_ONE_PAIR=triton_matmul._MINUS_ONE_PAIR[torch.bfloat16],
                     SIGN_BITS_PAIR=triton_matmul._SIGN_BITS_PAIR, BLOCK_B=block_b)
    signature = {n: "constexpr" if n in constants else _TYPES.get(n, "i32") for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]]
                              for n in names if n.endswith("_ptr") or n in _DIVISIBLE})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.metadata.shared


if __name__ == "__main__":
    result = {}
    for block_b in map(int, sys.argv[1:]):
        for split_fp32 in (False, True):
            kept = triton_matmul._prune_configs(triton_matmul._TUNING_CONFIGS, {"BLOCK_B": block_b})
            result[f"{block_b} {'fp32' if split_fp32 else 'bf16'}"] = [shared_bytes(c, block_b, split_fp32) for c in kept]
    print(json.dumps(result))
