"""Vision-side token scores on the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): native-resolution towers
without a CLS token whose merger packs each 2 x 2 group of patches into one visual token.

What a VisionZip- or VFlowOpt-style reduction needs from such a tower, observed with scoped hooks only (no
`output_attentions`, no class patches):

- `NativeVisionCapture` records, for the latest image encoding, the tower's `grid_thw` and pixel values (a
  pre-hook on the tower), and one block's fused q/k/v projection output, rotary tables and attention segments
  (`cu_seqlens`) (a forward hook on its `qkv` linear and a pre-hook on its attention). The block is the last one
  with full attention over each image: the last block on Qwen2-VL and Qwen3-VL, the last of
  `fullatt_block_indexes` on Qwen2.5-VL (its other blocks attend within windows). The merger reads the last
  block's output, which on the released Qwen2.5-VL checkpoints is also a full-attention block.
- `received_attention` recomputes that block's attention from q and k with the tower's 2-D rotary applied, one
  attention segment (one image) and a bounded block of query rows at a time, so the (H, N, N) matrix is never
  held.
- `NativeScores` turns per-patch values into per-visual-token values: the mean over the patch's 2 x 2 merge
  group (the tower keeps each group as 4 consecutive patches), put back into the order the language model sees
  (Qwen2.5-VL runs its blocks on window-ordered groups and un-permutes after the merger), split per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NATIVE = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")

# Attention probabilities held at once when recomputing a segment's attention (heads x query rows x keys): 2^26
# float32 values, 256 MiB.
_BLOCK_VALUES = 1 << 26


def is_native(adapter) -> bool:
    """Whether the model is a Qwen-VL family (native-resolution grids, merged patches, 3-D rotary positions)."""
    return adapter.architecture in NATIVE


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tower's rotary on x (N, H, D) with tables (N, D), in float32: x * cos + rotate_half(x) * sin."""
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None].float() + rotated * sin[:, None].float()


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, rows: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Attention each key receives (N,), averaged over heads and over the query rows `rows` (all rows if None).

    q, k: (H, N, D) float32 of one unmasked attention segment (one image)."""
    heads, n, _ = q.shape
    if rows is not None:
        q = q[:, rows]
    total = torch.zeros(n, dtype=torch.float32, device=q.device)
    rows_per_block = max(1, _BLOCK_VALUES // (heads * n))
    for start in range(0, q.shape[1], rows_per_block):
        block = torch.softmax(torch.matmul(q[:, start:start + rows_per_block], k.transpose(-1, -2)) * scale, dim=-1)
        total += block.sum(dim=(0, 1))
    return total / (heads * q.shape[1])


@dataclass
class NativeEncoding:
    """One image encoding as the capture saw it."""

    grid_thw: torch.Tensor          # (I, 3) long, patches per image (before merging)
    q: torch.Tensor                 # (L, H, D) float32, rotary applied, tower (block) order
    k: torch.Tensor                 # (L, H, D) float32, rotary applied
    k_content: torch.Tensor         # (L, H, D) float32, the key projection before the rotary
    cu_seqlens: torch.Tensor        # (segments + 1,) attention segments of the block
    pixel_values: torch.Tensor | None
    out: torch.Tensor | None = None  # (L, C) the block's output (with `output=True`), tower (block) order


class NativeVisionCapture:
    """Scoped hooks recording one Qwen-VL vision block's attention inputs for the latest image encoding.

    layer: the block to observe (None = the last full-attention block); output: also record its output."""

    def __init__(self, adapter, pixels: bool = False, layer: int | None = None, output: bool = False):
        tower = adapter.vision_tower
        self.tower = tower
        blocks = tower.blocks
        full = getattr(tower, "fullatt_block_indexes", None)
        self.layer_index = (max(full) if full else len(blocks) - 1) if layer is None else layer
        # Qwen2.5-VL runs every block on window-ordered groups (a windowed block also attends within windows).
        self.windowed = bool(full)
        attn = blocks[self.layer_index].attn
        self.num_heads = int(attn.num_heads)
        self.scale = float(attn.scaling)
        self.merge = int(tower.spatial_merge_size)
        self._grid: torch.Tensor | None = None
        self._pixels: torch.Tensor | None = None
        self._qkv: torch.Tensor | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cu: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._handles = [
            tower.register_forward_pre_hook(self._on_tower, with_kwargs=True),
            attn.register_forward_pre_hook(self._on_attention, with_kwargs=True),
            attn.qkv.register_forward_hook(self._on_qkv),
        ]
        self._want_output = output
        if output:
            self._handles.append(blocks[self.layer_index].register_forward_hook(self._on_output))
        self._want_pixels = pixels

    def _on_tower(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._grid = None if grid is None else torch.as_tensor(grid).detach().cpu().long().clone()
        if self._want_pixels:
            self._pixels = args[0] if args else kwargs.get("hidden_states")
        self._qkv = self._rope = self._cu = self._out = None

    def _on_attention(self, module, args, kwargs):
        self._cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        self._rope = kwargs.get("position_embeddings")

    def _on_qkv(self, module, args, output):
        self._qkv = output

    def _on_output(self, module, args, output):
        self._out = output[0] if isinstance(output, tuple) else output

    def take(self) -> NativeEncoding:
        """The latest encoding, cleared so a stale capture is never reused."""
        if self._grid is None or self._qkv is None or self._rope is None or self._cu is None or \
                (self._want_output and self._out is None):
            raise RuntimeError("the vision tower was not run for this prefill; cannot rank its tokens")
        qkv, (cos, sin) = self._qkv, self._rope
        n = qkv.shape[0]
        q, k, _ = qkv.reshape(n, 3, self.num_heads, -1).unbind(1)
        encoding = NativeEncoding(grid_thw=self._grid, q=_rotate(q, cos, sin), k=_rotate(k, cos, sin),
                                  k_content=k.float(), cu_seqlens=self._cu.detach().cpu().long(),
                                  pixel_values=self._pixels, out=self._out)
        self._grid = self._qkv = self._rope = self._cu = self._pixels = self._out = None
        return encoding

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class NativeScores:
    """Per-patch values of one encoding -> per-visual-token values, in the language model's order, per image."""

    def __init__(self, capture: NativeVisionCapture, encoding: NativeEncoding):
        self.encoding = encoding
        self._scale = capture.scale
        self.unit = capture.merge ** 2
        grid = encoding.grid_thw
        self.grids = [(int(t), int(h) // capture.merge, int(w) // capture.merge) for t, h, w in grid.tolist()]
        self.counts = [t * h * w for t, h, w in self.grids]
        n_patches = encoding.q.shape[0]
        if sum(self.counts) * self.unit != n_patches:
            raise RuntimeError(f"the vision block saw {n_patches} patches but grid_thw implies "
                               f"{sum(self.counts) * self.unit}")
        self._order = None
        if capture.windowed:
            # Qwen2.5-VL runs its blocks on merge groups permuted into windows: group g of the block is group
            # window_index[g] of the image order (the tower un-permutes after its merger).
            from transformers.vision_utils import get_vision_window_index

            tower = capture.tower
            self._order, _ = get_vision_window_index(grid, spatial_merge_size=capture.merge,
                                                     window_size=tower.window_size, patch_size=tower.patch_size)

    def segments(self) -> list[tuple[int, int]]:
        cu = self.encoding.cu_seqlens.tolist()
        return list(zip(cu[:-1], cu[1:]))

    def to_tokens(self, per_patch: torch.Tensor) -> list[torch.Tensor]:
        """(L, ...) values in block order -> per image (n_i, ...) per visual token (mean over its merge group)."""
        grouped = per_patch.reshape(-1, self.unit, *per_patch.shape[1:]).mean(1)
        if self._order is not None:
            natural = torch.empty_like(grouped)
            natural[self._order.to(grouped.device)] = grouped
            grouped = natural
        return list(torch.split(grouped, self.counts))

    def received(self, relative: bool = False) -> list[torch.Tensor]:
        """Per image, each visual token's attention received (mean over heads, the image's queries and its 4
        patches): the CLS-free score VisionZip's Qwen-VL and SigLIP ports rank by. `relative`: times the
        attention segment's length (1 = the segment's average), so tokens of windows of different sizes (a
        windowed Qwen2.5-VL block) compare on one scale."""
        q, k = self.encoding.q, self.encoding.k
        per_patch = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
        for start, end in self.segments():
            qh, kh = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
            per_patch[start:end] = received_attention(qh, kh, self._scale) * ((end - start) if relative else 1)
        return self.to_tokens(per_patch)

    def output_norm(self) -> list[torch.Tensor]:
        """Per image, each visual token's block-output L2 norm (mean over its 4 patches)."""
        if self.encoding.out is None:
            raise RuntimeError("the block output was not captured (NativeVisionCapture(output=True))")
        return self.to_tokens(self.encoding.out.float().norm(dim=-1))

    def global_relevance(self, threshold: float) -> list[torch.Tensor]:
        """Per image, VFlowOpt's context relevance per visual token: per attention segment, the global tokens are
        the patches whose received attention exceeds `threshold` x the segment mean (the most attended one if
        none does); a patch's relevance is the attention it gets from them (mean over heads and global queries)."""
        q, k = self.encoding.q, self.encoding.k
        per_patch = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
        for start, end in self.segments():
            qh, kh = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
            received = received_attention(qh, kh, self._scale)
            rows = (received > threshold * received.mean()).nonzero().flatten()
            if rows.numel() == 0:
                rows = received.argmax().view(1)
            per_patch[start:end] = received_attention(qh, kh, self._scale, rows)
        return self.to_tokens(per_patch)

    def merge_metric(self) -> list[torch.Tensor]:
        """Per image (n_i, D): the key projection (before the rotary, so similarity is about content, as with CLIP's
        rotary-free keys) averaged over heads and over the merge group, L2-normalised: VisionZip's merge metric."""
        keys = self.to_tokens(self.encoding.k_content.mean(1))
        return [m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12) for m in keys]

    def entropy(self, patch: int, channels: int, temporal: int) -> list[torch.Tensor]:
        """Per image, the entropy (bits) of each visual token's 256-bin grey-level histogram over the pixels of its
        2 x 2 patches (grey levels quantised per image between its min and max), from the tower's input rows."""
        pixels = self.encoding.pixel_values
        if pixels is None:
            raise RuntimeError("no pixel values were captured for the entropy term")
        grey = pixels.float().view(pixels.shape[0], channels, temporal, patch * patch).mean(dim=(1, 2))
        grey = grey.view(-1, self.unit * patch * patch)                  # image order: groups are 4 rows
        out = []
        for group in torch.split(grey, self.counts):
            lo, hi = group.min(), group.max()
            levels = ((group - lo) / (hi - lo).clamp_min(1e-12) * 255).round().long().clamp(0, 255)
            counts = torch.zeros(group.shape[0], 256, device=group.device)
            counts.scatter_add_(1, levels, torch.ones_like(levels, dtype=counts.dtype))
            p = counts / levels.shape[1]
            out.append(-(p * torch.log2(p.clamp_min(1e-12))).sum(-1))
        return out



def native_scores(capture: NativeVisionCapture) -> NativeScores:
    """Take the latest encoding from `capture` and wrap it for scoring."""
    return NativeScores(capture, capture.take())


def native_placement(kept: list[torch.Tensor], counts: list[int], device
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
    """From each image's kept token indices (in sequence order): the plan order (I, k) padded with 0, its
    validity (None if every image keeps k), and `ReductionPlan.placement` over the batch's image tokens."""
    k_max = max(1, max(int(x.numel()) for x in kept))
    order = torch.zeros(len(kept), k_max, dtype=torch.long)
    valid = torch.zeros(len(kept), k_max, dtype=torch.bool)
    keys, withins, images = [], [], []
    for i, (idx, n) in enumerate(zip(kept, counts)):
        idx = idx.cpu()
        order[i, :idx.numel()] = idx
        valid[i, :idx.numel()] = True
        key = torch.full((n,), -1, dtype=torch.long)
        key[idx] = torch.arange(idx.numel())
        keys.append(key)
        withins.append(torch.arange(n))
        images.append(torch.full((n,), i, dtype=torch.long))
    key = torch.cat(keys)
    placement = tuple(x.to(device) for x in (key, torch.cat(withins), torch.cat(images), key))
    return order.to(device), placement, None if bool(valid.all()) else valid.to(device)
