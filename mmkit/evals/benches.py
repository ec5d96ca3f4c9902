"""Benchmarks on the reference world: which questions, how to ask them, how to score them.

Bench data are generated on the fly from a world seed, so no files are needed and every run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mmkit.errors import MmkitError

POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class BenchSpec:
    name: str
    splits: tuple[str, ...]
    default_split: str
    default_limit: int
    max_new_tokens: int
    primary_metric: str
    # Splits whose answers need another length than `max_new_tokens`, as (split, tokens) pairs.
    split_max_new_tokens: tuple[tuple[str, int], ...] = field(default=())

    def max_new_tokens_for(self, split: str) -> int:
        """The default answer length of `split`."""
        return dict(self.split_max_new_tokens).get(split, self.max_new_tokens)


# CHAIR splits. "detailed": "Describe the image in detail." with room for a detailed caption (at most 80 words plus
# punctuation, about 95 tokens); "short": "Describe the image briefly." (one-sentence captions); "all": the
# detailed prompt capped at 64 new tokens, the bench as it was before the split existed (earlier results).
CHAIR_SPLITS = ("detailed", "short", "all")
CHAIR_DETAILED_TOKENS = 128


BENCHES = {
    "pope": BenchSpec("pope", POPE_SPLITS, "random", 300, 4, "f1"),
    "vqa": BenchSpec("vqa", ("all", "color", "count", "spatial"), "all", 300, 6, "accuracy"),
    "chair": BenchSpec("chair", CHAIR_SPLITS, "detailed", 100, 64, "chair_s",
                       split_max_new_tokens=(("detailed", CHAIR_DETAILED_TOKENS),)),
    "ground": BenchSpec("ground", ("all",), "all", 50, 48, "box_ap50"),
}


def bench_spec(name: str, split: str | None) -> tuple[BenchSpec, str]:
    if name not in BENCHES:
        raise MmkitError(f"unknown bench {name!r}; use one of {', '.join(BENCHES)}")
    spec = BENCHES[name]
    split = split or spec.default_split
    if split not in spec.splits:
        raise MmkitError(f"bench {name} has splits {', '.join(spec.splits)}; got {split!r}")
    return spec, split


def _question_source(bench: str, split: str) -> Callable:
    from mmkit.world import questions as q

    if bench == "pope":
        return lambda seed, n, start: q.pope_questions(seed, n, split, start=start)
    if bench == "vqa":
        if split == "all":
            return lambda seed, n, start: q.vqa_questions(seed, n, start=start)
        return lambda seed, n, start: [x for x in q.vqa_questions(seed, n, start=start) if x.kind == split]
    if bench == "chair":
        style = {"all": "legacy"}.get(split, split)
        return lambda seed, n, start: q.caption_questions(seed, n, start=start, style=style)
    return lambda seed, n, start: q.ground_questions(seed, n, start=start)


def select_questions(bench: str, split: str | None, world_seed: int, limit: int, chunk: int = 64) -> list:
    """The first `limit` questions of the bench, scene by scene: the same list for the same arguments. `split`
    None is the bench's default split."""
    if limit < 1:
        raise MmkitError(f"--limit must be >= 1, got {limit}")
    _, split = bench_spec(bench, split)
    source = _question_source(bench, split)
    out: list = []
    start = 0
    while len(out) < limit:
        batch = source(world_seed, chunk, start)
        out.extend(batch)
        start += chunk
        if start > 200 * limit + 10_000:  # a split with (almost) no questions would loop forever
            raise MmkitError(f"the world yields too few {bench}/{split} questions for --limit {limit}")
    return out[:limit]
