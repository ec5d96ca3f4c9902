"""Detailed captions: lengths, object mentions and every stated fact checked against the scene's truth with
independent re-computations (thresholds restated here, not imported)."""

import re

import numpy as np
import pytest

from mmkit.world.questions import (
    BRIEF_CAPTION_PROMPT, CAPTION_PROMPT, caption_questions, detailed_caption, reference_caption,
)
from mmkit.world.scenes import CATEGORIES, COLOURS, generate_scene, iter_scenes
from mmkit.world.vocab import all_words, mentioned_categories, plural

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
SURFACE = {c: c for c in CATEGORIES} | {plural(c): c for c in CATEGORIES}
COLOUR = "|".join(COLOURS)
CAT = "|".join(sorted(SURFACE, key=len, reverse=True))
POSITION = {
    "in the top left": ("top", "left"), "at the top": ("top", "center"), "in the top right": ("top", "right"),
    "on the left": ("middle", "left"), "in the center": ("middle", "center"), "on the right": ("middle", "right"),
    "in the bottom left": ("bottom", "left"), "at the bottom": ("bottom", "center"),
    "in the bottom right": ("bottom", "right"),
}
POS = "|".join(sorted(POSITION, key=len, reverse=True))


@pytest.fixture(scope="module")
def scenes():
    return [s for seed in (0, 1, 2) for s in iter_scenes(seed, 250)]


def _size(obj):
    longest = max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1])
    return "small" if longest < 32 else "medium" if longest < 64 else "large"


def _position(obj):
    cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
    row = "top" if cy < 112 else "bottom" if cy >= 224 else "middle"
    col = "left" if cx < 112 else "right" if cx >= 224 else "center"
    return row, col


def _refer(scene, phrase):
    """The single object a referring phrase ("red cup", "large red cup") denotes."""
    words = phrase.split()
    found = [o for o in scene.objects if o.category == words[-1] and o.colour == words[-2]
             and (len(words) == 2 or _size(o) == words[0])]
    assert len(found) == 1, (phrase, found)
    return found[0]


def _holds(a, b, relation, margin=8):
    if relation == "to the left of":
        return a.box[2] + margin <= b.box[0]
    if relation == "to the right of":
        return b.box[2] + margin <= a.box[0]
    if relation == "above":
        return a.box[3] + margin <= b.box[1]
    return b.box[3] + margin <= a.box[1]


def test_length_and_mentions(scenes):
    for scene in scenes:
        text = detailed_caption(scene)
        words = text.split()
        assert 40 <= len(words) <= 80, (len(words), text)
        mentions = [SURFACE[w] for w in re.findall(r"[a-z]+", text.lower()) if w in SURFACE]
        assert 4 <= len(mentions) <= 10, (len(mentions), text)
        assert set(mentions) == scene.categories(), text  # every object named, nothing absent named
        assert set(re.findall(r"[a-z]+|[.,]", text.lower())) <= set(all_words()), text


