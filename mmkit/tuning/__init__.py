"""Calibration searches for methods whose hyper-parameters are tuned per model and token budget.

Kept apart from the methods themselves: a tuner reads calibration data (`mmkit.evals`), a method does not.
"""
