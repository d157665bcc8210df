"""Architecture registry and the one place a spec's `model:` section becomes a module."""

from __future__ import annotations

import importlib
import inspect
import sys
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


def _resolve_factory(factory: str, base_dir) -> Callable[..., nn.Module]:
    module_name, fn_name = factory.split(":")
    added = str(base_dir) not in sys.path
    if added:  # a user's model file next to their model.yaml is importable
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"model.factory: cannot import {module_name!r}: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SpecError(f"model.factory: {module_name!r} has no function {fn_name!r}")
    return fn


def _accepts(fn: Callable) -> tuple[list[str], bool]:
    params = inspect.signature(fn).parameters
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(model_spec, input_spec, base_dir) -> nn.Module:
    """Instantiate a `model:` section (zoo architecture or user factory), weights not loaded.

    `in_channels` and `num_classes` come from the input section and are passed to
    constructors that accept them, so the yaml states them once. `base_dir` (the yaml's
    folder) is where a user's factory module may live.
    """
    if model_spec.arch is not None:
        fn, label = ARCHITECTURES[model_spec.arch], model_spec.arch
    else:
        fn, label = _resolve_factory(model_spec.factory, base_dir), model_spec.factory
    names, takes_any = _accepts(fn)
    kwargs = dict(model_spec.args)
    for key in kwargs:
        if key in ("in_channels", "num_classes"):
            raise SpecError(f"model.args.{key}: set by the input section; remove it here")
        if key not in names and not takes_any:
            raise SpecError(f"model.args.{key}: {label} has no argument {key!r} (accepts: {', '.join(names)})")
    implied = {"in_channels": input_spec.shape[0], "num_classes": len(input_spec.classes)}
    kwargs.update({k: v for k, v in implied.items() if k in names or takes_any})
    try:
        model = fn(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"model.args: {label} rejected its arguments: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model: {label} returned {type(model).__name__}, not a torch.nn.Module")
    for attr in ("blocks", "exits"):
        if not isinstance(getattr(model, attr, None), nn.ModuleList):
            raise SpecError(f"model: {label} has no nn.ModuleList '{attr}' (see the multi-exit contract in the README)")
    if len(model.blocks) != len(model.exits) or len(model.blocks) < 1:
        raise SpecError(f"model: {label} has {len(model.blocks)} blocks but {len(model.exits)} exits; they must match")
    return model.eval()


def load_weights(model: nn.Module, path) -> None:
    """Load a plain state_dict (weights_only: never unpickle arbitrary objects)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is the user's file
        raise SpecError(f"weights: cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise SpecError(f"weights: {path} is not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise SpecError(f"weights: {path} does not fit the model: {detail[:300]}") from None
