"""DivPrune (Alvar et al., CVPR 2025): keep the max-min diverse subset of the visual tokens, before the LLM.

Per image, on the projected features (the rows the language model receives), with cosine distance
D = 1 - cos:
1. first pick: the most isolated token, the one whose nearest other token is farthest;
2. then, k - 1 times: the token whose distance to the nearest already-picked token is largest (greedy
   farthest-point selection, the greedy solution of the max-min diversity problem).
The picked tokens enter the LLM in their original order (the released code sorts them), numbered contiguously as
a shorter image would be. Training-free, text-agnostic, per image (the released code selects on the first sample
of a batch and applies that to all; here every image gets its own subset).

On LLaVA-NeXT / OneVision and Qwen-VL each image is selected alone over all its tokens (anyres: base tile, unpadded
grid and its row newlines, as the released LLaVA-1.6 path), k = round(keep x its token count); Qwen-VL tokens keep
their 3-D positions (docs/divprune.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mmkit.pruning.selection import (
    ImageBatch,
    Selection,
    SelectionHandle,
    check_budget_fields,
    check_positions,
    fixed_budget,
    identity_order,
)
from mmkit.registry import register_method


@dataclass
class DivPruneConfig:
    """DivPrune: keep the max-min diverse subset of visual tokens (greedy farthest-point, cosine distance)."""

    keep: float = field(default=0.098, metadata={"help": "share of each image's visual tokens kept (the paper's "
                                                         "SUBSET_RATIO: 0.098 = 56 of 576)"})
    tokens: int = field(default=0, metadata={"help": "if > 0: visual tokens kept per image (overrides keep)"})
    positions: Literal["auto", "contiguous", "original"] = field(
        default="auto", metadata={"help": "position ids: auto = renumber the shorter sequence (paper) where "
                                          "positions are 1-D, keep the 3-D ones on Qwen-VL; or contiguous / original"})

    def __post_init__(self):
        self.keep = check_budget_fields(self.keep, self.tokens)
        check_positions(self.positions)


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """(I, N, D) -> (I, N, N) pairwise 1 - cos, in float32."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def maxmin_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min selection of k of the N tokens of each image. features (I, N, D) -> (I, k) picks, in pick
    order. Ties go to the lower index (argmax)."""
    dist = cosine_distance(features)
    n_img, n, _ = dist.shape
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    # Most isolated token: largest distance to its nearest *other* token.
    nearest = dist.masked_fill(eye, float("inf")).min(dim=2).values
    first = nearest.argmax(dim=1)
    picks = [first]
    rows = torch.arange(n_img, device=dist.device)
    min_dist = dist[rows, first].clone()           # each candidate's distance to its nearest picked token
    picked = torch.zeros(n_img, n, dtype=torch.bool, device=dist.device)
    picked[rows, first] = True
    for _ in range(k - 1):
        nxt = min_dist.masked_fill(picked, float("-inf")).argmax(dim=1)
        picks.append(nxt)
        picked[rows, nxt] = True
        min_dist = torch.minimum(min_dist, dist[rows, nxt])
    return torch.stack(picks, dim=1)


class DivPruneHandle(SelectionHandle):
    def __init__(self, session, config: DivPruneConfig):
        self.config = config
        self.k = fixed_budget(session, config, "divprune")
        super().__init__(session, self._select, positions=config.positions)

    def _select(self, batch: ImageBatch) -> Selection:
        # Every token of the image is a candidate, anyres row newlines included, as the released LLaVA-1.6 path
        # selects over the whole packed image (identical newline rows are at distance 0: at most one is picked).
        n_img, n, _ = batch.features.shape
        k = self.kept(n)
        if k >= n:
            return Selection(order=identity_order(n_img, n, batch.features.device))
        return Selection(order=maxmin_select(batch.features, k).sort(dim=1).values)


def apply_divprune(session, config: DivPruneConfig) -> DivPruneHandle:
    """Attach DivPrune to a session; `remove()` on the result restores the model exactly."""
    return DivPruneHandle(session, config)


register_method(
    "divprune", DivPruneConfig, apply_divprune, kind="pruning",
    description="Keep the max-min diverse subset of visual tokens before the LLM (CVPR'25).",
    slots=("pre_llm_token_drop",),
)
