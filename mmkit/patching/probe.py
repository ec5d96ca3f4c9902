"""The attention probe: the one way a method observes or replaces a decoder layer's attention.

Other methods may have shortened the sequence a layer sees: a pre-LLM reduction (VisionZip, VFlowOpt) feeds the
decoder fewer image tokens, a token dropper (FastV, PyramidDrop, SparseVLM, DyVTE, VISOR) removes tokens between
layers, and a batch is left padded. A method that indexed prompt-length tensors (`input_ids == image_token_id`,
the prompt's padding mask) against the current queries and keys would break as soon as it is combined with one of
them. The probe hands an observer a `LayerView` of the call instead, which knows for every row which prompt
position each current query and key holds (the maps the context keeps: pre-LLM slots, then the token dropper's
per-layer index), and gives, *in the current sequence*:

- `image_keys` / `real_keys` / `key_positions`: image tokens, real (non-padding, non-empty) slots, prompt positions;
- `allowed(rows)`: the keys each query row may attend (from the mask the layer receives);
- `mass(rows)`: the exact post-softmax attention mass of the last row (or given rows), never an N x N matrix;
- `text_rows`: the query rows that are text after the row's image (prompt and generated tokens);
- `to_prompt` / `from_prompt`: move per-key values between the current sequence and prompt coordinates (dropped
  tokens get a fill value), so maps and token sets chosen on the prompt follow the tokens wherever they went.

Decoding steps see the prefill's cached keys (each layer the tokens it kept) followed by the generated tokens,
whose prompt positions are n, n + 1, ... (n the prompt length). Static caches are supported in the prefill only.

`probe.observe(layers, fn)` calls `fn(view)` before each attention call of those layers; `probe.override(layers,
fn)` runs `fn(view, value, **kwargs) -> (output (B, Lq, H, D), None)` instead of the layer's attention, and
`view.attend(query, key, value, mask, **kwargs)` runs the layer's own implementation (the one the model was loaded
with) for the rows the method leaves alone. The handle's `remove()` detaches everything.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable, Iterable

import torch

from mmkit.patching.attention import causal_bool_mask, observe_attention, override_attention, run_original


def prefill_slots(ctx, layer: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt positions, real, image) of the prefill tokens decoder layer `layer` holds, each (B, m_l): the
    sequence after any pre-LLM reduction, re-indexed by the token dropper's map of that layer."""
    image = ctx.llm_image_mask.to(device)
    batch, m = image.shape
    positions = (torch.arange(m, device=device).expand(batch, m) if ctx.llm_positions is None
                 else ctx.llm_positions.to(device))
    real = (torch.ones(batch, m, dtype=torch.bool, device=device) if ctx.llm_attention_mask is None
            else ctx.llm_attention_mask.to(device).bool())
    entry = ctx.layer_maps[layer] if 0 <= layer < len(ctx.layer_maps) else None
    if entry is not None:
        index, valid = entry
        index = index.to(device)
        positions, real, image = positions.gather(1, index), real.gather(1, index), image.gather(1, index)
        if valid is not None:
            real = real & valid.to(device)
    return positions, real, image & real


