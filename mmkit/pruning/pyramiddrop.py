"""PyramidDrop (Xing et al., CVPR 2025): drop image tokens in stages, a geometric share at each stage.

The decoder is split into stages at layers l_1 < l_2 < ...; before stage layer l_s runs, the image tokens still
present are ranked by the attention the last instruction token (the last prompt token) gives them, and only
floor(lambda^s * N) of the N original image tokens of that row stay for the rest of the decoder (lambda = 0.5:
50 / 25 / 12.5 %).

Scoring follows the official `pdrop_rank_drop`: it uses the stage layer's *own* input layer norm, q/k projections
and rotary embedding on the stage layer's input (the hidden states before the drop), i.e. exactly the attention
row that layer would compute if it saw every token. Only one query row and the keys are projected; the row's
probabilities come from `subset_attention_mass` (exact softmax over all allowed keys), never an N x N matrix, and
the layer itself keeps running SDPA. This needs no observer, so the text backbone stays on its own attention
backend.

Difference from the official code: kept tokens keep their original positions (the official code renumbers them
contiguously after each drop), as every mmkit token dropper does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmkit.patching.token_drop import Selection, TokenDropper, keep_top_visual
from mmkit.registry import register_method


@dataclass
class PyramidDropConfig:
    """PyramidDrop: staged image-token drop, keeping lambda^s of the image tokens after stage s."""

    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "stage layers where tokens are dropped (before the layer runs); None = L/4, L/2, 3L/4 "
                          "of an L-layer decoder (8/16/24 for 32 layers)"},
    )
    ratio: float = field(
        default=0.5,
        metadata={"help": "lambda: after stage s, floor(lambda^s * N) of the N original image tokens stay; 1.0 = off"},
    )

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not 0.0 < float(self.ratio) <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        self.ratio = float(self.ratio)
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers:
                raise ValueError("layers must name at least one stage layer (or be None for L/4, L/2, 3L/4)")
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 1 for l in layers):
                raise ValueError(f"layers must be integers >= 1, got {self.layers!r}")
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"layers must be strictly increasing, got {self.layers!r}")
            self.layers = layers

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """The stage layers for an `num_layers`-deep decoder (defaults scale with depth)."""
        if self.layers is not None:
            if self.layers[-1] >= num_layers:
                raise ValueError(
                    f"pyramiddrop layers={'/'.join(map(str, self.layers))} go past the last decoder layer; "
                    f"this model has {num_layers}"
                )
            return self.layers
        layers = tuple(num_layers * s // 4 for s in (1, 2, 3))
        if layers[0] < 1 or len(set(layers)) != 3:
            raise ValueError(f"a {num_layers}-layer decoder is too shallow for the default stages; set layers=...")
        return layers


def stage_keep_count(n_image: torch.Tensor, ratio: float, stage: int) -> torch.Tensor:
    """floor(ratio^stage * n_image) per row (stage counts from 1), as the official `int(n * ratio)`."""
    # The small epsilon keeps exact products (e.g. 0.5^3 * 64 = 8) from flooring one below through rounding.
    return torch.floor(n_image.double() * ratio**stage + 1e-9).long()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B or 1, n, D) gathered along n with index (B, m)."""
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))


