"""Evaluation: items, multiple choice, identity, marker coupling, calibration, Set G, per-item records."""
