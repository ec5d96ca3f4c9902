"""Where each image token of a prompt row sits in its image: the token -> pixel geometry VL-SAM's maps need.

The flow gives one value per image token, in the order the tokens appear in the prompt. This module turns that
vector back into a 2-D map covering the whole image, for every supported layout:

* LLaVA-1.5: one square grid of patch tokens (row-major) over the processor's square input. transformers' CLIP
  processor center-crops a non-square image to that square, so the grid covers the central square only: the map is
  the grid with rows or columns of zeros on both sides for the part of the image the model never saw.
* LLaVA-NeXT / LLaVA-OneVision (anyres): the base tile's square grid (the whole image resized to one tile),
  followed by the high-resolution tiles packed as one grid with the processor's padding cropped away (unpadding)
  and a newline token closing each row; OneVision may also shrink that grid by interpolation (`anyres_max`). The
  layout is read off the model itself: its `pack_image_features` is run on tiles whose "features" are the patch
  indices and whose newline is -1, so the grid can never disagree with transformers'. Both grids cover the whole
  image; newline tokens belong to neither and are left out.
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: one grid of (h / merge) x (w / merge) merged tokens in row-major order
  (`image_grid_thw`, `spatial_merge_size`) over the processor's resized image (`smart_resize` scales the whole
  image to multiples of patch x merge, never crops), so the grid stretched over the original image places it.

A map cell (y, x) of an (h, w) map covers image pixels [x w_img / w, (x + 1) w_img / w) x [y h_img / h, ...), which
is how `prompts.py` turns cells into point prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mmkit.errors import MmkitError

# Which anyres grids form the map: both (their image-space densities averaged), the high-resolution tiles only, or
# the base tile only.
TileMap = Literal["mean", "high", "base"]
TILE_MAPS = ("mean", "high", "base")


@dataclass(frozen=True)
class ImageGeometry:
    """The grids of one image's tokens. Each grid is an (h, w) long tensor of indices into the image's token span
    (its tokens in prompt order) and covers the whole image, less `margins` cells of it the model never saw (LLaVA-1.5's
    center crop); `n_tokens` is the span length (newlines included)."""

    grids: tuple[torch.Tensor, ...]
    n_tokens: int
    margins: tuple[int, int, int, int] = (0, 0, 0, 0)  # zero cells (left, right, top, bottom) the grid does not cover

    @property
    def grid_shape(self) -> tuple[int, int]:
        """The finest grid's shape (the high-resolution tiles of an anyres image)."""
        return tuple(max((tuple(g.shape) for g in self.grids), key=lambda s: s[0] * s[1]))

    @property
    def shape(self) -> tuple[int, int]:
        """The map's shape: the finest grid plus the margins it does not cover."""
        left, right, top, bottom = self.margins
        h, w = self.grid_shape
        return h + top + bottom, w + left + right

    def to_map(self, values: torch.Tensor) -> torch.Tensor:
        """(n_tokens,) values over the image span -> (h, w) map covering the image.

        One grid: the values in grid order. Several (anyres base + high resolution): each grid is resized to the
        finest grid's shape (bilinear, which keeps every grid covering the whole image), made a distribution over
        the image (it sums to one; a grid holding no mass stays zero) and the distributions are averaged, so a
        grid with many small tokens and one with few large tokens weigh alike.
        """
        if values.shape != (self.n_tokens,):
            raise ValueError(f"expected {self.n_tokens} image-token values, got shape {tuple(values.shape)}")
        values = values.float()
        if len(self.grids) == 1:
            return self._with_margins(values[self.grids[0].to(values.device)])
        h, w = self.grid_shape
        parts = []
        for grid in self.grids:
            part = values[grid.to(values.device)]
            if tuple(part.shape) != (h, w):
                part = torch.nn.functional.interpolate(part[None, None], size=(h, w), mode="bilinear",
                                                       align_corners=False)[0, 0]
            total = part.sum()
            parts.append(part / total if total > 0 else part)
        return self._with_margins(torch.stack(parts).mean(0))

    def _with_margins(self, grid_map: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(grid_map, self.margins) if any(self.margins) else grid_map


def square_geometry(n_tokens: int, covered: tuple[float, float] = (1.0, 1.0)) -> ImageGeometry:
    """LLaVA-1.5: n tokens forming one square grid, covering the central `covered` = (width, height) fractions of
    the image (a center crop); the rest of the map is zero margins of about the grid's cell size."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise MmkitError(f"{n_tokens} image tokens do not form a square grid; this model's image layout is not one "
                         f"grid of patch tokens per image")
    # Equal margins on both sides (the crop is centred), so the grid's cells are off by under half a cell.
    pad_w = max(0, round((side / covered[0] - side) / 2))
    pad_h = max(0, round((side / covered[1] - side) / 2))
    return ImageGeometry((torch.arange(n_tokens).view(side, side),), n_tokens, (pad_w, pad_w, pad_h, pad_h))


def center_crop_cover(image_processor, size: tuple[int, int]) -> tuple[float, float]:
    """The (width, height) fractions of a `size` = (W, H) image that a resize-shortest-edge + center-crop processor
    (transformers' CLIP image processor) keeps; (1, 1) when it does not crop."""
    crop = getattr(image_processor, "crop_size", None)
    resize = getattr(image_processor, "size", None)
    shortest = resize.get("shortest_edge") if hasattr(resize, "get") else None
    if not getattr(image_processor, "do_center_crop", False) or not crop or not shortest:
        return 1.0, 1.0
    width, height = size
    scale = shortest / min(width, height)
    return min(1.0, crop["width"] / (width * scale)), min(1.0, crop["height"] / (height * scale))


def native_geometry(grid_thw, merge: int) -> ImageGeometry:
    """Qwen-VL: one (h / merge) x (w / merge) grid of merged tokens, row-major, for a still image (t = 1)."""
    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise MmkitError(f"an image with {t} temporal patches (a video) cannot be grounded; pass still images")
    gh, gw = h // merge, w // merge
    return ImageGeometry((torch.arange(gh * gw).view(gh, gw),), gh * gw)


def _rows(tokens: torch.Tensor, start: int) -> torch.Tensor:
    """(rows, width) span indices of a packed grid whose rows each end in a newline (-1), starting at `start`."""
    newline = (tokens == -1).nonzero().flatten().tolist()
    rows, begin = [], 0
    for end in newline:
        rows.append(torch.arange(begin, end))
        begin = end + 1
    if begin != tokens.numel() or len({r.numel() for r in rows}) != 1 or rows[0].numel() == 0:
        raise MmkitError("the high-resolution tiles of an anyres image are not packed as equal rows ending in a "
                         "newline; their layout cannot be mapped to the image")
    return torch.stack(rows) + start


def anyres_geometries(model: torch.nn.Module, image_sizes: torch.Tensor, batch_num_images=None,
                      tile_map: TileMap = "mean") -> list[ImageGeometry]:
    """LLaVA-NeXT / OneVision: per image, the base tile's grid and the unpadded high-resolution grid (newlines
    excluded), as the model itself packs them; `tile_map` picks which grids form the map. `model` is the inner
    model (`model.model`) holding `pack_image_features`."""
    from mmkit.patching.anyres import tiles_per_image

    if tile_map not in TILE_MAPS:
        raise ValueError(f"tile_map must be one of {', '.join(TILE_MAPS)}, got {tile_map!r}")
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    n_feat = side * side
    sizes = torch.as_tensor(image_sizes).cpu()
    counts = tiles_per_image(config, sizes, batch_num_images)
    # Features are the patch indices (>= 0; blends of them where OneVision interpolates), the newline is -1.
    features = [torch.arange(n * n_feat, dtype=torch.float64).view(n, n_feat, 1) for n in counts]
    newline = torch.tensor([-1.0], dtype=torch.float64)
    if config.model_type == "llava_onevision":
        packed, _ = model.pack_image_features(features, sizes, image_newline=newline,
                                              vision_aspect_ratio=config.vision_aspect_ratio)
    else:
        packed, _ = model.pack_image_features(features, sizes, vision_feature_select_strategy="default",
                                              image_newline=newline)
    out = []
    for tokens, n_tiles in zip(packed, counts):
        tokens = tokens[:, 0]
        base = torch.arange(n_feat).view(side, side)           # the base tile's patches come first, in order
        high = _rows(tokens[n_feat:], n_feat) if n_tiles > 1 else None
        if high is None or tile_map == "base":
            grids = (base,)
        elif tile_map == "high":
            grids = (high,)
        else:
            grids = (base, high)
        out.append(ImageGeometry(grids, tokens.numel()))
    return out


def row_geometries(session, inputs: dict, tile_map: TileMap = "mean", sizes=None) -> list[ImageGeometry]:
    """The geometry of each row's one image, from the model inputs (`image_sizes` for anyres, `image_grid_thw`
    for Qwen-VL, the image-token count for LLaVA-1.5, with `sizes` = each row's image (W, H) for its center crop).
    Every row must hold exactly one image."""
    adapter = session.adapter
    counts = adapter.image_mask(inputs["input_ids"]).sum(1).tolist()
    family = adapter.family.name
    if family in ("llava-next", "llava-onevision"):
        geos = anyres_geometries(adapter.model.model, inputs["image_sizes"], inputs.get("batch_num_images"),
                                 tile_map)
    elif "image_grid_thw" in inputs:
        merge = int(adapter.config.vision_config.spatial_merge_size)
        geos = [native_geometry(thw, merge) for thw in inputs["image_grid_thw"].tolist()]
    else:
        processor = getattr(session.processor, "image_processor", None)
        covers = [center_crop_cover(processor, size) for size in sizes] if sizes else [(1.0, 1.0)] * len(counts)
        geos = [square_geometry(int(n), cover) for n, cover in zip(counts, covers)]
    if len(geos) != len(counts) or any(g.n_tokens != int(n) for g, n in zip(geos, counts)):
        raise MmkitError("the image tokens of a row do not match its image's layout; grounding needs one image per "
                         "row")
    return geos
