"""Shared machinery for pre-LLM methods that choose visual tokens from the *projected* image features (DivPrune,
CDPruner, random, pooling).

These methods work on what the language model receives: the projector's outputs, i.e. the image rows of the
`inputs_embeds` the language model is called with. `ProjectedReducer` is a `PreLLMReducer` whose plan is made at
the language model's input (where those rows, the prompt's token ids and the padding mask are all known) instead
of at the projector, and whose method may also rewrite the image rows (pooling writes its averages into the first
slots of each image). Everything after the plan (the shorter sequence, masks, positions, decoding, per-layer
counts) is the shared pre-LLM reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mmkit.patching.pre_llm import PreLLMReducer, ReductionPlan, check_supported, visual_tokens_per_image


@dataclass
class ImageBatch:
    """The images of one prefill, as the language model is about to receive them.

    features: (I, N, D) projected image features (one row of the language model's input per visual token), images
    in row-major prompt order. vision_features: (I, N, C) what the projector received. rows: (I,) the batch row
    each image belongs to. input_ids: (B, n) token ids of the prompt (None when the model was called without them).
    """

    features: torch.Tensor
    vision_features: torch.Tensor | None
    rows: torch.Tensor
    input_ids: torch.Tensor | None
    image_mask: torch.Tensor
    attention_mask: torch.Tensor | None


@dataclass
class Selection:
    """A method's choice: `order` (I, k) indices of the kept tokens per image, in the order they enter the
    sequence; `features` (I, N, D) replacement projected features (None: unchanged)."""

    order: torch.Tensor
    features: torch.Tensor | None = None


SelectFn = Callable[[ImageBatch], Selection]


def identity_order(n_images: int, n_tokens: int, device) -> torch.Tensor:
    return torch.arange(n_tokens, device=device).expand(n_images, n_tokens)


class ProjectedReducer(PreLLMReducer):
    """A `PreLLMReducer` whose per-image plan `select_fn(ImageBatch) -> Selection` is made from the projected
    features at the language model's input."""

    def __init__(self, session, select_fn: SelectFn, positions="contiguous", keep_vision_features: bool = False):
        self.select_fn = select_fn
        self._keep_vision = keep_vision_features
        self._vision_features: torch.Tensor | None = None
        self._input_ids: torch.Tensor | None = None
        super().__init__(session, self._placeholder_plan, positions=positions)
        # The prompt's token ids (for methods that read the instruction); the session's context hook, registered
        # first, has already marked whether this call is a prefill.
        self._handles.append(session.model.register_forward_pre_hook(self._record_ids, with_kwargs=True))

    def _record_ids(self, module, args, kwargs):
        if self.ctx.prefill:
            self._input_ids = kwargs.get("input_ids", args[0] if args else None)
        return None

    def _placeholder_plan(self, features: torch.Tensor) -> ReductionPlan:
        # The projector's hook runs before the projected rows exist; the real plan is made in `_reduce_prefill`.
        self._vision_features = features if self._keep_vision else None
        return ReductionPlan(order=identity_order(features.shape[0], features.shape[1], features.device))

    def _reduce_prefill(self, kwargs: dict, plan: ReductionPlan, image_mask: torch.Tensor) -> dict:
        embeds = kwargs["inputs_embeds"]
        device = embeds.device
        image_mask = image_mask.to(device)
        n_images, n_tokens = plan.order.shape
        feats = embeds[image_mask].view(n_images, n_tokens, embeds.shape[-1])
        per_row = image_mask.sum(1) // n_tokens
        rows = torch.repeat_interleave(torch.arange(image_mask.shape[0], device=device), per_row)
        mask2d = kwargs.get("attention_mask")
        batch = ImageBatch(features=feats, vision_features=self._vision_features, rows=rows,
                           input_ids=self._input_ids, image_mask=image_mask, attention_mask=mask2d)
        self._vision_features = None
        selection = self.select_fn(batch)
        if selection.features is not None:
            embeds = embeds.clone()
            embeds[image_mask] = selection.features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            kwargs = dict(kwargs, inputs_embeds=embeds)
        return super()._reduce_prefill(kwargs, ReductionPlan(order=selection.order), image_mask)

    def remove(self) -> None:
        super().remove()
        self._input_ids = self._vision_features = None


def supported_tokens(session) -> int:
    """Visual tokens per image of a model the pre-LLM reduction supports (clear error for the others)."""
    check_supported(session.adapter)
    return visual_tokens_per_image(session.adapter)


def kept_count(keep: float, tokens: int, tokens_per_image: int, method: str) -> int:
    """Visual tokens per image a method keeps: `tokens` if > 0, else round(keep x the model's count), at least 1."""
    count = tokens if tokens > 0 else max(1, round(keep * tokens_per_image))
    if count > tokens_per_image:
        raise ValueError(f"{method} keeps {count} tokens per image but this model has {tokens_per_image}; "
                         f"use tokens<={tokens_per_image} or keep=<fraction>")
    return count


def check_budget_fields(keep, tokens) -> float:
    """Validate the (keep, tokens) pair every selection method shares; returns keep as a float."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an integer >= 0 (0 = use keep), got {tokens!r}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def check_positions(positions) -> None:
    if positions not in ("contiguous", "original"):
        raise ValueError(f"positions must be contiguous or original, got {positions!r}")


def grid_side(tokens_per_image: int, strategy: str) -> int:
    """Side of the square patch grid (LLaVA-1.5: 24); the "full" feature strategy's CLS token is not on it."""
    patches = tokens_per_image - (0 if strategy == "default" else 1)
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens per image do not form a square grid")
    return side


class SelectionHandle:
    """Handle of a method built on `ProjectedReducer`; `remove()` detaches every hook."""

    def __init__(self, session, select_fn: SelectFn, positions="contiguous", keep_vision_features: bool = False):
        check_supported(session.adapter)
        self.tokens_per_image = visual_tokens_per_image(session.adapter)
        self.reducer = ProjectedReducer(session, select_fn, positions=positions,
                                        keep_vision_features=keep_vision_features)

    def remove(self) -> None:
        self.reducer.remove()
