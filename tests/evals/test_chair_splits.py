"""CHAIR splits: detailed captions (the default), short captions, and the earlier 64-token bench."""

import json

import pytest

from mmkit.errors import MmkitError
from mmkit.evals.benches import bench_spec, select_questions
from mmkit.evals.runner import run_eval
from mmkit.world.questions import BRIEF_CAPTION_PROMPT, CAPTION_PROMPT, detailed_caption, reference_caption
from mmkit.world.scenes import generate_scene


def test_chair_splits_prompts_answers_and_lengths():
    spec, split = bench_spec("chair", None)
    assert split == "detailed" and spec.max_new_tokens_for("detailed") == 128
    assert spec.max_new_tokens_for("short") == spec.max_new_tokens_for("all") == 64
    for split, prompt, caption in (("detailed", CAPTION_PROMPT, detailed_caption),
                                   ("short", BRIEF_CAPTION_PROMPT, reference_caption),
                                   ("all", CAPTION_PROMPT, reference_caption)):
        qs = select_questions("chair", split, 1, 5)
        assert [q.scene_index for q in qs] == list(range(5))
        for q in qs:
            assert q.prompt == prompt and q.answer == caption(generate_scene(1, q.scene_index))
    # The earlier bench keeps its question ids, so its results stay comparable.
    assert select_questions("chair", "all", 1, 1)[0].qid == "w1-s0-caption-0"
    with pytest.raises(MmkitError, match="splits"):
        bench_spec("chair", "long")


def test_chair_split_default_answer_length(tmp_path, session):
    """Without --max-new-tokens the detailed split runs with 128 new tokens, the short one with 64."""
    for split, tokens in (("detailed", 128), ("short", 64)):
        out = tmp_path / split
        result = run_eval(session=session, bench="chair", split=split, limit=2, batch_size=2, out=out,
                          progress=False)
        assert result["split"] == split
        assert json.loads((out / "run.json").read_text())["max_new_tokens"] == tokens
        records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert all(r["new_tokens"] <= tokens for r in records)
        assert {r["prompt"] for r in records} == {CAPTION_PROMPT if split == "detailed" else BRIEF_CAPTION_PROMPT}
