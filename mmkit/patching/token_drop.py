"""Drop tokens from the decoder at chosen layers, with forward pre-hooks (no module swaps, no copied forward).

A `TokenDropper` holds a schedule {layer index: selector}. At a scheduled layer, during prefill, the selector
returns which of the current tokens survive; the hidden states are gathered and the map from current to original
positions is updated. Every hooked layer then slices what the decoder passes it for the full sequence (rotary
cos/sin, the 4-D mask, position ids) with that map, so kept tokens keep their original positions (as FastV
specifies) and their original causal/padding structure.

KV cache: layers from the first drop on only ever see (and cache) the kept tokens. During decoding the mask the
decoder builds spans the full original length (layer 0's cache); its key axis is re-indexed to the kept prefill
positions followed by the decoded ones, so the cache stays consistent token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mmkit.patching.context import ForwardContext


@dataclass
class Selection:
    """Indices (B, m) into the current sequence; `valid` (B, m) is False on padded slots when rows keep different
    numbers of tokens (None when every slot is real). Padded slots come first in a row, then the kept tokens in
    their original order."""

    keep: torch.Tensor
    valid: torch.Tensor | None = None


# selector(layer_idx, hidden_states (B, n_cur, d), image_mask (B, n_cur) bool, valid (B, n_cur) or None) -> Selection
Selector = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], Selection]


def keep_top_visual(scores: torch.Tensor, image_mask: torch.Tensor, keep_counts: torch.Tensor,
                    valid: torch.Tensor | None = None, host_per_row: Sequence[int] | None = None) -> Selection:
    """Keep every non-image token and the `keep_counts[b]` highest-scoring image tokens of each row.

    Ties are broken towards the earlier position (stable sort), so selection is deterministic. `host_per_row`, the
    number of tokens each row keeps, if the caller already knows it on the host, spares the one device-to-host read
    that sizes the result (which would stall the GPU queue in the middle of the prefill).
    """
    batch, n = scores.shape
    is_image = image_mask if valid is None else image_mask & valid
    other = ~image_mask if valid is None else (~image_mask) & valid
    rank_key = torch.where(is_image, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    rank_key = torch.where(other, torch.full_like(rank_key, float("inf")), rank_key)
    order = torch.sort(rank_key, dim=1, descending=True, stable=True).indices
    if host_per_row is not None:
        m, uniform = max(host_per_row), min(host_per_row) == max(host_per_row)
        per_row = torch.tensor(list(host_per_row), device=scores.device)
    else:
        per_row = other.sum(1) + torch.minimum(keep_counts, is_image.sum(1))
        m = int(per_row.max())  # the kept length sets tensor shapes
        uniform = None
    chosen = order[:, :m]
    if uniform:
        return Selection(keep=chosen.sort(dim=1).values, valid=None)
    slot_ok = torch.arange(m, device=scores.device)[None, :] < per_row[:, None]
    # Padded slots point at dropped positions. Put them first, like left padding: kept tokens stay in order and
    # the last position is still each row's last real token, whose logits generation reads.
    sort_key = torch.where(slot_ok, chosen, chosen - n)
    perm = torch.sort(sort_key, dim=1).indices
    keep = chosen.gather(1, perm)
    slot_ok = slot_ok.gather(1, perm)
    if uniform is None:
        uniform = bool(slot_ok.all())
    return Selection(keep=keep, valid=None if uniform else slot_ok)


def layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer's forward pre-hook (with_kwargs=True) receives, positional or keyword."""
    return args[0] if args else kwargs["hidden_states"]


def with_layer_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) for a pre-hook to return, with `hidden` in place of the layer's hidden states."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


