"""model.yaml -> a typed, validated `Spec`.

Every problem is reported as one `SpecError` line that starts with the field path
(`export.batch.max: ...`) and says what is allowed, so a user can fix the yaml without
reading code. Relative paths in the yaml are resolved against the yaml's own folder,
so a spec means the same thing whatever the current directory is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from calibration.solvers import TAILS
from edgeexit.errors import SpecError

CONFIDENCE_KINDS = ("max_softmax", "margin", "entropy", "learned")
BACKENDS = ("auto", "onnxruntime", "torch", "torch-cuda", "tensorrt")
DTYPES = ("float32",)
LOSSES = ("ce", "eenets", "eenets_sum")
PRECISIONS = ("fp32", "fp16", "int8")
FUSED_MODES = ("auto", "on", "off")
PROFILE_MODES = ("buckets", "range")  # export.batch.profiles
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
SPLITS = ("train", "val", "calibration", "test")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class ModelSpec:
    arch: str | None
    factory: str | None
    args: dict[str, Any]
    backbone: str | None = None  # torchvision:NAME, timm:NAME or package.module:function (any nn.Module)
    exits_after: tuple[str, ...] = ()  # with a backbone: the layers to exit after, in forward order
    exit_head: dict[str, Any] = field(default_factory=dict)  # with a backbone: {kind, width}
    checkpoint: Path | None = None  # with a backbone: its own trained weights (a state_dict), loaded before training
    checkpoint_keys: tuple[tuple[str, str | None], ...] = ()  # model.checkpoint.keys: file prefix -> model prefix
    exits_auto: tuple[int, str] | None = None  # exits_after: {auto: N, cost}: N cuts chosen by cost (cut_points)

    @property
    def label(self) -> str:
        """The model as the yaml names it."""
        return self.arch or self.factory or str(self.backbone)

    def to_manifest(self) -> dict[str, Any]:
        """The model section a bundle records (what the torch backend rebuilds it from)."""
        out: dict[str, Any] = {"arch": self.arch, "factory": self.factory, "args": self.args}
        if self.backbone is not None:
            out.update(backbone=self.backbone, exits_after=list(self.exits_after), exit_head=self.exit_head)
        return out


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # (C, H, W), batch excluded
    dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DataSpec:
    kind: str  # digits | npz | folder
    path: Path | None
    splits: dict[str, float]
    seed: int
    resize: bool = False  # resize images (bilinear) to input.shape's height x width


@dataclass(frozen=True)
class GatingSpec:
    confidence: str
    thresholds: tuple[float | None, ...] | None  # None: a default is chosen per model


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int
    profiles: str = "buckets"  # TensorRT optimization profiles: one static per batch bucket, or one range


@dataclass(frozen=True)
class QuantSpec:
    method: str  # activation range calibration: minmax | entropy | percentile
    samples: int  # calibration images (from the calibration split)


@dataclass(frozen=True)
class ExportSpec:
    opset: int
    batch: BatchRange
    parity_atol: float
    precision: str  # every stage's precision unless overridden
    stage_precision: dict[int, str]  # stage index -> precision
    calibration: QuantSpec
    tolerance_pt: float  # allowed final-exit accuracy drop vs fp32, in percentage points
    fallback: str | None  # precision a stage may fall back to when it breaks the tolerance
    fused: str = "auto"  # the fused cascade graph: auto (built, used at batch 1 where it pays), on, off

    def precision_of(self, stage: int) -> str:
        """The precision stage `stage` is exported in."""
        return self.stage_precision.get(stage, self.precision)


@dataclass(frozen=True)
class TargetSpec:
    device: str
    backend: str
    dla_core: int | None  # run the TensorRT engines on this DLA core (GPU fallback), or None


@dataclass(frozen=True)
class BudgetSpec:
    latency_ms: float | None
    batch: int = 1  # samples per cascade call the budget applies to
    tail: str = "mean"  # mean | p95 | p99: which figure of call latency must stay under the budget


@dataclass(frozen=True)
class TrainSpec:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    loss: str
    cost_lambda: float
    seed: int
    feature_surgery: float | None = None  # Deep Feature Surgery: share beta of exit-specific channels, or off
    freeze_backbone: bool = False  # with model.backbone: train the exit heads only (the backbone as loaded)
    distill: tuple[float, float] | None = None  # self-distillation from the final exit: (temperature, weight)


@dataclass(frozen=True)
class Spec:
    name: str
    model: ModelSpec
    weights: Path | None
    input: InputSpec
    data: DataSpec
    gating: GatingSpec
    export: ExportSpec
    target: TargetSpec
    budget: BudgetSpec
    train: TrainSpec
    output: Path
    source: Path | None = None  # the yaml file this spec came from
    weights_keys: tuple[tuple[str, str | None], ...] = ()  # weights.keys: file prefix -> model prefix (None: skip)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths of the yaml are resolved against."""
        return self.source.parent if self.source else Path.cwd()


