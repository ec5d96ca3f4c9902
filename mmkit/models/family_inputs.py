"""Per-family input handling for code that builds model inputs itself (multi-branch decoding, manual decode loops).

Qwen-VL models take two inputs the LLaVA families do not: `mm_token_type_ids` (1 on image tokens), one row per prompt,
from which the model derives the 3-D rotary positions (mRoPE) of each row; and, during decoding, positions that
continue each row's mRoPE sequence (the prefill stores the per-row offset in `model.model.rope_deltas`). Image
positions always come from `input_ids == image_token_id`.
"""

from __future__ import annotations

import torch


def uses_mrope(adapter) -> bool:
    return hasattr(adapter.model.model, "rope_deltas")


def fix_branch_inputs(adapter, inputs: dict) -> dict:
    """Re-derive per-row inputs after rows were added or edited (a brancher's `expand_inputs` stacks branches or
    removes image tokens): `mm_token_type_ids` follows the rows' actual image tokens."""
    if "mm_token_type_ids" not in inputs:
        return inputs
    ids = inputs["input_ids"]
    types = inputs["mm_token_type_ids"]
    fixed = (ids == adapter.image_token_id).to(types.dtype)
    if types.shape != ids.shape or not torch.equal(fixed, types):
        inputs = dict(inputs)
        inputs["mm_token_type_ids"] = fixed
    return inputs


def decode_position_ids(adapter, attention_mask: torch.Tensor, step_len: int = 1) -> torch.Tensor | None:
    """Positions of the last `step_len` tokens of a decode step, given the 2-D mask over everything so far; None
    for families whose decoder derives positions from the cache itself (1-D rotary positions)."""
    if not uses_mrope(adapter):
        return None
    deltas = adapter.model.model.rope_deltas
    text = attention_mask.long().cumsum(-1)[:, -step_len:] - 1
    if deltas is not None:
        text = text + deltas.to(text.device).view(-1, 1)
    return text[None].expand(3, -1, -1)


def patch_pixel_noise(adapter, inputs: dict, seed: int) -> torch.Tensor | None:
    """Standard-normal noise shaped like Qwen-VL's flattened patches (`pixel_values` (patches, C*T*P*P) with
    `image_grid_thw`), drawn per image from `seed` in the image's own pixel layout: one value per pixel and channel,
    shared by the T temporal copies of a still image (the processor repeats the frame T times). Each image's noise
    depends only on its size and the seed, not on the batch. None for per-image pixel tensors (LLaVA families)."""
    pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    if pixels is None or grid is None or pixels.dim() != 2:
        return None
    vision = adapter.config.vision_config
    channels, temporal = int(vision.in_channels), int(vision.temporal_patch_size)
    per_pixel = pixels.shape[1] // (channels * temporal)
    parts = []
    for t, h, w in grid.tolist():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((t * h * w, channels, 1, per_pixel), generator=generator, dtype=torch.float32)
        parts.append(noise.expand(-1, -1, temporal, -1).reshape(t * h * w, -1))
    return torch.cat(parts).to(pixels.device)
