"""Torch reference for `scaled_attention`: explicit softmax, materialises (Lq, Lk) per head: small shapes only."""

from __future__ import annotations

import torch


def check_and_prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                      row_mask: torch.Tensor | None, key_mask: torch.Tensor | None,
                      head_scale: torch.Tensor | float | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate shapes; return (allowed (B|1, 1, Lq, Lk) bool or None for causal, log head scale (H,) or None)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, q_len, _ = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != batch or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if heads % k.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {k.shape[1]} key heads")
    k_len = k.shape[2]
    if q_len > k_len and attn_mask is None:
        raise ValueError(f"causal attention needs Lq <= Lk; got Lq={q_len}, Lk={k_len} (pass attn_mask)")
    allowed = None
    if attn_mask is not None:
        if attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, batch) or attn_mask.shape[1] != 1 \
                or attn_mask.shape[2:] != (q_len, k_len):
            raise ValueError(f"attn_mask must be (B or 1, 1, Lq, Lk) = ({batch}, 1, {q_len}, {k_len}); "
                             f"got {tuple(attn_mask.shape)}")
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask
        elif attn_mask.is_floating_point():  # additive mask: 0 where allowed, -inf or dtype-min where not
            allowed = attn_mask > torch.finfo(attn_mask.dtype).min / 2
        else:
            raise ValueError(f"attn_mask must be bool (True = may attend) or an additive float mask; "
                             f"got {attn_mask.dtype}")
    for name, mask, length in (("row_mask", row_mask, q_len), ("key_mask", key_mask, k_len)):
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (batch, length)):
            raise ValueError(f"{name} must be bool ({batch}, {length}); got {mask.dtype} {tuple(mask.shape)}")
    log_scale = None
    if head_scale is not None:
        scale = torch.as_tensor(head_scale, dtype=torch.float32, device=q.device)
        if scale.dim() == 0:
            scale = scale.expand(heads)
        if scale.shape != (heads,):
            raise ValueError(f"head_scale must be a float or an (H,) = ({heads},) tensor; got {tuple(scale.shape)}")
        log_scale = scale.log()  # alpha = 0 gives -inf: those (row, key) pairs are removed
    return allowed, log_scale


def check_key_bias(q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor | None, key_mask, head_scale
                   ) -> torch.Tensor | None:
    """Validate a per-(row, head, key) additive log-scale `key_bias` (B, H, Lk); it replaces key_mask/head_scale."""
    if key_bias is None:
        return None
    if key_mask is not None or head_scale is not None:
        raise ValueError("give key_bias or key_mask/head_scale, not both")
    batch, heads = q.shape[:2]
    if not key_bias.is_floating_point() or key_bias.shape != (batch, heads, k.shape[2]):
        raise ValueError(f"key_bias must be float ({batch}, {heads}, {k.shape[2]}); got {key_bias.dtype} "
                         f"{tuple(key_bias.shape)}")
    return key_bias.float()


def check_key_gain(q: torch.Tensor, k: torch.Tensor, key_gain: torch.Tensor | None, key_bias, key_mask, head_scale
                   ) -> torch.Tensor | None:
    """Validate a per-(head, key) gain `key_gain` (B, H, Lk) of the score edit z <- z + gain * |z|; it replaces
    key_bias and key_mask/head_scale."""
    if key_gain is None:
        return None
    if key_bias is not None or key_mask is not None or head_scale is not None:
        raise ValueError("give key_gain alone, not with key_bias or key_mask/head_scale")
    batch, heads = q.shape[:2]
    if not key_gain.is_floating_point() or key_gain.shape != (batch, heads, k.shape[2]):
        raise ValueError(f"key_gain must be float ({batch}, {heads}, {k.shape[2]}); got {key_gain.dtype} "
                         f"{tuple(key_gain.shape)}")
    return key_gain.float()


def boost_mask(q_len: int, k_len: int, batch: int, device, row_mask, key_mask) -> torch.Tensor:
    """(B, Lq, Lk) bool: the (row, key) pairs whose logits get log(alpha_h)."""
    rows = row_mask if row_mask is not None else torch.ones(batch, q_len, dtype=torch.bool, device=device)
    keys = key_mask if key_mask is not None else torch.ones(batch, k_len, dtype=torch.bool, device=device)
    return rows[:, :, None] & keys[:, None, :]


def scaled_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
                         attn_mask: torch.Tensor | None = None, row_mask: torch.Tensor | None = None,
                         key_mask: torch.Tensor | None = None, head_scale: torch.Tensor | float | None = None,
                         key_bias: torch.Tensor | None = None, key_gain: torch.Tensor | None = None,
                         compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference: softmax(z, masked) · v in `compute_dtype`, with z = q kᵀ · scaling edited on the selected rows:
    + log(alpha_h) on boosted pairs (head_scale), + key_bias, or z + key_gain · |z| (key_gain).

    Same arguments as `scaled_attention`; rows with no allowed key give zeros.
    """
    key_gain = check_key_gain(q, k, key_gain, key_bias, key_mask, head_scale)
    allowed, log_scale = check_and_prepare(q, k, v, attn_mask, row_mask, key_mask, head_scale)
    key_bias = check_key_bias(q, k, key_bias, key_mask, head_scale)
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    group = heads // k.shape[1]
    kf = k.to(compute_dtype).repeat_interleave(group, dim=1)
    vf = v.to(compute_dtype).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute_dtype), kf.transpose(-1, -2)) * scaling
    scores = scores.to(torch.promote_types(compute_dtype, torch.float32))
    if log_scale is not None:
        boost = boost_mask(q_len, k_len, batch, q.device, row_mask, key_mask)[:, None]
        scores = scores + torch.where(boost, log_scale.to(scores.dtype)[None, :, None, None], 0.0)
    if key_bias is not None:
        rows = row_mask if row_mask is not None else torch.ones(batch, q_len, dtype=torch.bool, device=q.device)
        scores = scores + torch.where(rows[:, None, :, None], key_bias.to(scores.dtype)[:, :, None, :], 0.0)
    if key_gain is not None:
        rows = row_mask if row_mask is not None else torch.ones(batch, q_len, dtype=torch.bool, device=q.device)
        gain = torch.where(rows[:, None, :, None], key_gain.to(scores.dtype)[:, :, None, :], 0.0)
        scores = scores + gain * scores.abs()
    if allowed is None:  # causal, bottom-right aligned (query i sits at position Lk - Lq + i)
        allowed = (torch.arange(k_len, device=q.device)[None, :]
                   <= torch.arange(k_len - q_len, k_len, device=q.device)[:, None])[None, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return torch.matmul(probs.to(vf.dtype), vf).to(q.dtype)
