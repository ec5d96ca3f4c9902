"""Where each tile patch of a LLaVA-NeXT or LLaVA-OneVision (anyres) image lands among the image's tokens.

LLaVA-NeXT encodes every image as a base tile plus a grid of high-resolution tiles, projects each tile's patches,
then packs them: the base tile's patches, followed by the high-resolution grid with the padding the processor
added cropped away (unpadding) and an `image_newline` token after every row. A vision-side reduction plans per tile
(before the projector) but must place its tokens in the packed sequence, so it needs that map.

The map is taken from the model itself: its own `pack_image_features` is run on tiles whose "features" are the
patches' indices (float64, exact) and whose newline is -1, so the layout can never disagree with transformers'.
`pack_image_features` needs each image's size, which transformers passes only to `get_image_features`;
`ImageSizeCapture` records it there with a wrapper set on this model instance only (no class is changed) and
removed by `remove()`.
"""

from __future__ import annotations

import torch

NEWLINE = -1


class ImageSizeCapture:
    """Records the `image_sizes` (and OneVision's `batch_num_images` / `vision_aspect_ratio`) of the latest image
    encoding of one anyres model instance.

    Every capture of one model instance listens to a single wrapper, so captures of several methods stack and come
    off in any order; the last one removed deletes the wrapper."""

    def __init__(self, inner_model: torch.nn.Module):
        self.inner = inner_model
        self.image_sizes: torch.Tensor | None = None
        self.options: dict = {}
        wrapper = inner_model.__dict__.get("get_image_features")
        if getattr(wrapper, "mmkit_size_listeners", None) is None:
            previous = wrapper                      # an instance attribute set by someone else, kept on removal
            original = inner_model.get_image_features
            listeners: list[ImageSizeCapture] = []

            def get_image_features(pixel_values, image_sizes, *args, **kwargs):
                for listener in list(listeners):
                    listener._record(image_sizes, kwargs)
                return original(pixel_values, image_sizes, *args, **kwargs)

            get_image_features.mmkit_size_listeners = listeners
            get_image_features.mmkit_previous = previous
            # An instance attribute shadows the class method for this model only; deleting it restores the method.
            inner_model.get_image_features = get_image_features
            wrapper = get_image_features
        wrapper.mmkit_size_listeners.append(self)
        self._wrapper = wrapper

    def _record(self, image_sizes, kwargs) -> None:
        self.image_sizes = None if image_sizes is None else torch.as_tensor(image_sizes).detach().cpu().clone()
        self.options = {name: kwargs.get(name) for name in ("batch_num_images", "vision_aspect_ratio")}

    def take(self) -> torch.Tensor:
        if self.image_sizes is None:
            raise RuntimeError("the image sizes of this prefill were not seen; cannot place anyres tiles")
        sizes, self.image_sizes = self.image_sizes, None
        return sizes

    def remove(self) -> None:
        listeners = self._wrapper.mmkit_size_listeners
        if self in listeners:
            listeners.remove(self)
        if not listeners and self.inner.__dict__.get("get_image_features") is self._wrapper:
            previous = self._wrapper.mmkit_previous
            if previous is None:
                del self.inner.get_image_features
            else:
                self.inner.get_image_features = previous


def _onevision(config) -> bool:
    return config.model_type == "llava_onevision"


