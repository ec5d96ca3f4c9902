"""Visual-token pruning and exit methods. Each module registers itself with `mmkit.registry`."""
