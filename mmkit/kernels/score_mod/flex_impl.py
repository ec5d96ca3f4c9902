"""FlexAttention path for `scaled_attention`: the boost is a `score_mod`, the mask a block-sparse `mask_mod`.

Compiled (`torch.compile(flex_attention)`) on CUDA it generates a fused Triton flash kernel: no (Lq, Lk) score
matrix is ever stored. Without compile (`compiled=False`, used to test the mods on CPU) FlexAttention runs its
unfused reference, which does materialise the scores.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def scaled_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
                          allowed: torch.Tensor | None, boost: tuple[torch.Tensor, torch.Tensor] | None,
                          log_scale: torch.Tensor | None, compiled: bool = True,
                          key_bias: tuple[torch.Tensor, torch.Tensor] | None = None,
                          key_gain: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, Hkv, Lk, D); allowed (B|1, 1, Lq, Lk) bool or None = causal (bottom-right);
    boost = (row_mask (B, Lq), key_mask (B, Lk)) bool; log_scale (H,) float32 or None; key_bias = (row_mask
    (B, Lq) bool, bias (B, H, Lk) float32) added on those rows (instead of boost/log_scale); key_gain = (row_mask,
    gain (B, H, Lk) float32): the score edit z <- z + gain |z| on those rows (FlexAttention hands score_mod the
    already scaled score q·k·scaling, the z of the edit)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    offset = k_len - q_len
    if allowed is None:
        def mask_mod(b, h, qi, ki):
            return qi + offset >= ki
        mask_batch = None
    else:
        dense = allowed[:, 0]
        mask_batch = dense.shape[0] if dense.shape[0] > 1 else None

        def mask_mod(b, h, qi, ki):
            return dense[b if mask_batch else 0, qi, ki]
    block_mask = create_block_mask(mask_mod, mask_batch, None, q_len, k_len, device=q.device)

    score_mod = None
    if log_scale is not None:
        rows, keys = boost
        log_scale = log_scale.float()

        def score_mod(score, b, h, qi, ki):
            return score + torch.where(rows[b, qi] & keys[b, ki], log_scale[h], 0.0)
    elif key_bias is not None:
        bias_rows, bias = key_bias

        def score_mod(score, b, h, qi, ki):
            return score + torch.where(bias_rows[b, qi], bias[b, h, ki], 0.0)

    elif key_gain is not None:
        gain_rows, gain = key_gain

        def score_mod(score, b, h, qi, ki):
            return score + torch.where(gain_rows[b, qi], gain[b, h, ki] * torch.abs(score), 0.0)

    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling,
              enable_gqa=k.shape[1] != heads)
