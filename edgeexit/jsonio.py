"""JSON in and out: strict numbers (no NaN/Inf, which JSON does not have) and bounded reads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgeexit.errors import EdgeExitError


def dumps(obj: Any, indent: int | None = 2) -> str:
    """JSON text of `obj`; a NaN or Inf anywhere is a bug upstream, so it raises instead of
    writing `NaN` (which no JSON parser but Python's accepts)."""
    return json.dumps(obj, indent=indent, allow_nan=False)


def finite_or_none(value: float) -> float | None:
    """`value` where it is a finite number, else None (JSON's null): for raw outputs a user
    asked for with --allow-nonfinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: Path, what: str, max_bytes: int, error: type[EdgeExitError] = EdgeExitError) -> Any:
    """Parse a JSON file of at most `max_bytes`, refusing NaN/Inf; errors (`error`) name `what`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{what}: {path} is {size} bytes, above the {max_bytes}-byte limit")
    return parse_json(path.read_bytes(), f"{what}: {path}", error)


def parse_json(data: bytes, where: str, error: type[EdgeExitError] = EdgeExitError) -> Any:
    """Parse JSON bytes, refusing NaN/Inf; errors (`error`) start with `where`."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise error(f"{where} is not UTF-8 text") from None
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{where} is not valid JSON: {exc}") from None
