"""Attention with sink mass moved to image tokens in image-centric heads (VAR-style redistribution)."""
