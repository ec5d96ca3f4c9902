"""Per-object attention over image tokens, captured row by row during one forward over prompt + answer.

VL-SAM needs, for each object token, the attention of every layer and head, and the attention of the text tokens
between the image and that token (the flow passes through them). Only those query rows are scored: the attention
probe computes their exact softmax over all keys of each decoder layer, per head, and the result is kept in prompt
coordinates, so maps also come out when a pruning method shortened the sequence (image tokens it removed before a
layer carry no attention there).
The (L x L) attention matrix is never built; the image tokens' own rows (N_img x N_img per layer) are not
captured either: image tokens are the sources of the flow (see `flow.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from mmkit.errors import MmkitError
from mmkit.models.family_inputs import fix_branch_inputs

logger = logging.getLogger(__name__)

# Rows scored per kernel call when folding query rows into the batch (bounds the expanded key copy).
_ROW_CHUNK = 16


def row_attention(q_rows: torch.Tensor, key: torch.Tensor, scaling: float,
                  key_mask: torch.Tensor | None) -> torch.Tensor:
    """Exact attention probabilities of a few query rows, per head: (B, H, R, Lk) float32.

    Each row is folded into the batch and scored with `mmkit.kernels.subset_attention_mass(..., per_head=True)`
    (Triton on CUDA, torch elsewhere), which reduces over rows, so one row per folded item keeps rows apart.
    The single place to swap the scoring kernel.

    Args:
        q_rows: (B, H, R, D) rotary-embedded query rows.
        key: (B, Hkv, Lk, D) keys.
        scaling: logit scale.
        key_mask: (B, R, Lk) bool (True = the row may attend the key) or None.
    """
    from mmkit.kernels import subset_attention_mass

    batch, heads, rows, dim = q_rows.shape
    out = []
    for start in range(0, rows, _ROW_CHUNK):
        stop = min(rows, start + _ROW_CHUNK)
        r = stop - start
        q = q_rows[:, :, start:stop].permute(0, 2, 1, 3).reshape(batch * r, heads, 1, dim)
        k = key[:, None].expand(batch, r, *key.shape[1:]).reshape(batch * r, *key.shape[1:])
        mask = None if key_mask is None else key_mask[:, start:stop].reshape(batch * r, 1, -1)
        mass = subset_attention_mass(q.contiguous(), k.contiguous(), scaling=scaling, key_mask=mask,
                                     reduce="sum", per_head=True)  # (B*r, H, Lk)
        out.append(mass.view(batch, r, heads, -1).permute(0, 2, 1, 3))
    return torch.cat(out, dim=2)


@dataclass
class CapturedRows:
    """Attention rows of one forward.

    probs[l]: (B, H, R, L) float32 attention of the captured rows at layer l (keys sliced to the sequence);
    rows: (B, R) the captured positions (padded rows repeat a valid position and are marked invalid);
    valid: (B, R) bool; image_mask: (B, L) bool; key_counts: (B, L) how many query positions of the full
    sequence may attend each key (the column's unmasked count, for the causal-collapse regularisation).
    """

    probs: list[torch.Tensor]
    rows: torch.Tensor
    valid: torch.Tensor
    image_mask: torch.Tensor
    key_counts: torch.Tensor


def capture_rows(session, inputs: dict[str, torch.Tensor], rows: torch.Tensor, valid: torch.Tensor) -> CapturedRows:
    """Run one forward over `inputs` and capture, at every decoder layer, the per-head attention of `rows`.

    Args:
        session: an mmkit Session (one image span per row).
        inputs: model inputs (input_ids, attention_mask, pixel_values, ...), left padded.
        rows: (B, R) long, positions to capture (pad with any valid position and mark it in `valid`).
        valid: (B, R) bool.
    """
    adapter = session.adapter
    input_ids = inputs["input_ids"]
    seq_len = input_ids.shape[1]
    padding = inputs["attention_mask"].bool()
    rows = rows.to(input_ids.device)
    layers = list(adapter.decoder_layers)
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def observe(view) -> None:
        if not view.prefill or view.prompt_len != seq_len:
            return  # not the full-sequence forward (should not happen with use_cache=False)
        # The captured rows are text tokens, which no pruning method drops; find them in this layer's sequence.
        current, found = view.rows_of_positions(rows)
        key_mask = view.allowed(current) & found[:, :, None]
        probs = row_attention(view.query_rows(current), view.key, view.scaling, key_mask)
        # Back to prompt positions: image tokens another method removed before this layer get no attention.
        captured[view.layer] = view.to_prompt(probs[..., : view.prefill_keys].float())

    probe = session.probe.observe(range(len(layers)), observe)
    try:
        with torch.inference_mode():
            session.model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        probe.remove()
    if any(c is None for c in captured):
        raise MmkitError("attention rows were not captured at every layer; the model's attention is not observable")
    image_mask = adapter.image_mask(input_ids)
    # Column j of the full causal matrix is unmasked for every non-padding query at or after j.
    pad_int = padding.long()
    later = pad_int.flip(1).cumsum(1).flip(1)
    key_counts = later * pad_int
    return CapturedRows([c for c in captured], rows, valid.to(rows.device), image_mask, key_counts)


def build_inputs(session, images: Sequence, prompts: Sequence[str], answers: Sequence[str]):
    """Model inputs for (image, prompt, answer) rows: the chat prompt followed by the answer's tokens, left
    padded. Returns (inputs, answer_starts) where answer_starts[b] is the position of row b's first answer token.
    """
    base = session.prepare(images, prompts)
    tokenizer = session.processor.tokenizer
    ids, masks = base["input_ids"], base["attention_mask"]
    rows, starts = [], []
    for b, answer in enumerate(answers):
        prompt_ids = ids[b][masks[b].bool()].tolist()
        answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] if answer.strip() else []
        starts.append(len(prompt_ids))
        rows.append(prompt_ids + answer_ids)
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad_id, dtype=ids.dtype)
    attention_mask = torch.zeros((len(rows), width), dtype=masks.dtype)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = torch.tensor(r, dtype=ids.dtype)
        attention_mask[b, width - len(r):] = 1
        starts[b] += width - len(r)
    inputs = {k: v for k, v in base.items() if k not in ("input_ids", "attention_mask")}
    inputs["input_ids"] = input_ids.to(ids.device)
    inputs["attention_mask"] = attention_mask.to(ids.device)
    # Qwen-VL's per-token image flags (mRoPE positions come from them) must follow the extended rows.
    return fix_branch_inputs(session.adapter, inputs), starts
