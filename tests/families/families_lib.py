"""Shared helpers for the per-family tests: the built-in tiny models and images of different sizes."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from mmkit.models.builtin_families import FAMILY_BUILTIN_NAMES, build_family_builtin

FAMILY_BUILTINS = FAMILY_BUILTIN_NAMES


def family_model(name: str):
    """A fresh (model, processor) of a built-in family model (tests may change the model)."""
    return build_family_builtin(name)


@lru_cache(maxsize=None)
def _images():
    rng = np.random.default_rng(0)
    # Three aspect ratios: square, tall, small and wide, so anyres tiling and native-resolution grids differ.
    shapes = ((336, 336), (504, 336), (120, 200))
    return tuple((rng.random((h, w, 3)) * 255).astype("uint8") for h, w in shapes)


def family_images():
    return list(_images())


def assert_batch_equals_single(session, images, prompts) -> None:
    """Batched rows equal single rows: greedy texts (3 new tokens) and answer log-probabilities."""
    batch = [r.text for r in session.generate(images, prompts, max_new_tokens=3)]
    single = [session.generate([im], [p], max_new_tokens=3)[0].text for im, p in zip(images, prompts)]
    assert batch == single
    scores = session.answer_logprobs(images, prompts).logprobs
    for i, (im, p) in enumerate(zip(images, prompts)):
        assert session.answer_logprobs([im], [p]).logprobs[0] == pytest.approx(scores[i], abs=1e-4)