class LayerView:
    """One attention call of one decoder layer, in the coordinates of the sequence that layer sees."""

    def __init__(self, ctx, module, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float):
        self.ctx = ctx
        self.module = module
        self.layer = int(getattr(module, "layer_idx", -1))
        self.query = query
        self.key = key
        self.attention_mask = attention_mask
        self.scaling = float(scaling)
        self.prefill = bool(ctx.prefill)

    # -- where the tokens came from ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return int(self.query.shape[0])

    @property
    def prompt_len(self) -> int:
        mask = self.ctx.prompt_image_mask
        return 0 if mask is None else int(mask.shape[1])

    @cached_property
    def _slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return prefill_slots(self.ctx, self.layer, self.query.device)

    @property
    def prefill_keys(self) -> int:
        """How many of this layer's keys are prefill tokens (the rest are generated tokens or empty slots)."""
        return int(self._slots[0].shape[1])

    def _extend(self, prefill: torch.Tensor, tail) -> torch.Tensor:
        extra = self.key.shape[2] - prefill.shape[1]
        if extra <= 0:
            return prefill[:, : self.key.shape[2]]
        if isinstance(tail, torch.Tensor):
            return torch.cat([prefill, tail], dim=1)
        return torch.cat([prefill, prefill.new_full((prefill.shape[0], extra), tail)], dim=1)

    @cached_property
    def key_positions(self) -> torch.Tensor:
        """(B, Lk) long: the prompt position each key holds; generated tokens continue at n, n + 1, ..."""
        positions = self._slots[0]
        extra = self.key.shape[2] - positions.shape[1]
        tail = None
        if extra > 0:
            tail = (self.prompt_len + torch.arange(extra, device=positions.device)).expand(positions.shape[0], extra)
        return self._extend(positions, tail)

    @cached_property
    def real_keys(self) -> torch.Tensor:
        """(B, Lk) bool: keys that are tokens of the row (not padding, not an unused slot)."""
        return self._extend(self._slots[1], True)

    @cached_property
    def image_keys(self) -> torch.Tensor:
        """(B, Lk) bool: keys that are image tokens."""
        return self._extend(self._slots[2], False)

    @cached_property
    def query_offset(self) -> int:
        """Key index of query row 0 (0 in the prefill; the cached length while decoding)."""
        return 0 if self.prefill else self.key.shape[2] - self.query.shape[2]

    def _rows_of(self, per_key: torch.Tensor) -> torch.Tensor:
        start = self.query_offset
        return per_key[:, start: start + self.query.shape[2]]

    @property
    def query_positions(self) -> torch.Tensor:
        """(B, Lq) prompt position of each query row."""
        return self._rows_of(self.key_positions)

    @cached_property
    def text_rows(self) -> torch.Tensor:
        """(B, Lq) bool: real query rows that are text after the row's first image token (prompt or generated)."""
        prompt_image = self.ctx.prompt_image_mask.to(self.query.device)
        has = prompt_image.any(1)
        first = prompt_image.long().argmax(1)
        rows = (self.query_positions > first[:, None]) & has[:, None]
        return rows & self._rows_of(self.real_keys) & ~self._rows_of(self.image_keys)

    # -- attention ---------------------------------------------------------------------------------------------
    def allowed(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R, Lk) bool: the keys query rows `rows` (B, R) may attend (None: the last row, R = 1)."""
        batch, _, q_len, _ = self.query.shape
        k_len = self.key.shape[2]
        if rows is None:
            rows = torch.full((batch, 1), q_len - 1, dtype=torch.long, device=self.query.device)
        mask = self.attention_mask
        if mask is None:
            mask = causal_bool_mask(1, q_len, k_len, self.query.device)
        elif mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        mask = mask[:, 0].expand(batch, q_len, k_len)
        picked = mask.gather(1, rows[:, :, None].expand(batch, rows.shape[1], k_len))
        return picked & self.real_keys[:, None, :]

    def query_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, R, D) the queries of rows `rows` (B, R) (None: the last row)."""
        if rows is None:
            return self.query[:, :, -1:, :]
        heads, dim = self.query.shape[1], self.query.shape[3]
        return self.query.gather(2, rows[:, None, :, None].expand(-1, heads, -1, dim))

    def mass(self, rows: torch.Tensor | None = None, row_valid: torch.Tensor | None = None, reduce: str = "mean",
             per_head: bool = False) -> torch.Tensor:
        """Exact attention mass each current key gets from query rows `rows` (B, R) (None: the last row):
        float32 (B, Lk), (B, H, Lk) with per_head. Rows with `row_valid` False contribute nothing (with "mean"
        the count still includes them: pass reduce="sum" and divide by your own count)."""
        from mmkit.kernels import subset_attention_mass

        key_mask = self.allowed(rows)
        if row_valid is not None:
            key_mask = key_mask & row_valid[:, :, None]
        return subset_attention_mass(self.query_rows(rows), self.key, scaling=self.scaling, key_mask=key_mask,
                                     reduce=reduce, per_head=per_head)

    def rows_of_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query rows (B, R) holding prompt positions `positions` (B, R), and whether the row is still there."""
        qpos = self.query_positions
        hit = qpos[:, None, :] == positions[:, :, None]                  # (B, R, Lq)
        found = hit.any(-1) & self._rows_of(self.real_keys).gather(1, hit.long().argmax(-1))
        return hit.long().argmax(-1), found

    # -- prompt coordinates ------------------------------------------------------------------------------------
    def to_prompt(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-key values (B, ..., K) of the first K keys (K <= Lk) -> (B, ..., n) at their prompt positions;
        prompt tokens this layer does not hold get `fill`."""
        n = self.prompt_len
        width = values.shape[-1]  # the first `width` keys (e.g. only the prefill's)
        positions = self.key_positions[:, :width]
        ok = self.real_keys[:, :width] & (positions < n)
        index = torch.where(ok, positions, n)                                    # spare column n for the rest
        shape = (*values.shape[:-1], n + 1)
        out = values.new_full(shape, fill)
        index = index.view(index.shape[0], *([1] * (values.dim() - 2)), index.shape[1]).expand(values.shape)
        out.scatter_(-1, index, values)
        return out[..., :n]

    def from_prompt(self, values: torch.Tensor, fill=False) -> torch.Tensor:
        """Per-prompt-position values (B, n) -> (B, Lk) for the current keys; generated tokens and empty slots
        get `fill`."""
        n = self.prompt_len
        positions = self.key_positions
        ok = self.real_keys & (positions < n)
        picked = values.to(positions.device).gather(1, positions.clamp(0, n - 1))
        return torch.where(ok, picked, torch.full_like(picked, fill))

    def attend(self, query, key, value, attention_mask, **kwargs):
        """The layer's own attention implementation on (a slice of) this call."""
        return run_original(self.module, query, key, value, attention_mask, **kwargs)


