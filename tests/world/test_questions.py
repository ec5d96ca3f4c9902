"""Questions over the reference world: POPE balance and split semantics, VQA truth, captions, grounding."""

import re
from collections import Counter

import numpy as np
import pytest

from mmkit.world.questions import (
    POPE_SPLITS,
    caption_questions,
    ground_questions,
    ground_truth,
    pope_questions,
    reference_caption,
    spatial_relation,
    training_examples,
    vqa_questions,
)
from mmkit.world.scenes import GROUPS, PARTNER, CATEGORIES, category_frequencies, generate_scene, iter_scenes
from mmkit.world.vocab import mentioned_categories, world_words

N = 40


@pytest.fixture(scope="module")
def scenes():
    return {s.index: s for s in iter_scenes(2, N)}


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_pope_balanced_and_true(split, scenes):
    qs = pope_questions(2, N, split)
    assert all(q.kind == "pope" and q.split == split for q in qs)
    per_scene = Counter((q.scene_index, q.answer) for q in qs)
    for i in range(N):
        assert per_scene[(i, "yes")] == per_scene[(i, "no")] == min(3, len(scenes[i].categories()))
    for q in qs:
        assert q.prompt.endswith("in the image? Answer yes or no.") and q.target in q.prompt
        assert (q.target in scenes[q.scene_index].categories()) == (q.answer == "yes")
    assert len({q.qid for q in qs}) == len(qs)
    assert pope_questions(2, N, split) == qs  # deterministic


def test_pope_split_semantics():
    n = 150
    neg = {s: [q for q in pope_questions(4, n, s) if q.answer == "no"] for s in POPE_SPLITS}
    scenes = {s.index: s for s in iter_scenes(4, n)}

    def partner_rate(qs):
        return np.mean([any(PARTNER.get(c) == q.target for c in scenes[q.scene_index].categories()) for q in qs])

    assert partner_rate(neg["adversarial"]) > 2 * partner_rate(neg["random"])
    freq = category_frequencies()
    assert np.mean([freq[q.target] for q in neg["popular"]]) > 1.5 * np.mean([freq[q.target] for q in neg["random"]])
    # An absent partner of a present object is always the first adversarial negative.
    for i, scene in scenes.items():
        absent_partners = {PARTNER[c] for c in scene.categories() if c in PARTNER} - scene.categories()
        first = next(q.target for q in neg["adversarial"] if q.scene_index == i)
        if absent_partners:
            assert first in absent_partners
    assert len(pope_questions(4, 5, "all")) == sum(len(pope_questions(4, 5, s)) for s in POPE_SPLITS)
    with pytest.raises(ValueError):
        pope_questions(4, 5, "hard")


def test_vqa_answers_match_truth(scenes):
    qs = vqa_questions(2, N)
    kinds = Counter(q.kind for q in qs)
    assert kinds["color"] and kinds["count"] and kinds["spatial"]
    spatial_answers = Counter()
    for q in qs:
        scene = scenes[q.scene_index]
        if q.kind == "color":
            (obj,) = [o for o in scene.objects if o.category == q.target]
            assert q.answer == obj.colour
        elif q.kind == "count":
            expected = scene.count(q.target) if q.target else len(scene.objects)
            assert q.answer == str(expected)
        else:
            a, b = re.match(r"Is the (\w+) (?:to the left of|above) the (\w+)\?", q.prompt).groups()
            rel = "left" if "left" in q.prompt else "above"
            assert spatial_relation(scene, a, b, rel) is (q.answer == "yes")
            ia = next(o for o in scene.objects if o.category == a)
            ib = next(o for o in scene.objects if o.category == b)
            axis = 0 if rel == "left" else 1
            centre = lambda o: (o.box[axis] + o.box[axis + 2]) / 2  # noqa: E731
            assert (centre(ia) < centre(ib)) == (q.answer == "yes")
            spatial_answers[q.answer] += 1
    assert spatial_answers["yes"] > 0 and spatial_answers["no"] > 0
    assert len({q.qid for q in qs}) == len(qs)


def test_caption_lists_every_object(scenes):
    caps = caption_questions(2, N)
    for q in caps:
        scene = scenes[q.scene_index]
        assert q.prompt == "Describe the image in detail." and q.answer == reference_caption(scene)
        assert q.answer[0].isupper() and q.answer.endswith(".")
        assert set(mentioned_categories(q.answer)) == scene.categories()
        for obj in scene.objects:
            assert obj.colour in q.answer


def test_caption_format():
    def repeats(s):
        pairs = [(o.colour, o.category) for o in s.objects]
        return len(set(pairs)) < len(pairs)

    scene = next(s for s in iter_scenes(2, 300) if len(s.objects) >= 3 and repeats(s))
    cap = reference_caption(scene)
    assert re.fullmatch(r"[A-Z][a-z]+( [a-z]+)+(, [a-z]+( [a-z]+)+)* and [a-z]+( [a-z]+)+\.", cap), cap
    assert re.search(r"\b(two|three|four|five|six)\b", cap, re.IGNORECASE)


def test_grounding(scenes):
    qs = ground_questions(2, N)
    for q in qs:
        scene = scenes[q.scene_index]
        mask, boxes = ground_truth(scene, q.target)
        assert mask.sum() == sum(o.area for o in scene.objects if o.category == q.target)
        assert len(boxes) == scene.count(q.target) == q.answer.count("[")
    assert {(q.scene_index, q.target) for q in qs} == {(i, c) for i, s in scenes.items() for c in s.categories()}


def test_training_stream_and_vocabulary():
    pairs = list(training_examples(2, 20, start=5))
    assert [q for _, q in pairs] == [q for _, q in training_examples(2, 20, start=5)]
    kinds = {q.kind for _, q in pairs}
    assert kinds == {"pope", "color", "count", "spatial", "caption"}
    assert all(scene.index == q.scene_index for scene, q in pairs)
    words = set(world_words())
    assert words == set(w.lower() for w in words)
    qs = [q for _, q in pairs] + ground_questions(2, 20)
    for q in qs:
        for token in re.findall(r"[a-z]+|\d+|[^\sa-z\d]", (q.prompt + " " + q.answer).lower()):
            assert token in words, token
    assert set(CATEGORIES) <= words and "yes" in words and "no" in words


def test_adversarial_negatives_follow_groups():
    scene = next(s for s in iter_scenes(8, 300)
                 if any(a in s.categories() and b not in s.categories() for a, b in GROUPS))
    a, b = next((a, b) for a, b in GROUPS if a in scene.categories() and b not in scene.categories())
    qs = [q for q in pope_questions(8, 1, "adversarial", start=scene.index) if q.answer == "no"]
    assert qs[0].target in {PARTNER[c] for c in scene.categories() if c in PARTNER}
    assert generate_scene(8, scene.index).categories() == scene.categories()
