"""edgeexit.plots draws what it says: sweeps in cost order, both solvers, honest axes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from edgeexit.plots import (PAD_SAMPLES, pareto_figure, plot_pareto, plot_tradeoff,  # noqa: E402
                            sample_pt, tradeoff_figure, upper_frontier)

N_TEST = 269  # one sample = 0.37 pt, as on digits


def _report(samples: int = N_TEST) -> dict:
    # a shared-threshold sweep in threshold order: cost and accuracy both wobble
    thresholds = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, None]
    mflops = [2.4, 2.5, 2.45, 2.8, 3.1, 2.9, 4.2, 10.8]
    hits = [264, 265, 263, 267, 266, 268, 265, 265]
    return {"name": "toy", "confidence": "max_softmax", "samples": samples,
            "tradeoff": {"threshold": thresholds, "mflops": mflops, "accuracy": [h / samples for h in hits]},
            "thresholds": [0.95, 0.9, None], "cascade_flops": 3.5e6, "cascade_accuracy": 265 / samples,
            "monolithic_flops": 10.8e6, "monolithic_accuracy": 265 / samples,
            "cumulative_flops": [2.4e6, 6.6e6, 10.8e6], "exit_accuracy": [264 / samples, 266 / samples, 265 / samples]}


def _point(acc: float, mean: float, p95: float) -> dict:
    return {"val_accuracy": acc, "accuracy": acc, "mean_ms": mean, "p95_ms": p95}


def _record(metric: str = "mean", falling: bool = False, samples: int = N_TEST) -> dict:
    budgets = [0.08, 0.10, 0.12, 0.14, 0.16]
    hits = [262, 264, 266, 267, 264 if falling else 267]
    rows = []
    for k, (b, h) in enumerate(zip(budgets, hits)):
        pt = _point(h / samples, b - 0.005, b + 0.05 + 0.01 * k)
        rows.append({"budget_ms": b, "geometric": dict(pt) if k else None, "optimise": dict(pt)})  # they coincide
    test = _point(266 / samples, 0.115, 0.18) | {"bound_ms": 0.12, "exit_shares": [0.9, 0.05, 0.05]}
    return {"budget": {"ms": 0.12, "metric": metric, "batch": 1}, "pareto": rows, "test": test,
            "latency": {"estimate": False}, "splits": {"fit": {"name": "val", "samples": 270},
                                                       "report": {"name": "test", "samples": samples}},
            "measured": {"chosen": {"mean_ms": 0.118, "p95_ms": 0.19}}, "deployed": "thresholds", "policy": None}


def _line(ax, gid):
    found = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(found) == 1, f"{gid}: {len(found)} lines"
    return found[0]


def _texts(fig) -> str:
    ax = fig.axes[0]
    parts = [t.get_text() for t in ax.texts] + [ax.get_xlabel(), ax.get_ylabel()]
    parts += [ax.get_title(loc=loc) for loc in ("left", "center", "right")]
    return "\n".join(parts + ([fig._suptitle.get_text()] if fig._suptitle else []))


def test_tradeoff_line_is_the_frontier_in_cost_order():
    report = _report()
    fig = tradeoff_figure(report)
    ax = fig.axes[0]
    line = _line(ax, "frontier")
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    assert (np.diff(x) >= 0).all() and (np.diff(y) > 0).all()  # no zig-zag: cost up, accuracy up
    cost, acc = report["tradeoff"]["mflops"], [100 * a for a in report["tradeoff"]["accuracy"]]
    # the frontier by brute force: no other sweep point at most as costly is at least as accurate
    expected = sorted((c, a) for i, (c, a) in enumerate(zip(cost, acc))
                      if not any(cost[j] <= c and acc[j] >= a and (cost[j], acc[j]) != (c, a) for j in range(len(cost))))
    np.testing.assert_allclose(np.c_[x, y], expected)
    dominated = _line(ax, "dominated")  # the rest stay, as plain markers, named so
    assert dominated.get_linestyle() == "None" and "dominated" in dominated.get_label()
    assert len(dominated.get_xdata()) + len(x) == len(cost)


def test_upper_frontier_breaks_cost_ties_by_accuracy():
    front, dominated = upper_frontier([1.0, 1.0, 2.0, 3.0], [0.5, 0.7, 0.6, 0.8])
    assert front == [1, 3] and sorted(dominated) == [0, 2]


def test_tradeoff_says_what_one_sample_is_worth_and_pads_the_axis():
    fig = tradeoff_figure(_report())
    ax = fig.axes[0]
    assert sample_pt(N_TEST) == pytest.approx(100 / 269)
    assert "1 sample = 0.37 pt" in ax.get_ylabel() and "269 samples" in ax.get_ylabel()
    lo, hi = ax.get_ylim()
    drawn = [100 * a for a in _report()["tradeoff"]["accuracy"]]
    assert hi - lo >= 8 * 100 / 269 - 1e-9  # a one-sample wobble cannot fill the axis
    assert lo <= min(drawn) - PAD_SAMPLES * 100 / 269 + 1e-9 and hi >= max(drawn) + 1e-9


def test_pareto_draws_both_solvers_where_they_coincide():
    fig = pareto_figure(_record(), "toy")
    ax = fig.axes[0]
    geo, opt = _line(ax, "geometric"), _line(ax, "optimise")
    np.testing.assert_allclose(geo.get_ydata(), opt.get_ydata()[1:])  # same points: styling must show both
    assert geo.get_marker() != opt.get_marker() and geo.get_linestyle() != opt.get_linestyle()
    assert geo.get_zorder() > opt.get_zorder()  # drawn on top ...
    assert geo.get_markerfacecolor() == "none" and geo.get_markersize() > opt.get_markersize()  # ... hollow, larger
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("geometric" in t for t in labels) and "optimiser" in labels


@pytest.mark.parametrize("metric", ["mean", "p95", "p99"])
def test_pareto_legend_covers_no_point(metric):
    fig = pareto_figure(_record(metric, falling=True), "toy")
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, area = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert not legend.overlaps(area) and legend.y1 <= area.y0


def test_pareto_notes_falling_accuracy_when_and_only_when_it_falls():
    assert "does not rise with budget" not in _texts(pareto_figure(_record(), "toy"))
    text = _texts(pareto_figure(_record(falling=True), "toy"))
    assert "does not rise with budget" in text and "3 samples" in text and "269 held-out test samples" in text
    # a one-sample dip is within one test sample's worth: no note
    one = _record()
    for solver in ("geometric", "optimise"):
        one["pareto"][-1][solver]["accuracy"] = 266 / N_TEST
    assert "does not rise with budget" not in _texts(pareto_figure(one, "toy"))


def test_pareto_mean_budget_on_a_mean_axis():
    record = _record("mean")
    ax = pareto_figure(record, "toy").axes[0]
    np.testing.assert_allclose(_line(ax, "optimise").get_xdata(), [r["optimise"]["mean_ms"] for r in record["pareto"]])
    assert ax.get_xlabel().startswith("mean call latency") and _line(ax, "budget").get_xdata()[0] == 0.12


def test_pareto_p95_budget_on_a_p95_axis():
    record = _record("p95")
    ax = pareto_figure(record, "toy").axes[0]
    np.testing.assert_allclose(_line(ax, "optimise").get_xdata(), [r["optimise"]["p95_ms"] for r in record["pareto"]])
    np.testing.assert_allclose(_line(ax, "geometric").get_xdata(),
                               [r["geometric"]["p95_ms"] for r in record["pareto"] if r["geometric"]])
    assert ax.get_xlabel().startswith("p95 call latency") and "mean" not in ax.get_xlabel()
    assert _line(ax, "budget").get_xdata()[0] == 0.12 and "p95" in _line(ax, "budget").get_label()
    assert _line(ax, "deployed").get_xdata()[0] == record["test"]["p95_ms"]
    assert _line(ax, "measured").get_xdata()[0] == record["measured"]["chosen"]["p95_ms"]


def test_pareto_p99_budget_is_not_drawn_on_the_p95_axis():
    record = _record("p99")
    ax = pareto_figure(record, "toy").axes[0]
    np.testing.assert_allclose(_line(ax, "optimise").get_xdata(), [r["optimise"]["p95_ms"] for r in record["pareto"]])
    assert not [ln for ln in ax.get_lines() if ln.get_gid() == "budget"]
    label = ax.get_xlabel()
    assert label.startswith("p95 call latency") and "p99 <= 0.12 ms, not drawn" in label


def test_plot_functions_still_write_pngs(tmp_path):
    assert plot_tradeoff(_report(), tmp_path / "tradeoff.png") is True
    assert plot_pareto(_record("p95", falling=True), "toy", tmp_path / "pareto.png") is True
    for name in ("tradeoff.png", "pareto.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_functions_return_false_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from edgeexit.plots import plot_exit_curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plot_tradeoff(_report(), tmp_path / "t.png") is False
    assert plot_pareto(_record(), "toy", tmp_path / "p.png") is False
    assert plot_exit_curves({"m": ([1.0], [0.5])}, tmp_path / "e.png", "t") is False
    assert not list(tmp_path.iterdir())


def test_tradeoff_marks_the_thresholds_it_evaluated_as_people_read_them():
    assert _line(tradeoff_figure(_report()).axes[0], "bundle").get_label() == "build thresholds 0.95, 0.9"
    calibrated = _report() | {"thresholds": [0.7722437977790833, 2.0, None], "yaml_thresholds": [0.95, 0.9, None]}
    label = _line(tradeoff_figure(calibrated).axes[0], "bundle").get_label()
    assert label == "calibrated thresholds 0.7722, never"
