"""Hallucination-mitigation methods. Each module registers itself with `mmkit.registry`."""
