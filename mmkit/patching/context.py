"""Per-call forward context: what the current prefill looks like and what methods did to it.

The session installs two hooks on the top-level model (removed with the session's `close()`): before a call they
record the image-token mask of a new prefill, after it the prefill time. Methods read the image mask from here
instead of assuming fixed image positions, and report how many visual tokens each decoder layer kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch


# What describes the current prefill's sequence (a pre-LLM reduction swaps these, then restores them).
_PREFILL_FIELDS = ("image_mask", "attention_mask", "image_counts")


@dataclass
class ForwardContext:
    num_layers: int
    image_token_id: int
    # Decoder layers before this one must see the whole sequence (see `TokenDropper`); set from the model family.
    first_droppable_layer: int = 1
    prefill: bool = False
    image_mask: torch.Tensor | None = None          # (B, n) bool, positions of image tokens in the prefill
    image_counts: list[int] = field(default_factory=list)  # image tokens per row, on the host
    attention_mask: torch.Tensor | None = None      # (B, n) 2-D padding mask of the prefill, if any
    prefill_ms: float | None = None
    # Per decoder layer: visual tokens and all tokens each row carried through that layer in the last prefill.
    visual_per_layer: list[torch.Tensor] = field(default_factory=list)
    tokens_per_layer: list[torch.Tensor] = field(default_factory=list)
    # Per decoder layer: visual tokens each row read through a cross-attention block (VISOR); 0 elsewhere.
    cross_per_layer: list[torch.Tensor] = field(default_factory=list)
    # Where every token the decoder sees came from (kept for the decoding steps that follow the prefill; read
    # through `mmkit.patching.probe`). The prompt's own masks, never swapped:
    prompt_image_mask: torch.Tensor | None = None       # (B, n)
    prompt_attention_mask: torch.Tensor | None = None   # (B, n) or None
    # The sequence entering the first decoder layer: prompt positions of its m slots (None = the prompt itself,
    # set by a pre-LLM reduction), its image mask and its 2-D padding/slot mask (None = every slot real).
    llm_positions: torch.Tensor | None = None            # (B, m) long
    llm_image_mask: torch.Tensor | None = None           # (B, m) bool
    llm_attention_mask: torch.Tensor | None = None       # (B, m) or None
    # Per decoder layer: (index (B, m_l) into the first layer's slots, slot validity (B, m_l) or None) of the tokens
    # that layer saw in the prefill; None where the layer saw every slot (set by a token dropper).
    layer_maps: list = field(default_factory=list)
    _on_prefill: dict[int, Callable[["ForwardContext"], None]] = field(default_factory=dict)
    _t0: float = 0.0

    @property
    def prefill_len(self) -> int:
        return 0 if self.image_mask is None else int(self.image_mask.shape[1])

    def on_prefill(self, key: int, callback: Callable[["ForwardContext"], None]) -> None:
        """Run `callback(ctx)` at the start of every prefill (methods reset their per-call state there)."""
        self._on_prefill[key] = callback

    def drop_callback(self, key: int) -> None:
        self._on_prefill.pop(key, None)

    def replace_prefill(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                        positions: torch.Tensor | None = None) -> dict:
        """Describe a shortened prefill (a method reduced the sequence before the LLM) and re-run the per-prefill
        callbacks on it, so LLM-side methods see the sequence they will actually get. `positions` (B, m): the
        prompt position each slot of the shortened sequence holds. Returns what `restore_prefill` needs to
        describe the prompt again (the slot map stays for the decoding steps)."""
        saved = {name: getattr(self, name) for name in _PREFILL_FIELDS}
        self.image_mask = image_mask
        self.attention_mask = attention_mask
        self.image_counts = image_mask.sum(1).tolist()
        self.llm_positions = positions
        self.llm_image_mask = image_mask
        self.llm_attention_mask = attention_mask
        self.layer_maps = [None] * self.num_layers
        for callback in list(self._on_prefill.values()):
            callback(self)
        return saved

    def restore_prefill(self, saved: dict) -> None:
        for name, value in saved.items():
            setattr(self, name, value)

    def record_layer(self, layer_idx: int, visual: torch.Tensor, tokens: torch.Tensor) -> None:
        self.visual_per_layer[layer_idx] = visual
        self.tokens_per_layer[layer_idx] = tokens

    def record_layer_map(self, layer_idx: int, index: torch.Tensor | None, valid: torch.Tensor | None) -> None:
        """The first-layer slots (and their validity) `layer_idx` saw in this prefill (a token dropper's map)."""
        self.layer_maps[layer_idx] = None if index is None else (index, valid)

    def record_cross(self, layer_idx: int, visual: torch.Tensor) -> None:
        self.cross_per_layer[layer_idx] = visual

    def start_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self.prefill = True
        self.image_mask = input_ids == self.image_token_id
        # Only a 2-D padding mask tells which positions are padding (static-cache generation passes a 4-D one, or
        # for decoders with sliding-window layer types such as Qwen2's, a dict of them per layer type).
        if attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape):
            attention_mask = None
        self.attention_mask = attention_mask
        self.prompt_image_mask = self.image_mask
        self.prompt_attention_mask = attention_mask
        self.llm_positions = None
        self.llm_image_mask = self.image_mask
        self.llm_attention_mask = attention_mask
        self.layer_maps = [None] * self.num_layers
        batch, n = input_ids.shape
        real = attention_mask.sum(1) if attention_mask is not None else torch.full((batch,), n, device=input_ids.device)
        visual = self.image_mask.sum(1)
        # Read once here, before any model work is queued, so methods can size tensors without stalling the GPU.
        self.image_counts = visual.tolist()
        self.visual_per_layer = [visual] * self.num_layers
        self.tokens_per_layer = [real] * self.num_layers
        self.cross_per_layer = [torch.zeros_like(visual)] * self.num_layers
        for callback in list(self._on_prefill.values()):
            callback(self)


def _sync(tensor_or_module) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install_context_hooks(model: torch.nn.Module, ctx: ForwardContext):
    """Hooks on the top-level model that keep `ctx` current. Returns the two hook handles."""

    def pre_hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        is_prefill = cache is None or cache.get_seq_length() == 0
        if is_prefill and input_ids is not None:
            ctx.start_prefill(input_ids, kwargs.get("attention_mask"))
            _sync(module)
            ctx._t0 = time.perf_counter()
        else:
            ctx.prefill = False
        return None

    def post_hook(module, args, kwargs, output):
        if ctx.prefill:
            _sync(module)
            ctx.prefill_ms = (time.perf_counter() - ctx._t0) * 1000.0
            ctx.prefill = False
        return None

    return (
        model.register_forward_pre_hook(pre_hook, with_kwargs=True),
        model.register_forward_hook(post_hook, with_kwargs=True),
    )
