"""`LayoutReducer`: the pre-LLM reduction of DivPrune, CDPruner, random and pooling on models whose images differ in
token count (LLaVA-NeXT / OneVision anyres tiles with row newlines, Qwen-VL native grids with 3-D rotary positions).

At the language model's input each image is laid out (`mmkit.pruning.image_layout`) and handed to the method alone;
the kept tokens become a shorter, left-padded sequence with its mask and positions, and decoding continues on the
shorter cache as the unreduced model would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmkit.patching.pre_llm import (ReducedPrefill, record_reduced_prefill, reduced_decode_kwargs,
                                    sequence_selection_from_keys)
from mmkit.pruning.image_layout import QWEN_ARCHITECTURES, ImageLayout, LayoutCapture
from mmkit.pruning.selection import ImageBatch, SelectFn


class LayoutReducer:
    """Reduce each image's tokens at the language model's input per `select_fn`, on models whose images differ in
    token count (LLaVA-NeXT / OneVision anyres, Qwen-VL). `remove()` detaches every hook.

    Each image is handed to `select_fn` alone (an `ImageBatch` of one image with its `ImageLayout`), so an image's
    choice never depends on the rest of the batch. The kept tokens stay in their image's span, in prompt order;
    rows that keep different numbers are left padded. Positions: "contiguous" renumbers the real tokens of each row
    (1-D positions), "original" keeps each kept token's position ids, for Qwen-VL every row of its (text,) time,
    height and width positions. Qwen3-VL's DeepStack features are kept for the kept tokens. Decoding re-indexes the
    growing 2-D mask onto the reduced cache and continues the positions as the unreduced model would.
    """

    def __init__(self, session, select_fn: SelectFn, positions: str, keep_vision_features: bool = False):
        if positions not in ("contiguous", "original"):
            raise ValueError(f"positions must be 'contiguous' or 'original', got {positions!r}")
        self.ctx = session.context
        self.select_fn = select_fn
        self.positions = positions
        self.rope3d = session.adapter.architecture in QWEN_ARCHITECTURES
        self.num_layers = session.adapter.num_layers
        self.layouts = LayoutCapture(session)
        self._input_ids: torch.Tensor | None = None
        self._caller_positions = False
        self._decode: ReducedPrefill | None = None
        self._saved: dict | None = None
        self._vision: torch.Tensor | None = None
        lm = session.adapter.language_model
        self._handles = [] if not keep_vision_features else [
            # What the projector receives (anyres: every tile's patch features), for relevance from CLIP.
            session.model.model.multi_modal_projector.register_forward_pre_hook(self._record_vision)]
        self._handles += [
            # After the session's context hook (registered first): it has marked whether this call is a prefill.
            session.model.register_forward_pre_hook(self._record_call, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            lm.register_forward_hook(self._lm_post_hook, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.layouts.remove()
        self._restore_context()
        self._input_ids = self._vision = None

    def _record_vision(self, module, args):
        self._vision = args[0]
        return None

    def _image_vision(self, layout: ImageLayout) -> torch.Tensor | None:
        """(1, N, C) the projector input each of the image's tokens came from (zeros for newlines), or None."""
        if self._vision is None:
            return None
        if layout.source is None:
            raise RuntimeError("this image's tokens are not single projected patches (the model resized its grid "
                               "after projection); CLIP relevance cannot be placed")
        rows = self._vision.reshape(-1, self._vision.shape[-1])
        source = layout.source.to(rows.device)
        picked = rows[source.clamp(min=0)] * (source >= 0)[:, None].to(rows.dtype)
        return picked[None]

    def _record_call(self, module, args, kwargs):
        if self.ctx.prefill:
            self._input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._caller_positions = kwargs.get("position_ids") is not None
        return None

    def _lm_pre_hook(self, module, args, kwargs):
        if args:
            raise RuntimeError("the language model was called with positional inputs; pass inputs_embeds by keyword")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise RuntimeError("token reduction before the LLM needs a 2-D attention mask (no static KV cache)")
        if self.ctx.prefill:
            self._decode = None
            image_mask = self.ctx.image_mask
            if image_mask is None or not bool(image_mask.any()):
                return None
            return args, self._reduce_prefill(kwargs, self.layouts.take(), image_mask)
        if self._decode is not None:
            return args, reduced_decode_kwargs(kwargs, self._decode, self.rope3d, self._caller_positions)
        return None

    def _lm_post_hook(self, module, args, kwargs, output):
        self._restore_context()
        return None

    def _restore_context(self) -> None:
        if self._saved is not None:
            self.ctx.restore_prefill(self._saved)
            self._saved = None

    def _plan(self, embeds, image_mask, layouts, mask2d):
        """Per image token (row-major): key (rank among its image's kept tokens, -1 dropped), offset in its image,
        image index; and the image rows with any replaced features (None: unchanged)."""
        flat = embeds[image_mask]
        lengths = [layout.length for layout in layouts]
        if sum(lengths) != flat.shape[0]:
            raise RuntimeError(f"{flat.shape[0]} image tokens in the prompt but the images' layouts give "
                               f"{sum(lengths)}")
        token_rows = image_mask.nonzero()[:, 0]
        keys, withins, images = [], [], []
        edited = None
        start = 0
        for index, (layout, length) in enumerate(zip(layouts, lengths)):
            row = token_rows[start:start + 1]
            batch = ImageBatch(features=flat[start:start + length][None], vision_features=self._image_vision(layout),
                               rows=row,
                               input_ids=self._input_ids, image_mask=image_mask, attention_mask=mask2d,
                               layout=layout)
            selection = self.select_fn(batch)
            order = selection.order[0].to(flat.device)
            key = torch.full((length,), -1, dtype=torch.long, device=flat.device)
            key[order] = torch.arange(order.numel(), device=flat.device)
            if selection.features is not None:
                edited = flat.clone() if edited is None else edited
                edited[start:start + length] = selection.features[0].to(flat.dtype)
            keys.append(key)
            withins.append(torch.arange(length, device=flat.device))
            images.append(torch.full((length,), index, dtype=torch.long, device=flat.device))
            start += length
        self._vision = None
        return torch.cat(keys), torch.cat(withins), torch.cat(images), edited

    def _reduce_prefill(self, kwargs: dict, layouts: list[ImageLayout], image_mask: torch.Tensor) -> dict:
        embeds = kwargs["inputs_embeds"]
        device = embeds.device
        batch, n, d = embeds.shape
        image_mask = image_mask.to(device)
        mask2d = kwargs.get("attention_mask")
        key, within, image_of, edited = self._plan(embeds, image_mask, layouts, mask2d)
        if edited is not None:
            embeds = embeds.clone()
            embeds[image_mask] = edited
        keep, valid, _, _ = sequence_selection_from_keys(image_mask, key, within, image_of, key)
        m = keep.shape[1]
        had_mask = mask2d is not None
        full = mask2d.to(device).bool() if had_mask else torch.ones(batch, n, dtype=torch.bool, device=device)
        new_mask = full.gather(1, keep)
        if valid is not None:
            new_mask = new_mask & valid
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = embeds.gather(1, keep[..., None].expand(batch, m, d))
        # Always a 2-D mask: with gaps in the position ids and no mask, transformers would take the rows for packed
        # sequences. An all-ones mask takes SDPA's is_causal path exactly like no mask.
        kwargs["attention_mask"] = new_mask.to(mask2d.dtype) if had_mask else new_mask.long()
        pos = kwargs.get("position_ids")
        shift = None
        if self.rope3d:
            if pos is None or pos.dim() != 3:
                raise RuntimeError("the Qwen-VL decoder was called without its 3-D rotary positions; cannot keep "
                                   "the kept tokens' positions")
            kwargs["position_ids"] = pos.to(device).gather(2, keep[None].expand(pos.shape[0], batch, m))
        else:
            pos = torch.arange(n, device=device)[None].expand(batch, n) if pos is None else \
                pos.to(device).expand(batch, n)
            kept_pos = pos.gather(1, keep)
            if self.positions == "original":
                new_pos = kept_pos
            else:
                # Real kept tokens numbered consecutively from the row's first real position; padding keeps its own.
                start = torch.where(full, pos, torch.full_like(pos, torch.iinfo(pos.dtype).max)).min(1).values
                new_pos = torch.where(new_mask, start[:, None] + new_mask.long().cumsum(1) - 1, kept_pos)
            kwargs["position_ids"] = new_pos
            shift = pos[:, -1] - new_pos[:, -1]
        reduced_image = image_mask.gather(1, keep) & new_mask
        if kwargs.get("visual_pos_masks") is not None:
            # Qwen3-VL DeepStack: the features of the kept image tokens, in the reduced sequence's row-major order.
            visual_index = (image_mask.reshape(-1).long().cumsum(0) - 1).view(batch, n)
            kept_visual = visual_index.gather(1, keep)[reduced_image]
            kwargs["visual_pos_masks"] = reduced_image
            kwargs["deepstack_visual_embeds"] = [e[kept_visual.to(e.device)]
                                                 for e in kwargs["deepstack_visual_embeds"]]
        self._decode = ReducedPrefill(keep=keep, mask=kwargs["attention_mask"], prompt_len=n, shift=shift)
        self._saved = record_reduced_prefill(self.ctx, reduced_image, new_mask, keep, had_mask or valid is not None,
                                             self.num_layers)
        return kwargs
