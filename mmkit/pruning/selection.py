"""Shared machinery for pre-LLM methods that choose visual tokens from the *projected* image features (DivPrune,
CDPruner, random, pooling).

These methods work on what the language model receives: the projector's outputs, i.e. the image rows of the
`inputs_embeds` the language model is called with. `ProjectedReducer` is a `PreLLMReducer` whose plan is made at
the language model's input (where those rows, the prompt's token ids and the padding mask are all known) instead
of at the projector, and whose method may also rewrite the image rows (pooling writes its averages into the first
slots of each image). Everything after the plan (the shorter sequence, masks, positions, decoding, per-layer
counts) is the shared pre-LLM reduction.

On models whose images differ in token count (LLaVA-NeXT / OneVision anyres tiles with row newlines, Qwen-VL
native grids with 3-D rotary positions) `LayoutReducer` does the same at the language model's input with each
image laid out (`mmkit.pruning.image_layout`) and handed to the method alone; `SelectionHandle` picks the reducer
for the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mmkit.patching.pre_llm import PreLLMReducer, ReductionPlan, check_supported, visual_tokens_per_image
from mmkit.pruning.image_layout import QWEN_ARCHITECTURES, ImageLayout


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
    # Models whose images have different token counts (anyres, Qwen-VL): one image per batch, and where its tokens
    # sit (newline separators, raster grids). None: LLaVA-1.5, every image one square grid.
    layout: ImageLayout | None = None


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


def per_image_layout(session) -> bool:
    """Whether the model's images have different token counts (anyres tiles with newlines, Qwen-VL native grids):
    then each image is laid out and selected on its own (`LayoutReducer`)."""
    return session.adapter.architecture != "LlavaForConditionalGeneration"


def fixed_tokens(session) -> int | None:
    """Visual tokens of every image where all images have the same count (LLaVA-1.5); None where it varies."""
    return None if per_image_layout(session) else supported_tokens(session)


def fixed_budget(session, config, method: str) -> int | None:
    """Tokens every image keeps where all images have the same count (validated against it); None where images
    differ in size and each gets `image_budget`."""
    fixed = fixed_tokens(session)
    return None if fixed is None else kept_count(config.keep, config.tokens, fixed, method)


def patch_tokens(batch: ImageBatch) -> torch.Tensor | None:
    """Indices of an image's patch tokens, its anyres row newlines excluded; None where every token is a patch."""
    if batch.layout is None or not bool(batch.layout.newline.any()):
        return None
    return (~batch.layout.newline).nonzero().flatten().to(batch.features.device)


def kept_count(keep: float, tokens: int, tokens_per_image: int, method: str) -> int:
    """Visual tokens per image a method keeps: `tokens` if > 0, else round(keep x the model's count), at least 1."""
    count = tokens if tokens > 0 else max(1, round(keep * tokens_per_image))
    if count > tokens_per_image:
        raise ValueError(f"{method} keeps {count} tokens per image but this model has {tokens_per_image}; "
                         f"use tokens<={tokens_per_image} or keep=<fraction>")
    return count


def image_budget(keep: float, tokens: int, n: int) -> int:
    """Tokens kept of one image of n tokens where images differ in size: `tokens` (all of a smaller image) if > 0,
    else round(keep x n), at least 1."""
    return min(tokens, n) if tokens > 0 else max(1, round(keep * n))


def check_budget_fields(keep, tokens) -> float:
    """Validate the (keep, tokens) pair every selection method shares; returns keep as a float."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an integer >= 0 (0 = use keep), got {tokens!r}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def check_positions(positions) -> None:
    if positions not in ("auto", "contiguous", "original"):
        raise ValueError(f"positions must be auto, contiguous or original, got {positions!r}")


def resolve_positions(session, positions: str) -> str:
    """"auto": renumbered ("contiguous", the papers' LLaVA setting) where positions are 1-D; "original" on Qwen-VL,
    whose 3-D rotary positions (time, height, width) of a reduced grid have no renumbering."""
    rope3d = session.adapter.architecture in QWEN_ARCHITECTURES
    if positions == "auto":
        return "original" if rope3d else "contiguous"
    if positions == "contiguous" and rope3d:
        raise ValueError(f"positions=contiguous cannot renumber the 3-D rotary positions of "
                         f"{session.adapter.family.name}; kept tokens keep theirs (positions=auto or original)")
    return positions


def grid_side(tokens_per_image: int, strategy: str) -> int:
    """Side of the square patch grid (LLaVA-1.5: 24); the "full" feature strategy's CLS token is not on it."""
    patches = tokens_per_image - (0 if strategy == "default" else 1)
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens per image do not form a square grid")
    return side


class SelectionHandle:
    """Handle of a method built on `ProjectedReducer` (LLaVA-1.5) or `LayoutReducer` (models whose images differ in
    token count); `remove()` detaches every hook."""

    def __init__(self, session, select_fn: SelectFn, positions="contiguous", keep_vision_features: bool = False):
        if per_image_layout(session):
            from mmkit.pruning.layout_reducer import LayoutReducer  # it builds on this module's ImageBatch

            self.tokens_per_image = None
            self.reducer = LayoutReducer(session, select_fn, positions=resolve_positions(session, positions),
                                         keep_vision_features=keep_vision_features)
            return
        check_supported(session.adapter)
        self.tokens_per_image = visual_tokens_per_image(session.adapter)
        self.reducer = ProjectedReducer(session, select_fn, positions=resolve_positions(session, positions),
                                        keep_vision_features=keep_vision_features)

    def kept(self, n: int) -> int:
        """Tokens kept of an image of n tokens: the fixed count (LLaVA-1.5), else this image's budget."""
        fixed = getattr(self, "k", None)
        return fixed if fixed is not None else image_budget(self.config.keep, self.config.tokens, n)

    def remove(self) -> None:
        self.reducer.remove()
