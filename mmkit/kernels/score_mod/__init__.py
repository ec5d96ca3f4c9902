"""Attention with edited logits on selected (query row, key) pairs: per-head additive boosts (head modulation) and
PAINT's score-dependent edit z + gain |z|."""