def last_token_attention(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         key_mask: torch.Tensor) -> torch.Tensor:
    """Attention (B, n) of the last position over all positions in `layer`'s self-attention, mean over heads.

    hidden: (B, n, d) the layer's input; cos/sin: (B or 1, n, head_dim) rotary tables of those positions;
    key_mask: (B, n) bool, keys the last position may attend to. Q is projected for the last row only.
    """
    from mmkit.kernels import subset_attention_mass

    attn = layer.self_attn
    for name in ("q_proj", "k_proj"):
        if not hasattr(attn, name):
            raise ValueError(f"pyramiddrop needs a self-attention with q_proj/k_proj; {type(attn).__name__} has none")
    batch, n, _ = hidden.shape
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)   # (B, H, 1, D)
    k = attn.k_proj(x).view(batch, n, -1, head_dim).transpose(1, 2)            # (B, Hkv, n, D)
    if hasattr(attn, "q_norm"):  # per-head q/k norms (Qwen3-style backbones) come before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos_q, sin_q = cos[:, -1:, None, :].transpose(1, 2), sin[:, -1:, None, :].transpose(1, 2)
    cos_k, sin_k = cos[:, :, None, :].transpose(1, 2), sin[:, :, None, :].transpose(1, 2)
    q = q * cos_q.to(q.dtype) + _rotate_half(q) * sin_q.to(q.dtype)
    k = k * cos_k.to(k.dtype) + _rotate_half(k) * sin_k.to(k.dtype)
    scaling = getattr(attn, "scaling", None) or head_dim**-0.5
    return subset_attention_mass(q, k, scaling=scaling, key_mask=key_mask[:, None, :], reduce="mean")


class PyramidDropHandle:
    def __init__(self, session, config: PyramidDropConfig):
        self.config = config
        adapter = session.adapter
        self.layers = config.stage_layers(adapter.num_layers)
        self._ctx = session.context
        self._decoder_layers = adapter.decoder_layers
        self._rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # These pre-hooks must run before the dropper's (hooks run in registration order): they see the rotary
        # tables the decoder passes for the full original sequence, before the dropper slices them.
        self._stash_handles = [
            adapter.decoder_layers[l].register_forward_pre_hook(self._make_stash(l), with_kwargs=True)
            for l in self.layers
        ]
        schedule = {l: self._make_selector(stage) for stage, l in enumerate(self.layers, start=1)}
        self.dropper = TokenDropper(session.context, adapter.decoder_layers, schedule)

    def _make_stash(self, layer_idx: int):
        def stash(module, args, kwargs):
            if self._ctx.prefill:
                self._rotary[layer_idx] = kwargs["position_embeddings"]
            return None

        return stash

    def _make_selector(self, stage: int):
        def select(layer_idx: int, hidden: torch.Tensor, image_mask: torch.Tensor,
                   valid: torch.Tensor | None) -> Selection:
            batch, n, _ = hidden.shape
            index = self.dropper.index  # current -> original positions (None before the first drop)
            if index is None:
                index = torch.arange(n, device=hidden.device).expand(batch, n)
            cos, sin = self._rotary.pop(layer_idx)
            cos, sin = _take_rows(cos, index), _take_rows(sin, index)
            # The last prompt token comes after every other token, so causality allows all real keys.
            key_mask = torch.ones(batch, n, dtype=torch.bool, device=hidden.device)
            if self._ctx.attention_mask is not None:
                key_mask = self._ctx.attention_mask.to(hidden.device).gather(1, index).bool()
            if valid is not None:
                key_mask = key_mask & valid
            scores = last_token_attention(self._decoder_layers[layer_idx], hidden, cos, sin, key_mask)
            n_image = self._ctx.image_mask.to(hidden.device).sum(1)
            keep_counts = stage_keep_count(n_image, self.config.ratio, stage)
            return keep_top_visual(scores, image_mask, keep_counts, valid)

        return select

    def remove(self) -> None:
        self.dropper.remove()
        for handle in self._stash_handles:
            handle.remove()
        self._stash_handles = []
        self._rotary.clear()


def apply_pyramiddrop(session, config: PyramidDropConfig) -> PyramidDropHandle:
    """Attach PyramidDrop to a session's model; `remove()` on the result restores it exactly."""
    return PyramidDropHandle(session, config)


register_method(
    "pyramiddrop", PyramidDropConfig, apply_pyramiddrop, kind="pruning",
    description="Staged image-token drop keeping lambda^s per stage, ranked by the last instruction token (CVPR'25).",
    slots=("llm_token_drop",),
)
