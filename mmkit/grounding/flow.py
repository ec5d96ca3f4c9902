"""VL-SAM's attention flow: head weighting, causal-collapse regularisation and residual rollout over layers.

Notation: for one sequence, the captured text rows (positions t_1 < ... < t_R after the image, up to the last
object token) have per-layer, per-head attention P^l_h (R x L). The flow runs over the sub-system of those text
rows and the image tokens: image tokens are the flow's sources (their own rows are not captured), text rows mix
through each other. Per layer:

    W^l_h   = mean over rows of (max over image keys of P^l_h)          ("MeanMax" head weight)
    S^l     = mean over heads of W^l_h * P^l_h
    S^l_:j *= 1 - (L0_j - 1) / N    (column regularisation; L0_j = unmasked queries of column j, N = tokens)
    A^l     = 0.5 * S^l + 0.5 * I   (rows renormalised over the sub-system first)
    F^l     = A^l_tt F^{l-1} + A^l_ti,  F^0 = 0     (F: text rows x image tokens)

The object row of F^L, placed on the image by the row's `ImageGeometry` (a square grid for LLaVA-1.5, the anyres
tiles, or Qwen-VL's native grid), is the object's map.
"""

from __future__ import annotations

import torch

from mmkit.grounding.geometry import ImageGeometry, square_geometry


