"""Open-vocabulary object lists parsed from hand-written LVLM answers, and VL-SAM grounding every listed noun."""

from types import SimpleNamespace

import pytest

from mmkit.grounding.phrases import answer_objects, object_phrases, singular
from mmkit.grounding.vlsam import VLSAMConfig, answer_labels, ground


def _parsed(text):
    return [(p.label, p.attributes, p.count) for p in object_phrases(text)]


def test_lists_split_on_commas_and_and_with_counts_and_colours_as_attributes():
    assert _parsed("A red star, two blue cups and 3 keys.") == [
        ("star", ("red",), 1), ("cup", ("blue",), 2), ("key", (), 3)]
    assert _parsed("Objects: knife, fork, spoon.") == [("knife", (), 1), ("fork", (), 1), ("spoon", (), 1)]
    assert _parsed("There are cups and keys.") == [("cup", (), 2), ("key", (), 2)]


def test_llava_style_description_finds_objects_outside_the_world():
    text = ("The image shows a red car parked on the street next to a tall tree. In the background, a group of "
            "people stand near a white bus, with bicycles and benches.")
    phrases = object_phrases(text)
    assert [p.label for p in phrases] == ["car", "street", "tree", "person", "bus", "bicycle", "bench"]
    car = phrases[0]
    assert car.attributes == ("red",) and text[car.span[0]:car.span[1]] == "car"
    assert phrases[3].head == "people" and phrases[3].count == 2  # "a group of people": the group is no object


def test_non_objects_are_not_labels():
    assert _parsed("The image is bright. The car is red.") == [("car", (), 1)]
    assert _parsed("In the top left corner of the picture there is nothing.") == []
    assert _parsed("a striped shirt and a pair of shoes") == [("shirt", ("striped",), 1), ("shoe", (), 2)]


def test_singular():
    assert [singular(w) for w in ("cups", "boxes", "berries", "people", "bus", "glass", "crosses", "shoes",
                                  "fish", "dog")] == ["cup", "box", "berry", "person", "bus", "glass", "cross",
                                                      "shoe", "fish", "dog"]


def test_world_vocabulary_filters_and_relabels():
    text = "A white mug, a balloon and two red crosses."
    assert [p.label for p in answer_objects(text, "open")] == ["mug", "balloon", "cross"]
    assert [p.label for p in answer_objects(text, "world")] == ["cup", "cross"]
    labels, surface = answer_labels(text, "world")
    assert labels == ["cup", "cross"] and "mug" in surface["cup"] and "cups" in surface["cup"]
    labels, surface = answer_labels(text, "open")
    assert labels == ["mug", "balloon", "cross"] and surface["cross"] == ["crosses", "cross"]
    with pytest.raises(ValueError, match="vocabulary"):
        answer_objects(text, "coco")
    with pytest.raises(ValueError, match="vocabulary"):
        VLSAMConfig(vocabulary="coco")


@pytest.fixture
def scripted_answer(session, monkeypatch):
    """The tiny model 'answers' a hand-written description (generation is replaced, mapping stays real)."""
    def use(text):
        monkeypatch.setattr(session, "generate", lambda images, prompts, **kw: [SimpleNamespace(text=text)
                                                                             for _ in images])
    return use


def test_ground_maps_every_listed_noun_with_open_vocabulary(session, images, scripted_answer):
    from mmkit.grounding.sam_backend import load_sam

    sam = load_sam(device="cpu")
    scripted_answer("A red balloon next to two dogs and a mug.")
    (r,) = ground(session, sam, images[:1], config=VLSAMConfig(max_new_tokens=4, refine_steps=0))
    assert set(r.maps) == {"balloon", "dog", "mug"}
    assert {d.label for d in r.detections} <= {"balloon", "dog", "mug"} and r.detections
    (w,) = ground(session, sam, images[:1], config=VLSAMConfig(max_new_tokens=4, refine_steps=0,
                                                               vocabulary="world"))
    assert set(w.maps) == {"cup"}  # only the world's category ("mug" is a cup), the rest filtered
    # A free-text query is answered from the description that names it (no query prompt needed).
    (q,) = ground(session, sam, images[:1], query="black dogs",
                  config=VLSAMConfig(max_new_tokens=4, refine_steps=0))
    assert set(q.maps) == {"black dogs"}
    assert q.stats["lvlm_generate_calls"] == 1 and q.stats["lvlm_forward_calls"] == 1
    assert q.stats["lvlm_sequences"] == 2  # one generation, one mapping forward of the same row