# --- small typed readers: each names the field path in its error -------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _mapping(value: Any, path: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{path or 'model.yaml'}: expected a mapping, got {_type_name(value)}")
    allowed = required | optional
    for key in value:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            hint = _closest(str(key), allowed)
            raise SpecError(
                f"{where}: unknown key{hint} (allowed: {', '.join(sorted(allowed))})"
            )
    for key in sorted(required):
        if key not in value:
            where = f"{path}.{key}" if path else key
            raise SpecError(f"{where}: required field is missing")
    return value


def _closest(key: str, allowed: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{path}: expected a non-empty string, got {_type_name(value)}")
    return value


def _choice(value: Any, path: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SpecError(f"{path}: {value!r} is not allowed (allowed: {', '.join(allowed)})")
    return value


def _int(value: Any, path: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}: expected an integer, got {_type_name(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise SpecError(f"{path}: {value} is out of range (must be {rng})")
    return value


def _float(value: Any, path: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{path}: expected a number, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise SpecError(f"{path}: {value} is not a finite number")
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        lo_txt = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_txt = "" if hi is None else f"<= {hi}"
        raise SpecError(f"{path}: {value:g} is out of range (must be {' and '.join(t for t in (lo_txt, hi_txt) if t)})")
    return value


def _list(value: Any, path: str, min_len: int = 1) -> list[Any]:
    if not isinstance(value, list) or len(value) < min_len:
        raise SpecError(f"{path}: expected a list of at least {min_len} item(s), got {_type_name(value)}")
    return value


def _path(value: Any, path: str, base: Path) -> Path:
    p = Path(_str(value, path)).expanduser()
    return p if p.is_absolute() else (base / p)


def _weights_file(value: Any, path: str, base: Path) -> tuple[Path, tuple[tuple[str, str | None], ...]]:
    """A weights file: its path, or {path, keys} where `keys` maps key prefixes of the file to
    the model's (an official checkpoint's names; a `module.` prefix to ''), null skipping a
    prefix on both sides (a classifier of another class count keeps its initial weights)."""
    if not isinstance(value, dict):
        return _path(value, path, base), ()
    w = _mapping(value, path, {"path"}, {"keys"})
    keys = w.get("keys") or {}
    if not isinstance(keys, dict):
        raise SpecError(f"{path}.keys: expected a mapping of key prefixes (file: model, null to skip), "
                        f"got {_type_name(keys)}")
    pairs = []
    for old, new in keys.items():
        old = _str(old, f"{path}.keys")
        if new is not None and not isinstance(new, str):
            raise SpecError(f"{path}.keys.{old}: expected the model's key prefix (a string, '' to strip) or null "
                            f"(skip), got {_type_name(new)}")
        pairs.append((old, new))
    return _path(w["path"], f"{path}.path", base), tuple(pairs)


# --- sections ----------------------------------------------------------------------------


EXIT_HEADS = ("pool-linear", "conv-pool-linear")  # model.exit_head.kind (edgeexit.backbone.make_head)
BACKBONE_LIBRARIES = ("torchvision", "timm")  # model.backbone LIBRARY:NAME; model libraries, not a bundle's code
_BACKBONE_RE = re.compile(rf"^({'|'.join(BACKBONE_LIBRARIES)}):[A-Za-z_]\w*$")


def _model(raw: Any, base_dir: Path) -> ModelSpec:
    m = _mapping(raw, "model", set(), {"arch", "factory", "backbone", "exits_after", "exit_head", "checkpoint", "args"})
    if sum(k in m for k in ("arch", "factory", "backbone")) != 1:
        raise SpecError("model: give exactly one of 'arch' (a zoo architecture), 'factory' ('package.module:function' "
                        "building a multi-exit model) or 'backbone' (any network, with exits_after)")
    args = m.get("args", {}) or {}
    if not isinstance(args, dict):
        raise SpecError(f"model.args: expected a mapping, got {_type_name(args)}")
    if "backbone" not in m:
        for key in ("exits_after", "exit_head", "checkpoint"):
            if key in m:
                raise SpecError(f"model.{key}: only with model.backbone")
    arch = factory = backbone = exits_auto = None
    exits_after: tuple[str, ...] = ()
    head: dict[str, Any] = {}
    if "arch" in m:
        from edgeexit.models import ARCHITECTURES

        arch = _choice(m["arch"], "model.arch", tuple(sorted(ARCHITECTURES)))
    elif "factory" in m:
        factory = _str(m["factory"], "model.factory")
        if not _FACTORY_RE.match(factory):
            raise SpecError(f"model.factory: {factory!r} is not of the form 'package.module:function'")
    else:
        backbone = _str(m["backbone"], "model.backbone")
        if not (_BACKBONE_RE.match(backbone) or _FACTORY_RE.match(backbone)):
            raise SpecError(f"model.backbone: {backbone!r} is not torchvision:NAME, timm:NAME or "
                            "'package.module:function'")
        for key in ("weights", "pretrained", "weights_backbone", "pretrained_cfg_overlay"):
            if _BACKBONE_RE.match(backbone) and args.get(key):
                raise SpecError(f"model.args.{key}: edgeexit downloads nothing at run time; save the pretrained "
                                "weights to a file once and name it in model.checkpoint")
        if "exits_after" not in m:
            raise SpecError("model.exits_after: name the layers to exit after (as named_modules() prints them, "
                            "e.g. [layer1, layer2, layer3]), or {auto: N}")
        if isinstance(m["exits_after"], dict):
            from edgeexit.cut_points import COSTS

            a = _mapping(m["exits_after"], "model.exits_after", {"auto"}, {"cost"})
            exits_auto = (_int(a["auto"], "model.exits_after.auto", 1, 16),
                          _choice(a.get("cost", "flops"), "model.exits_after.cost", COSTS))
        else:
            exits_after = tuple(_str(v, f"model.exits_after[{k}]")
                                for k, v in enumerate(_list(m["exits_after"], "model.exits_after")))
        h = _mapping(m.get("exit_head") or {}, "model.exit_head", set(), {"kind", "width"})
        head = {"kind": _choice(h.get("kind", "pool-linear"), "model.exit_head.kind", EXIT_HEADS),
                "width": _int(h.get("width", 128), "model.exit_head.width", 1, 4096)}
    checkpoint, checkpoint_keys = None, ()
    if m.get("checkpoint") is not None:
        checkpoint, checkpoint_keys = _weights_file(m["checkpoint"], "model.checkpoint", base_dir)
        if not checkpoint.is_file():
            raise SpecError(f"model.checkpoint: file not found: {checkpoint}")
    return ModelSpec(arch=arch, factory=factory, args=dict(args), backbone=backbone, exits_after=exits_after,
                     exits_auto=exits_auto, exit_head=head, checkpoint=checkpoint, checkpoint_keys=checkpoint_keys)


def _input(raw: Any) -> InputSpec:
    i = _mapping(raw, "input", {"shape", "classes"}, {"name", "dtype", "mean", "std"})
    shape = tuple(_int(v, f"input.shape[{k}]", 1) for k, v in enumerate(_list(i["shape"], "input.shape")))
    if len(shape) != 3:
        raise SpecError(f"input.shape: expected [channels, height, width] (batch excluded), got {list(shape)}")
    channels = shape[0]

    def per_channel(key: str, default: float, positive: bool) -> tuple[float, ...]:
        value = i.get(key, [default])
        if not isinstance(value, list):
            value = [value]
        vals = tuple(_float(v, f"input.{key}[{k}]", 0.0 if positive else None, lo_open=positive)
                     for k, v in enumerate(value))
        if len(vals) not in (1, channels):
            raise SpecError(f"input.{key}: {len(vals)} values for {channels} channel(s); give 1 or {channels}")
        return vals * channels if len(vals) == 1 else vals

    classes = tuple(_str(c, f"input.classes[{k}]") if isinstance(c, bool) or not isinstance(c, int) else str(c)
                    for k, c in enumerate(_list(i["classes"], "input.classes", 2)))
    if len(set(classes)) != len(classes):
        raise SpecError("input.classes: class names must be unique")
    name = _str(i.get("name", "image"), "input.name")
    if not _NAME_RE.match(name):
        raise SpecError(f"input.name: {name!r} must be letters, digits, '_', '.' or '-'")
    return InputSpec(
        name=name,
        shape=shape,
        dtype=_choice(i.get("dtype", "float32"), "input.dtype", DTYPES),
        mean=per_channel("mean", 0.0, positive=False),
        std=per_channel("std", 1.0, positive=True),
        classes=classes,
    )


def _data(raw: Any, base: Path) -> DataSpec:
    d = _mapping(raw, "data", {"source"}, {"splits", "seed", "resize"})
    source = _str(d["source"], "data.source")
    if source == "digits":
        kind, path = "digits", None
    else:
        path = _path(source, "data.source", base)
        if path.suffix == ".npz":
            kind = "npz"
            if not path.is_file():
                raise SpecError(f"data.source: file not found: {path}")
        elif path.is_dir():
            kind = "folder"
        else:
            raise SpecError(f"data.source: {source!r} is neither 'digits', an existing .npz file nor an image folder")
    defaults = {"train": 0.6, "val": 0.15, "calibration": 0.1, "test": 0.15}
    s = _mapping(d.get("splits", defaults), "data.splits", set(), set(SPLITS))
    splits = {k: _float(s.get(k, defaults[k]), f"data.splits.{k}", 0.0, 1.0, lo_open=True) for k in SPLITS}
    if sum(splits.values()) > 1.0 + 1e-9:
        raise SpecError(f"data.splits: fractions add up to {sum(splits.values()):g}; they must add up to <= 1")
    resize = d.get("resize", False)
    if not isinstance(resize, bool):
        raise SpecError(f"data.resize: expected true or false, got {_type_name(resize)}")
    return DataSpec(kind=kind, path=path, splits=splits, seed=_int(d.get("seed", 0), "data.seed", 0, MAX_SEED), resize=resize)


def _gating(raw: Any) -> GatingSpec:
    g = _mapping(raw, "gating", set(), {"confidence", "thresholds"})
    confidence = _choice(g.get("confidence", "max_softmax"), "gating.confidence", CONFIDENCE_KINDS)
    thresholds = None
    if g.get("thresholds") is not None:
        values = _list(g["thresholds"], "gating.thresholds", 2)
        thresholds = tuple(
            None if v is None else _float(v, f"gating.thresholds[{k}]", 0.0) for k, v in enumerate(values)
        )
        # how many values and which may be null depend on the model's exit count: checked with
        # it, by runtime.cascade.gate_thresholds (as for `run --thresholds`)
    return GatingSpec(confidence=confidence, thresholds=thresholds)


def _export(raw: Any) -> ExportSpec:
    e = _mapping(raw, "export", set(), {"opset", "batch", "parity_atol", "precision", "stage_precision",
                                        "calibration", "tolerance_pt", "fallback", "fused"})
    b = _mapping(e.get("batch", {}), "export.batch", set(), {"min", "opt", "max", "profiles"})
    lo = _int(b.get("min", 1), "export.batch.min", 1)
    hi = _int(b.get("max", 64), "export.batch.max", 1)
    opt = _int(b.get("opt", min(max(lo, 8), hi)), "export.batch.opt", 1)
    if not lo <= opt <= hi:
        raise SpecError(f"export.batch: need min <= opt <= max, got min={lo}, opt={opt}, max={hi}")
    stage_precision = {}
    overrides = e.get("stage_precision") or {}
    if not isinstance(overrides, dict):
        raise SpecError(f"export.stage_precision: expected a mapping of stage index to precision, got {_type_name(overrides)}")
    for key, value in overrides.items():
        index = _int(key, f"export.stage_precision.{key}", 0)
        stage_precision[index] = _choice(value, f"export.stage_precision.{key}", PRECISIONS)
    c = _mapping(e.get("calibration") or {}, "export.calibration", set(), {"method", "samples"})
    fallback = e.get("fallback")
    return ExportSpec(
        # 13 is the oldest opset TensorRT's parser takes well; 17 is what TensorRT 8.5 (JetPack 5) reads.
        opset=_int(e.get("opset", 17), "export.opset", 13, 21),
        batch=BatchRange(lo, opt, hi, _choice(b.get("profiles", "buckets"), "export.batch.profiles", PROFILE_MODES)),
        parity_atol=_float(e.get("parity_atol", 1e-4), "export.parity_atol", 0.0, lo_open=True),
        precision=_choice(e.get("precision", "fp32"), "export.precision", PRECISIONS),
        stage_precision=stage_precision,
        calibration=QuantSpec(
            method=_choice(c.get("method", "minmax"), "export.calibration.method", CALIBRATION_METHODS),
            samples=_int(c.get("samples", 256), "export.calibration.samples", 1),
        ),
        tolerance_pt=_float(e.get("tolerance_pt", 0.5), "export.tolerance_pt", 0.0),
        fallback=None if fallback is None else _choice(fallback, "export.fallback", PRECISIONS),
        fused=_choice(_switch(e.get("fused", "auto")), "export.fused", FUSED_MODES),
    )


def _switch(value: Any) -> Any:
    """yaml's true/false (a bare on/off reads as a boolean) as "on"/"off"; anything else as is."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def _target(raw: Any) -> TargetSpec:
    t = _mapping(raw, "target", set(), {"device", "backend", "dla"})
    dla = t.get("dla")
    return TargetSpec(
        device=_str(t.get("device", "host-cpu"), "target.device"),
        backend=_choice(t.get("backend", "auto"), "target.backend", BACKENDS),
        dla_core=None if dla is None else _int(dla, "target.dla", 0, 1),
    )


def _budget(raw: Any) -> BudgetSpec:
    b = _mapping(raw, "budget", set(), {"latency_ms", "batch", "tail"})
    latency = b.get("latency_ms")
    return BudgetSpec(latency_ms=None if latency is None else _float(latency, "budget.latency_ms", 0.0, lo_open=True),
                      batch=_int(b.get("batch", 1), "budget.batch", 1),
                      tail=_choice(b.get("tail", "mean"), "budget.tail", tuple(TAILS)))


def _train(raw: Any) -> TrainSpec:
    keys = {"epochs", "batch_size", "lr", "momentum", "weight_decay", "loss", "cost_lambda", "seed", "feature_surgery",
            "freeze_backbone", "distill"}
    t = _mapping(raw, "train", set(), keys)
    surgery = t.get("feature_surgery")
    freeze = t.get("freeze_backbone", False)
    if not isinstance(freeze, bool):
        raise SpecError(f"train.freeze_backbone: expected true or false, got {_type_name(freeze)}")
    distill = None
    if t.get("distill") is not None:
        d = _mapping(t["distill"], "train.distill", set(), {"temperature", "weight"})
        distill = (_float(d.get("temperature", 4.0), "train.distill.temperature", 0.0, 100.0, lo_open=True),
                   _float(d.get("weight", 1.0), "train.distill.weight", 0.0, 100.0))
    return TrainSpec(
        epochs=_int(t.get("epochs", 30), "train.epochs", 1),
        batch_size=_int(t.get("batch_size", 64), "train.batch_size", 1),
        lr=_float(t.get("lr", 0.05), "train.lr", 0.0, 10.0, lo_open=True),
        momentum=_float(t.get("momentum", 0.9), "train.momentum", 0.0, 1.0),
        weight_decay=_float(t.get("weight_decay", 5e-4), "train.weight_decay", 0.0, 1.0),
        loss=_choice(t.get("loss", "ce"), "train.loss", LOSSES),
        cost_lambda=_float(t.get("cost_lambda", 0.1), "train.cost_lambda", 0.0),
        seed=_int(t.get("seed", 0), "train.seed", 0, MAX_SEED),
        feature_surgery=None if surgery is None else _float(surgery, "train.feature_surgery", 0.0, 1.0, lo_open=True),
        freeze_backbone=freeze, distill=distill,
    )


TOP_LEVEL_REQUIRED = {"name", "model", "input", "data"}
TOP_LEVEL_OPTIONAL = {"weights", "gating", "export", "target", "budget", "train", "output"}


def parse_spec(raw: Any, base_dir: Path, source: Path | None = None, require_weights: bool = True) -> Spec:
    """Validate a loaded yaml document and turn it into a `Spec`.

    `require_weights` is False for `edgeexit train`, which creates the weights file.
    """
    _check_values(raw)
    top = _mapping(raw, "", TOP_LEVEL_REQUIRED, TOP_LEVEL_OPTIONAL)
    name = _str(top["name"], "name")
    if not _NAME_RE.match(name):
        raise SpecError(f"name: {name!r} must be letters, digits, '_', '.' or '-' (it names files)")
    weights, weights_keys = None, ()
    if top.get("weights") is not None:
        weights, weights_keys = _weights_file(top["weights"], "weights", base_dir)
        if require_weights and not weights.is_file():
            raise SpecError(
                f"weights: file not found: {weights} (run `edgeexit train` to create it, or drop `weights` to train during build)"
            )
    output = _path(top.get("output", f"build/{name}"), "output", base_dir)
    spec = Spec(
        name=name,
        model=_model(top["model"], base_dir),
        weights=weights,
        input=_input(top["input"]),
        data=_data(top["data"], base_dir),
        gating=_gating(top.get("gating", {}) or {}),
        export=_export(top.get("export", {}) or {}),
        target=_target(top.get("target", {}) or {}),
        budget=_budget(top.get("budget", {}) or {}),
        train=_train(top.get("train", {}) or {}),
        output=output,
        source=source,
        weights_keys=weights_keys,
        raw=raw,
    )
    if spec.budget.batch > spec.export.batch.max:
        raise SpecError(f"budget.batch: {spec.budget.batch} is above export.batch.max ({spec.export.batch.max})")
    if spec.weights is not None and spec.model.exits_auto is not None and spec.model.exits_auto[1] == "measured":
        raise SpecError("model.exits_after: {auto, cost: measured} chooses again on every build, so weights trained "
                        "for one choice may not fit the next; name the layers the build printed, or use cost: flops")
    if spec.train.freeze_backbone and (spec.model.backbone is None or spec.model.checkpoint is None):
        raise SpecError("train.freeze_backbone: trains the exit heads of a model.backbone on its model.checkpoint "
                        + ("(give the backbone's trained weights there; a frozen random backbone learns nothing)"
                           if spec.model.backbone is not None else "(this model has no backbone)"))
    _check_device(spec)
    return spec


def _check_device(spec: Spec) -> None:
    from edgeexit.devices import load_device

    load_device(spec.target.device)  # raises "target.device: unknown device ..." with the known names


MAX_YAML_BYTES = 1 << 20  # a model.yaml is a page of settings; this leaves room for long class lists
MAX_YAML_VALUES = 100_000  # values after YAML aliases are expanded (an alias bomb stops here)
MAX_YAML_DEPTH = 64


def _check_values(raw: Any) -> None:
    """Refuse NaN/Inf anywhere in the document, and a document that expands (through YAML
    aliases, or a recursive alias) beyond MAX_YAML_VALUES values or MAX_YAML_DEPTH levels."""
    count = 0
    stack: list[tuple[Any, str, int]] = [(raw, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
            raise SpecError(f"model.yaml: expands to more than {MAX_YAML_VALUES} values or {MAX_YAML_DEPTH} levels "
                            "(recursive or repeated YAML aliases?)")
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{path or 'model.yaml'}: {value} is not a finite number")
        if isinstance(value, dict):
            stack += [(v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{k}]", depth + 1) for k, v in enumerate(value)]


def load_spec(path: str | Path, require_weights: bool = True) -> Spec:
    """Read and validate a model.yaml file (yaml.safe_load only; no object construction;
    at most MAX_YAML_BYTES of UTF-8)."""
    path = Path(path)
    if path.is_dir():
        inside = path / "model.yaml"
        raise SpecError(f"model.yaml: {path} is a folder, not a yaml file"
                        + (f" (did you mean {inside}?)" if inside.is_file() else ""))
    if not path.is_file():
        raise SpecError(f"model.yaml: file not found: {path}")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise SpecError(f"model.yaml: {path} is {size} bytes; a model.yaml may have at most {MAX_YAML_BYTES}")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"model.yaml: {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"model.yaml: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise SpecError("model.yaml: nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits (int's conversion limit)
        raise SpecError(f"model.yaml: {' '.join(str(exc).split())[:200]}") from None
    return parse_spec(raw, path.resolve().parent, source=path.resolve(), require_weights=require_weights)
