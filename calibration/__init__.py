"""Thresholds chosen against measured latency budgets (numpy only; never imports torch).

The inputs are numbers, never models: per-sample, per-exit confidence and prediction
(`traces`), and per-stage seconds as a function of batch size (`latency`). `solvers`
searches the threshold space on a validation split; `gating` replays the runtime's rule.
"""