def test_every_sentence_is_true(scenes):
    checked = {"count": 0, "object": 0, "group": 0, "relation": 0, "pair": 0, "edge": 0, "size": 0}
    for scene in scenes:
        objs = scene.objects
        text = detailed_caption(scene)
        assert text == detailed_caption(generate_scene(scene.world_seed, scene.index))  # deterministic
        described = []
        for sentence in re.findall(r"[^.]+\.", text):
            sentence = sentence.strip()
            if m := re.fullmatch(r"There (?:is|are) (\w+) objects? in the image\.", sentence):
                assert NUMBERS[m[1]] == len(objs)
                checked["count"] += 1
            elif m := re.fullmatch(rf"A (small|medium|large) ({COLOUR}) ({CAT}) is ({POS})\.", sentence):
                assert scene.count(m[3]) == 1, sentence
                obj = next(o for o in objs if o.category == m[3])
                assert (obj.colour, _size(obj), _position(obj)) == (m[2], m[1], POSITION[m[4]]), sentence
                described.append(obj)
                checked["object"] += 1
            elif m := re.fullmatch(rf"There are (\w+) ({CAT}), (.+)\.", sentence):
                cat = SURFACE[m[2]]
                parts = re.split(r", | and ", m[3])
                assert NUMBERS[m[1]] == scene.count(cat) == len(parts), sentence
                facts = sorted(re.fullmatch(rf"a (small|medium|large) ({COLOUR}) one ({POS})", p).groups()
                               for p in parts)
                instances = [o for o in objs if o.category == cat]
                assert facts == sorted((_size(o), o.colour, next(k for k, v in POSITION.items() if v == _position(o)))
                                       for o in instances), sentence
                described.extend(instances)
                checked["group"] += 1
            elif m := re.fullmatch(r"The ([a-z ]+) is (to the left of|to the right of|above|below) the ([a-z ]+)\.",
                                   sentence):
                assert _holds(_refer(scene, m[1]), _refer(scene, m[3]), m[2]), sentence
                checked["relation"] += 1
            elif m := re.fullmatch(rf"One ({CAT}) is (to the left of|to the right of|above|below) "
                                   rf"(?:the other|another) ({CAT})\.", sentence):
                same = [o for o in objs if o.category == m[1]]
                assert m[1] == m[3] and len(same) >= 2
                assert any(_holds(a, b, m[2]) for a in same for b in same if a is not b), sentence
                checked["pair"] += 1
            elif m := re.fullmatch(r"The ([a-z ]+) is (near the (top|bottom|left|right) edge|far from the edges)\.",
                                   sentence):
                obj = _refer(scene, m[1])
                gaps = {"left": obj.box[0], "top": obj.box[1], "right": 336 - obj.box[2], "bottom": 336 - obj.box[3]}
                if m[3]:
                    assert gaps[m[3]] == min(gaps.values()) < 40, sentence
                else:
                    assert min(gaps.values()) >= 40, sentence
                checked["edge"] += 1
            elif m := re.fullmatch(r"The ([a-z ]+) is (small|medium|large) in size\.", sentence):
                assert _size(_refer(scene, m[1])) == m[2]
                checked["size"] += 1
            elif m := re.fullmatch(rf"Nothing else is in the image besides the ({CAT})\.", sentence):
                assert len(objs) == 1 and objs[0].category == m[1]
            elif m := re.fullmatch(rf"All objects in the image are ({CAT})\.", sentence):
                assert {o.category for o in objs} == {SURFACE[m[1]]}
            elif m := re.fullmatch(r"The background is (dark|medium|light) grey and (\w+)\.", sentence):
                assert m[2] == scene.background
                assert m[1] == scene.background_tone
            else:
                raise AssertionError(f"unexpected sentence {sentence!r} in {text!r}")
        assert sorted(map(id, described)) == sorted(map(id, objs))  # every object described once
    assert all(checked.values()), checked  # every sentence kind occurred


def test_background_tone_matches_pixels(scenes):
    """The tone word follows the background's measured grey level (away from the 112 / 148 bounds, where object
    pixels and noise could tip the measurement)."""
    checked = 0
    for scene in scenes[:200]:
        owner = scene.owner_map()
        grey = float(np.asarray(scene.image, dtype=np.float64)[owner < 0].mean())
        expected = "dark" if grey < 112 else "medium" if grey < 148 else "light"
        if min(abs(grey - 112), abs(grey - 148)) > 6:
            assert scene.background_tone == expected, (scene.index, grey)
            checked += 1
    assert checked > 100


def test_caption_questions_per_style():
    scene = generate_scene(4, 7)
    detailed = caption_questions(4, 1, start=7, style="detailed")[0]
    short = caption_questions(4, 1, start=7, style="short")[0]
    legacy = caption_questions(4, 1, start=7)[0]
    assert (detailed.prompt, detailed.answer, detailed.split) == (CAPTION_PROMPT, detailed_caption(scene), "detailed")
    assert (short.prompt, short.answer, short.split) == (BRIEF_CAPTION_PROMPT, reference_caption(scene), "short")
    assert (legacy.prompt, legacy.answer, legacy.qid) == (CAPTION_PROMPT, reference_caption(scene), "w4-s7-caption-0")
    assert len({detailed.qid, short.qid, legacy.qid}) == 3
    with pytest.raises(ValueError):
        caption_questions(4, 1, style="long")


def test_hand_checked_example():
    """One scene read by eye: two objects, both described, one relation, the background."""
    scene = generate_scene(0, 0)
    text = detailed_caption(scene)
    assert mentioned_categories(text) == ["key", "cup"]
    assert text.startswith("There are two objects in the image. A medium green key is in the top left. "
                           "A medium purple cup is in the top right. The green key is to the left of the purple cup.")
    assert text.endswith("The background is light grey and mottled.")
