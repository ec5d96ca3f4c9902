"""Category mention extraction (CHAIR) and the world's word list."""

import pytest

from mmkit.world.scenes import CATEGORIES
from mmkit.world.vocab import mentioned_categories, plural, world_words


def test_plurals_synonyms_case_and_order():
    assert mentioned_categories("Two red Cups and a MUG.") == ["cup"]
    assert mentioned_categories("A star, three fish, two crosses and a fishes") == ["star", "fish", "cross"]
    assert mentioned_categories("a sailboat near a crescent") == ["boat", "moon"]
    for cat in CATEGORIES:
        assert mentioned_categories(f"some {plural(cat)} here") == [cat]
        assert mentioned_categories(cat.upper()) == [cat]


def test_no_matches_inside_words():
    assert mentioned_categories("a carpet, keyboard, bellows, starfish-free, scar, treehouse, crossing") == []
    assert mentioned_categories("") == []
    with pytest.raises(ValueError):
        mentioned_categories(None)


def test_world_words_sorted_unique():
    words = world_words()
    assert words == sorted(set(words))
    assert {"yes", "no", ".", ",", "?", "2", "color", "describe"} <= set(words)


def test_detailed_caption_mentions_by_hand():
    """CHAIR's object words in long captions: counts, plurals, relations and repeats, computed by hand."""
    from mmkit.evals.metrics import chair_metrics
    from mmkit.world.vocab import category_word_count, category_words

    a = ("There are five objects in the image. There are two cups, a large red one in the top left and a small "
         "blue one at the bottom. A medium green key is on the right. The red cup is to the left of the green key. "
         "One cup is above the other cup. The background is dark grey and plain.")
    b = ("There are three fish, a small orange one at the top and two large ones below. Three boats are below the "
         "fish. The crosses are near the left edge.")
    c = "A yellow star is above the white moon. The stars are small; both moons are far from the edges."
    assert category_words(a) == ["cup", "key", "cup", "key", "cup", "cup"] and category_word_count(a) == 6
    assert mentioned_categories(a) == ["cup", "key"]  # "one", "ones", "objects", "edge" are no objects
    assert mentioned_categories(b) == ["fish", "boat", "cross"]
    assert mentioned_categories(c) == ["star", "moon"]
    truths = [{"cup", "key", "tree"}, {"fish"}, {"star", "moon"}]
    m = chair_metrics([mentioned_categories(t) for t in (a, b, c)], truths, [len(t.split()) for t in (a, b, c)])
    assert m["chair_s"] == pytest.approx(1 / 3)  # only b names an absent object
    assert m["chair_i"] == pytest.approx(2 / 7)  # boat and cross of 2 + 3 + 2 distinct mentions
    assert m["recall"] == pytest.approx(5 / 6)  # tree is never named
