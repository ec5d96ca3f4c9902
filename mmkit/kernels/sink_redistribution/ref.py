"""Torch reference for `redistributed_attention`: explicit probabilities of every row, no chunking."""

from __future__ import annotations

import torch


def redistribute(probs: torch.Tensor, image: torch.Tensor, sink: torch.Tensor, row_mask: torch.Tensor | None,
                 p: float, rho: float, min_visual: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on attention probabilities (B, H, R, Lk) float32; image/sink (B, Lk) bool; row_mask (B, R) or None.

    Image-centric head rows give the image at least `min_visual` of their attention and at most `rho` of that to
    visual sinks; in them every sink key's probability is multiplied by p and the freed (1 - p) mass is added to the
    non-sink image keys in proportion to their attention. Returns the edited probabilities and the bool (B, H, R)
    of edited head rows.
    """
    img = image[:, None, None, :].to(probs.dtype)
    snk = sink[:, None, None, :].to(probs.dtype)
    visual = (probs * img).sum(-1)
    visual_sink = (probs * img * snk).sum(-1)
    centric = (visual >= min_visual) & (visual_sink <= rho * visual)
    if row_mask is not None:
        centric &= row_mask[:, None, :]
    free_visual = img * (1.0 - snk)
    sink_mass = (probs * snk).sum(-1, keepdim=True)
    free_mass = (probs * free_visual).sum(-1, keepdim=True)
    # rho < 1 and visual >= min_visual > 0 make free_mass > 0 in every centric row.
    gain = (1.0 - p) * sink_mass / free_mass.clamp(min=torch.finfo(probs.dtype).tiny)
    edited = probs * (1.0 - (1.0 - p) * snk) + probs * free_visual * gain
    return torch.where(centric[..., None], edited, probs), centric


def allowed_or_causal(allowed: torch.Tensor | None, batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """(B|1, 1, Lq, Lk) bool; None means causal with the queries as the last Lq keys."""
    if allowed is not None:
        return allowed
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]


def redistributed_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
                                allowed: torch.Tensor | None, image_keys: torch.Tensor, sink_keys: torch.Tensor,
                                row_mask: torch.Tensor | None, p: float, rho: float, min_visual: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scaling, masked) redistributed, times v: ((B, H, Lq, D) in q's dtype, edited head rows
    (B, H, Lq) bool). float32 throughout."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    groups = heads // k.shape[1]
    k_f = k.float().repeat_interleave(groups, dim=1)
    v_f = v.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k_f.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed_or_causal(allowed, batch, q_len, k_len, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    probs, centric = redistribute(probs, image_keys, sink_keys, row_mask, p, rho, min_visual)
    return torch.matmul(probs, v_f).to(q.dtype), centric
