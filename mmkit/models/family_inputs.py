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
