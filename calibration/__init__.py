"""Threshold search against measured latency budgets (numpy only; never imports torch).

Filled in by the calibration work; importable now so the distribution layout is final.
"""
