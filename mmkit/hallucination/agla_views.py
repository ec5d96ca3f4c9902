"""Where AGLA's local view lives in each family's pixel input, and how attention over image tokens maps onto it.

AGLA blacks out pixels of the image the model sees. Every family's processor turns an image into a different pixel
tensor, so each family's views class (`image_views` picks it; one image per prompt row) gives, per row:

- `canvases[i]`: the image as the model sees it at its finest resolution, normalised, (3, H, W):
  * LLaVA-1.5: the processed crop;
  * LLaVA-NeXT / OneVision (anyres): the high-resolution tiles stitched back together, without the padding the
    processor put around the resized image (the geometry is recomputed with the processor's own
    `select_best_resolution` / `get_patch_output_size`);
  * Qwen-VL: the resized image, taken back out of its flattened, merge-ordered patch rows (`image_grid_thw`).
- `token_grids(masses)`: the attention mass on the row's image tokens (in prompt order) -> a relevance map over the
  whole canvas (upsampled to its pixels afterwards):
  * LLaVA-1.5: the square patch grid (a CLS token, if kept, dropped);
  * anyres: a map at the canvas's pixels: the packed high-resolution grid (R rows of C tokens, each row's
    newline dropped) laid over the canvas region its unpadded feature grid covers (found with the model's own
    `unpad_image`; R x C may be smaller when OneVision resized the grid), plus the base tile's grid over the whole
    image, both as mass per pixel;
  * Qwen-VL: the merged-token grid, h / merge x w / merge.
- `masked(keeps, fills)`: pixel inputs in the family's own layout where every canvas pixel outside `keeps[i]`
  becomes `fills[i]`. Anyres: the high-resolution tiles take the canvas mask (padding untouched) and the base tile
  (the whole image resized to one tile) takes it resampled at its pixel centres; Qwen-VL: every temporal copy.

Shapes, `image_sizes` and `image_grid_thw` stay as they are, so both views give the same number of visual tokens in
the same places: the local view goes through the model exactly as the processor laid the image out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _one_image_per_row(count: int, batch: int) -> None:
    if count != batch:
        raise ValueError(f"agla needs one image per prompt; got {count} images for {batch} prompts")


def _row_masses(masses: torch.Tensor, input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per row, the values of `masses` (B, n) at the row's image tokens, in prompt order."""
    image = input_ids == image_token_id
    return [masses[b][image[b]].float() for b in range(image.shape[0])]


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) -> size, each output pixel taking the cell its centre falls in."""
    return F.interpolate(grid[None, None].float(), size=size, mode="nearest-exact")[0, 0]


class LlavaViews:
    """One fixed crop per row: pixel_values (B, 3, H, W), one square patch grid of image tokens."""

    def __init__(self, session, inputs: dict):
        pixels = inputs["pixel_values"]
        if pixels.dim() != 4:
            raise ValueError(f"agla expects pixel_values (B, 3, H, W) for this model, got {tuple(pixels.shape)}")
        _one_image_per_row(pixels.shape[0], inputs["input_ids"].shape[0])
        self.session = session
        self.inputs = inputs
        self.canvases = list(pixels)

    def token_grids(self, masses: torch.Tensor) -> list[torch.Tensor]:
        vision = self.session.model.config.vision_config
        side = vision.image_size // vision.patch_size
        grids = []
        for row in _row_masses(masses, self.inputs["input_ids"], self.session.adapter.image_token_id):
            if row.numel() == side * side + 1:  # "full" feature selection keeps CLS first
                row = row[1:]
            elif row.numel() != side * side:
                raise ValueError(f"agla: {row.numel()} image tokens do not form the {side}x{side} patch grid of "
                                 "the vision tower")
            grids.append(row.view(side, side))
        return grids

    def masked(self, keeps: list[torch.Tensor], fills: list[torch.Tensor]) -> dict:
        pixels = self.inputs["pixel_values"]
        out = torch.stack([torch.where(keep[None], canvas.float(), fill.view(-1, 1, 1).expand_as(canvas).float())
                           for canvas, keep, fill in zip(self.canvases, keeps, fills)])
        return {"pixel_values": out.to(pixels.dtype)}


class AnyresGeometry:
    """Where one image's pixels sit in its LLaVA-NeXT / OneVision tiles: the high-resolution canvas (tiles_h x
    tiles_w tiles of `tile` px) holds the image resized to (height, width) at offset (top, left); tile 0 is the whole
    image resized to one tile."""

    def __init__(self, config, image_size: tuple[int, int]):
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
        from transformers.image_utils import ChannelDimension

        self.tile = int(config.vision_config.image_size)
        target_h, target_w = select_best_resolution(tuple(image_size), config.image_grid_pinpoints)
        # The processor's own size rule (it reads only the image's height and width).
        shape_only = np.empty((0, *image_size), dtype=np.uint8)
        self.height, self.width = get_patch_output_size(shape_only, (target_h, target_w), ChannelDimension.FIRST)
        self.top, self.left = (target_h - self.height) // 2, (target_w - self.width) // 2
        self.tiles_h, self.tiles_w = target_h // self.tile, target_w // self.tile

    @property
    def n_tiles(self) -> int:
        return 1 + self.tiles_h * self.tiles_w

    def stitch(self, tiles: torch.Tensor) -> torch.Tensor:
        """(n_tiles, C, t, t) -> the high-resolution canvas (C, tiles_h * t, tiles_w * t)."""
        t, channels = self.tile, tiles.shape[1]
        grid = tiles[1:].reshape(self.tiles_h, self.tiles_w, channels, t, t)
        return grid.permute(2, 0, 3, 1, 4).reshape(channels, self.tiles_h * t, self.tiles_w * t)

    def split(self, canvas: torch.Tensor) -> torch.Tensor:
        """Inverse of `stitch`: (C, tiles_h * t, tiles_w * t) -> (tiles_h * tiles_w, C, t, t)."""
        t, channels = self.tile, canvas.shape[0]
        grid = canvas.reshape(channels, self.tiles_h, t, self.tiles_w, t)
        return grid.permute(1, 3, 0, 2, 4).reshape(self.tiles_h * self.tiles_w, channels, t, t)

    def content(self, canvas: torch.Tensor) -> torch.Tensor:
        """The resized image inside the padded canvas."""
        return canvas[:, self.top: self.top + self.height, self.left: self.left + self.width]


class AnyresViews:
    """LLaVA-NeXT / OneVision: pixel_values (B, tiles, 3, t, t) (padded to the batch's most tiles), image_sizes."""

    def __init__(self, session, inputs: dict):
        from mmkit.patching.anyres import tiles_per_image

        pixels = inputs["pixel_values"]
        if pixels.dim() != 5 or "image_sizes" not in inputs:
            raise ValueError(f"agla expects anyres pixel_values (B, tiles, 3, H, W) with image_sizes, got "
                             f"{tuple(pixels.shape)}")
        batch = inputs["input_ids"].shape[0]
        _one_image_per_row(pixels.shape[0], batch)
        per_prompt = inputs.get("batch_num_images")
        if per_prompt is not None and bool((torch.as_tensor(per_prompt) != 1).any()):
            raise ValueError("agla needs one image per prompt; got prompts with several images")
        self.session = session
        self.inputs = inputs
        config = session.model.config
        sizes = torch.as_tensor(inputs["image_sizes"]).cpu()
        counts = tiles_per_image(config, sizes)
        self.geometry = [AnyresGeometry(config, tuple(size)) for size in sizes.tolist()]
        for geometry, count in zip(self.geometry, counts):
            if geometry.n_tiles != count or count > pixels.shape[1]:
                raise ValueError(f"agla: the tiles of an image ({pixels.shape[1]} given, the model expects {count}) "
                                 "do not follow this model's anyres grid; use the model's own processor")
        self.canvases = [g.content(g.stitch(row[: g.n_tiles])) for g, row in zip(self.geometry, pixels)]

    def _packed_grid(self, b: int) -> tuple[int, int, int]:
        """(base tokens, R, C) of row b's image: the model's own `pack_image_features`, run on zero features with a
        newline of 1, shows how many rows (newlines) and columns its unpadded (and possibly resized) grid has."""
        inner = self.session.model.model
        config = inner.config
        vision = config.vision_config
        n_feat = (vision.image_size // vision.patch_size) ** 2
        geometry = self.geometry[b]
        features = [torch.zeros(geometry.n_tiles, n_feat, 1, dtype=torch.float64)]
        sizes = torch.as_tensor(self.inputs["image_sizes"])[b: b + 1].cpu()
        newline = torch.ones(1, dtype=torch.float64)
        if config.model_type == "llava_onevision":
            packed, _ = inner.pack_image_features(features, sizes, image_newline=newline,
                                                  vision_aspect_ratio=config.vision_aspect_ratio)
        else:
            packed, _ = inner.pack_image_features(features, sizes, config.vision_feature_select_strategy,
                                                  image_newline=newline)
        marks = packed[0][n_feat:, 0] == 1
        rows = int(marks.sum())
        cols = marks.numel() // max(rows, 1) - 1
        if rows == 0 or rows * (cols + 1) != marks.numel() or not bool(marks.view(rows, cols + 1)[:, -1].all()):
            raise RuntimeError("agla: could not read the packed anyres grid of this image")
        return n_feat, rows, cols

    def _unpadded_region(self, b: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) in feature cells of the padded high-resolution feature grid that the model keeps
        for row b's image (its own `unpad_image`, run on the cells' coordinates)."""
        import sys

        vision = self.session.model.config.vision_config
        side = vision.image_size // vision.patch_size
        geometry = self.geometry[b]
        height, width = geometry.tiles_h * side, geometry.tiles_w * side
        cells = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"))
        unpad = sys.modules[type(self.session.model.model).__module__].unpad_image
        kept = unpad(cells, torch.as_tensor(self.inputs["image_sizes"])[b].cpu())
        return (int(kept[0].min()), int(kept[0].max()) + 1, int(kept[1].min()), int(kept[1].max()) + 1)

    def token_grids(self, masses: torch.Tensor) -> list[torch.Tensor]:
        vision = self.session.model.config.vision_config
        side, patch = vision.image_size // vision.patch_size, vision.patch_size
        maps = []
        rows_masses = _row_masses(masses, self.inputs["input_ids"], self.session.adapter.image_token_id)
        for b, row in enumerate(rows_masses):
            geometry = self.geometry[b]
            n_feat, rows, cols = self._packed_grid(b)
            if row.numel() != n_feat + rows * (cols + 1):
                raise ValueError(f"agla: {row.numel()} image tokens do not match the {rows}x{cols} anyres grid of "
                                 f"image {b} (plus {n_feat} base tokens and {rows} newlines)")
            top, bottom, left, right = self._unpadded_region(b)
            size = ((bottom - top) * patch, (right - left) * patch)
            high = row[n_feat:].view(rows, cols + 1)[:, :cols]
            # Each token's mass spread evenly over the pixels it covers.
            high = _upsample(high, size) * (rows * cols) / (size[0] * size[1])
            canvas = high.new_zeros(geometry.tiles_h * geometry.tile, geometry.tiles_w * geometry.tile)
            canvas[top * patch: bottom * patch, left * patch: right * patch] = high
            density = geometry.content(canvas[None])[0]
            base = _upsample(row[:n_feat].view(side, side), tuple(density.shape)) * (side * side) / density.numel()
            maps.append(density + base)
        return maps

    def masked(self, keeps: list[torch.Tensor], fills: list[torch.Tensor]) -> dict:
        pixels = self.inputs["pixel_values"]
        out = pixels.clone()
        for b, (geometry, keep, fill) in enumerate(zip(self.geometry, keeps, fills)):
            tiles = pixels[b, : geometry.n_tiles].float()
            t = geometry.tile
            canvas_keep = torch.ones(geometry.tiles_h * t, geometry.tiles_w * t, dtype=torch.bool, device=keep.device)
            canvas_keep[geometry.top: geometry.top + geometry.height,
                        geometry.left: geometry.left + geometry.width] = keep  # the padding stays as it was
            base_keep = F.interpolate(keep[None, None].float(), size=(t, t), mode="nearest-exact")[0, 0] > 0.5
            tile_keep = torch.cat([base_keep[None], geometry.split(canvas_keep[None])[:, 0]])
            value = fill.view(1, -1, 1, 1).float().expand_as(tiles)
            out[b, : geometry.n_tiles] = torch.where(tile_keep[:, None], tiles, value).to(pixels.dtype)
        return {"pixel_values": out}


class QwenViews:
    """Qwen2-VL / 2.5-VL / 3-VL: pixel_values (patches, C * T * P * P), flattened per image in merge order, with
    image_grid_thw (images, 3)."""

    def __init__(self, session, inputs: dict):
        pixels, grid = inputs["pixel_values"], inputs.get("image_grid_thw")
        if pixels.dim() != 2 or grid is None:
            raise ValueError(f"agla expects Qwen-VL flattened patches with image_grid_thw, got pixel_values of shape "
                             f"{tuple(pixels.shape)}")
        _one_image_per_row(grid.shape[0], inputs["input_ids"].shape[0])
        self.session = session
        self.inputs = inputs
        vision = session.model.config.vision_config
        self.channels = int(vision.in_channels)
        self.temporal = int(vision.temporal_patch_size)
        self.patch = int(vision.patch_size)
        self.merge = int(vision.spatial_merge_size)
        self.grid = [tuple(int(x) for x in row) for row in grid.tolist()]
        sizes = [t * h * w for t, h, w in self.grid]
        if sum(sizes) != pixels.shape[0]:
            raise ValueError(f"agla: {pixels.shape[0]} patch rows do not match image_grid_thw ({sum(sizes)})")
        self._frames = [self._unflatten(part, thw) for part, thw in zip(pixels.split(sizes), self.grid)]
        self.canvases = [frames[0] for frames in self._frames]

    def _shape(self, thw) -> tuple[int, ...]:
        t, h, w = thw
        m, p = self.merge, self.patch
        return (t, h // m, w // m, m, m, self.channels, self.temporal, p, p)

    def _unflatten(self, rows: torch.Tensor, thw) -> torch.Tensor:
        """(t * h * w, C * T * P * P) -> frames (t * T, C, h * P, w * P), inverting the processor's patch order
        (t, h/m, w/m, m, m, C, T, P, P)."""
        t, h, w = thw
        x = rows.reshape(self._shape(thw)).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
        return x.reshape(t * self.temporal, self.channels, h * self.patch, w * self.patch)

    def _flatten(self, frames: torch.Tensor, thw) -> torch.Tensor:
        t, h, w = thw
        m, p = self.merge, self.patch
        x = frames.reshape(t, self.temporal, self.channels, h // m, m, p, w // m, m, p)
        return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, -1)

    def token_grids(self, masses: torch.Tensor) -> list[torch.Tensor]:
        grids = []
        rows = _row_masses(masses, self.inputs["input_ids"], self.session.adapter.image_token_id)
        for row, (t, h, w) in zip(rows, self.grid):
            gh, gw = h // self.merge, w // self.merge
            if row.numel() != t * gh * gw:
                raise ValueError(f"agla: {row.numel()} image tokens do not match the {t}x{gh}x{gw} merged grid")
            grids.append(row.view(t, gh, gw).mean(0))
        return grids

    def masked(self, keeps: list[torch.Tensor], fills: list[torch.Tensor]) -> dict:
        pixels = self.inputs["pixel_values"]
        parts = []
        for frames, thw, keep, fill in zip(self._frames, self.grid, keeps, fills):
            value = fill.view(1, -1, 1, 1).float().expand_as(frames)
            parts.append(self._flatten(torch.where(keep[None, None], frames.float(), value), thw))
        return {"pixel_values": torch.cat(parts).to(pixels.dtype)}


def image_views(session, inputs: dict):
    """The `ImageViews` of a batch for this session's model family."""
    family = session.adapter.family.name
    if family == "llava-1.5":
        return LlavaViews(session, inputs)
    if family in ("llava-next", "llava-onevision"):
        return AnyresViews(session, inputs)
    if family.startswith("qwen"):
        return QwenViews(session, inputs)
    raise ValueError(f"agla has no pixel layout for the {family} family")
