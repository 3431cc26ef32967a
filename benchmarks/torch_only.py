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


if __name__ == "__main__":
    # `python benchmarks/torch_only.py train --d 8 --D 16 ...` = `python -m lift_ao.lattice train ...`
    # on a machine without torchao (the stored command names the latter: same arguments, same result).
    install()
    from lift_ao.lattice import _main

    _main(sys.argv[1:])
