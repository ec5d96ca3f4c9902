"""Public `scaled_attention`: FlexAttention (fused Triton kernel) on CUDA; elsewhere chunked SDPA with an additive
bias, or explicit float32 rows for the score-dependent edit; `ref.scaled_attention_ref` is the explicit reference
all are tested against."""

from __future__ import annotations

import torch

from mmkit.kernels.dispatch import choose_backend
from mmkit.kernels.score_mod.ref import check_and_prepare, check_key_bias, check_key_gain

OP_NAME = "scaled_attention"


def scaled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
                     attn_mask: torch.Tensor | None = None, row_mask: torch.Tensor | None = None,
                     key_mask: torch.Tensor | None = None,
                     head_scale: torch.Tensor | float | None = None,
                     key_bias: torch.Tensor | None = None,
                     key_gain: torch.Tensor | None = None) -> torch.Tensor:
    """Attention whose selected (query row, key) logits are edited before the softmax.

    Two kinds of edit. Additive (head_scale / key_bias): for query rows in `row_mask` and keys in `key_mask`,
    head h's logit gets + log(alpha_h), i.e. its unnormalised attention exp(q·k·scaling) is multiplied by alpha_h.
    Score-dependent (key_gain, PAINT's edit): the logit z = q·k·scaling becomes z + gain · |z|, i.e. z (1 + gain)
    when z > 0 and z (1 - gain) when z < 0.

    Args:
        q: (B, H, Lq, D) queries (rotary already applied); k, v: (B, Hkv, Lk, D), H % Hkv == 0 (GQA).
        scaling: logit scale, usually D ** -0.5.
        attn_mask: None = causal with the queries as the last Lq positions of the Lk keys; else a
            (B or 1, 1, Lq, Lk) bool mask (True = may attend) or an additive float mask (0 / -inf or dtype min).
        row_mask: (B, Lq) bool, the query rows to modulate; None = all rows.
        key_mask: (B, Lk) bool, the keys to boost (e.g. chosen visual tokens); None = all keys.
        head_scale: alpha per head, an (H,) tensor or one float, alpha > 0 (0 removes the pairs; a negative
            alpha gives NaN); None = plain attention.
        key_bias: instead of key_mask/head_scale, a (B, H, Lk) float log-scale per head and key added to the
            logits of the `row_mask` rows (several key sets with their own per-head factors, as PAINT's local and
            summary tokens).
        key_gain: alone (no key_bias, key_mask or head_scale), a (B, H, Lk) float gain per head and key: the
            logits of the `row_mask` rows become z + gain · |z| (0 leaves a key alone).

    Returns:
        (B, H, Lq, D) in q's dtype. Rows with no allowed key give zeros. On CUDA (Triton backend) this is a
        compiled FlexAttention kernel that never stores the (Lq, Lk) scores; the first call per shape compiles.
    """
    gain = check_key_gain(q, k, key_gain, key_bias, key_mask, head_scale)
    allowed, log_scale = check_and_prepare(q, k, v, attn_mask, row_mask, key_mask, head_scale)
    bias = check_key_bias(q, k, key_bias, key_mask, head_scale)
    if choose_backend(q, OP_NAME) == "triton" and q.is_cuda:
        from mmkit.kernels.score_mod.flex_impl import scaled_attention_flex

        batch, _, q_len, _ = q.shape
        rows = row_mask if row_mask is not None else torch.ones(batch, q_len, dtype=torch.bool, device=q.device)
        boost = None
        if log_scale is not None:
            boost = (rows, key_mask if key_mask is not None else torch.ones(batch, k.shape[2], dtype=torch.bool,
                                                                            device=q.device))
        return scaled_attention_flex(q, k, v, scaling=scaling, allowed=allowed, boost=boost, log_scale=log_scale,
                                     key_bias=None if bias is None else (rows, bias),
                                     key_gain=None if gain is None else (rows, gain))
    # CPU (also under TRITON_INTERPRET=1: compiling FlexAttention for CPU takes minutes) and the torch override.
    from mmkit.kernels.score_mod.sdpa_impl import scaled_attention_sdpa

    if bias is None and log_scale is not None:
        batch, k_len = q.shape[0], k.shape[2]
        keys = key_mask if key_mask is not None else torch.ones(batch, k_len, dtype=torch.bool, device=q.device)
        # alpha = 0 gives log 0 = -inf on boosted pairs only (0 * -inf would be NaN elsewhere).
        bias = torch.where(keys[:, None, :], log_scale.to(q.device)[None, :, None], 0.0)
    return scaled_attention_sdpa(q, k, v, scaling=scaling, allowed=allowed, row_mask=row_mask, bias=bias, gain=gain)
