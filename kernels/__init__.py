"""LiftQuant ops (installed as ``lift_ao.kernels``): ``torch.library`` registrations and kernels."""

import torch

from .ops import lift_activation, lifted_matmul

__all__ = ["lift_activation", "lifted_matmul"]

if torch.cuda.is_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        from .triton_register import register_cuda_kernels

        register_cuda_kernels()
