"""Random visual-token pruning, before the LLM: the floor every selection method has to beat.

Keeps k of each image's N visual tokens drawn uniformly without replacement from a generator seeded with `seed`,
in their original order, numbered contiguously as a shorter image would be (UniPruneBench's pre-LLM random
baseline, which draws an unseeded subset per call). Here the subset depends only on (seed, N, k): every image of
every call keeps the same patch positions, so runs are reproducible and a batch gives the same answers as single
calls; another seed is another draw (average over seeds to estimate the baseline's spread).

On LLaVA-NeXT / OneVision the draw is over each image's patch tokens (row newlines dropped); on Qwen-VL over its
merged tokens, which keep their 3-D positions (docs/random.md).
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
    patch_tokens,
)
from mmkit.registry import register_method


@dataclass
class RandomPruneConfig:
    """Random: keep a seeded uniform random subset of the visual tokens before the LLM (baseline)."""

    keep: float = field(default=0.111, metadata={"help": "share of each image's visual tokens kept (0.111 = 64 of "
                                                         "576)"})
    tokens: int = field(default=0, metadata={"help": "if > 0: visual tokens kept per image (overrides keep)"})
    seed: int = field(default=0, metadata={"help": "seed of the draw; the same subset for every image"})
    positions: Literal["auto", "contiguous", "original"] = field(
        default="auto", metadata={"help": "position ids: auto = renumber the shorter sequence where positions are "
                                          "1-D, keep the 3-D ones on Qwen-VL; or contiguous / original"})

    def __post_init__(self):
        self.keep = check_budget_fields(self.keep, self.tokens)
        check_positions(self.positions)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def random_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """k of range(n), uniformly without replacement, sorted; a function of (n, k, seed) only."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].sort().values


class RandomPruneHandle(SelectionHandle):
    def __init__(self, session, config: RandomPruneConfig):
        self.config = config
        self.k = fixed_budget(session, config, "random")
        super().__init__(session, self._select, positions=config.positions)

    def _select(self, batch: ImageBatch) -> Selection:
        n_img, n, _ = batch.features.shape
        device = batch.features.device
        k = self.kept(n)
        if k >= n:
            return Selection(order=identity_order(n_img, n, device))
        patches = patch_tokens(batch)
        if patches is None:
            return Selection(order=random_subset(n, k, self.config.seed).to(device).expand(n_img, k))
        # Anyres: the draw is over the patch tokens; row newlines carry no image content and are dropped.
        k = min(k, patches.numel())
        return Selection(order=patches[random_subset(patches.numel(), k, self.config.seed).to(device)][None])


def apply_random(session, config: RandomPruneConfig) -> RandomPruneHandle:
    """Attach random pruning to a session; `remove()` on the result restores the model exactly."""
    return RandomPruneHandle(session, config)


register_method(
    "random", RandomPruneConfig, apply_random, kind="pruning",
    description="Keep a seeded random subset of visual tokens before the LLM (baseline).",
    slots=("pre_llm_token_drop",),
)
