"""Pictures of what a build measured (matplotlib, optional: `pip install 'edgeexit[plot]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, ax, path: Path) -> None:
    """Grid, legend, tight layout, write the PNG and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tradeoff(report: dict[str, Any], path: Path) -> bool:
    """Accuracy vs compute per sample: the shared-threshold curve, the bundle's thresholds and
    the monolithic model, on the test split. Returns False when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    curve = sorted(zip(report["tradeoff"]["mflops"], report["tradeoff"]["accuracy"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([c for c, _ in curve], [100 * a for _, a in curve], ".-", color="tab:blue", lw=0.8, ms=4,
            label="one threshold for every early exit (0..1)")
    ax.plot([report["cascade_flops"] / 1e6], [100 * report["cascade_accuracy"]], "o", color="tab:orange", ms=8,
            label=f"bundle thresholds {report['thresholds'][:-1]}")
    ax.plot([report["monolithic_flops"] / 1e6], [100 * report["monolithic_accuracy"]], "s", color="tab:gray", ms=7,
            label="monolithic (final exit only)")
    for k, (f, a) in enumerate(zip(report["cumulative_flops"], report["exit_accuracy"])):
        ax.annotate(f"exit {k}", (f / 1e6, 100 * a), textcoords="offset points", xytext=(4, -10), fontsize=7,
                    color="tab:green")
        ax.plot([f / 1e6], [100 * a], ".", color="tab:green")
    ax.set_xlabel("MFLOPs per sample (expected)")
    ax.set_ylabel(f"test accuracy, % ({report['samples']} samples)")
    ax.set_title(f"{report['name']}: early exit trade-off ({report['confidence']})", fontsize=10)
    _save(plt, fig, ax, path)
    return True


def plot_pareto(record: dict[str, Any], name: str, path: Path) -> bool:
    """Test accuracy vs latency of both threshold solvers (and the exit policy, when trained)
    over a sweep of budgets, with the deployed point: the thresholds, or the exit policy when
    the manifest gates on it (and its re-measured latency). Returns False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = {"geometric": ("s--", "tab:gray", "geometric (MSDNet/RANet)"), "optimise": ("o-", "tab:blue", "optimiser"),
              "policy": ("^:", "tab:purple", "exit policy (trained)")}
    for solver, (style, color, label) in styles.items():
        pts = sorted((r[solver]["mean_ms"], 100 * r[solver]["accuracy"]) for r in record["pareto"] if r.get(solver))
        if pts:
            ax.plot(*zip(*pts), style, color=color, ms=4, lw=1, label=label)
    on_policy = record.get("deployed") == "policy"
    b, test = record["budget"], record["policy"]["test"] if on_policy else record["test"]
    what = "calibrated, exit policy" if on_policy else "calibrated"
    ax.axvline(b["ms"], color="tab:red", lw=0.8, ls=":", label=f"budget {b['ms']:.4g} ms ({b['metric']})")
    ax.plot([test["mean_ms"]], [100 * test["accuracy"]], "*", color="tab:orange", ms=12, label=f"{what} (modelled)")
    if record.get("measured"):
        ax.plot([record["measured"]["policy" if on_policy else "chosen"]["mean_ms"]], [100 * test["accuracy"]], "x",
                color="tab:red", ms=9, label=f"{what} (measured)")
    ax.set_xlabel(f"mean call latency, ms (batch {b['batch']}, {'estimate' if record['latency']['estimate'] else 'measured model'})")
    ax.set_ylabel(f"test accuracy, % ({record['splits']['report']['samples']} samples)")
    ax.set_title(f"{name}: accuracy under a latency budget (fit on val, shown on test)", fontsize=9)
    _save(plt, fig, ax, path)
    return True


def plot_exit_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str) -> bool:
    """Test accuracy vs cumulative MFLOPs per exit, one line with markers per model (name ->
    (MFLOPs per exit, accuracy per exit as a share)). Returns False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, (mflops, accuracy) in curves.items():
        ax.plot(mflops, [100 * a for a in accuracy], "o-", ms=4, lw=1, label=name)
    ax.set_xlabel("cumulative MFLOPs at the exit (multiply-adds incl. earlier heads)")
    ax.set_ylabel("test accuracy at the exit, %")
    ax.set_title(title, fontsize=9)
    _save(plt, fig, ax, path)
    return True
