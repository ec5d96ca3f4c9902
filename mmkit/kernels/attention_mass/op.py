"""Public `subset_attention_mass`: validates, dispatches to Triton (CUDA) or the torch reference."""

from __future__ import annotations

import torch

from mmkit.kernels.attention_mass.ref import check_inputs, subset_attention_mass_ref
from mmkit.kernels.dispatch import choose_backend

OP_NAME = "subset_attention_mass"


def subset_attention_mass(q_rows: torch.Tensor, k: torch.Tensor, *, scaling: float,
                          key_mask: torch.Tensor | None = None, reduce: str = "mean",
                          per_head: bool = False) -> torch.Tensor:
    """Exact post-softmax attention probability each key receives from a subset of query rows.

    Never builds the (Lq, Lk) attention matrix: only the R selected rows are scored, so the cost is
    O(B·H·R·Lk·D). Deterministic (no atomics; fixed-order reductions).

    Args:
        q_rows: (B, H, R, D) the selected query rows, already rotary-embedded (fp32, fp16 or bf16).
        k: (B, Hkv, Lk, D) keys; H % Hkv == 0 and query head h reads key head h // (H // Hkv) (GQA).
        scaling: logit scale, usually D ** -0.5.
        key_mask: (B, R, Lk) or (B, 1, Lk) bool, True = the row may attend the key (the caller folds causal and
            padding masks in); None = every key.
        reduce: "mean" or "sum" over heads and rows; "none" returns all probabilities (B, H, R, Lk), computed by
            the torch reference on every device (it materialises R x Lk per head by definition).
        per_head: reduce over rows only and return (B, H, Lk), e.g. for per-head weighting.

    Returns:
        float32 (B, Lk), or (B, H, Lk) with per_head=True, or (B, H, R, Lk) with reduce="none". Each row's softmax
        runs over all of its allowed keys (full log-sum-exp); slice the key range you need afterwards. Rows with
        no allowed key contribute zeros, never NaN.
    """
    check_inputs(q_rows, k, key_mask, reduce, per_head)
    if reduce == "none" or choose_backend(k, OP_NAME) == "torch":
        return subset_attention_mass_ref(q_rows, k, scaling=scaling, key_mask=key_mask, reduce=reduce,
                                         per_head=per_head)
    from mmkit.kernels.attention_mass import triton_impl

    batch, heads, rows, _ = q_rows.shape
    count = (rows if per_head else heads * rows) if reduce == "mean" else 1
    masses = triton_impl.per_head_row_sums(q_rows, k, scaling, key_mask, out_scale=1.0 / max(count, 1))
    return masses if per_head else masses.sum(1)
