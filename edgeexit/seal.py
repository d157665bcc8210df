"""The manifest's seal and its shape: what makes an edit to `manifest.json` detectable.

The seal is a sha256 over the manifest's canonical JSON (sorted keys, no whitespace), stored
inside the manifest under `seal` together with a short digest per field, so a refused
manifest names the field that was edited (`gating.thresholds`, `stages[1].onnx`). Because
`files` (the sha256 of every other file) is inside the sealed JSON, one digest covers the
whole bundle: that digest is what `edgeexit sign` signs. Without a signature the seal detects
edits — by hand, by a tool, by a broken copy — but not a forger who recomputes it; a device
that must refuse forged bundles checks a signature (`--trust`).

`check_shape` refuses a manifest whose fields have the wrong types or meaningless values
(a number where a list belongs, std 0, a NaN threshold) in one line naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from edgeexit.errors import BundleError

SEAL = "seal"
ALGORITHM = "sha256-canonical-json"
FIELD_DEPTH = 3  # fields are named down to e.g. stages[1].outputs.carry
_HEX = set("0123456789abcdef")


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of `obj`: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def digest(obj: Any) -> str:
    """Hex sha256 of `obj`'s canonical JSON."""
    return hashlib.sha256(canonical(obj)).hexdigest()


def _fields(value: Any, path: str, depth: int, out: dict[str, str]) -> None:
    children = (value.items() if isinstance(value, dict)
                else enumerate(value) if isinstance(value, list) else ())
    if depth == 0 or not children:
        out[path] = digest(value)[:16]
        return
    for key, child in children:
        sub = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
        _fields(child, sub, depth - 1, out)
    if isinstance(value, (dict, list)) and not value:
        out[path] = digest(value)[:16]


