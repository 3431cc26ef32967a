"""LiftQuant ops (installed as ``lift_ao.kernels``): ``torch.library`` registrations and kernels."""

if __name__ == "lift_ao.kernels":
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
# Otherwise this folder was found as a top-level ``kernels`` because a checkout's root is on sys.path
# (``python -m pytest`` from the repository, say): transformers probes ``import kernels`` for the
# Hugging Face kernels-hub package. Defining nothing makes it see no usable package, instead of
# running our op registrations a second time under another module name.
