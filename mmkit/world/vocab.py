"""Words of the reference world: category mentions in free text (for CHAIR) and the world's full word list."""

from __future__ import annotations

import functools
import re

from mmkit.world.scenes import CATEGORIES, COLOURS

# Plural forms that are not the singular plus "s".
PLURALS: dict[str, str] = {"cross": "crosses", "fish": "fish"}
# Other words a caption may use for a category. Each maps to exactly one category; words with common other
# meanings ("plus", "home", "dot") are left out so ordinary text does not produce false mentions.
SYNONYMS: dict[str, str] = {
    "disc": "circle", "disk": "circle",
    "donut": "ring", "doughnut": "ring",
    "rhombus": "diamond", "lozenge": "diamond",
    "crescent": "moon",
    "automobile": "car",
    "cottage": "house", "hut": "house",
    "mug": "cup",
    "parasol": "umbrella",
    "ship": "boat", "sailboat": "boat", "yacht": "boat",
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
# Largest pixel coordinate a grounding answer can contain (scenes of questions are 336 px).
MAX_COORDINATE = 336

_WORD = re.compile(r"[a-z]+")


def plural(category: str) -> str:
    """The plural of a category or synonym word ("cup" -> "cups", "cross" -> "crosses", "fish" -> "fish")."""
    if category in PLURALS:
        return PLURALS[category]
    if category.endswith(("s", "sh", "ch", "x")):
        return category + "es"
    return category + "s"


@functools.lru_cache(maxsize=1)
def _lexicon() -> dict[str, str]:
    """Every surface form (singular, plural, synonym, synonym plural, "fishes") mapped to its category."""
    table: dict[str, str] = {}
    for word, cat in [(c, c) for c in CATEGORIES] + list(SYNONYMS.items()):
        table[word] = cat
        table[plural(word)] = cat
    table["fishes"] = "fish"
    return table


def mentioned_categories(text: str) -> list[str]:
    """Categories mentioned in `text`, each once, in order of first mention.

    Matching is per whole word, case-insensitive, and understands plurals and the synonyms in SYNONYMS, so
    "Two red Cups and a mug" gives ["cup"] and "a carpet" gives [].
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    lexicon = _lexicon()
    found: list[str] = []
    for word in _WORD.findall(text.lower()):
        cat = lexicon.get(word)
        if cat is not None and cat not in found:
            found.append(cat)
    return found


def category_words(text: str) -> list[str]:
    """The category of every category word in `text`, in order and with repeats ("Two cups; the red cup." ->
    ["cup", "cup"]). Same matching rules as `mentioned_categories`."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    lexicon = _lexicon()
    return [lexicon[w] for w in _WORD.findall(text.lower()) if w in lexicon]


def category_word_count(text: str) -> int:
    """How many category words `text` holds, repeats included."""
    return len(category_words(text))


@functools.lru_cache(maxsize=1)
def _world_words() -> tuple[str, ...]:
    from mmkit.world import questions

    words: set[str] = set(CATEGORIES) | {plural(c) for c in CATEGORIES} | set(COLOURS) | set(NUMBER_WORDS)
    for template in questions.TEMPLATES:
        words.update(_WORD.findall(template.lower()))
    words.update(questions.FIXED_WORDS)
    words.update(str(n) for n in range(MAX_COORDINATE + 1))
    words.update(questions.PUNCTUATION)
    return tuple(sorted(words))


def world_words() -> list[str]:
    """The world's original word list, from which the shipped tokenizer's ids were built: every word of the
    short captions, questions and answers (lowercase words, punctuation tokens and numerals: counts, and pixel
    coordinates up to MAX_COORDINATE in grounding answers). Sorted, no duplicates. Words that later caption styles
    need are `added_words`; `all_words` is both."""
    return list(_world_words())


@functools.lru_cache(maxsize=1)
def _added_words() -> tuple[str, ...]:
    from mmkit.world import questions

    words: set[str] = set(questions.DETAILED_WORDS)
    for template in questions.ADDED_TEMPLATES:
        words.update(_WORD.findall(template.lower()))
    return tuple(sorted(words - set(_world_words())))


def added_words() -> list[str]:
    """Words of the detailed caption style and its prompts that `world_words` lacks. Sorted; a tokenizer appends
    them after the original words, so the ids of the original words never change."""
    return list(_added_words())


def all_words() -> list[str]:
    """Every word any prompt, answer or caption of the world can contain: `world_words` then `added_words`."""
    return list(_world_words()) + list(_added_words())