def head_weights(probs: torch.Tensor, image_cols: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """MeanMax head weights (H,): per head, the mean over valid rows of the row's largest image-key probability.

    A head that puts a sharp peak on some image token weighs more than one that spreads its attention (or sends it
    to sink tokens). probs: (H, R, L); image_cols: (N,) long; valid: (R,) bool or None.
    """
    peak = probs[:, :, image_cols].amax(-1)  # (H, R)
    if valid is not None:
        peak = peak[:, valid]
    return peak.mean(-1) if peak.shape[-1] else torch.ones(probs.shape[0], device=probs.device)


def aggregate_heads(probs: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """S = mean over heads of w_h * P_h: (H, R, L) -> (R, L). weights None = plain mean."""
    if weights is None:
        return probs.mean(0)
    return (probs * weights[:, None, None]).mean(0)


def column_regularize(attn: torch.Tensor, key_counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Scale column j by 1 - (L0_j - 1) / N (VL-SAM), so early columns, which every later token can attend and
    which therefore collect flow under a causal mask, do not dominate. attn: (R, L); key_counts: (L,)."""
    scale = 1.0 - (key_counts.to(attn.dtype) - 1.0).clamp(min=0) / max(n_tokens, 1)
    return attn * scale.clamp(min=0)[None, :]


def rollout(layers: list[torch.Tensor], row_pos: torch.Tensor, image_cols: torch.Tensor, residual: float = 0.5,
            renormalize: bool = True) -> torch.Tensor:
    """Residual attention rollout from the captured text rows to the image tokens.

    Args:
        layers: per layer, (R, L) head-aggregated attention of the captured rows.
        row_pos: (R,) positions of the captured rows (increasing).
        image_cols: (N,) positions of the image tokens.
        residual: weight of the identity (0.5: A = 0.5 S + 0.5 I).
        renormalize: renormalise each row over the sub-system (text rows + image tokens) before adding the
            identity, so mass sent to the system prompt or sink tokens does not dilute the flow.

    Returns:
        (R, N) flow from each captured row to each image token.
    """
    n_rows, n_img = row_pos.shape[0], image_cols.shape[0]
    flow = torch.zeros(n_rows, n_img, dtype=torch.float32, device=row_pos.device)
    eye = torch.eye(n_rows, dtype=torch.float32, device=row_pos.device)
    for attn in layers:
        tt = attn[:, row_pos].float().tril()  # causal: row i reads captured rows <= i
        ti = attn[:, image_cols].float()
        if renormalize:
            total = (tt.sum(1, keepdim=True) + ti.sum(1, keepdim=True)).clamp(min=1e-12)
            tt, ti = tt / total, ti / total
        a_tt = (1 - residual) * tt + residual * eye
        a_ti = (1 - residual) * ti
        flow = a_tt @ flow + a_ti
    return flow


def object_maps(probs_per_layer: list[torch.Tensor], row_pos: torch.Tensor, valid: torch.Tensor,
                image_cols: torch.Tensor, key_counts: torch.Tensor, object_rows: list[list[int]], *,
                head_weighting: bool = True, column_reg: bool = True, residual: float = 0.5,
                renormalize: bool = True, layers: tuple[int, ...] = (),
                geometry: ImageGeometry | None = None) -> list[torch.Tensor]:
    """Maps (h, w) covering the image for each object of one sequence.

    Args:
        probs_per_layer: per layer (H, R, L) captured attention of this sequence.
        row_pos: (R,) captured positions; valid: (R,) which are real (padding rows are dropped).
        image_cols: (N,) image-token positions; key_counts: (L,) unmasked queries per column.
        object_rows: per object, indices into the captured rows of its mention tokens (maps are averaged).
        layers: decoder layers whose attention enters the rollout (empty: all, as VL-SAM).
        geometry: how the image tokens (in prompt order) lie on the image; None = one square grid (LLaVA-1.5).
    """
    keep = valid.nonzero().flatten()
    remap = {int(r): i for i, r in enumerate(keep.tolist())}
    pos = row_pos[keep]
    n_tokens = int((key_counts > 0).sum())
    n_layers = len(probs_per_layer)
    chosen = sorted({l % n_layers for l in layers}) if layers else range(n_layers)
    if any(not -n_layers <= l < n_layers for l in layers):
        raise ValueError(f"layers {layers} out of range for a {n_layers}-layer model")
    per_layer = []
    for probs in (probs_per_layer[l] for l in chosen):
        probs = probs[:, keep]
        weights = head_weights(probs, image_cols) if head_weighting else None
        attn = aggregate_heads(probs, weights)
        if column_reg:
            attn = column_regularize(attn, key_counts, n_tokens)
        per_layer.append(attn)
    flow = rollout(per_layer, pos, image_cols, residual=residual, renormalize=renormalize)
    return _place(flow, object_rows, remap, geometry or square_geometry(image_cols.shape[0]))


def _place(flow: torch.Tensor, object_rows: list[list[int]], remap: dict[int, int],
           geometry: ImageGeometry) -> list[torch.Tensor]:
    """Each object's flow row (its mention rows averaged) over the image tokens, as a map on the image."""
    maps = []
    for rows in object_rows:
        idx = [remap[r] for r in rows if r in remap]
        values = flow[idx].mean(0).float() if idx else torch.zeros(flow.shape[1], device=flow.device)
        maps.append(geometry.to_map(values))
    return maps


def full_rollout_maps(probs_per_layer: list[torch.Tensor], row_pos: torch.Tensor, valid: torch.Tensor,
                      image_cols: torch.Tensor, key_counts: torch.Tensor, object_rows: list[list[int]], *,
                      head_weighting: bool = True, column_reg: bool = True,
                      layers: tuple[int, ...] = (), geometry: ImageGeometry | None = None) -> list[torch.Tensor]:
    """VL-SAM's attention flow over the whole sequence, as in the paper (the rows of every token, image tokens
    included, so image-to-image mixing inside the LLM is part of the flow):

        W^l_h = mean over all queries of (max over all keys of S^l_h)        (MeanMax)
        S'^l  = mean over heads of W^l_h * S^l_h;  S'^l_:j *= 1 - (L0_j - 1) / N
        R^l   = (I + S'^l)(I + R^{l-1}),  R^0 = 0

    The object row of R^L over the image columns is its map. `probs_per_layer[l]`: (H, R, L) with the valid rows
    being every non-padding position in order; other arguments as in `object_maps`.
    """
    keep = valid.nonzero().flatten()
    pos = row_pos[keep]
    real = (key_counts > 0).nonzero().flatten()
    if pos.shape != real.shape or not torch.equal(pos.to(real.device), real):
        # MeanMax averages over every query, so every row is needed (not only those up to the objects).
        raise ValueError("the full rollout needs the attention rows of every token of the sequence, in order")
    n = n_tokens = real.shape[0]
    n_layers = len(probs_per_layer)
    if any(not -n_layers <= l < n_layers for l in layers):
        raise ValueError(f"layers {layers} out of range for a {n_layers}-layer model")
    chosen = sorted({l % n_layers for l in layers}) if layers else range(n_layers)
    eye = torch.eye(n, dtype=torch.float64, device=real.device)
    scale = (1.0 - (key_counts[real].double() - 1.0).clamp(min=0) / n_tokens).clamp(min=0)
    flow = torch.zeros(n, n, dtype=torch.float64, device=real.device)
    for l in chosen:
        probs = probs_per_layer[l][:, keep][:, :, real].double()          # (H, N, N)
        weights = probs.amax(-1).mean(-1) if head_weighting else torch.ones(probs.shape[0], dtype=torch.float64,
                                                                            device=probs.device)
        attn = (probs * weights[:, None, None]).mean(0)
        if column_reg:
            attn = attn * scale[None, :]
        flow = (eye + attn) @ (eye + flow)
    col = {int(p): i for i, p in enumerate(real.tolist())}
    img = torch.tensor([col[int(p)] for p in image_cols.tolist()], dtype=torch.long, device=real.device)
    remap = {int(r): i for i, r in enumerate(keep.tolist())}
    return _place(flow[:, img], object_rows, remap, geometry or square_geometry(img.shape[0]))
