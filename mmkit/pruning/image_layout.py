"""How each image's tokens are laid out in the prompt, for methods that choose among an image's projected tokens
at the language model's input (DivPrune, CDPruner, random, pooling) on models whose images have different token
counts.

- LLaVA-NeXT / LLaVA-OneVision (anyres): a base tile (a square grid of patch tokens), then the high-resolution
  tiles merged into one grid, unpadded, with an `image_newline` token after every row; an image encoded as its
  base tile only ends with one newline. Which tokens are newlines (and which tile patch every other token is) is
  taken from the model itself: its own `pack_image_features` is run on tiles whose "features" are the patches'
  row indices (float64, exact) and a newline of -1, so the layout can never disagree with transformers' (when
  OneVision resizes a large grid after projection, the blended rows are still told from the exact -1 newlines).
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: per image `t x h x w` patches (`image_grid_thw`), merged `m x m` into
  `t` frames of `h/m x w/m` tokens in raster order, no separator tokens.

`ImageLayout.grids` lists the raster grids inside an image's tokens (pooling works per grid); `newline` marks the
row separators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmkit.patching.anyres import ImageSizeCapture, tiles_per_image
from mmkit.patching.pre_llm import ANYRES as ANYRES_ARCHITECTURES

QWEN_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                      "Qwen3VLForConditionalGeneration")


@dataclass(frozen=True)
class Grid:
    """A raster grid inside an image's tokens: token (r, c) sits at `start + r * stride + c`."""

    start: int
    rows: int
    cols: int
    stride: int


@dataclass
class ImageLayout:
    length: int                 # the image's tokens in the prompt
    newline: torch.Tensor       # (length,) bool: anyres row separators
    grids: list[Grid]
    # Anyres: per token, the row of the projector's input it was projected from (tile x patches + patch, tiles
    # numbered over the encoding), -1 for newlines; None where a token is not one row (OneVision's resized grids)
    # or the family has no such input (Qwen-VL merges inside its tower).
    source: torch.Tensor | None = None


def grid_layout(rows: int, cols: int, frames: int = 1) -> ImageLayout:
    """`frames` raster grids of rows x cols tokens back to back, no separators (LLaVA-1.5, Qwen-VL)."""
    size = rows * cols
    return ImageLayout(frames * size, torch.zeros(frames * size, dtype=torch.bool),
                       [Grid(f * size, rows, cols, cols) for f in range(frames)])


def packed_layout(newline: torch.Tensor, side: int, source: torch.Tensor | None = None) -> ImageLayout:
    """Layout of one packed anyres image from its newline mask: the base tile's side x side grid first, then rows
    of the high-resolution grid, each ending with a newline (or a single closing newline for a base-only image)."""
    length = int(newline.numel())
    base = side * side
    grids = [Grid(0, side, side, side)]
    rest = newline[base:]
    rows = int(rest.sum())
    if length - base > 1:
        cols = (length - base) // rows - 1 if rows else 0
        ends = base + torch.arange(1, rows + 1) * (cols + 1) - 1
        if rows == 0 or rows * (cols + 1) != length - base or not bool(rest.any()) or \
                set(newline.nonzero().flatten().tolist()) != set(ends.tolist()):
            raise RuntimeError("unexpected anyres packing: the high-resolution tokens do not form rows that each "
                               "end with a newline")
        grids.append(Grid(base, rows, cols, cols + 1))
    elif length - base != 1 or not bool(rest.all()):
        raise RuntimeError("unexpected anyres packing: a base-only image should end with one newline")
    return ImageLayout(length, newline.clone(), grids, source)


class LayoutCapture:
    """Records, per image encoding, what lays out the images of the next prefill; `take()` returns one
    `ImageLayout` per image (prompt order). `remove()` detaches everything."""

    def __init__(self, session):
        adapter = session.adapter
        self.architecture = adapter.architecture
        self.inner = session.model.model
        self._sizes: ImageSizeCapture | None = None
        self._grid_thw: torch.Tensor | None = None
        self._handles = []
        if self.architecture in ANYRES_ARCHITECTURES:
            self._sizes = ImageSizeCapture(self.inner)
            vc = adapter.config.vision_config
            self.side = int(vc.image_size) // int(vc.patch_size)
        elif self.architecture in QWEN_ARCHITECTURES:
            self.merge = int(adapter.config.vision_config.spatial_merge_size)
            self._handles.append(adapter.vision_tower.register_forward_pre_hook(self._record_grid, with_kwargs=True))
        else:
            raise ValueError(f"no per-image token layout for {self.architecture}")

    def _record_grid(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._grid_thw = None if grid is None else torch.as_tensor(grid).detach().cpu().clone()

    def take(self) -> list[ImageLayout]:
        if self._sizes is not None:
            return self._anyres()
        if self._grid_thw is None:
            raise RuntimeError("the image grids of this prefill were not seen; cannot lay out its image tokens")
        grid, self._grid_thw = self._grid_thw, None
        return [grid_layout(int(h) // self.merge, int(w) // self.merge, int(t)) for t, h, w in grid.tolist()]

    def _anyres(self) -> list[ImageLayout]:
        options = self._sizes.options
        sizes = self._sizes.take()
        config = self.inner.config
        counts = tiles_per_image(config, sizes, options.get("batch_num_images"))
        n_feat = self.side * self.side
        # Each tile patch's "feature" is its row index in the projector's input (exact in float64), the newline -1.
        index = torch.arange(sum(counts) * n_feat, dtype=torch.float64).view(-1, n_feat, 1)
        tiles = list(torch.split(index, counts))
        newline = torch.full((1,), -1.0, dtype=torch.float64)
        if config.model_type == "llava_onevision":
            aspect = options.get("vision_aspect_ratio") or config.vision_aspect_ratio
            packed, _ = self.inner.pack_image_features(tiles, sizes, image_newline=newline, vision_aspect_ratio=aspect)
        else:
            packed, _ = self.inner.pack_image_features(
                tiles, sizes, vision_feature_select_strategy=config.vision_feature_select_strategy,
                image_newline=newline)
        layouts = []
        for p in packed:
            values = p[:, 0]
            exact = bool((values == values.round()).all())   # OneVision blends the rows of a resized grid
            layouts.append(packed_layout(values == -1.0, self.side, values.long() if exact else None))
        return layouts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._sizes is not None:
            self._sizes.remove()