class TokenDropper:
    """Pre-hooks on decoder layers that drop tokens per a schedule; `remove()` detaches everything."""

    def __init__(self, ctx: ForwardContext, layers: torch.nn.ModuleList, schedule: dict[int, Selector]):
        if not schedule:
            raise ValueError("a TokenDropper needs at least one drop layer")
        first = max(1, ctx.first_droppable_layer)
        if min(schedule) < first or max(schedule) >= len(layers):
            # Layer 0 must stay whole: the decoder sizes its masks from layer 0's cache. (Family handling: Qwen3-VL
            # adds DeepStack features at the original image positions after its first layers, so those stay whole.)
            why = "" if first == 1 else (f" (this model adds DeepStack visual features after decoder layers "
                                         f"0-{first - 1}, at the original image positions)")
            raise ValueError(f"drop layers must be in [{first}, {len(layers) - 1}], got {sorted(schedule)}{why}")
        self.ctx = ctx
        self.schedule = dict(schedule)
        self.first = min(schedule)
        self.index: torch.Tensor | None = None  # (B, m) current -> original positions
        self.valid: torch.Tensor | None = None
        self.prefill_len = 0
        self._per_layer: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._handles = [
            layers[i].register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
            for i in range(self.first, len(layers))
        ]
        ctx.on_prefill(id(self), self._reset)

    def _reset(self, ctx: ForwardContext) -> None:
        self.index = None
        self.valid = None
        self.prefill_len = ctx.prefill_len
        # Each layer caches the token set it saw in the prefill; with several drop layers these differ, so
        # decoding re-indexes every layer's mask with that layer's own map.
        self._per_layer: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def index_at(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(original positions (B, m), slot validity or None) of the tokens `layer_idx` saw in the last prefill;
        (None, None) when that layer saw every token."""
        return self._per_layer.get(layer_idx, (None, None))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.ctx.drop_callback(id(self))

    # -- hooks -------------------------------------------------------------------------------------------------
    def _make_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            hidden = layer_hidden(args, kwargs)
            if self.ctx.prefill:
                hidden = self._prefill_drop(layer_idx, hidden)
                kwargs = self._slice_prefill_kwargs(kwargs, layer_idx)
                self._record(layer_idx)
                self._per_layer[layer_idx] = (self.index, self.valid)
                self.ctx.record_layer_map(layer_idx, self.index, self.valid)
            else:
                self.index, self.valid = self.index_at(layer_idx)
                if self.index is not None:
                    kwargs = self._slice_decode_kwargs(kwargs, hidden.shape[1], layer_idx)
            return with_layer_hidden(args, kwargs, hidden)

        return hook

    def _current_image_mask(self, batch: int, n: int, device) -> torch.Tensor:
        mask = self.ctx.image_mask.to(device)
        if self.index is not None:
            mask = mask.gather(1, self.index)
        return mask

    def _prefill_drop(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        selector = self.schedule.get(layer_idx)
        if selector is None:
            return hidden
        batch, n, _ = hidden.shape
        image_mask = self._current_image_mask(batch, n, hidden.device)
        sel = selector(layer_idx, hidden, image_mask, self.valid)
        base = self.index if self.index is not None else torch.arange(n, device=hidden.device).expand(batch, n)
        self.index = base.gather(1, sel.keep)
        if self.valid is not None:
            kept_valid = self.valid.gather(1, sel.keep)
            self.valid = kept_valid if sel.valid is None else kept_valid & sel.valid
        else:
            self.valid = sel.valid
        return hidden.gather(1, sel.keep[..., None].expand(batch, sel.keep.shape[1], hidden.shape[2]))

    def _record(self, layer_idx: int) -> None:
        if self.index is None:
            return
        visual = self.ctx.image_mask.to(self.index.device).gather(1, self.index)
        tokens = torch.ones_like(visual)
        if self.ctx.attention_mask is not None:
            tokens = self.ctx.attention_mask.to(self.index.device).gather(1, self.index).bool()
        if self.valid is not None:
            visual = visual & self.valid
            tokens = tokens & self.valid
        self.ctx.record_layer(layer_idx, visual.sum(1), tokens.sum(1))

    def _slice_prefill_kwargs(self, kwargs: dict, layer_idx: int) -> dict:
        if self.index is None:
            return kwargs
        kwargs = dict(kwargs)
        idx = self.index
        batch, m = idx.shape
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (_take(cos, idx, 1), _take(sin, idx, 1))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _take(kwargs["position_ids"], idx, 1)
        mask = kwargs.get("attention_mask")
        if mask is None and self.valid is None:
            return kwargs  # causal, no padding: the kept tokens are still in order, SDPA's is_causal holds
        if mask is None:
            mask = idx[:, None, :, None] >= idx[:, None, None, :]
        else:
            mask = self._reindex_keys(_take(mask, idx, 2), layer_idx, kwargs)
        if self.valid is not None:
            mask = _apply_key_valid(mask, _pad_valid(self.valid, mask.shape[-1]))
            # A padded slot may see no valid key; let it see itself so its row never softmaxes to NaN (a NaN value
            # would poison real rows even at zero weight).
            eye = torch.eye(m, mask.shape[-1], dtype=torch.bool, device=mask.device)[None, None]
            eye = eye & ~self.valid.to(mask.device)[:, None, :, None]
            mask = mask | eye if mask.dtype == torch.bool else mask.masked_fill(eye, 0.0)
        kwargs["attention_mask"] = mask
        return kwargs

    def _slice_decode_kwargs(self, kwargs: dict, q_len: int, layer_idx: int) -> dict:
        mask = kwargs.get("attention_mask")
        if mask is None and self.valid is None:
            return kwargs
        kwargs = dict(kwargs)
        if mask is None:
            # Layer 0 is never pruned and has already cached this step: its length is the full original length.
            kv_full = kwargs["past_key_values"].get_seq_length(0)
            mask = torch.ones(self.index.shape[0], 1, q_len, kv_full, dtype=torch.bool, device=self.index.device)
        mask = self._reindex_keys(mask, layer_idx, kwargs)
        if self.valid is not None:
            mask = _apply_key_valid(mask, _pad_valid(self.valid, mask.shape[-1]))
        kwargs["attention_mask"] = mask
        return kwargs

    def _reindex_keys(self, mask: torch.Tensor, layer_idx: int, kwargs: dict) -> torch.Tensor:
        """Map the mask's key axis from original positions to this layer's cache layout: the kept prefill tokens,
        then every token after the prefill. A static cache keeps its fixed length, so the unused tail is masked."""
        idx = self.index
        kv_full = mask.shape[-1]
        tail = torch.arange(self.prefill_len, kv_full, device=idx.device).expand(idx.shape[0], -1)
        mask = _take(mask, torch.cat([idx, tail], dim=1), 3)
        if _is_static_layer(kwargs.get("past_key_values"), layer_idx):
            pad_shape = (*mask.shape[:-1], kv_full - mask.shape[-1])
            if mask.dtype == torch.bool:
                pad = torch.zeros(pad_shape, dtype=torch.bool, device=mask.device)
            else:
                pad = torch.full(pad_shape, torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
            mask = torch.cat([mask, pad], dim=-1)
        return mask


def _is_static_layer(cache, layer_idx: int) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and hasattr(layers[layer_idx], "max_cache_len")


def _pad_valid(valid: torch.Tensor, length: int) -> torch.Tensor:
    """Extend a (B, m) slot-validity mask to `length` key slots; slots after the prefill are real tokens."""
    extra = length - valid.shape[1]
    return torch.cat([valid, valid.new_ones(valid.shape[0], extra)], dim=1) if extra > 0 else valid


def _take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x.gather(dim, index) where index is (B, m) over axis `dim`; size-1 batch or head axes broadcast."""
    batch, m = index.shape
    # Family handling: with a device map the rotary tables and masks live where the decoder made them, the index
    # where the hidden states are; gather on the tensor's device.
    index = index.to(x.device)
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, *x.shape[1:])
    view = [batch] + [1] * (x.dim() - 1)
    view[dim] = m
    expand = list(x.shape)
    expand[dim] = m
    return x.gather(dim, index.view(view).expand(expand))


def _apply_key_valid(mask: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return mask
    key_ok = valid.to(mask.device)[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & key_ok
    return mask.masked_fill(~key_ok, torch.finfo(mask.dtype).min)
