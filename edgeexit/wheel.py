"""The torch-free edgeexit runtime as a wheel, and a digest of the code it carries.

`edgeexit deploy`, `stage` and `container` put this wheel on a device (``pip install`` there,
no extras: numpy, onnx, onnxruntime, pyyaml, tqdm, and JetPack's own TensorRT). It is built
from the checkout this edgeexit runs from, copied first into a temporary folder so that the
user's tree gains no ``build/`` or ``*.egg-info``. `code_digest` names the code itself (the
package's modules and device profiles, not the wheel's bytes, which carry timestamps), so a
device whose installed edgeexit has the same digest needs no reinstall.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from edgeexit.errors import EdgeExitError

_PACKAGES = ("edgeexit", "calibration")  # the wheel's top-level packages (pyproject's [tool.setuptools])
_SOURCES = ("pyproject.toml", "README.md", "edgeexit", "calibration", "devices")


def checkout_root() -> Path | None:
    """The source checkout this edgeexit is imported from, or None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "devices").is_dir() else None


def _code_files() -> list[tuple[str, bytes]]:
    """(name, bytes) of every module and device profile, named the same in a checkout and a wheel."""
    out = []
    for package in _PACKAGES:
        base = Path(str(resources.files(package)))
        out += [(p.relative_to(base.parent).as_posix(), p.read_bytes()) for p in base.rglob("*.py")
                if "__pycache__" not in p.parts and "device_profiles" not in p.parts]  # a wheel's devices/
    profiles = resources.files("edgeexit.device_profiles")
    out += [(f"profiles/{f.name}", f.read_bytes()) for f in profiles.iterdir() if f.name.endswith(".yaml")]
    return sorted(out)


def code_digest() -> str:
    """sha256 over this edgeexit's modules and device profiles: equal digests, equal runtimes."""
    h = hashlib.sha256()
    for name, data in _code_files():
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def build_wheel(dest_dir: str | Path) -> Path:
    """Build the edgeexit wheel (no dependencies bundled) into `dest_dir` and return its path.

    Needs a source checkout (pyproject.toml beside the package); an edgeexit installed from a
    wheel cannot rebuild itself, and the error says to pass the wheel instead."""
    root = checkout_root()
    if root is None:
        raise EdgeExitError("wheel: this edgeexit is installed from a wheel, not a source checkout, so it cannot "
                            "build the device's runtime wheel; pass one with --wheel PATH")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeexit-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in _SOURCES:
            path = root / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif path.is_file():
                shutil.copy2(path, src / name)
        out = Path(tmp) / "out"
        offline = ["--no-build-isolation"] if _has_build_backend() else []  # else pip fetches setuptools
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *offline,
                               "-w", str(out), str(src)], capture_output=True, text=True)
        wheels = sorted(out.glob("edgeexit-*.whl")) if done.returncode == 0 else []
        if not wheels:
            tail = " ".join((done.stderr or done.stdout).split())[-300:]
            raise EdgeExitError(f"wheel: pip wheel failed for {root} ({tail or 'no wheel written'})")
        target = dest_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


def _has_build_backend() -> bool:
    """Whether setuptools and wheel are importable here (then no isolated build env is needed)."""
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True
