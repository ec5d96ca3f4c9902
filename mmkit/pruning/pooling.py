"""Uniform spatial average pooling of the visual tokens to a target count, before the LLM (baseline).

Each image's projected features, laid out on their patch grid (24 x 24 on LLaVA-1.5), are average-pooled to an
h x w grid with h * w = the target count, h and w as close to square as the count allows (64 -> 8 x 8,
128 -> 8 x 16, 192 -> 12 x 16) and never larger than the patch grid. Windows are those of adaptive average
pooling (`torch.nn.functional.adaptive_avg_pool2d`): equal 3 x 3 windows when the side divides evenly (24 -> 8),
otherwise windows of floor/ceil sizes that tile the grid. The pooled tokens enter the LLM in raster order,
numbered contiguously as a shorter image would be. This is LLaVA-NeXT's `get_2dPool` (average mode, applied after
the projector) with a free target count instead of a fixed stride; its tokens are new vectors (merging, not a
subset), so there is no "original positions" option.

On LLaVA-NeXT / OneVision and Qwen-VL, whose images differ in size, every grid of an image (anyres: base tile and
unpadded high-resolution grid; Qwen-VL: each frame of merged tokens) is pooled by the share, each side scaled by
sqrt(share); each window's average takes the slot (and on Qwen-VL the 3-D position) of its central token, and a
newline-ended grid keeps one newline per pooled row (`pool_layout`, docs/pooling.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mmkit.pruning.selection import (
    ImageBatch,
    Selection,
    SelectionHandle,
    check_budget_fields,
    grid_side,
    identity_order,
    kept_count,
    per_image_layout,
    supported_tokens,
)
from mmkit.pruning.image_layout import Grid, ImageLayout
from mmkit.registry import register_method


@dataclass
class PoolingConfig:
    """Pooling: average-pool each image's patch grid to the target token count before the LLM (baseline)."""

    keep: float = field(default=0.111, metadata={"help": "share of each image's visual tokens kept (0.111 = 64 of "
                                                         "576 = an 8 x 8 grid)"})
    tokens: int = field(default=0, metadata={"help": "if > 0: pooled tokens per image (overrides keep)"})

    def __post_init__(self):
        self.keep = check_budget_fields(self.keep, self.tokens)