def tiles_per_image(config, image_sizes: torch.Tensor, batch_num_images=None) -> list[int]:
    """How many tiles (base + high resolution) the model encodes for each image, as transformers computes it
    (OneVision encodes an image of a multi-image prompt as its base tile only)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tiled = [True] * len(image_sizes)
    if _onevision(config) and batch_num_images is not None:
        tiled = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    return [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                      patch_size=config.vision_config.image_size) if tile else 1
            for size, tile in zip(image_sizes.tolist(), tiled)]


def anyres_layout(inner_model: torch.nn.Module, capture: ImageSizeCapture, n_tiles: int, n_feat: int
                  ) -> list[torch.Tensor]:
    """Per image of the latest encoding, a long tensor over its packed image tokens: the global feature index
    `tile * n_feat + patch` of the token (tiles numbered over the whole batch, as the projector sees them), or
    NEWLINE."""
    config = inner_model.config
    options = capture.options
    image_sizes = capture.take()
    counts = tiles_per_image(config, image_sizes, options.get("batch_num_images"))
    if sum(counts) != n_tiles:
        raise RuntimeError(f"{n_tiles} tiles were encoded but the image sizes imply {sum(counts)}")
    index = list(torch.split(torch.arange(n_tiles * n_feat, dtype=torch.float64).view(n_tiles, n_feat, 1), counts))
    newline = torch.tensor([float(NEWLINE)], dtype=torch.float64)
    if _onevision(config):
        aspect = options.get("vision_aspect_ratio") or config.vision_aspect_ratio
        packed, _ = inner_model.pack_image_features(index, image_sizes, image_newline=newline,
                                                    vision_aspect_ratio=aspect)
    else:
        packed, _ = inner_model.pack_image_features(
            index, image_sizes, vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_newline=newline)
    layout = [p[:, 0] for p in packed]
    if any(bool((p != p.round()).any()) for p in layout):
        # OneVision shrinks a grid of more than `anyres_max_N` tiles by bilinear interpolation after the
        # projector: its tokens are blends of patches, so no patch can be kept or dropped on its own.
        raise RuntimeError("visionzip cannot place tokens of an image whose high-resolution grid the model resizes "
                           "after projection (OneVision anyres_max); use smaller images or an LLM-side method")
    return [p.long() for p in layout]


def pack_tile_values(inner_model: torch.nn.Module, capture, values: torch.Tensor) -> list[torch.Tensor]:
    """Per-tile, per-patch values (tiles, n_feat, C) of the latest encoding -> per image (n_tokens, C) float64 over
    its packed image tokens, laid out by the model's own `pack_image_features` (unpadding, row newlines, and
    OneVision's bilinear resize of a large grid, which blends the values as it blends the features); newline tokens
    hold NaN."""
    config = inner_model.config
    options = capture.options
    image_sizes = capture.take()
    n_tiles = values.shape[0]
    counts = tiles_per_image(config, image_sizes, options.get("batch_num_images"))
    if sum(counts) != n_tiles:
        raise RuntimeError(f"{n_tiles} tiles were encoded but the image sizes imply {sum(counts)}")
    tiles = list(torch.split(values.detach().to("cpu", torch.float64), counts))
    newline = torch.full((values.shape[-1],), float("nan"), dtype=torch.float64)
    if _onevision(config):
        aspect = options.get("vision_aspect_ratio") or config.vision_aspect_ratio
        packed, _ = inner_model.pack_image_features(tiles, image_sizes, image_newline=newline,
                                                    vision_aspect_ratio=aspect)
    else:
        packed, _ = inner_model.pack_image_features(
            tiles, image_sizes, vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_newline=newline)
    return list(packed)


def visible_patches(layout: list[torch.Tensor], n_tiles: int, n_feat: int) -> torch.Tensor:
    """(tiles, n_feat) bool: the patches that reach the language model (unpadding crops the others)."""
    seen = torch.zeros(n_tiles * n_feat, dtype=torch.bool)
    for tokens in layout:
        seen[tokens[tokens != NEWLINE]] = True
    return seen.view(n_tiles, n_feat)


GRID, AFTER_GRID, LAST = 1, 0, 2   # placement groups: in grid order; per tile after the grid; per tile at the end


def anyres_placement(layout: list[torch.Tensor], rank: torch.Tensor, group: torch.Tensor, n_feat: int,
                     device: torch.device) -> tuple[torch.Tensor, ...]:
    """`ReductionPlan.placement` for per-tile plans on the packed anyres layout.

    rank (tiles, N): each patch's rank in its tile's plan order (-1 = dropped); group (tiles, N): GRID, AFTER_GRID
    or LAST. Per image: the base tile's kept patches in plan order; then the high-resolution GRID patches in grid
    order, with the newline of every row that keeps one (a single-tile image's one newline always stays); then
    each tile's AFTER_GRID patches (tile order, then plan order); then each tile's LAST patches.
    """
    rank, group = rank.cpu(), group.cpu()
    keys, withins, images, ranks = [], [], [], []
    for tokens in layout:
        n_tok = tokens.numel()
        is_newline = tokens == NEWLINE
        g = tokens.clamp(min=0)
        tile, patch = g // n_feat, g % n_feat
        tok_rank = torch.where(is_newline, -1, rank[tile, patch])
        tok_group = torch.where(is_newline, -1, group[tile, patch])
        first = int(tile[0])
        p = torch.arange(n_tok)
        base = ~is_newline & (tile == first)
        local = tile - first
        kept = tok_rank >= 0
        raw = torch.where(base & kept, tok_rank, torch.full((n_tok,), -1, dtype=torch.long))
        high = ~is_newline & ~base & kept
        raw = torch.where(high & (tok_group == GRID), n_feat + p, raw)
        raw = torch.where(high & (tok_group == AFTER_GRID), n_feat + n_tok + local * n_feat + tok_rank, raw)
        raw = torch.where(high & (tok_group == LAST), n_feat + n_tok * (n_feat + 2) + local * n_feat + tok_rank, raw)
        row = is_newline.long().cumsum(0) - is_newline.long()               # each token's row (its newline's too)
        grid_in_row = torch.zeros(n_tok + 1, dtype=torch.long).index_add_(0, row, (high & (tok_group == GRID)).long())
        single = not bool((~is_newline & ~base).any())
        raw = torch.where(is_newline & ((grid_in_row[row] > 0) | single), n_feat + p, raw)
        keep = raw >= 0
        dense = torch.full((n_tok,), -1, dtype=torch.long)
        dense[keep] = torch.argsort(torch.argsort(raw[keep]))               # distinct keys 0.. inside the span
        keys.append(dense)
        withins.append(p)
        images.append(torch.where(is_newline, -1, tile))
        ranks.append(tok_rank)
    return tuple(torch.cat(x).to(device) for x in (keys, withins, images, ranks))
