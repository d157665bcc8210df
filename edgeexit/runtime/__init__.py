"""The runtime: one gating loop (cascade.py) over small per-engine backends."""
