"""lift_ao: LiftQuant continuous bit-width weight quantization as a torchao extension.

    from torchao.quantization import quantize_
    from lift_ao import liftquant
    quantize_(model, liftquant(bits=2.4))

Importing the package registers the config's module handler with torchao and the
``lift_ao::*`` ops with ``torch.library``.
"""

__version__ = "0.1.0"

from lift_ao import kernels  # noqa: F401  (registers the torch.library ops)
from lift_ao import passes  # noqa: F401  (installs the Inductor passes; lift_ao.passes.uninstall() removes them)
from lift_ao.api import quantizable_linears, quantize
from lift_ao.budget import BudgetError, Plan, plan
from lift_ao.calibration import calibrate
from lift_ao.config import LiftQuantConfig, liftquant
from lift_ao.finetune import finetune_end_to_end
from lift_ao.footprint import footprint
from lift_ao.io import CheckpointError, load_quantized, save_quantized
from lift_ao.lattice import Lattice, LatticeError
from lift_ao.sensitivity import calibrated_sensitivity, measure_sensitivity
from lift_ao.tensor import LiftQuantTensor, share_constants
from lift_ao.integrations.hf import LiftQuantHfConfig  # noqa: F401  (registers quant_method "liftquant" with transformers)

__all__ = [
    "BudgetError",
    "CheckpointError",
    "Lattice",
    "LatticeError",
    "LiftQuantConfig",
    "LiftQuantTensor",
    "calibrate",
    "calibrated_sensitivity",
    "finetune_end_to_end",
    "footprint",
    "liftquant",
    "load_quantized",
    "measure_sensitivity",
    "Plan",
    "plan",
    "quantizable_linears",
    "quantize",
    "save_quantized",
    "share_constants",
]