def pooled_grid(count: int, side: int) -> tuple[int, int]:
    """(h, w) with h * w = count, h <= w <= side, closest to square; ValueError if no such pair exists."""
    pairs = [(h, count // h) for h in range(1, math.isqrt(count) + 1) if count % h == 0 and count // h <= side]
    if not pairs:
        raise ValueError(f"pooling to {count} tokens needs a grid h x w = {count} with sides <= {side}; "
                         f"pick a count such as {(side // 3) ** 2} or {side // 2 * (side // 2)}")
    return max(pairs, key=lambda p: p[0])


def pool_features(features: torch.Tensor, side: int, grid: tuple[int, int]) -> torch.Tensor:
    """(I, side*side, D) raster-ordered tokens -> (I, h*w, D) adaptive-average-pooled, raster order."""
    n_img, _, dim = features.shape
    spatial = features.float().transpose(1, 2).reshape(n_img, dim, side, side)
    pooled = torch.nn.functional.adaptive_avg_pool2d(spatial, grid)
    return pooled.flatten(2).transpose(1, 2).to(features.dtype)


def window_centres(size: int, out: int) -> torch.Tensor:
    """(out,) the central index (lower middle for an even size) of each window of `adaptive_avg_pool2d` reducing
    `size` to `out` along one axis: window i spans [floor(i size / out), ceil((i + 1) size / out))."""
    i = torch.arange(out)
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    return (start + end - 1) // 2


def pooled_sides(grid: Grid, share: float) -> tuple[int, int]:
    """A grid's pooled (rows, cols): each side scaled by sqrt(share), rounded, at least 1 (the aspect ratio kept)."""
    scale = math.sqrt(share)
    return (min(grid.rows, max(1, round(grid.rows * scale))), min(grid.cols, max(1, round(grid.cols * scale))))


def pool_layout(features: torch.Tensor, layout: ImageLayout, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every grid of one image (features (N, D)) by `share` of its tokens. Each window's average is written
    into the slot of the window's central token (lower middle for even sizes), which keeps its place (and, on
    Qwen-VL, its 3-D position); a grid row that ends with a newline keeps the newline of each pooled row's
    central row; newlines outside the grids stay. Returns (kept slots sorted, edited features)."""
    edited = features.clone()
    keep = torch.zeros(layout.length, dtype=torch.bool)
    keep[layout.newline] = True
    for grid in layout.grids:
        h, w = pooled_sides(grid, share)
        rows = torch.arange(grid.rows)[:, None] * grid.stride + torch.arange(grid.cols)[None] + grid.start
        if grid.stride > grid.cols:
            keep[rows[:, -1] + 1] = False          # this grid's newlines: only the pooled rows' stay
        # (1, D, rows, cols) as a channels-last view: adaptive pooling runs far faster on it than on a copy.
        spatial = features[rows.flatten().to(features.device)].float().view(1, grid.rows, grid.cols, -1)
        spatial = spatial.permute(0, 3, 1, 2)
        pooled = torch.nn.functional.adaptive_avg_pool2d(spatial, (h, w))[0]
        centre_rows = window_centres(grid.rows, h)
        slots = rows[centre_rows][:, window_centres(grid.cols, w)].flatten()
        keep[slots] = True
        edited[slots.to(features.device)] = pooled.flatten(1).T.to(features.dtype)
        if grid.stride > grid.cols:
            keep[rows[centre_rows, -1] + 1] = True
    return keep.nonzero().flatten().to(features.device), edited


class PoolingHandle(SelectionHandle):
    def __init__(self, session, config: PoolingConfig):
        self.config = config
        if per_image_layout(session):
            # Images differ in size: each grid is pooled by the share (`tokens` sets the share per image).
            self.k = None
            super().__init__(session, self._select_layout, positions="auto")
            return
        n = supported_tokens(session)
        if session.adapter.vision_feature_select_strategy != "default":
            raise ValueError("pooling needs the patch tokens only (vision_feature_select_strategy='default'); "
                             "this model also feeds the CLS token")
        self.k = kept_count(config.keep, config.tokens, n, "pooling")
        self.side = grid_side(n, "default")
        self.grid = pooled_grid(self.k, self.side)
        super().__init__(session, self._select, positions="contiguous")

    def _select(self, batch: ImageBatch) -> Selection:
        feats = batch.features
        n_img, n, _ = feats.shape
        if self.k >= n:
            return Selection(order=identity_order(n_img, n, feats.device))
        edited = feats.clone()
        edited[:, :self.k] = pool_features(feats, self.side, self.grid)
        # The pooled tokens take the first k slots of each image; the rest are dropped.
        return Selection(order=identity_order(n_img, self.k, feats.device), features=edited)

    def _select_layout(self, batch: ImageBatch) -> Selection:
        layout = batch.layout
        share = self.config.tokens / layout.length if self.config.tokens > 0 else self.config.keep
        if share >= 1.0:
            return Selection(order=identity_order(1, layout.length, batch.features.device))
        slots, edited = pool_layout(batch.features[0], layout, share)
        return Selection(order=slots[None], features=edited[None])


def apply_pooling(session, config: PoolingConfig) -> PoolingHandle:
    """Attach average pooling to a session; `remove()` on the result restores the model exactly."""
    return PoolingHandle(session, config)


register_method(
    "pooling", PoolingConfig, apply_pooling, kind="pruning",
    description="Average-pool each image's patch grid to the target token count before the LLM (baseline).",
    slots=("pre_llm_token_drop",),
)
