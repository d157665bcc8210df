"""Imported first by every bench script: keeps this folder off the import path.

Python puts a script's own folder first on `sys.path`, and `bench/calibration.py` is named
like the `calibration` package that edgeexit imports; without this, every bench script
would import the bench instead of the package.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def sibling(name: str):
    """Another bench script, loaded as a module (this folder is off the import path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
