"""LiftQuant ops (installed as ``lift_ao.kernels``): ``torch.library`` registrations and kernels."""

from .ops import lift_activation, lifted_matmul

__all__ = ["lift_activation", "lifted_matmul"]
