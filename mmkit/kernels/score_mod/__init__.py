"""Attention with per-head logit boosts on selected (query row, key) pairs (PAINT/VAR-style head modulation)."""
