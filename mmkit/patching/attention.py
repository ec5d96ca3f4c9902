"""The `mmkit` attention backend: the model's own attention, plus per-module observers and replacements.

Methods that rank tokens by attention (FastV, SparseVLM, VL-SAM, ...) need a few rows of the attention matrix.
Asking transformers for `output_attentions` forces eager attention and materialises N x N for every layer; instead
the text backbone is switched to this backend, which hands q/k of the layers someone observes to that observer and
then runs the attention implementation the model was loaded with (`sdpa`, `eager`, `flex_attention`,
`flash_attention_2`, ..., resolved through transformers' `ALL_ATTENTION_FUNCTIONS`), so every layer no method edits
computes exactly what it computed before. Observers are registered per module instance, so two models in one
process never see each other's hooks.

Methods do not call this module directly: `mmkit.patching.probe` is the interface (it also says, at every layer,
where each current token came from).

The backend's mask function is SDPA's (a 4-D bool mask, or None for plain causal attention): the token dropper and
the probe read and re-index it. `run_original` turns it into what the original implementation expects (an additive
float mask for eager and flex attention; flash attention takes no 4-D mask, so a call that carries one runs SDPA,
which computes the same attention).
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Callable

import torch

ATTN_NAME = "mmkit"

# module -> {handle id: observer(module, query, key, attention_mask, scaling)}
_OBSERVERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Callable]]" = weakref.WeakKeyDictionary()
# module -> {handle id: replacement(module, query, key, value, attention_mask, **kwargs) -> (output, weights)}
_OVERRIDES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Callable]]" = weakref.WeakKeyDictionary()
# module -> the attention implementation the model was loaded with (set while the switch is held)
_ORIGINAL: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_next_id = 0
_registered = False
_warned: set[str] = set()
logger = logging.getLogger(__name__)


def original_implementation(module: torch.nn.Module) -> str:
    """Name of the attention implementation `module` ran before the switch to this backend."""
    return _ORIGINAL.get(module, "sdpa")


def _resolve(name: str, module: torch.nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    # Eager attention is not in the registry: each modeling file defines its own `eager_attention_forward`.
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"cannot find the {name!r} attention of {type(module).__name__}; load the model with "
                           f"attn_implementation='sdpa'")
    return eager


def causal_bool_mask(batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """(B, 1, Lq, Lk) causal mask with the queries as the last Lq of the Lk keys (what mask None means)."""
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return (torch.arange(k_len, device=device)[None, :] <= rows).expand(batch, 1, q_len, k_len)


def _additive(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    if mask is None:
        mask = causal_bool_mask(query.shape[0], query.shape[2], key.shape[2], query.device)
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def run_original(module, query, key, value, attention_mask, **kwargs):
    """The layer's own attention (the implementation the model was loaded with) on this backend's mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = original_implementation(module)
    if name in ("sdpa", ATTN_NAME):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if name.startswith("flash_attention"):
        if attention_mask is not None:
            if name not in _warned:
                _warned.add(name)
                logger.info("%s takes no 4-D mask; calls that carry one (padding, dropped tokens) run SDPA", name)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return _resolve(name, module)(module, query, key, value, None, **kwargs)
    return _resolve(name, module)(module, query, key, value, _additive(attention_mask, query, key), **kwargs)


def _mmkit_attention(module, query, key, value, attention_mask, **kwargs):
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
    return run_original(module, query, key, value, attention_mask, **kwargs)


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
    """Run `replacement(module, query, key, value, attention_mask, **kwargs) -> (output, weights)` instead of the
    layer's attention for `module` (e.g. attention with modified scores). Output layout as SDPA's backend: (B, Lq, H, D)."""
    global _next_id
    if _OVERRIDES.get(module):
        raise ValueError(f"attention of layer {getattr(module, 'layer_idx', '?')} is already replaced by another method")
    _next_id += 1
    _OVERRIDES.setdefault(module, {})[_next_id] = replacement
    return ObserverHandle(module, _next_id, _OVERRIDES)


class TextAttentionSwitch:
    """Reference-counted switch of a model's text backbone to the `mmkit` backend; the last release restores it."""

    def __init__(self, model: torch.nn.Module, text_module: torch.nn.Module, attention_modules=()):
        self.model = model
        self.text_module = text_module
        self.attention_modules = list(attention_modules)
        self.count = 0
        self.original: str | None = None

    def acquire(self) -> None:
        ensure_registered()
        if self.count == 0:
            self.original = self.text_module.config._attn_implementation
            for module in self.attention_modules:
                _ORIGINAL[module] = self.original
            self.model.set_attn_implementation({"text_config": ATTN_NAME})
            if self.text_module.config._attn_implementation != ATTN_NAME:
                raise RuntimeError("could not switch the text backbone to the mmkit attention backend")
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.model.set_attn_implementation({"text_config": self.original})
            for module in self.attention_modules:
                _ORIGINAL.pop(module, None)
