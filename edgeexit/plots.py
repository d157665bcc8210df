"""Pictures of what a build measured (matplotlib, optional: `pip install 'edgeexit[plot]'`).

Each picture has a `*_figure` builder that returns the matplotlib Figure (on the file-only
Agg canvas, no pyplot state), so tests can inspect what is drawn, and a `plot_*` function
that writes it as a PNG and returns True, or False when matplotlib is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from calibration.gating import describe_thresholds

MIN_SPAN_SAMPLES = 8  # the accuracy axis spans at least this many test samples' worth
PAD_SAMPLES = 2  # and pads the data by this many samples' worth on either side


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(figsize: tuple[float, float]):
    """A Figure on the Agg canvas, outside pyplot (nothing global to close or leak)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _plot(figure: Callable[[], Any], path: Path) -> bool:
    """Draw `figure()` into the PNG `path`; False (nothing written) without matplotlib."""
    if not _have_matplotlib():
        return False
    figure().savefig(path, bbox_inches="tight")
    return True


def sample_pt(samples: int) -> float:
    """Accuracy points (percent) one sample is worth on a split of `samples`."""
    return 100.0 / max(int(samples), 1)


def _pad_accuracy_axis(ax, values: Sequence[float], samples: int) -> None:
    """Y limits around `values` (percent) padded by PAD_SAMPLES samples' worth and at least
    MIN_SPAN_SAMPLES samples wide, so a one-sample wobble does not fill the axis."""
    step = sample_pt(samples)
    lo, hi = min(values) - PAD_SAMPLES * step, max(values) + PAD_SAMPLES * step
    short = MIN_SPAN_SAMPLES * step - (hi - lo)
    if short > 0:
        lo, hi = lo - short / 2, hi + short / 2
    if hi > 100.0:  # accuracy cannot pass 100%: shift the window down instead of showing the void
        lo, hi = lo - (hi - 100.0 - step / 2), 100.0 + step / 2
    ax.set_ylim(lo, hi)


def accuracy_label(samples: int, split: str = "test") -> str:
    """The accuracy axis label, with what one sample of the split is worth."""
    return f"{split} accuracy, % ({samples} samples; 1 sample = {sample_pt(samples):.2g} pt)"


def _legend_below(ax, ncol: int = 2):
    """The legend under the axes (outside the data area, so it covers no point)."""
    return ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False)


