"""Torch reference for `subset_attention_mass`: exact post-softmax attention mass of a few query rows."""

from __future__ import annotations

import torch

REDUCES = ("mean", "sum", "none")


def check_inputs(q_rows: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, reduce: str,
                 per_head: bool) -> None:
    """Raise ValueError with what to fix when the arguments of `subset_attention_mass` do not fit together."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {', '.join(REDUCES)}; got {reduce!r}")
    if reduce == "none" and per_head:
        raise ValueError("per_head=True needs reduce='mean' or 'sum'; reduce='none' already keeps heads and rows")
    if q_rows.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q_rows must be (B, H, R, D) and k (B, Hkv, Lk, D); got {tuple(q_rows.shape)} and "
                         f"{tuple(k.shape)}")
    batch, heads, rows, dim = q_rows.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"q_rows {tuple(q_rows.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {k.shape[1]} key heads")
    if not (q_rows.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"q_rows and k must be floating point; got {q_rows.dtype} and {k.dtype}")
    if q_rows.device != k.device:
        raise ValueError(f"q_rows is on {q_rows.device} but k is on {k.device}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be bool (True = may attend); got {key_mask.dtype}")
        if (key_mask.dim() != 3 or key_mask.shape[0] != batch or key_mask.shape[1] not in (1, rows)
                or key_mask.shape[2] != k.shape[2]):
            raise ValueError(f"key_mask must be (B, R, Lk) or (B, 1, Lk) = ({batch}, {rows} or 1, {k.shape[2]}); "
                             f"got {tuple(key_mask.shape)}")
        if key_mask.device != k.device:
            raise ValueError(f"key_mask is on {key_mask.device} but k is on {k.device}")


def reduce_per_head(per_head_sum: torch.Tensor, rows: int, reduce: str, per_head: bool) -> torch.Tensor:
    """(B, H, Lk) row sums -> the requested output; fixed-order torch reductions keep it deterministic."""
    heads = per_head_sum.shape[1]
    out = per_head_sum if per_head else per_head_sum.sum(1)
    if reduce == "mean":
        count = rows if per_head else heads * rows
        out = out / count if count else out
    return out


def subset_attention_mass_ref(q_rows: torch.Tensor, k: torch.Tensor, *, scaling: float,
                              key_mask: torch.Tensor | None = None, reduce: str = "mean",
                              per_head: bool = False, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Attention probability each key receives from the given query rows (explicit softmax).

    Args:
        q_rows: (B, H, R, D) query rows, already rotary-embedded.
        k: (B, Hkv, Lk, D) keys; H % Hkv == 0 and query head h reads key head h // (H // Hkv).
        scaling: logit scale, usually D ** -0.5.
        key_mask: (B, R, Lk) or (B, 1, Lk) bool, True = the row may attend the key; None = every key.
        reduce: "mean" or "sum" over heads and rows, or "none" for the full (B, H, R, Lk) probabilities.
        per_head: reduce over rows only, giving (B, H, Lk).
        compute_dtype: dtype of the score matmul (float32; float64 for test references, or the input dtype to
            measure what a same-precision torch computation gets). Softmax runs in at least float32.

    Returns:
        float32 (B, Lk), (B, H, Lk) with per_head, or (B, H, R, Lk) with reduce="none". Softmax is over every
        allowed key of the row (full log-sum-exp); rows with no allowed key contribute zeros.
    """
    check_inputs(q_rows, k, key_mask, reduce, per_head)
    batch, heads, rows, dim = q_rows.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = q_rows.to(compute_dtype).reshape(batch, kv_heads, group * rows, dim)
    scores = torch.matmul(q, k.to(compute_dtype).transpose(-1, -2))  # (B, Hkv, G*R, Lk)
    softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
    scores = scores.to(softmax_dtype).mul_(scaling).view(batch, heads, rows, -1)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # all-masked rows: softmax gives NaN -> 0
    out_dtype = torch.float64 if softmax_dtype == torch.float64 else torch.float32
    if reduce == "none":
        return probs.to(out_dtype)
    return reduce_per_head(probs.sum(2), rows, reduce, per_head).to(out_dtype)
