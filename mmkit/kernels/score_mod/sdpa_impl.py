"""Torch path of `scaled_attention`: SDPA with the boost as an additive mask, a chunk of query rows at a time.

Memory stays bounded on long prompts (one chunk's (rows, Lk) bias per head is materialised, never the whole score
matrix of the layer), and rows before the first boosted one run as plain attention in one call. The score edit
z + gain |z| depends on the score itself, which SDPA never exposes: its rows are computed explicitly (float32
scores of one chunk, softmax, times v); PAINT edits only the current token's row, so that is one row per call.
Tested against the explicit reference `ref.scaled_attention_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest bias chunk (elements) materialised per SDPA call.
CHUNK_ELEMENTS = 1 << 25


def _causal(batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return (torch.arange(k_len, device=device)[None, :] <= rows).expand(batch, 1, q_len, k_len)


def scaled_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
                          allowed: torch.Tensor | None, row_mask: torch.Tensor | None,
                          bias: torch.Tensor | None, gain: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, Hkv, Lk, D); allowed (B|1, 1, Lq, Lk) bool or None = causal (bottom-right);
    row_mask (B, Lq) bool or None = every row; bias (B, H, Lk) float log-scale added on the rows of row_mask, or
    gain (B, H, Lk) float: z <- z + gain |z| on those rows (both None = plain attention). Returns (B, H, Lq, D) in
    q's dtype; rows with no allowed key give zeros."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    if allowed is None:
        allowed = _causal(batch, q_len, k_len, q.device)
    gqa = k.shape[1] != heads
    if bias is None and gain is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
        return out.nan_to_num_(0.0)
    rows = row_mask if row_mask is not None else torch.ones(batch, q_len, dtype=torch.bool, device=q.device)
    has = rows.any(1)
    # One host read per call: rows before this get no boost in any batch row.
    first = int(torch.where(has, rows.long().argmax(1), torch.full_like(has, q_len, dtype=torch.long)).min())
    parts = []
    if first > 0:
        parts.append(F.scaled_dot_product_attention(q[:, :, :first], k, v, attn_mask=allowed[:, :, :first],
                                                    scale=scaling, enable_gqa=gqa))
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * heads * k_len))
    if gain is not None:
        for start in range(first, q_len, chunk):
            stop = min(q_len, start + chunk)
            parts.append(_gain_rows(q[:, :, start:stop], k, v, scaling, allowed[:, :, start:stop],
                                    rows[:, start:stop], gain))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return out.nan_to_num_(0.0)
    bias = bias.to(q.dtype)
    neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    for start in range(first, q_len, chunk):
        stop = min(q_len, start + chunk)
        rows_bias = bias[:, :, None, :] * rows[:, None, start:stop, None].to(bias.dtype)     # (B, H, r, Lk)
        mask = torch.where(allowed[:, :, start:stop], rows_bias, neg_inf)
        parts.append(F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask, scale=scaling,
                                                    enable_gqa=gqa))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.nan_to_num_(0.0)


def _gain_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, allowed: torch.Tensor,
               rows: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Explicit attention of query rows q (B, H, r, D) with z <- z + gain |z| on the rows of `rows` (B, r).

    Scores and softmax in float32; grouped-query heads share their key head through a view (no repeated keys)."""
    batch, heads, r, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.float().view(batch, kv_heads, group, r, dim)
    scores = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) * scaling        # (B, Hkv, g, r, Lk)
    scores = scores.view(batch, heads, r, k_len)
    edit = torch.where(rows[:, None, :, None], gain[:, :, None, :], 0.0)                # (B, H, r, Lk)
    scores = scores + edit * scores.abs()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group, r, k_len)
    out = torch.matmul(probs, v.float()[:, :, None])                                    # (B, Hkv, g, r, D)
    return out.view(batch, heads, r, dim).to(q.dtype)
