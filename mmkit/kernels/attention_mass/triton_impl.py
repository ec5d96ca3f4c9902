"""Triton kernels for `subset_attention_mass` (import only where triton is available).

Two passes, flash style, fp32 accumulation, no atomics (deterministic):
1. `_row_lse_kernel`, one program per (batch, head, block of rows): streams the key blocks and keeps the running
   max and sum of exp, giving each row's log-sum-exp over *all* of its allowed keys.
2. `_key_mass_kernel`, one program per (batch, head, block of keys): recomputes q·kᵀ for every row against its
   key block, turns it into probabilities with the row LSE, and sums over rows in a fixed loop order.
For few rows (R <= 16) a single-read variant reads K once instead: `_block_scores_kernel` (one program per
(batch, head, key block)) stores the block's logits and its per-row (max, sum of exp); `_normalise_kernel` combines
the block partials into each row's LSE in a fixed order and normalises the stored logits.
The (B, H, Lk) partials are reduced over heads by torch in the caller, also in a fixed order.
Scores are kept in base 2 (scaled by log2(e)) so the kernels use exp2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Finite "minus infinity" for masked logits: -inf would make the running-max update exp2(-inf - -inf) = NaN.
_NEG: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _row_lse_kernel(Q, K, MASK, LSE,
                    sq_b, sq_h, sq_r, sq_d, sk_b, sk_h, sk_n, sk_d, sm_b, sm_r, sm_n,
                    H, GROUP, R, LK, D, scale_log2,
                    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < R
    q = tl.load(Q + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_R], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    k_base = K + b * sk_b + kvh * sk_h
    for start in range(0, LK, BLOCK_N):
        n = start + offs_n
        kt = tl.load(k_base + n[None, :] * sk_n + offs_d[:, None] * sk_d,
                     mask=(n[None, :] < LK) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        ok = row_ok[:, None] & (n[None, :] < LK)
        if HAS_MASK:
            allowed = tl.load(MASK + b * sm_b + offs_r[:, None] * sm_r + n[None, :] * sm_n, mask=ok, other=0)
            ok = ok & (allowed != 0)
        s = tl.where(ok, s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.where(ok, tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
    # A row with no allowed key has l_i == 0; any finite LSE will do, pass 2 masks all of its entries to zero.
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), 0.0)
    tl.store(LSE + pid_bh * R + offs_r, lse, mask=row_ok)


@triton.jit
def _key_mass_kernel(Q, K, MASK, LSE, OUT,
                     sq_b, sq_h, sq_r, sq_d, sk_b, sk_h, sk_n, sk_d, sm_b, sm_r, sm_n,
                     H, GROUP, R, LK, D, scale_log2, out_scale,
                     HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = n < LK
    kt = tl.load(K + b * sk_b + kvh * sk_h + n[None, :] * sk_n + offs_d[:, None] * sk_d,
                 mask=key_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        row_ok = offs_r < R
        q = tl.load(Q + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :] * sq_d,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lse = tl.load(LSE + pid_bh * R + offs_r, mask=row_ok, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        ok = row_ok[:, None] & key_ok[None, :]
        if HAS_MASK:
            allowed = tl.load(MASK + b * sm_b + offs_r[:, None] * sm_r + n[None, :] * sm_n, mask=ok, other=0)
            ok = ok & (allowed != 0)
        acc += tl.sum(tl.where(ok, tl.exp2(s - lse[:, None]), 0.0), 0)
    tl.store(OUT + pid_bh * LK + n, acc * out_scale, mask=key_ok)


@triton.jit
def _block_scores_kernel(Q, K, MASK, S, MPART, LPART,
                         sq_b, sq_h, sq_r, sq_d, sk_b, sk_h, sk_n, sk_d, sm_b, sm_r, sm_n,
                         H, GROUP, R, LK, D, NKB, scale_log2,
                         HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Single-read pass A, for R <= BLOCK_R: raw base-2 logits of one key block for all rows, stored to S
    # (masked ones as _NEG), plus the block's per-row max and sum of exp.
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    offs_r = tl.arange(0, BLOCK_R)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < R
    key_ok = n < LK
    q = tl.load(Q + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    kt = tl.load(K + b * sk_b + kvh * sk_h + n[None, :] * sk_n + offs_d[:, None] * sk_d,
                 mask=key_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
    ok = row_ok[:, None] & key_ok[None, :]
    if HAS_MASK:
        allowed = tl.load(MASK + b * sm_b + offs_r[:, None] * sm_r + n[None, :] * sm_n, mask=ok, other=0)
        ok = ok & (allowed != 0)
    s = tl.where(ok, s, _NEG)
    tl.store(S + (pid_bh * R + offs_r[:, None]) * LK + n[None, :], s, mask=row_ok[:, None] & key_ok[None, :])
    m_blk = tl.max(s, 1)
    l_blk = tl.sum(tl.where(ok, tl.exp2(s - m_blk[:, None]), 0.0), 1)
    part = (pid_bh * NKB + pid_n) * R + offs_r
    tl.store(MPART + part, m_blk, mask=row_ok)
    tl.store(LPART + part, l_blk, mask=row_ok)


@triton.jit
def _normalise_kernel(S, MPART, LPART, OUT, R, LK, NKB, out_scale,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # Single-read pass B: combine the per-block (max, sum) into each row's LSE (fixed order over blocks), then
    # turn the stored logits of this key block into probabilities and sum them over rows.
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_r < R
    m_i = tl.full([BLOCK_R], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for j in range(0, NKB):
        part = (pid_bh * NKB + j) * R + offs_r
        m_j = tl.load(MPART + part, mask=row_ok, other=_NEG)
        l_j = tl.load(LPART + part, mask=row_ok, other=0.0)
        m_new = tl.maximum(m_i, m_j)
        l_i = l_i * tl.exp2(m_i - m_new) + l_j * tl.exp2(m_j - m_new)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), 0.0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = n < LK
    inside = row_ok[:, None] & key_ok[None, :]
    s = tl.load(S + (pid_bh * R + offs_r[:, None]) * LK + n[None, :], mask=inside, other=_NEG)
    ok = inside & (s > _NEG * 0.5)
    acc = tl.sum(tl.where(ok, tl.exp2(s - lse[:, None]), 0.0), 0)
    tl.store(OUT + pid_bh * LK + n, acc * out_scale, mask=key_ok)


def _block_r(rows: int) -> int:
    # tl.dot needs M >= 16; larger row blocks amortise each key tile over more rows.
    return min(64, max(16, triton.next_power_of_2(rows)))


# Up to this many rows the single-read path stores the raw logits (4 bytes per row and key, vs 2*D bytes of K per
# key re-read by the two-pass path) and fills the GPU with one program per key block in both passes.
SINGLE_READ_MAX_ROWS = 16


def per_head_row_sums(q_rows: torch.Tensor, k: torch.Tensor, scaling: float,
                      key_mask: torch.Tensor | None, out_scale: float = 1.0, method: str = "auto") -> torch.Tensor:
    """(B, H, Lk) float32: per head, the attention probability each key gets, summed over the rows.

    `out_scale` multiplies the result inside the kernel (a mean's 1/count costs no extra launch). `method`:
    "two_pass" (row LSE pass, then a pass recomputing q·kᵀ per key block: reads K twice), "single_read" (R <= 16:
    logits of each key block stored once, then normalised: reads K once), or "auto" (single_read when R <= 16).
    """
    if method not in ("auto", "two_pass", "single_read"):
        raise ValueError(f"method must be auto, two_pass or single_read; got {method!r}")
    batch, heads, rows, dim = q_rows.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    if q_rows.dtype != k.dtype:
        dtype = torch.promote_types(torch.promote_types(q_rows.dtype, k.dtype), torch.float32)
        q_rows, k = q_rows.to(dtype), k.to(dtype)
    out = torch.empty(batch, heads, n_keys, device=k.device, dtype=torch.float32)
    if rows == 0 or n_keys == 0 or heads == 0 or batch == 0:
        return out.zero_()
    if method == "single_read" and rows > SINGLE_READ_MAX_ROWS:
        raise ValueError(f"single_read handles at most {SINGLE_READ_MAX_ROWS} rows; got {rows}")
    single = method == "single_read" or (method == "auto" and rows <= SINGLE_READ_MAX_ROWS)
    if key_mask is None:
        mask_arg, sm = out, (0, 0, 0)  # never read: HAS_MASK=False
    else:
        mask_arg = key_mask.view(torch.uint8)
        sm = (mask_arg.stride(0), 0 if key_mask.shape[1] == 1 else mask_arg.stride(1), mask_arg.stride(2))
    # fp32 inputs: exact fp32 products (tl.dot would otherwise use tf32 on GPUs, ~1e-3 relative error).
    precision = "ieee" if q_rows.dtype == torch.float32 else "tf32"
    block_r, block_d = _block_r(rows), max(16, triton.next_power_of_2(dim))
    common = dict(HAS_MASK=key_mask is not None, PRECISION=precision, BLOCK_R=block_r, BLOCK_D=block_d)
    strides = (*q_rows.stride(), *k.stride(), *sm, heads, heads // kv_heads, rows, n_keys, dim)
    scale_log2 = float(scaling) * math.log2(math.e)
    if single:
        block_n = 64
        n_blocks = triton.cdiv(n_keys, block_n)
        logits = torch.empty(batch * heads, rows, n_keys, device=k.device, dtype=torch.float32)
        parts = torch.empty(2, batch * heads, n_blocks, rows, device=k.device, dtype=torch.float32)
        grid = (batch * heads, n_blocks)
        _block_scores_kernel[grid](q_rows, k, mask_arg, logits, parts[0], parts[1], *strides, n_blocks, scale_log2,
                                   BLOCK_N=block_n, num_warps=4, **common)
        _normalise_kernel[grid](logits, parts[0], parts[1], out, rows, n_keys, n_blocks, float(out_scale),
                                BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)
        return out
    lse = torch.empty(batch, heads, rows, device=k.device, dtype=torch.float32)
    args = (*strides, scale_log2)
    _row_lse_kernel[(batch * heads, triton.cdiv(rows, block_r))](q_rows, k, mask_arg, lse, *args, BLOCK_N=64,
                                                                  num_warps=4, **common)
    block_n = 64
    _key_mass_kernel[(batch * heads, triton.cdiv(n_keys, block_n))](q_rows, k, mask_arg, lse, out, *args,
                                                                     float(out_scale), BLOCK_N=block_n,
                                                                     num_warps=4, **common)
    return out
