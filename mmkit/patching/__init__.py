"""The only code that touches HF model internals: attention-registry entry, scoped hooks, layer wrappers."""
