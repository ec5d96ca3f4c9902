"""Shared pieces of the multi-branch decoding methods (VCD, AGLA, VHR).

A branched method runs k versions of each prompt as one batch (branch-major: rows [j*B, (j+1)*B) are branch j,
branch 0 the original input) and merges their next-token logits; see `mmkit.contract.Branching`.
"""

from __future__ import annotations

import math

import torch


def check_float(name: str, value, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float inside [low, high] (open ends where asked), or a ValueError saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")
    return value


def plausibility_mask(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Bool (B, V): tokens whose probability under `logits` is at least beta times the most likely token's.

    p_i >= beta * max_j p_j  <=>  z_i >= log(beta) + max_j z_j (the softmax normaliser cancels), so the test runs
    on logits, as VCD's and AGLA's official code do. beta = 0 keeps every token.
    """
    if beta <= 0.0:
        return torch.ones_like(logits, dtype=torch.bool)
    cutoff = math.log(beta) + logits.max(dim=-1, keepdim=True).values
    return logits >= cutoff


def restrict_to_plausible(combined: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """`combined` with every token implausible under `reference` (see `plausibility_mask`) set to -inf."""
    return combined.masked_fill(~plausibility_mask(reference, beta), float("-inf"))


def split_branches(logits: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Branch-major (k*B, V) logits -> k tensors of (B, V)."""
    if logits.shape[0] % k:
        raise RuntimeError(f"got {logits.shape[0]} logit rows for {k} branches")
    return list(logits.chunk(k, dim=0))


def stack_branches(inputs: dict[str, torch.Tensor], **replaced: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two branches of the same prompts: branch 0 = `inputs`, branch 1 = `inputs` with the given entries replaced
    (e.g. `pixel_values=noised`). Every tensor entry is concatenated along the batch dimension."""
    unknown = set(replaced) - set(inputs)
    if unknown:
        raise KeyError(f"inputs have no {sorted(unknown)}")
    return {key: torch.cat([value, replaced.get(key, value)], dim=0) for key, value in inputs.items()}


def image_normalisation(session) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's per-channel image mean and std as (3, 1, 1) float32 tensors (pixel_values = (x - mean) / std
    for x in [0, 1])."""
    image_processor = session.processor.image_processor
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(-1, 1, 1)
    return mean, std
