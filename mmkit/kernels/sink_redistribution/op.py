"""Public `redistributed_attention`: VAR's post-softmax edit, float32, a chunk of query rows at a time.

There is no fused kernel: the edit needs each edited row's full probability vector (its visual and sink sums decide
whether the head row is image-centric), so the op computes exact probabilities chunk by chunk (one chunk's
(rows, Lk) per head in memory) and runs the rows before the first edited one as plain SDPA. Tested against
`ref.redistributed_attention_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkit.kernels.sink_redistribution.ref import allowed_or_causal, redistribute

# Largest probability chunk (elements) held per call.
CHUNK_ELEMENTS = 1 << 24


def redistributed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
                            attn_mask: torch.Tensor | None, image_keys: torch.Tensor, sink_keys: torch.Tensor,
                            row_mask: torch.Tensor | None, p: float, rho: float, min_visual: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention whose image-centric head rows move (1 - p) of their sink mass to the non-sink image keys.

    Args:
        q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), H % Hkv == 0.
        attn_mask: (B|1, 1, Lq, Lk) bool or additive float mask, or None = causal (queries last).
        image_keys, sink_keys: (B, Lk) bool.
        row_mask: (B, Lq) bool rows that may be edited; None = every row.
        p, rho, min_visual: see `ref.redistribute`.

    Returns:
        ((B, H, Lq, D) in q's dtype, number of edited (row, head) pairs as a 0-d tensor).
    """
    if q.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    if image_keys.shape != (batch, k_len) or sink_keys.shape != (batch, k_len):
        raise ValueError(f"image_keys and sink_keys must be ({batch}, {k_len}); got {tuple(image_keys.shape)} and "
                         f"{tuple(sink_keys.shape)}")
    allowed = attn_mask
    if allowed is not None and allowed.dtype != torch.bool:
        allowed = allowed > torch.finfo(allowed.dtype).min / 2
    allowed = allowed_or_causal(allowed, batch, q_len, k_len, q.device)
    first = 0
    if row_mask is not None:
        has = row_mask.any(1)
        first = int(torch.where(has, row_mask.long().argmax(1), torch.full_like(has, q_len, dtype=torch.long)).min())
    parts = []
    if first > 0:
        plain = F.scaled_dot_product_attention(q[:, :, :first], k, v, attn_mask=allowed[:, :, :first], scale=scaling,
                                               enable_gqa=k.shape[1] != heads)
        parts.append(plain.nan_to_num_(0.0))
    groups = heads // k.shape[1]
    k_f = k.float().repeat_interleave(groups, dim=1) if groups > 1 else k.float()
    v_f = v.float().repeat_interleave(groups, dim=1) if groups > 1 else v.float()
    edited = torch.zeros((), dtype=torch.long, device=q.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * heads * k_len))
    for start in range(first, q_len, chunk):
        stop = min(q_len, start + chunk)
        scores = torch.matmul(q[:, :, start:stop].float(), k_f.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed[:, :, start:stop], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
        rows = None if row_mask is None else row_mask[:, start:stop]
        probs, centric = redistribute(probs, image_keys, sink_keys, rows, p, rho, min_visual)
        edited = edited + centric.sum()
        parts.append(torch.matmul(probs, v_f).to(q.dtype))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out, edited