def _scaling(module, query, kwargs) -> float:
    scaling = kwargs.get("scaling") if kwargs else None
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    return scaling


class ProbeHandle:
    def __init__(self, switch, handles: list):
        self._switch = switch
        self._handles = handles

    def remove(self) -> None:
        if self._handles is None:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = None
        self._switch.release()


class AttentionProbe:
    """A session's probe: registers observers and replacements on decoder layers' attention."""

    def __init__(self, session):
        self.ctx = session.context
        self.switch = session.text_attention
        self.layers = session.adapter.decoder_layers

    def view(self, module, query, key, attention_mask, scaling) -> LayerView:
        return LayerView(self.ctx, module, query, key, attention_mask, scaling)

    def observe(self, layers: Iterable[int], fn: Callable[[LayerView], None]) -> ProbeHandle:
        """Call `fn(view)` before every attention call of the given decoder layers."""

        def observer(module, query, key, attention_mask, scaling):
            fn(LayerView(self.ctx, module, query, key, attention_mask, scaling))

        return self._install(layers, lambda attn: observe_attention(attn, observer))

    def override(self, layers: Iterable[int], fn: Callable) -> ProbeHandle:
        """Run `fn(view, value, **kwargs) -> (output (B, Lq, H, D), None)` instead of those layers' attention."""

        def replacement(module, query, key, value, attention_mask, **kwargs):
            view = LayerView(self.ctx, module, query, key, attention_mask, _scaling(module, query, kwargs))
            return fn(view, value, **kwargs)

        return self._install(layers, lambda attn: override_attention(attn, replacement))

    def _install(self, layers, register) -> ProbeHandle:
        layers = list(layers)
        for layer in layers:
            if not 0 <= layer < len(self.layers):
                raise ValueError(f"decoder layer {layer} does not exist; this model has {len(self.layers)}")
        self.switch.acquire()
        handles = []
        try:
            for layer in layers:
                handles.append(register(self.layers[layer].self_attn))
        except Exception:
            for handle in handles:
                handle.remove()
            self.switch.release()
            raise
        return ProbeHandle(self.switch, handles)
