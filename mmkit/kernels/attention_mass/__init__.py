"""Subset attention mass: how much attention each key gets from a few query rows (exact softmax)."""
