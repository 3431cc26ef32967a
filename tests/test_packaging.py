"""The wheel ships every subpackage: a package missing from pyproject's list imports fine from a
checkout (editable install) and fails only where lift_ao is installed as a wheel."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    locations = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = set()
    for name, folder in [("lift_ao", ROOT / "lift_ao"), *locations.items()]:
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((name, *relative)))
    assert found == listed, f"pyproject [tool.setuptools] packages should be {sorted(found)}"