def upper_frontier(cost: Sequence[float], accuracy: Sequence[float]) -> tuple[list[int], list[int]]:
    """Indices of the sweep's upper (Pareto) frontier in cost order, and of the dominated
    rest: a point is on the frontier when every cheaper-or-equal point is less accurate."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -accuracy[i]))
    front, dominated, best = [], [], float("-inf")
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
        else:
            dominated.append(i)
    return front, dominated


def tradeoff_figure(report: dict[str, Any]):
    """Accuracy vs compute per sample on the test split: the shared-threshold sweep (its upper
    frontier joined in cost order, dominated thresholds as plain markers), the bundle's
    thresholds, the monolithic model and each exit alone. The axis says what one test sample
    is worth and spans at least MIN_SPAN_SAMPLES of them."""
    samples = int(report["samples"])
    curve = report["tradeoff"]
    cost = [float(c) for c in curve["mflops"]]
    acc = [100 * float(a) for a in curve["accuracy"]]
    front, dominated = upper_frontier(cost, acc)
    fig, ax = _new_figure((6.4, 4.8))
    ax.plot([cost[i] for i in front], [acc[i] for i in front], ".-", color="tab:blue", lw=0.9, ms=5, zorder=3,
            label="one threshold for every early exit: upper frontier, by cost", gid="frontier")
    if dominated:
        ax.plot([cost[i] for i in dominated], [acc[i] for i in dominated], "x", color="tab:blue", alpha=0.5, ms=4,
                lw=0, zorder=2, label="dominated thresholds (a cheaper one is as accurate)", gid="dominated")
    ys = list(acc)
    ys.append(100 * report["cascade_accuracy"])
    ax.plot([report["cascade_flops"] / 1e6], [ys[-1]], "o", color="tab:orange", ms=8, zorder=4,
            label=f"{'calibrated' if report.get('yaml_thresholds') else 'build'} thresholds "
                  f"{', '.join(describe_thresholds(report['thresholds'])[:-1])}", gid="bundle")
    ys.append(100 * report["monolithic_accuracy"])
    ax.plot([report["monolithic_flops"] / 1e6], [ys[-1]], "s", color="tab:gray", ms=7, zorder=4,
            label="monolithic (final exit only)", gid="monolithic")
    for k, (f, a) in enumerate(zip(report["cumulative_flops"], report["exit_accuracy"])):
        ys.append(100 * a)
        ax.annotate(f"exit {k}", (f / 1e6, 100 * a), textcoords="offset points", xytext=(4, -10), fontsize=7,
                    color="tab:green")
        ax.plot([f / 1e6], [100 * a], ".", color="tab:green", zorder=4,
                label="each exit alone (all samples leave there)" if k == 0 else None)
    _pad_accuracy_axis(ax, ys, samples)
    ax.set_xlabel("MFLOPs per sample (expected)")
    ax.set_ylabel(accuracy_label(samples), fontsize=9)
    ax.set_title(f"{report['name']}: early exit trade-off ({report['confidence']})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    fig.tight_layout()
    return fig


def plot_tradeoff(report: dict[str, Any], path: Path) -> bool:
    """tradeoff.png (see `tradeoff_figure`). Returns False when matplotlib is not installed."""
    return _plot(lambda: tradeoff_figure(report), path)


SOLVER_STYLES = {  # geometric on top, larger and hollow, so it shows where the optimiser lands on it
    "geometric": dict(marker="s", ls="--", color="0.25", ms=8, mfc="none", mew=1.3, lw=1.2, zorder=4,
                      label="geometric (MSDNet/RANet)"),
    "optimise": dict(marker="o", ls="-", color="tab:blue", ms=4, mfc="tab:blue", mew=1.0, lw=1.0, zorder=3,
                     label="optimiser"),
    "policy": dict(marker="^", ls=":", color="tab:purple", ms=5, mfc="tab:purple", mew=1.0, lw=1.0, zorder=3.5,
                   label="exit policy (trained)"),
}


def latency_axis(metric: str) -> tuple[str, bool]:
    """Which per-point latency the pareto plot draws for a budget on `metric`, and whether
    the budget line belongs on that axis.

    The pareto rows carry a modelled mean and p95 per point, nothing else. A mean or p95
    budget is drawn on its own axis with its line. For any other tail (p99, p90, ...) the
    points are drawn at their p95, the only tail they have, and the budget line is left
    off: a p99 limit drawn on a p95 axis would put points left of the line that may still
    break it (a point's p99 is at least its p95). The axis label says so instead."""
    if metric == "mean":
        return "mean_ms", True
    return "p95_ms", metric == "p95"


def falling_accuracy(rows: list[dict[str, Any]], solver: str, samples: int) -> dict[str, float] | None:
    """When the solver's test accuracy at the largest budget is more than one test sample
    below its best at a smaller budget: the two points (budget ms, accuracy %), else None."""
    pts = sorted((r["budget_ms"], 100 * r[solver]["accuracy"]) for r in rows if r.get(solver))
    if len(pts) < 2:
        return None
    best = max(pts[:-1], key=lambda p: p[1])
    if best[1] - pts[-1][1] <= sample_pt(samples) + 1e-9:
        return None
    return {"best_budget_ms": best[0], "best_accuracy": best[1], "last_budget_ms": pts[-1][0],
            "last_accuracy": pts[-1][1], "drop_pt": best[1] - pts[-1][1]}


def pareto_figure(record: dict[str, Any], name: str):
    """Test accuracy vs modelled call latency of both threshold solvers (and the exit policy,
    when trained) over a sweep of budgets, with the deployed point: the thresholds, or the
    exit policy when the manifest gates on it (and its re-measured latency).

    The x axis is the latency the budget is written in where the points have it (see
    `latency_axis`). The geometric solver is drawn above the optimiser with larger hollow
    markers, so both show where they coincide; the legend sits below the axes. When test
    accuracy falls with budget (see `falling_accuracy`), a note on the plot says so."""
    b = record["budget"]
    metric = b.get("metric", "mean")
    key, line = latency_axis(metric)
    drawn = "mean" if key == "mean_ms" else "p95"
    samples = int(record["splits"]["report"]["samples"])
    fit = record["splits"].get("fit", {})
    fig, ax = _new_figure((6.4, 5.0))
    ys: list[float] = []
    for solver, style in SOLVER_STYLES.items():
        pts = sorted((r[solver][key], 100 * r[solver]["accuracy"]) for r in record["pareto"] if r.get(solver))
        if pts:
            ax.plot(*zip(*pts), gid=solver, **style)
            ys += [a for _, a in pts]
    on_policy = record.get("deployed") == "policy"
    test = record["policy"]["test"] if on_policy else record["test"]
    what = "calibrated, exit policy" if on_policy else "calibrated"
    if line:
        ax.axvline(b["ms"], color="tab:red", lw=0.8, ls=":", zorder=1, label=f"budget {b['ms']:.4g} ms ({metric})",
                   gid="budget")
    ys.append(100 * test["accuracy"])
    ax.plot([test[key]], [ys[-1]], "*", color="tab:orange", ms=12, zorder=5, label=f"{what} (modelled)",
            gid="deployed")
    measured = (record.get("measured") or {}).get("policy" if on_policy else "chosen")
    if measured and key in measured:
        ax.plot([measured[key]], [100 * test["accuracy"]], "x", color="tab:red", ms=9, zorder=5,
                label=f"{what} (measured)", gid="measured")
    source = "estimate" if record["latency"]["estimate"] else "measured model"
    xlabel = f"{drawn} call latency, ms (batch {b['batch']}, {source})"
    if not line:
        xlabel += (f"\nbudget: {metric} <= {b['ms']:.4g} ms, not drawn: points have no {metric}, "
                   f"their {metric} is at least the {drawn} shown")
    ax.set_xlabel(xlabel, fontsize=8 if not line else None)
    ax.set_ylabel(accuracy_label(samples), fontsize=9)
    fig.suptitle(f"{name}: accuracy under a {metric} latency budget (fit on val, shown on test)", fontsize=9)
    if ys:
        _pad_accuracy_axis(ax, ys, samples)
    falls = [(s, f) for s in SOLVER_STYLES if (f := falling_accuracy(record["pareto"], s, samples))]
    if falls:
        f = falls[0][1]
        who = ", ".join(SOLVER_STYLES[x]["label"] for x, _ in falls)
        ax.set_title(f"test accuracy does not rise with budget on this split ({who}): "
                     f"{f['last_accuracy']:.1f}% at the largest budget,\n{f['drop_pt']:.2g} pt "
                     f"({f['drop_pt'] / sample_pt(samples):.0f} samples) below {f['best_accuracy']:.1f}% "
                     f"at budget {f['best_budget_ms']:.3g} ms; thresholds are fit on val"
                     + (f" ({fit['samples']} samples)" if "samples" in fit else "")
                     + f", scored on {samples} held-out test samples",
                     loc="left", fontsize=6.5, color="tab:red")
    ax.grid(alpha=0.3)
    _legend_below(ax)
    fig.tight_layout()
    return fig


def plot_pareto(record: dict[str, Any], name: str, path: Path) -> bool:
    """pareto.png (see `pareto_figure`). Returns False without matplotlib."""
    return _plot(lambda: pareto_figure(record, name), path)


def exit_curves_figure(curves: dict[str, tuple[list[float], list[float]]], title: str):
    """Test accuracy vs cumulative MFLOPs per exit, one line with markers per model."""
    fig, ax = _new_figure((6, 4))
    for name, (mflops, accuracy) in curves.items():
        ax.plot(mflops, [100 * a for a in accuracy], "o-", ms=4, lw=1, label=name)
    ax.set_xlabel("cumulative MFLOPs at the exit (multiply-adds incl. earlier heads)")
    ax.set_ylabel("test accuracy at the exit, %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_exit_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str) -> bool:
    """Test accuracy vs cumulative MFLOPs per exit, one line with markers per model (name ->
    (MFLOPs per exit, accuracy per exit as a share)). Returns False without matplotlib."""
    return _plot(lambda: exit_curves_figure(curves, title), path)


def anytime_figure(rows: list[dict[str, Any]], samples: int, name: str):
    """Test accuracy vs the deadline per input (`calibration.anytime.anytime_curve` rows on
    `samples` inputs): pure anytime (the deepest exit that fits) and the thresholds under it."""
    fig, ax = _new_figure((6, 4))
    deadline = [r["deadline_ms"] for r in rows]
    ax.step(deadline, [100 * r["anytime_accuracy"] for r in rows], where="post", label="anytime (deepest exit that fits)")
    ax.step(deadline, [100 * r["accuracy"] for r in rows], where="post", label="thresholds under the deadline")
    late = [r["deadline_ms"] for r in rows if r["late"]]
    if late:
        ax.axvspan(min(deadline), max(late), color="tab:red", alpha=0.1, label="late: exit 0 does not fit")
    ax.set_xlabel("deadline per input, ms (batch 1, a call's tail in the profile)")
    ax.set_ylabel(accuracy_label(samples), fontsize=9)
    ax.set_title(f"{name}: anytime accuracy vs deadline", fontsize=9)
    _pad_accuracy_axis(ax, [100 * r[k] for r in rows for k in ("anytime_accuracy", "accuracy")], samples)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    fig.tight_layout()
    return fig


def plot_anytime(rows: list[dict[str, Any]], samples: int, name: str, path: Path) -> bool:
    """Write `anytime_figure` as a PNG; False without matplotlib."""
    return _plot(lambda: anytime_figure(rows, samples, name), path)
