"""Torch reference for `subset_attention_mass`: exact post-softmax attention mass of a few query rows."""

from __future__ import annotations

import torch


def subset_attention_mass_ref(q_rows: torch.Tensor, k: torch.Tensor, *, scaling: float,
                              key_mask: torch.Tensor | None = None, reduce: str = "mean",
                              per_head: bool = False) -> torch.Tensor:
    """Attention probability each key receives from the given query rows.

    q_rows (B, H, R, D), k (B, Hkv, Lk, D) with H % Hkv == 0, key_mask (B, R, Lk) or (B, 1, Lk) bool (True = the
    row may attend the key). Softmax over every allowed key (full log-sum-exp), in float32. Returns (B, Lk)
    averaged ("mean") or summed ("sum") over heads and rows, or (B, H, Lk) over rows only with per_head=True.
    Rows with no allowed key contribute zeros.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    batch, heads, rows, dim = q_rows.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    group = heads // kv_heads
    q = q_rows.float().reshape(batch, kv_heads, group * rows, dim)
    scores = torch.matmul(q, k.float().transpose(-1, -2)).mul_(scaling)  # (B, Hkv, G*R, Lk)
    scores = scores.view(batch, heads, rows, -1)
    if key_mask is not None:
        allowed = key_mask[:, None].expand(batch, heads, rows, scores.shape[-1]) if key_mask.dim() == 3 else key_mask
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    if per_head:
        out = probs.sum(2)
        return out / rows if reduce == "mean" else out
    out = probs.sum((1, 2))
    return out / (heads * rows) if reduce == "mean" else out
