"""Top-k token compaction and gathers, in torch only (sorts and gathers; a Triton kernel would add nothing here).

Everything stays on the input device and nothing reads a value back to the host (no `.item()`, `.tolist()`,
`.cpu()`), as long as the caller passes `out_len`; `torch.sort(stable=True)` makes the result deterministic,
with ties broken by the lower token index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compaction:
    """Result of `topk_compact`.

    Attributes:
        index: (B, L_keep) long, the kept token positions in increasing (original) order. Valid slots come first;
            padded slots follow and point at real (dropped) tokens, so gathers with `index` never go out of range.
        valid: (B, L_keep) bool, False for padded slots (rows keeping fewer tokens than L_keep). All True when
            every row keeps the same number of tokens.
        overflow: (B,) bool, True where the row needed more than L_keep slots; that row then lost its lowest
            scoring kept candidates (never a non-candidate unless L_keep < its number of non-candidates).
        kept: (B,) long, the number of valid slots per row.
    """

    index: torch.Tensor
    valid: torch.Tensor
    overflow: torch.Tensor
    kept: torch.Tensor


def kept_count(num_tokens: int, num_candidates: int, keep: int) -> int:
    """Host-side L_keep for a row with `num_candidates` candidates out of `num_tokens` tokens: pass it as `out_len`."""
    if not 0 <= num_candidates <= num_tokens:
        raise ValueError(f"num_candidates={num_candidates} must lie in [0, num_tokens={num_tokens}]")
    return num_tokens - num_candidates + min(max(keep, 0), num_candidates)


def topk_compact(scores: torch.Tensor, candidate_mask: torch.Tensor, keep: int | torch.Tensor, *,
                 out_len: int | None = None) -> Compaction:
    """Sorted keep indices: every non-candidate plus the `keep` highest scoring candidates of each row.

    Args:
        scores: (B, L) per-token scores (any float dtype; compared in float32, NaN counts as -inf). Only the
            candidates' scores matter.
        candidate_mask: (B, L) bool, True for tokens that may be dropped (e.g. image tokens).
        keep: candidates to keep per row, an int or a (B,) integer tensor; rows with fewer candidates keep them all.
        out_len: L_keep, the number of output slots. Give it (e.g. from `kept_count` on host-side counts) to avoid
            any host sync; None computes the largest row count, which reads one number back from the device.

    Returns:
        A `Compaction` (index, valid, overflow, kept). Ties among candidate scores go to the lower index.
    """
    if scores.dim() != 2 or candidate_mask.shape != scores.shape:
        raise ValueError(f"scores and candidate_mask must both be (B, L); got {tuple(scores.shape)} and "
                         f"{tuple(candidate_mask.shape)}")
    if candidate_mask.dtype != torch.bool:
        raise ValueError(f"candidate_mask must be bool; got {candidate_mask.dtype}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point; got {scores.dtype}")
    batch, length = scores.shape
    device = scores.device
    candidate_mask = candidate_mask.to(device)
    if isinstance(keep, torch.Tensor):
        if keep.shape not in ((batch,), ()) or keep.is_floating_point():
            raise ValueError(f"keep must be an int or a (B,)={batch} integer tensor; got {keep.dtype} "
                             f"{tuple(keep.shape)}")
        keep_t = keep.to(device=device, dtype=torch.long).clamp(min=0).expand(batch)
    else:
        if keep < 0:
            raise ValueError(f"keep must be >= 0; got {keep}")
        keep_t = torch.full((batch,), int(keep), dtype=torch.long, device=device)
    n_cand = candidate_mask.sum(1)
    n_fixed = length - n_cand
    kept = n_fixed + torch.minimum(keep_t, n_cand)
    if out_len is None:
        out_len = int(kept.max()) if batch else 0  # the one host sync; pass out_len to avoid it
    if not 0 <= out_len <= length:
        raise ValueError(f"out_len must lie in [0, L={length}]; got {out_len}")

    # Priority order: non-candidates first (by index), then candidates by descending score, ties by lower index.
    # Two stable sorts give that lexicographic order deterministically.
    key = scores.float().nan_to_num(nan=float("-inf"))
    key = torch.where(candidate_mask, key, torch.zeros((), device=device))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(candidate_mask.gather(1, order).to(torch.uint8), dim=1,
                                       stable=True).indices)
    chosen = order[:, :out_len]
    slot = torch.arange(out_len, device=device)
    chosen_valid = slot[None, :] < kept[:, None]
    # Back to original order, valid slots first: padded slots sort after every real position.
    sort_key = torch.where(chosen_valid, chosen, chosen + length)
    final = torch.sort(sort_key, dim=1).indices
    index = chosen.gather(1, final)
    valid = chosen_valid.gather(1, final)
    return Compaction(index=index, valid=valid, overflow=kept > out_len, kept=torch.clamp(kept, max=out_len))


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Select tokens `index` (B, L_keep) along `dim` of `x` (hidden states, position ids, cos/sin, masks).

    `x` has its batch on dim 0; a batch of 1 (shared tables such as rotary cos/sin or position ids) is broadcast
    to B. Trailing dims after `dim` are kept.
    """
    if index.dim() != 2:
        raise ValueError(f"index must be (B, L_keep); got {tuple(index.shape)}")
    dim = dim % x.dim()
    if dim == 0:
        raise ValueError("gather_tokens selects along a token dim, not the batch dim 0")
    batch = index.shape[0]
    if x.shape[0] not in (1, batch):
        raise ValueError(f"x has batch {x.shape[0]}, index has {batch}; they must match or x must have batch 1")
    shape = [batch, *x.shape[1:]]
    shape[dim] = index.shape[1]
    view = [batch] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    idx = index.to(x.device).view(view).expand(shape)
    return x.expand(batch, *x.shape[1:]).gather(dim, idx)
