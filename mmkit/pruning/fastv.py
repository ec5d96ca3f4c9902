"""FastV (Chen et al., ECCV 2024): after the first K decoder layers, keep only the image tokens that the last
query attended to most at layer K-1 (mean over heads); all later layers, and the KV cache they fill, see only
the kept tokens. Positions keep their original values.

The layer K-1 attention row is computed exactly from that layer's q and k (full softmax over all keys, through
the attention probe) while the layer itself runs its own attention: no `output_attentions`, no N x N matrix. The
probe reads the keys in the sequence layer K-1 actually sees, so FastV also runs after a pre-LLM reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mmkit.patching.token_drop import TokenDropper, keep_top_visual
from mmkit.registry import register_method


@dataclass
class FastVConfig:
    """FastV: drop low-attention image tokens after layer K, ranked by the last token's attention."""

    layer: int = field(default=2, metadata={"help": "K: layers [0, K) see every token, layers >= K the kept ones"})
    keep: float = field(default=0.5, metadata={"help": "fraction of each image's tokens kept (1 - R in the paper)"})

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an integer >= 1, got {self.layer!r}")
        if not isinstance(self.keep, (int, float)) or not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep!r}")
        self.keep = float(self.keep)


class FastVHandle:
    def __init__(self, session, config: FastVConfig):
        self.config = config
        adapter = session.adapter
        if config.layer >= adapter.num_layers:
            raise ValueError(
                f"fastv layer={config.layer} is past the last decoder layer; this model has {adapter.num_layers}"
            )
        self.scores: torch.Tensor | None = None
        self._observer = session.probe.observe([config.layer - 1], self._observe)
        self._ctx = session.context
        self._dropper = TokenDropper(session.context, adapter.decoder_layers, {config.layer: self._select})

    def _observe(self, view) -> None:
        if view.prefill:
            # Keys beyond the current sequence are empty slots of a static cache.
            self.scores = view.mass()[:, : view.query.shape[2]]

    def _select(self, layer_idx, hidden, image_mask, valid):
        if self.scores is None:
            raise RuntimeError("fastv: no attention scores were recorded before the drop layer")
        # FastV drops once, on the prompt as it came in, so per-row counts are known on the host.
        n = image_mask.shape[1]
        counts = [min(math.ceil(c * self.config.keep), c) for c in self._ctx.image_counts]
        keep_counts = torch.tensor(counts, device=image_mask.device)
        host_per_row = [n - c + k for c, k in zip(self._ctx.image_counts, counts)]
        selection = keep_top_visual(self.scores, image_mask, keep_counts, valid, host_per_row=host_per_row)
        self.scores = None
        return selection

    def remove(self) -> None:
        self._dropper.remove()
        self._observer.remove()


def apply_fastv(session, config: FastVConfig) -> FastVHandle:
    return FastVHandle(session, config)


register_method(
    "fastv", FastVConfig, apply_fastv, kind="pruning",
    description="Drop image tokens after layer K by the last token's attention at layer K-1 (ECCV'24).",
    slots=("llm_token_drop",),
)
