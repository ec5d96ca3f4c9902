"""Public compaction ops (torch on every device: sorts and gathers; see ref.py for why there is no Triton path)."""

from mmkit.kernels.compaction.ref import Compaction, gather_tokens, kept_count, topk_compact

__all__ = ["Compaction", "gather_tokens", "kept_count", "topk_compact"]
