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
