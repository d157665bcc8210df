"""A device-wide cache of TensorRT plans, so the same stage is never built twice on one module.

Building five models at first boot takes minutes on an Orin Nano, and a redeployed bundle
whose graphs did not change should not pay that again. A plan is reusable exactly when the
module, the L4T release, the TensorRT version, the stage graph (its sha256), the precision, the
batch profile and the builder settings (workspace, DLA core, optimization level) all match, so
those fields, hashed, name the cache entry: ``<cache>/<key>/stage.plan`` with ``entry.json``
beside it (the fields in clear, the plan's sha256 and the build metadata). An entry is written
into a staging folder and renamed into place, so a killed build leaves no half entry; an entry
whose plan fails its checksum is ignored and rebuilt. Only folders that look like edgeexit's
entries are ever read or replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgeexit.bundle import sha256
from edgeexit.jsonio import dumps
from edgeexit.seal import digest

ENTRY = "entry.json"
PLAN = "stage.plan"
CACHE_FORMAT = 1
_KEY = re.compile(r"^[0-9a-f]{32}$")


def board_identity(root: Path | None = None) -> dict[str, str | None]:
    """The module (device-tree model) and full L4T release (``36.4.3``) of this board; None off a Jetson."""
    from edgeexit.doctor import l4t_release
    from edgeexit.jetson import _read, board_root

    base = root if root is not None else board_root()
    return {"module": _read(base / "proc/device-tree/model"), "l4t": l4t_release(base)}


def cache_fields(*, onnx_sha256: str, tensorrt: str, device: str, precision: str, batch: tuple[int, int, int],
                 profiles: str, workspace_mb: int, dla_core: int | None, optimization_level: int | None,
                 board: dict[str, str | None]) -> dict[str, Any]:
    """Everything a plan depends on, as the cache key's clear-text fields."""
    return {"format": CACHE_FORMAT, "module": board.get("module"), "l4t": board.get("l4t"), "tensorrt": tensorrt,
            "device": device, "onnx_sha256": onnx_sha256, "precision": precision, "batch": list(batch),
            "profiles": profiles, "workspace_mb": int(workspace_mb), "dla_core": dla_core,
            "optimization_level": optimization_level}


class EngineCache:
    """Plans by key in one folder; `get` returns a verified entry, `put` adds one atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(fields: dict[str, Any]) -> str:
        """The entry name of `fields`: 32 hex digits of their canonical sha256."""
        return digest(fields)[:32]

    def get(self, fields: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        """(plan path, build metadata) of the entry for `fields`, or None when absent or damaged."""
        where = self.root / self.key(fields)
        try:
            entry = json.loads((where / ENTRY).read_text())
        except (OSError, ValueError):
            return None
        plan = where / PLAN
        if (not isinstance(entry, dict) or entry.get("fields") != fields or not plan.is_file()
                or sha256(plan) != entry.get("plan_sha256")):
            return None
        return plan, dict(entry.get("meta") or {})

    def put(self, fields: dict[str, Any], plan: Path, meta: dict[str, Any]) -> None:
        """Store a copy of `plan` with its metadata under `fields`' key, replacing only an entry of ours."""
        key = self.key(fields)
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / key
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".partial", dir=self.root))
        try:
            shutil.copyfile(plan, tmp / PLAN)
            (tmp / ENTRY).write_text(dumps({"fields": fields, "plan_sha256": sha256(tmp / PLAN), "meta": meta}) + "\n")
            if dest.exists():
                if not _is_entry(dest):
                    return  # not ours: leave it, and this plan simply is not cached
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _is_entry(path: Path) -> bool:
    """Whether `path` is one of edgeexit's cache entries (a key-named folder with an entry.json)."""
    return (path.is_dir() and not path.is_symlink() and bool(_KEY.match(path.name))
            and {p.name for p in path.iterdir()} <= {ENTRY, PLAN})