def field_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """A short digest per field path of `manifest` (less the seal), to name what was edited."""
    out: dict[str, str] = {}
    for key, value in manifest.items():
        if key != SEAL:
            _fields(value, key, FIELD_DEPTH - 1, out)
    return out


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` with its seal: the digest of everything else and a digest per field."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return {**body, SEAL: {"algorithm": ALGORITHM, "digest": digest(body), "fields": field_digests(body)}}


def seal_digest(manifest: dict[str, Any]) -> str:
    """The digest a sealed manifest claims (what a signature signs)."""
    return manifest[SEAL]["digest"]


def check_seal(manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose content no longer matches its seal, naming the edited field."""
    seal = manifest.get(SEAL)
    if not isinstance(seal, dict) or seal.get("algorithm") != ALGORITHM or not _is_hex(seal.get("digest"), 64):
        raise BundleError("bundle: manifest.json has no valid seal (edited by hand, or written by an older edgeexit)")
    body = {k: v for k, v in manifest.items() if k != SEAL}
    if digest(body) == seal["digest"]:
        return
    recorded = seal.get("fields") if isinstance(seal.get("fields"), dict) else {}
    now = field_digests(body)
    changed = sorted(k for k in now.keys() & recorded.keys() if now[k] != recorded[k])
    added = sorted(now.keys() - recorded.keys())
    removed = sorted(recorded.keys() - now.keys())
    what = "; ".join(part for part in (
        f"field {', '.join(changed[:3])} changed" if changed else "",
        f"field {', '.join(added[:3])} added" if added else "",
        f"field {', '.join(removed[:3])} removed" if removed else "") if part) or "its seal was altered"
    raise BundleError(f"bundle: manifest.json was edited after it was sealed: {what} (refused; rebuild the bundle "
                      "or run the edgeexit command that makes this change)")


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


# --- shape ----------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _fail(path: str, expected: str, value: Any) -> None:
    raise BundleError(f"bundle: manifest field {path}: expected {expected}, got {_type_name(value)}")


def _get(obj: dict, key: str, path: str, kind, expected: str, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise BundleError(f"bundle: manifest field {path}{'.' if path else ''}{key} is missing")
    value = obj[key]
    if optional and value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        _fail(f"{path}{'.' if path else ''}{key}", expected, value)
    return value


def _number(value: Any, path: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(path, "a finite number", value)
    if positive and value <= 0:
        raise BundleError(f"bundle: manifest field {path}: {value} must be > 0")
    return float(value)


def _strings(value: Any, path: str, min_len: int = 0) -> list[str]:
    if not isinstance(value, list) or len(value) < min_len or not all(isinstance(v, str) and v for v in value):
        _fail(path, f"a list of {'at least ' + str(min_len) + ' ' if min_len else ''}non-empty strings", value)
    return value


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # as the yaml's `name`


def check_shape(m: Any) -> None:
    """Refuse a manifest whose required fields are missing, mistyped or meaningless, in one
    line naming the field; the runtime may then index it without further checks."""
    if not isinstance(m, dict):
        _fail("(top level)", "an object", m)
    _get(m, "format", "", int, "an integer")
    if not _NAME.match(_get(m, "name", "", str, "a string")):  # it names files: `trace` writes NAME.SPLIT.traces.npz
        _fail("name", "a plain name (letters, digits, _ . -)", m["name"])
    inp = _get(m, "input", "", dict, "an object")
    _get(inp, "name", "input", str, "a string")
    shape = _get(inp, "shape", "input", list, "a list")
    if len(shape) != 4 or shape[0] is not None or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape[1:]):
        _fail("input.shape", "[null, C, H, W] with positive integers", shape)
    _get(inp, "dtype", "input", str, "a string")
    for key in ("mean", "std"):
        values = _get(inp, key, "input", list, "a list")
        if len(values) not in (1, shape[1]):
            raise BundleError(f"bundle: manifest field input.{key}: {len(values)} values for {shape[1]} channel(s)")
        for k, v in enumerate(values):
            _number(v, f"input.{key}[{k}]", positive=key == "std")
    value_range = _get(inp, "range", "input", dict, "an object", optional=True)
    if value_range is not None:
        for key in ("min", "max", "mean", "std", "span_p01"):
            _number(_get(value_range, key, "input.range", (int, float), "a number"), f"input.range.{key}")
        if value_range["min"] > value_range["max"]:
            raise BundleError("bundle: manifest field input.range: min is above max")
    if inp.get("resize") not in (None, "bicubic", "bilinear"):
        _fail("input.resize", "null, 'bicubic' or 'bilinear'", inp["resize"])
    classes = _strings(_get(m, "classes", "", list, "a list"), "classes", 2)
    if len(set(classes)) != len(classes):
        raise BundleError("bundle: manifest field classes: class names repeat")
    stages = _get(m, "stages", "", list, "a list")
    if not stages:
        _fail("stages", "a non-empty list", stages)
    for k, s in enumerate(stages):
        p = f"stages[{k}]"
        if not isinstance(s, dict):
            _fail(p, "an object", s)
        if _get(s, "index", p, int, "an integer") != k:
            raise BundleError(f"bundle: manifest field {p}.index: {s['index']} where {k} belongs")
        _get(s, "onnx", p, str, "a string")
        _strings(_get(s, "inputs", p, list, "a list"), f"{p}.inputs", 1)
        out = _get(s, "outputs", p, dict, "an object")
        _strings(_get(out, "carry", f"{p}.outputs", list, "a list"), f"{p}.outputs.carry")
        for key in ("logits", "conf", "pred"):
            _get(out, key, f"{p}.outputs", str, "a string")
        _get(s, "precision", p, str, "a string", optional=True)
    gating = _get(m, "gating", "", dict, "an object")
    _get(gating, "confidence", "gating", str, "a string")
    thresholds = _get(gating, "thresholds", "gating", list, "a list")
    if len(thresholds) != len(stages):
        raise BundleError(f"bundle: manifest field gating.thresholds: {len(thresholds)} values for "
                          f"{len(stages)} stages")
    for k, t in enumerate(thresholds):
        if t is not None:
            _number(t, f"gating.thresholds[{k}]")
    _get(gating, "policy", "gating", dict, "an object", optional=True)
    points = _get(gating, "operating_points", "gating", dict, "an object", optional=True) or {}
    for name, point in points.items():
        p = f"gating.operating_points.{name}"
        if not isinstance(point, dict):
            raise BundleError(f"bundle: manifest field {p}: expected an object")
        _number(_get(point, "budget_ms", p, (int, float), "a number"), f"{p}.budget_ms")
        values = _get(point, "thresholds", p, list, "a list")
        if len(values) != len(stages) or any(t is not None and not isinstance(t, (int, float)) for t in values):
            raise BundleError(f"bundle: manifest field {p}.thresholds: expected {len(stages)} numbers (the last null)")
    fused = _get(m, "fused", "", dict, "an object", optional=True)
    if fused is not None:
        _get(fused, "onnx", "fused", str, "a string")
        _get(fused, "use_at_batch_1", "fused", bool, "true or false")
    _get(m, "monolithic", "", str, "a string")
    files = _get(m, "files", "", dict, "an object")
    for rel, h in files.items():
        if not _is_hex(h, 64):
            _fail(f"files.{rel}", "a sha256 hex digest", h)
    _get(m, "weights", "", str, "a string", optional=True)
    batch = _get(_get(m, "export", "", dict, "an object"), "batch", "export", dict, "an object")
    for key in ("min", "opt", "max"):
        v = _get(batch, key, "export.batch", int, "an integer")
        if v < 1:
            raise BundleError(f"bundle: manifest field export.batch.{key}: {v} must be >= 1")
    profiles = _get(batch, "profiles", "export.batch", str, "a string", optional=True)
    if profiles is not None and profiles not in ("buckets", "range"):
        _fail("export.batch.profiles", "buckets or range", profiles)
    target = _get(m, "target", "", dict, "an object")
    _get(target, "device", "target", str, "a string")
    dla = _get(target, "dla_core", "target", int, "an integer", optional=True)
    if dla is not None and dla not in (0, 1):
        _fail("target.dla_core", "0, 1 or null", dla)
    data = _get(m, "data", "", dict, "an object", optional=True)
    if data is not None:
        _get(data, "source", "data", str, "a string")
        for key, share in _get(data, "splits", "data", dict, "an object").items():
            if not 0 < _number(share, f"data.splits.{key}") <= 1:
                _fail(f"data.splits.{key}", "a fraction in (0, 1]", share)
        if _get(data, "seed", "data", int, "an integer") < 0:
            _fail("data.seed", "an integer >= 0", data["seed"])
        _get(data, "resize", "data", bool, "true or false", optional=True)
    engines = _get(m, "engines", "", dict, "an object", optional=True) or {}
    for key, entry in engines.items():
        p = f"engines.{key}"
        if not isinstance(entry, dict):
            _fail(p, "an object", entry)
        _get(entry, "dir", p, str, "a string")
        _strings(_get(entry, "stages", p, list, "a list"), f"{p}.stages", 1)


def path_fields(m: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(field, relative path, is a file that needs a checksum) for every path the manifest
    names; all of them must stay inside the bundle."""
    out = [(f"files.{rel}", rel, True) for rel in m["files"]]
    for k, s in enumerate(m["stages"]):
        out.append((f"stages[{k}].onnx", s["onnx"], True))
        if s.get("onnx_fp32") is not None:
            out.append((f"stages[{k}].onnx_fp32", s["onnx_fp32"], True))
    if m.get("fused") is not None:
        out.append(("fused.onnx", m["fused"]["onnx"], True))
    for key in ("monolithic", "monolithic_fp32", "weights", "report", "profile", "calibration"):
        value = m.get(key)
        if value is not None:
            if not isinstance(value, str):
                _fail(key, "a relative path", value)
            out.append((key, value, True))
    for key, entry in (m.get("engines") or {}).items():
        out.append((f"engines.{key}.dir", entry["dir"], False))
        out += [(f"engines.{key}.stages[{k}]", rel, True) for k, rel in enumerate(entry["stages"])]
        if entry.get("metadata") is not None:
            out.append((f"engines.{key}.metadata", entry["metadata"], True))
        if entry.get("fused") is not None:
            out.append((f"engines.{key}.fused", entry["fused"], True))
    return out
