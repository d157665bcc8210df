"""Architecture registry and the one place a spec's `model:` section becomes a module."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgeexit.errors import SpecError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    """Add an architecture constructor to the zoo under `name` (used as a decorator)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = fn
        return fn

    return wrap


# top-level modules a factory may not come from: the standard library and torch itself
NOT_FACTORIES = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins", "torch", "__main__"}


def _module_origin(module_name: str) -> list[Path]:
    """Where the top package of `module_name` would be imported from (nothing is executed)."""
    spec = importlib.util.find_spec(module_name.split(".")[0])
    if spec is None:
        return []
    places = [Path(spec.origin)] if spec.origin and spec.origin not in ("built-in", "frozen") else []
    return places + [Path(p) for p in (spec.submodule_search_locations or [])]


def resolve_factory(factory: str, base_dir: Path | None, refuse_under: Path | None = None,
                    field: str = "model.factory") -> Callable[..., nn.Module]:
    """The factory function; `base_dir` (a yaml's folder) is importable while it is looked up,
    and a module that would come from inside `refuse_under` (a bundle) is refused unrun."""
    module_name, fn_name = factory.split(":")
    top = module_name.split(".")[0]
    if top in NOT_FACTORIES:  # os:system, subprocess:run, torch.hub:load ... are not model factories
        raise SpecError(f"{field}: {factory!r} names {top!r} ({'the standard library' if top != 'torch' else 'torch itself'}); "
                        "a factory is a function or class of the user's own (or a model library's) module")
    added = base_dir is not None and str(base_dir) not in sys.path
    if added:  # a user's model file next to their model.yaml is importable
        sys.path.insert(0, str(base_dir))
    try:
        if refuse_under is not None:
            inside = [p for p in _module_origin(module_name) if p.resolve().is_relative_to(refuse_under.resolve())]
            if inside:
                raise SpecError(f"{field}: {module_name!r} would be imported from inside the bundle ({inside[0]}); "
                                "a bundle never runs code it carries: install the module where it runs")
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name and (module_name + ".").startswith(exc.name + ".")
        hint = (" (is it installed, or on PYTHONPATH? the current folder is not searched)"
                if missing and base_dir is None else "")  # the module itself, where only installed ones are found
        raise SpecError(f"{field}: cannot import {module_name!r}: {exc}{hint}") from None
    except SystemExit as exc:
        raise SpecError(f"{field}: importing {module_name!r} called sys.exit({exc.code})") from None
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed: say so in one line
        raise SpecError(f"{field}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    fn = getattr(module, fn_name, None)
    if not (inspect.isfunction(fn) or inspect.isclass(fn)):
        raise SpecError(f"{field}: {module_name!r} has no function or class {fn_name!r}")
    origin = getattr(fn, "__module__", None) or ""
    if origin.split(".")[0] != top:  # `from os import system` in a user module is not its factory
        raise SpecError(f"{field}: {factory!r} is {origin}.{fn_name}, defined outside the {top!r} package; "
                        "name the module that defines it")
    return fn


def _accepts(fn: Callable) -> tuple[list[str], bool]:
    params = inspect.signature(fn).parameters
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(model_spec, input_spec, base_dir: Path | None, refuse_under: Path | None = None) -> nn.Module:
    """Instantiate a `model:` section (zoo architecture or user factory), weights not loaded.

    `in_channels` and `num_classes` come from the input section and are passed to
    constructors that accept them, so the yaml states them once. `base_dir` (the yaml's
    folder) is where a user's factory module may live; None adds no import path (a bundle's
    factory must be installed), and a factory module inside `refuse_under` is refused.
    A factory runs the user's Python code: whatever it raises becomes one line.
    """
    implied = {"in_channels": input_spec.shape[0], "num_classes": len(input_spec.classes)}
    if model_spec.arch is not None:
        fn, label = ARCHITECTURES[model_spec.arch], model_spec.arch
    elif model_spec.backbone is not None:
        from edgeexit.backbone import backbone_constructor

        fn, label, implied = backbone_constructor(model_spec.backbone, implied, base_dir, refuse_under)
    else:
        fn, label = resolve_factory(model_spec.factory, base_dir, refuse_under), model_spec.factory
    names, takes_any = _accepts(fn)
    kwargs = dict(model_spec.args)
    for key in kwargs:
        if key in ("in_channels", "num_classes", "in_chans"):
            raise SpecError(f"model.args.{key}: set by the input section; remove it here")
        if key not in names and not takes_any:
            raise SpecError(f"model.args.{key}: {label} has no argument {key!r} (accepts: {', '.join(names)})")
    kwargs.update({k: v for k, v in implied.items() if k in names or takes_any})
    try:
        model = fn(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"model.args: {label} rejected its arguments: {exc}") from None
    except SystemExit as exc:
        raise SpecError(f"model.factory: {label} called sys.exit({exc.code}) instead of returning a model") from None
    except Exception as exc:  # noqa: BLE001
        if model_spec.arch is not None:
            raise  # the zoo's own constructors: a bug, keep the traceback
        raise SpecError(f"model.factory: {label} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model: {label} returned {type(model).__name__}, not a torch.nn.Module")
    if model_spec.backbone is not None:
        from edgeexit.backbone import ExitHead, attach_exits

        # random data, seeded apart from the model's draws: probes of what a layer reads need values
        sample = torch.randn(2, *input_spec.shape, generator=torch.Generator().manual_seed(0))
        cuts, note = model_spec.exits_after, None
        if model_spec.exits_auto is not None:
            from edgeexit.cut_points import choose_cuts, describe

            chosen = choose_cuts(model, *model_spec.exits_auto, sample, label)
            cuts, note = [c.module for c in chosen], describe(chosen, model_spec.exits_auto[1])
        model = attach_exits(model, cuts, ExitHead(**model_spec.exit_head), sample, implied["num_classes"], label)
        model.cut_note = "; ".join(n for n in (note, model.cut_note) if n) or None
    for attr in ("blocks", "exits"):
        if not isinstance(getattr(model, attr, None), nn.ModuleList):
            raise SpecError(f"model: {label} has no nn.ModuleList '{attr}' (see the multi-exit contract in the README)")
    if len(model.blocks) != len(model.exits) or len(model.blocks) < 1:
        raise SpecError(f"model: {label} has {len(model.blocks)} blocks but {len(model.exits)} exits; they must match")
    return model.eval()


def load_weights(model: nn.Module, path, data: bytes | None = None, field: str = "weights",
                 by_position: bool = False, keys: tuple[tuple[str, str | None], ...] = ()) -> str | None:
    """Load a plain state_dict (weights_only: never unpickle arbitrary objects) from `path`,
    or from `data` (its bytes, already checked against a bundle's seal); errors name `field`.

    With `by_position` (the user's own file, not a bundle's), a training checkpoint holding its
    state_dict under 'state_dict' or 'model' is unwrapped; `keys` (file prefix -> model prefix,
    None: skipped on both sides, those layers keep their initial weights) renames the file's
    keys; and a state_dict whose keys still differ but whose tensors have the model's shapes
    one for one, in order (an official checkpoint of the same network written by other code),
    is loaded by position. The returned line says what was done (None: loaded by name as is)."""
    import io

    try:
        state = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is the user's file
        first = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise SpecError(f"{field}: cannot read {path}: {first or type(exc).__name__}") from None
    if not isinstance(state, dict):
        raise SpecError(f"{field}: {path} is not a state_dict")
    notes = []
    if by_position:
        state, note = _unwrap(state)
        notes += [note] if note else []
    skipped: list[str] = []
    if keys:
        count = len(state)
        state, renamed, skipped = _map_keys(state, keys, f"{field}.keys")
        notes.append(f"{renamed} keys renamed by {field}.keys" + (f", {count - len(state)} skipped (the model keeps "
                                                                   f"its own {', '.join(skipped)})" if skipped else ""))
    mine = {k: v for k, v in model.state_dict().items() if not _under(k, skipped)}
    if not any(k.endswith(".num_batches_tracked") for k in state):  # written before torch 0.4.1 had the counter
        mine = {k: v for k, v in mine.items() if not k.endswith(".num_batches_tracked")}
    bad_shape = [k for k, v in state.items() if k in mine and tuple(getattr(v, "shape", ())) != tuple(mine[k].shape)]
    if set(state) == set(mine) and not bad_shape:
        model.load_state_dict(state, strict=False)  # every key checked above
    elif by_position and len(state) == len(mine) and all(
            tuple(getattr(v, "shape", ())) == tuple(w.shape) for v, w in zip(state.values(), mine.values())):
        model.load_state_dict(dict(zip(mine, state.values())), strict=False)
        moved = [(a, b) for a, b in zip(state, mine) if a != b]
        notes.append(f"the keys of {path} are not the model's; loaded by position, every shape equal "
                     f"({len(moved)} of {len(mine)} renamed, e.g. {moved[0][0]!r} -> {moved[0][1]!r})")
    else:
        missing, unexpected = [k for k in mine if k not in state], [k for k in state if k not in mine]
        parts = [f"{what} {len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                 for what, names in (("missing", missing), ("unexpected", unexpected), ("other shape", bad_shape))
                 if names]
        hint = "; map them with {path, keys: {file_prefix: model_prefix}}, null to skip" if by_position else ""
        raise SpecError(f"{field}: {path} does not fit the model: keys {'; '.join(parts)}{hint}")
    return f"{field}: " + "; ".join(notes) if notes else None


def _unwrap(state: dict) -> tuple[dict, str | None]:
    """The state_dict inside a training checkpoint ({'state_dict': ..., 'epoch': ...}), as the
    seeds' reference code saves them; a plain state_dict as it is."""
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        return state, None
    for name in ("state_dict", "model", "model_state_dict"):
        inner = state.get(name)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, f"the state_dict under {name!r} of a training checkpoint"
    return state, None


def _under(key: str, prefixes) -> bool:
    return any(key.startswith(p) for p in prefixes)


def _map_keys(state: dict, keys, field: str) -> tuple[dict, int, list[str]]:
    """`state` with each key's longest matching prefix in `keys` replaced (or the key dropped,
    for None); how many were renamed; the skipped prefixes, as the model's keys start."""
    out, renamed = {}, 0
    ordered = sorted(keys, key=lambda pair: -len(pair[0]))
    for key, value in state.items():
        matched, target = _apply_prefix(key, ordered)
        if target is None:
            continue
        if target in out:
            raise SpecError(f"{field}: {key!r} and another key of the file both become {target!r}; map one of them "
                            "to null (skip) or elsewhere")
        out[target] = value
        renamed += matched
    renames = [(old, new) for old, new in ordered if new is not None]
    # a skipped prefix as the model names it ('module.fc.' -> 'fc.')
    return out, renamed, [_apply_prefix(old, renames)[1] for old, new in keys if new is None]


def _apply_prefix(key: str, pairs) -> tuple[bool, str | None]:
    """Whether a prefix of `pairs` (longest first) matches `key`, and `key` with it replaced
    (None when it maps to null: skipped)."""
    match = next(((old, new) for old, new in pairs if key.startswith(old)), None)
    if match is None:
        return False, key
    return True, None if match[1] is None else match[1] + key[len(match[0]):]
