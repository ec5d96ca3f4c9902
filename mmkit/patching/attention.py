"""The `mmkit` attention backend: SDPA, plus per-module observers that read a layer's queries and keys.

Methods that rank tokens by attention (FastV, PyramidDrop, SparseVLM, VL-SAM, ...) need a few rows of the
attention matrix. Asking transformers for `output_attentions` forces eager attention and materialises N x N for
every layer; instead the text backbone is switched to this backend, which runs SDPA exactly as the `sdpa` backend
does and hands q/k of the layers someone observes to that observer. Observers are registered per module instance,
so two models in one process never see each other's hooks.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

ATTN_NAME = "mmkit"

# module -> {handle id: observer(module, query, key, attention_mask, scaling)}
_OBSERVERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Callable]]" = weakref.WeakKeyDictionary()
# module -> {handle id: replacement(module, query, key, value, attention_mask, **kwargs) -> (output, weights)}
_OVERRIDES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Callable]]" = weakref.WeakKeyDictionary()
_next_id = 0
_registered = False


def _mmkit_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    observers = _OBSERVERS.get(module)
    if observers:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        for observer in list(observers.values()):
            observer(module, query, key, attention_mask, scaling)
    overrides = _OVERRIDES.get(module)
    if overrides:
        # Only one replacement per module can run; `override_attention` refuses a second.
        (replacement,) = overrides.values()
        return replacement(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def ensure_registered() -> None:
    """Register the backend and its mask function with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _mmkit_attention)
    # Without a registered mask function transformers would pass mask=None and causality would be lost.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


class ObserverHandle:
    def __init__(self, module: torch.nn.Module, key: int, table=None):
        self._module = weakref.ref(module)
        self._key = key
        self._table = _OBSERVERS if table is None else table

    def remove(self) -> None:
        module = self._module()
        if module is not None and module in self._table:
            self._table[module].pop(self._key, None)
            if not self._table[module]:
                del self._table[module]


def observe_attention(module: torch.nn.Module, observer: Callable) -> ObserverHandle:
    """Call `observer(module, query, key, attention_mask, scaling)` before each attention call of `module`.

    query: (B, H, Lq, D) after RoPE; key: (B, Hkv, Lk, D) including the cache; attention_mask: the 4-D bool/float
    mask SDPA receives, or None (causal, no padding).
    """
    global _next_id
    _next_id += 1
    _OBSERVERS.setdefault(module, {})[_next_id] = observer
    return ObserverHandle(module, _next_id)


def override_attention(module: torch.nn.Module, replacement: Callable) -> ObserverHandle:
    """Run `replacement(module, query, key, value, attention_mask, **kwargs) -> (output, weights)` instead of SDPA
    for `module` (e.g. attention with modified scores). Output layout as SDPA's backend: (B, Lq, H, D)."""
    global _next_id
    if _OVERRIDES.get(module):
        raise ValueError(f"attention of layer {getattr(module, 'layer_idx', '?')} is already replaced by another method")
    _next_id += 1
    _OVERRIDES.setdefault(module, {})[_next_id] = replacement
    return ObserverHandle(module, _next_id, _OVERRIDES)


class TextAttentionSwitch:
    """Reference-counted switch of a model's text backbone to the `mmkit` backend; the last release restores it."""

    def __init__(self, model: torch.nn.Module, text_module: torch.nn.Module):
        self.model = model
        self.text_module = text_module
        self.count = 0
        self.original: str | None = None

    def acquire(self) -> None:
        ensure_registered()
        if self.count == 0:
            self.original = self.text_module.config._attn_implementation
            self.model.set_attn_implementation({"text_config": ATTN_NAME})
            if self.text_module.config._attn_implementation != ATTN_NAME:
                raise RuntimeError("could not switch the text backbone to the mmkit attention backend")
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.model.set_attn_implementation({"text_config": self.original})
