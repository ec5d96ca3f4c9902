"""Question sets over reference-world scenes: POPE existence, attribute / counting / spatial VQA, captions (a
one-sentence short style and a several-sentence detailed style) and grounding, plus the mixed stream used for
instruction tuning.

Prompts are plain user text (the chat template is applied by the caller). Every question is a pure function of
(world_seed, scene index, kind), with a stable `qid`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mmkit.world.scenes import (
    CATEGORIES, COLOURS, PARTNER, Scene, category_frequencies, cooccurrence, generate_scene,
)
from mmkit.world.vocab import NUMBER_WORDS, plural

KINDS = ("pope", "color", "count", "spatial", "caption", "ground")
POPE_SPLITS = ("random", "popular", "adversarial")
# Named weightings of the training stream's POPE negatives (see `parse_pope_negatives`): "random" is the shipped
# recipe, "mixed" draws each scene's split uniformly from the three.
TRAINING_POPE_NEGATIVES = {"random": "random", "mixed": "random=1,popular=1,adversarial=1"}
# At most this many positive (and as many negative) POPE questions per scene.
POPE_PER_SCENE = 3

POPE_PROMPT = "Is there {article} {category} in the image? Answer yes or no."
COLOR_PROMPT = "What color is the {category}?"
COUNT_PROMPT = "How many {plural} are there?"
COUNT_ALL_PROMPT = "How many objects are there?"
LEFT_PROMPT = "Is the {a} to the left of the {b}?"
ABOVE_PROMPT = "Is the {a} above the {b}?"
CAPTION_PROMPT = "Describe the image in detail."
BRIEF_CAPTION_PROMPT = "Describe the image briefly."
GROUND_ONE_PROMPT = "Where is the {category}?"
GROUND_ALL_PROMPT = "Where are the {plural}?"
TEMPLATES = (
    POPE_PROMPT, COLOR_PROMPT, COUNT_PROMPT, COUNT_ALL_PROMPT, LEFT_PROMPT, ABOVE_PROMPT, CAPTION_PROMPT,
    GROUND_ONE_PROMPT, GROUND_ALL_PROMPT,
)
# Prompts added with the detailed caption style. Kept apart from TEMPLATES: the shipped tokenizer's ids are built
# from the words of TEMPLATES, and words added later get ids after them (`mmkit.world.vocab.added_words`).
ADDED_TEMPLATES = (BRIEF_CAPTION_PROMPT,)
# Caption styles: "short" lists the objects in one sentence (`reference_caption`), "detailed" describes every
# object, relations, counts and the background in several sentences (`detailed_caption`).
CAPTION_STYLES = ("short", "detailed")
# What the training stream asks for captions: "legacy" is the recipe of the shipped model (the short caption
# answers the detailed prompt); "detailed" answers the detailed prompt with the detailed caption and the brief
# prompt with the short one.
CAPTION_MIXES = ("legacy", "detailed")
# Words of answers and captions not taken from templates, categories, colours or numbers.
FIXED_WORDS = ("yes", "no", "a", "an", "and")
PUNCTUATION = (".", ",", "?", ";", "[", "]")

# Spatial questions need boxes separated by at least this many pixels (at 336 px) along the asked axis.
SPATIAL_MARGIN = 8
# Per scene in `vqa_questions`: up to this many colour, count and spatial questions.
MAX_COLOR, MAX_COUNT, MAX_SPATIAL = 2, 2, 2
# Probability of also asking the count of an absent category (answer "0") and of all objects.
ABSENT_COUNT_PROB = 0.25
ALL_COUNT_PROB = 0.4


@dataclass(frozen=True)
class Question:
    """One question about scene `scene_index` of world `world_seed`.

    `kind` is one of KINDS, `split` the POPE split ("" otherwise), `target` the category asked about (pope,
    ground, color, count; "" for counts of all objects, spatial and captions) and `qid` a stable unique id.
    """

    world_seed: int
    scene_index: int
    kind: str
    split: str
    prompt: str
    answer: str
    target: str = ""
    qid: str = ""


def _rng(scene: Scene, purpose: str) -> random.Random:
    # String seeds hash deterministically (sha512) in Python's random, independent of PYTHONHASHSEED.
    return random.Random(f"{scene.world_seed}-{scene.index}-{purpose}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _check(n_scenes: int, start: int) -> None:
    if n_scenes < 0 or start < 0:
        raise ValueError(f"n_scenes and start must be >= 0, got {n_scenes}, {start}")


# ---------------------------------------------------------------------------------------------------------------
# POPE


def pope_negatives(scene: Scene, split: str, n: int) -> list[str]:
    """`n` absent categories for `scene` under a POPE split.

    random: uniform among absent categories; popular: the most frequent absent categories of the world;
    adversarial: the absent categories that co-occur most with the present ones (highest max over present a of
    P(b | a), then highest sum, then frequency).
    """
    present = scene.categories()
    absent = [c for c in CATEGORIES if c not in present]
    freq = category_frequencies()
    if split == "random":
        return _rng(scene, "pope-random").sample(absent, min(n, len(absent)))
    if split == "popular":
        return sorted(absent, key=lambda c: (-freq[c], c))[:n]
    if split == "adversarial":
        co = cooccurrence()
        # Strongest single association first, so an absent group partner always leads; the sum breaks ties.
        score = {b: (max(co[a][b] for a in present), sum(co[a][b] for a in present)) for b in absent}
        return sorted(absent, key=lambda c: (-score[c][0], -score[c][1], -freq[c], c))[:n]
    raise ValueError(f"split must be one of {POPE_SPLITS} or 'all', got {split!r}")


def _pope_for_scene(scene: Scene, split: str) -> list[Question]:
    present = sorted(scene.categories())
    # Positives are drawn with a split-independent stream, so all splits share them, as in POPE.
    positives = _rng(scene, "pope-pos").sample(present, min(POPE_PER_SCENE, len(present)))
    negatives = pope_negatives(scene, split, len(positives))
    out = []
    for j, (cat, answer) in enumerate(
        x for pair in zip(positives, negatives) for x in ((pair[0], "yes"), (pair[1], "no"))
    ):
        out.append(Question(
            scene.world_seed, scene.index, "pope", split,
            POPE_PROMPT.format(article=_article(cat), category=cat), answer, cat,
            f"w{scene.world_seed}-s{scene.index}-pope-{split}-{j}",
        ))
    return out


def pope_questions(world_seed: int, n_scenes: int, split: str = "all", start: int = 0) -> list[Question]:
    """Balanced POPE yes/no questions for scenes `start` .. `start + n_scenes - 1`.

    Per scene: up to POPE_PER_SCENE present categories ("yes") and as many absent ones ("no") chosen by `split`
    (see `pope_negatives`), alternating yes/no. `split="all"` returns the three splits one after another.
    """
    _check(n_scenes, start)
    splits = POPE_SPLITS if split == "all" else (split,)
    if any(s not in POPE_SPLITS for s in splits):
        raise ValueError(f"split must be one of {POPE_SPLITS} or 'all', got {split!r}")
    scenes = [generate_scene(world_seed, i) for i in range(start, start + n_scenes)]
    return [q for s in splits for scene in scenes for q in _pope_for_scene(scene, s)]


# ---------------------------------------------------------------------------------------------------------------
# VQA: colour, count, spatial


def _single(scene: Scene) -> dict[str, int]:
    """Categories present exactly once, mapped to their object index."""
    counts: dict[str, int] = {}
    for obj in scene.objects:
        counts[obj.category] = counts.get(obj.category, 0) + 1
    return {o.category: i for i, o in enumerate(scene.objects) if counts[o.category] == 1}


def spatial_relation(scene: Scene, a: str, b: str, relation: str) -> bool | None:
    """Whether single-instance `a` is `relation` ("left" or "above") of single-instance `b`; None when the
    question is ambiguous (a category absent or repeated, or boxes not separated by SPATIAL_MARGIN)."""
    single = _single(scene)
    if a not in single or b not in single or a == b:
        return None
    ba, bb = scene.objects[single[a]].box, scene.objects[single[b]].box
    axis = {"left": 0, "above": 1}.get(relation)
    if axis is None:
        raise ValueError(f"relation must be 'left' or 'above', got {relation!r}")
    margin = SPATIAL_MARGIN * scene.size / 336
    if ba[axis + 2] + margin <= bb[axis]:
        return True
    if bb[axis + 2] + margin <= ba[axis]:
        return False
    return None


def _vqa_for_scene(scene: Scene) -> list[Question]:
    rng = _rng(scene, "vqa")
    ws, si = scene.world_seed, scene.index
    out: list[Question] = []

    def add(kind: str, prompt: str, answer: str, target: str = "") -> None:
        j = sum(q.kind == kind for q in out)
        out.append(Question(ws, si, kind, "", prompt, answer, target, f"w{ws}-s{si}-{kind}-{j}"))

    single = _single(scene)
    for cat in rng.sample(sorted(single), min(MAX_COLOR, len(single))):
        add("color", COLOR_PROMPT.format(category=cat), scene.objects[single[cat]].colour, cat)

    present = sorted(scene.categories())
    for cat in rng.sample(present, min(MAX_COUNT, len(present))):
        add("count", COUNT_PROMPT.format(plural=plural(cat)), str(scene.count(cat)), cat)
    if rng.random() < ABSENT_COUNT_PROB:
        cat = rng.choice([c for c in CATEGORIES if c not in scene.categories()])
        add("count", COUNT_PROMPT.format(plural=plural(cat)), "0", cat)
    if rng.random() < ALL_COUNT_PROB:
        add("count", COUNT_ALL_PROMPT, str(len(scene.objects)))

    candidates = []
    names = sorted(single)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for relation in ("left", "above"):
                if spatial_relation(scene, a, b, relation) is not None:
                    candidates.append((a, b, relation))
    for a, b, relation in rng.sample(candidates, min(MAX_SPATIAL, len(candidates))):
        if rng.random() < 0.5:  # random order, so "yes" and "no" are equally likely
            a, b = b, a
        template = LEFT_PROMPT if relation == "left" else ABOVE_PROMPT
        answer = "yes" if spatial_relation(scene, a, b, relation) else "no"
        add("spatial", template.format(a=a, b=b), answer)
    return out


def vqa_questions(world_seed: int, n_scenes: int, start: int = 0) -> list[Question]:
    """Colour, counting and spatial questions for scenes `start` .. `start + n_scenes - 1`.

    Colour: "What color is the {category}?" for categories present once -> colour word. Count: "How many
    {plural} are there?" (present categories, sometimes an absent one) or "How many objects are there?" ->
    numeral ("2"). Spatial: "Is the {a} to the left of / above the {b}?" for single instances with a clear
    margin -> "yes"/"no".
    """
    _check(n_scenes, start)
    return [q for i in range(start, start + n_scenes) for q in _vqa_for_scene(generate_scene(world_seed, i))]


# ---------------------------------------------------------------------------------------------------------------
# Captions


def reference_caption(scene: Scene) -> str:
    """The reference detailed caption: every object with its colour, grouped by (colour, category) with a count
    word, ordered left to right by the group's leftmost box, e.g. "A red star, two blue cups and a green key."."""
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.colour, obj.category), []).append((obj.box[0], obj.box[1]))
    order = sorted(groups, key=lambda k: (min(groups[k]), k))
    phrases = []
    for colour, cat in order:
        n = len(groups[(colour, cat)])
        if n == 1:
            phrases.append(f"{_article(colour)} {colour} {cat}")
        else:
            phrases.append(f"{NUMBER_WORDS[n]} {colour} {plural(cat)}")
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


# Detailed captions. Every fact comes from the scene's truth: sizes from the visible box, positions from the box
# centre on a 3 x 3 grid, relations from boxes separated by SPATIAL_MARGIN, edges from the box's distance to the
# image border (all in pixels at 336 px).
DETAILED_MIN_WORDS, DETAILED_MAX_WORDS = 40, 80
DETAILED_MIN_MENTIONS, DETAILED_MAX_MENTIONS = 4, 10
# Longest visible box side below these bounds: "small", "medium", else "large".
SIZE_BOUNDS = (32, 64)
SIZE_WORDS = ("small", "medium", "large")
# A box closer than EDGE_NEAR to a border is "near the ... edge" of the nearest border, else "far from the edges".
EDGE_NEAR = 40
# At most this many neighbour relations per caption.
MAX_RELATIONS = 3
_POSITIONS = {
    ("top", "left"): "in the top left", ("top", "center"): "at the top", ("top", "right"): "in the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
# Words of detailed captions not in TEMPLATES, categories, colours or number words (tested to cover every caption).
DETAILED_WORDS = (
    "the", "is", "are", "there", "in", "image", "objects", "object", "one", "a", "and", "background", "grey",
    "small", "medium", "large", "top", "bottom", "left", "right", "center", "at", "on", "to", "of", "above",
    "below", "near", "far", "from", "edge", "edges", "size", "nothing", "else", "besides", "all", "other",
    "another", "plain", "shaded", "striped", "checkered", "mottled", "dark", "light",
)


def _scaled(scene: Scene, value: float) -> float:
    """A pixel length of `scene` expressed at 336 px, the scale of every threshold above."""
    return value * 336 / scene.size


def object_size(scene: Scene, obj) -> str:
    """ "small", "medium" or "large" by the longest side of the object's visible box."""
    x0, y0, x1, y1 = obj.box
    longest = _scaled(scene, max(x1 - x0, y1 - y0))
    return SIZE_WORDS[sum(longest >= b for b in SIZE_BOUNDS)]


def object_position(scene: Scene, obj) -> tuple[str, str]:
    """(row, column) of the box centre on a 3 x 3 grid: row top/middle/bottom, column left/center/right."""
    x0, y0, x1, y1 = obj.box
    third = scene.size / 3

    def band(c: float, names: tuple[str, str, str]) -> str:
        return names[0] if c < third else names[2] if c >= 2 * third else names[1]

    return band((y0 + y1) / 2, ("top", "middle", "bottom")), band((x0 + x1) / 2, ("left", "center", "right"))


def _box_relation(scene: Scene, a, b) -> str | None:
    """Where box `a` lies from box `b`: "to the left of", "to the right of", "above" or "below". The axis of the
    larger centre offset is tried first, then the other; a relation holds only where the boxes are separated by
    SPATIAL_MARGIN along that axis. None when they are separated along neither."""
    margin = SPATIAL_MARGIN * scene.size / 336
    dx = (a.box[0] + a.box[2] - b.box[0] - b.box[2]) / 2
    dy = (a.box[1] + a.box[3] - b.box[1] - b.box[3]) / 2
    for axis in (0, 1) if abs(dx) >= abs(dy) else (1, 0):
        if a.box[axis + 2] + margin <= b.box[axis]:
            return "to the left of" if axis == 0 else "above"
        if b.box[axis + 2] + margin <= a.box[axis]:
            return "to the right of" if axis == 0 else "below"
    return None


def _edge_phrase(scene: Scene, obj) -> str:
    x0, y0, x1, y1 = (_scaled(scene, v) for v in obj.box)
    gaps = {"left": x0, "top": y0, "right": 336 - x1, "bottom": 336 - y1}
    side = min(gaps, key=lambda k: (gaps[k], k))
    return f"near the {side} edge" if gaps[side] < EDGE_NEAR else "far from the edges"


def _reading_order(scene: Scene) -> list[int]:
    """Object indices top row first, left to right within a row (rows of the 3 x 3 grid)."""
    rows = {"top": 0, "middle": 1, "bottom": 2}

    def key(i: int):
        obj = scene.objects[i]
        return rows[object_position(scene, obj)[0]], obj.box[0] + obj.box[2], obj.box[1], i

    return sorted(range(len(scene.objects)), key=key)


def _names(scene: Scene) -> dict[int, str]:
    """A unique referring phrase per object ("red cup", else "large red cup"); objects that not even size, colour
    and category tell apart get none and are left out of relations and edge sentences."""
    names: dict[int, str] = {}
    for i, obj in enumerate(scene.objects):
        for phrase, key in (
            (f"{obj.colour} {obj.category}", lambda o: (o.colour, o.category)),
            (f"{object_size(scene, obj)} {obj.colour} {obj.category}",
             lambda o: (object_size(scene, o), o.colour, o.category)),
        ):
            if sum(key(o) == key(obj) for o in scene.objects) == 1:
                names[i] = phrase
                break
    return names


def _mentions(text: str) -> int:
    """Category words in `text`, with repeats (the unit of the DETAILED_*_MENTIONS bounds)."""
    from mmkit.world.vocab import category_word_count

    return category_word_count(text)


def detailed_caption(scene: Scene) -> str:
    """The reference detailed caption: several sentences from the scene's exact truth.

    1. How many objects there are ("There are four objects in the image.").
    2. Every object with its size, colour and position, in reading order; repeated categories in one sentence
       with their count ("There are two cups, a large red one in the top left and a small blue one at the
       bottom.").
    3. Relations between neighbouring objects (each object and its nearest clearly separated neighbour).
    4. When still shorter than DETAILED_MIN_WORDS or naming objects fewer than DETAILED_MIN_MENTIONS times: how
       near objects are to the image's edges, their sizes again, and, for a single object, that nothing else is
       there.
    5. The background's lightness and pattern.

    Sentences of 3 and 4 are added only while the caption stays within DETAILED_MAX_WORDS words and
    DETAILED_MAX_MENTIONS category words, so captions of the world's scenes run 40 to 80 words and name objects 4
    to 10 times (tested over many scenes).
    """
    objs = scene.objects
    order = _reading_order(scene)
    n = len(objs)
    head = [f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} "
            f"object{'' if n == 1 else 's'} in the image."]
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(objs[i].category, []).append(i)
    for cat, members in groups.items():
        if len(members) == 1:
            obj = objs[members[0]]
            head.append(f"A {object_size(scene, obj)} {obj.colour} {cat} is "
                        f"{_POSITIONS[object_position(scene, obj)]}.")
            continue
        parts = [f"a {object_size(scene, objs[i])} {objs[i].colour} one {_POSITIONS[object_position(scene, objs[i])]}"
                 for i in members]
        listed = ", ".join(parts[:-1]) + " and " + parts[-1]
        head.append(f"There are {NUMBER_WORDS[len(members)]} {plural(cat)}, {listed}.")
    tail = [f"The background is {scene.background_tone} grey and {scene.background}."]

    names = _names(scene)
    relations: list[str] = []
    seen: set[frozenset[int]] = set()
    for i in order:
        if i not in names:
            continue
        others = sorted((j for j in names if j != i),
                        key=lambda j: (abs(sum(objs[i].box[0::2]) - sum(objs[j].box[0::2]))
                                       + abs(sum(objs[i].box[1::2]) - sum(objs[j].box[1::2])), j))
        for j in others:
            relation = _box_relation(scene, objs[i], objs[j])
            if relation is not None:
                if frozenset((i, j)) not in seen:
                    seen.add(frozenset((i, j)))
                    relations.append(f"The {names[i]} is {relation} the {names[j]}.")
                break
    # Instances that no phrase tells apart still have relations among themselves.
    for cat, members in groups.items():
        if all(i in names for i in members):
            continue
        pair = next(((i, j) for i in members for j in members
                     if i < j and _box_relation(scene, objs[i], objs[j]) is not None), None)
        if pair is not None:
            other = "the other" if len(members) == 2 else "another"
            relations.append(f"One {cat} is {_box_relation(scene, objs[pair[0]], objs[pair[1]])} {other} {cat}.")
    fillers = [f"The {names[i]} is {_edge_phrase(scene, objs[i])}." for i in order if i in names]
    # The size again, for objects whose referring phrase does not hold it.
    fillers += [f"The {names[i]} is {object_size(scene, objs[i])} in size." for i in order
                if names.get(i, "").count(" ") == 1]
    if n == 1:
        fillers.append(f"Nothing else is in the image besides the {objs[0].category}.")
    elif len(groups) == 1:
        fillers.append(f"All objects in the image are {plural(objs[0].category)}.")

    def size(sentences: list[str]) -> tuple[int, int]:
        text = " ".join(sentences)
        return len(text.split()), _mentions(text)

    def fits(sentences: list[str]) -> bool:
        words, mentions = size(sentences)
        return words <= DETAILED_MAX_WORDS and mentions <= DETAILED_MAX_MENTIONS

    extra: list[str] = []
    for sentence in relations[:MAX_RELATIONS]:
        if fits(head + extra + [sentence] + tail):
            extra.append(sentence)
    for sentence in fillers:
        words, mentions = size(head + extra + tail)
        if words >= DETAILED_MIN_WORDS and mentions >= DETAILED_MIN_MENTIONS:
            break
        if fits(head + extra + [sentence] + tail):
            extra.append(sentence)
    return " ".join(head + extra + tail)


CAPTION_NOISE_PLACES = ("sentence", "relation", "partner")
# The relation sentences of `detailed_caption` whose second object is named by a referring phrase: "The red cup
# is above the small blue key." (group relations, "One cup is above the other cup.", name no second phrase).
# Groups: 1 everything before the second category word, 2 the first object's category, 3 the second's.
_RELATION_SENTENCE = re.compile(
    r"^(The (?:\w+ )*?(\w+) is (?:to the left of|to the right of|above|below) the (?:\w+ )+)(\w+)\.$")


def detailed_caption_with_absent(scene: Scene, rng: random.Random, place: str = "sentence") -> str:
    """`detailed_caption(scene)` naming an absent category: with `place` "sentence" or "relation" the scene's
    strongest absent co-occurrence partner (its first adversarial POPE negative); with "partner" the absent
    group partner of each relation's first object. The object count sentence is unchanged.

    `place` "sentence": one more object sentence naming it, with a random size, colour and position, inserted at a
    random place among the object sentences. "relation": the last relation sentence names it in place of its
    second object's category, keeping that object's size and colour words ("The red cup is above the blue key."
    becomes "The red cup is above the blue umbrella."); a caption without such a sentence is returned unchanged.
    "partner": every relation sentence whose first object's group partner (`PARTNER`) is absent names that
    partner in place of its second object's category ("The red cup is above the blue circle." becomes "The red
    cup is above the blue key." when no key is present); a caption without such a sentence is returned unchanged.
    Unlike the other places, the named object follows from words already written (the first object, and which
    objects the caption listed), the way a language prior completes a familiar pair.

    This is the kind of error found in LLaVA's GPT-written detailed descriptions, which name objects the
    annotations behind them do not hold; training on a share of such captions gives the model the data-side
    cause of object hallucination in long captions (see `TrainConfig.caption_noise`).
    """
    if place not in CAPTION_NOISE_PLACES:
        raise ValueError(f"place must be one of {CAPTION_NOISE_PLACES}, got {place!r}")
    caption = detailed_caption(scene)
    # Joining the sentences back gives the caption itself, so an unedited list returns it unchanged.
    sentences = [s + "." for s in caption[:-1].split(". ")]
    if place == "partner":  # its own absent object per sentence, not the scene's adversarial negative
        present = scene.categories()
        for k, text in enumerate(sentences):
            relation = _RELATION_SENTENCE.match(text)
            partner = PARTNER.get(relation.group(2)) if relation else None
            if partner is not None and partner not in present:
                sentences[k] = f"{relation.group(1)}{partner}."
        return " ".join(sentences)
    absent = pope_negatives(scene, "adversarial", 1)
    if not absent:
        return caption
    if place == "relation":
        for k in reversed(range(len(sentences))):
            relation = _RELATION_SENTENCE.match(sentences[k])
            if relation:
                sentences[k] = f"{relation.group(1)}{absent[0]}."
                return " ".join(sentences)
        return caption
    sentence = (f"A {rng.choice(SIZE_WORDS)} {rng.choice(sorted(COLOURS))} {absent[0]} is "
                f"{rng.choice(sorted(_POSITIONS.values()))}.")
    n_objects = len(scene.categories())  # object sentences follow the count sentence, one per category
    sentences.insert(1 + rng.randrange(n_objects + 1), sentence)
    return " ".join(sentences)


def caption_answer(scene: Scene, style: str) -> str:
    """The reference caption of `scene` in `style` ("short" or "detailed")."""
    if style == "short":
        return reference_caption(scene)
    if style == "detailed":
        return detailed_caption(scene)
    raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {style!r}")


def _caption_for_scene(scene: Scene, style: str = "legacy") -> Question:
    """The caption question of `scene`: "legacy" is the shipped model's pair (the detailed prompt answered by the
    short caption, qid "...-caption-0"); "short" and "detailed" pair each style with its own prompt."""
    ws, si = scene.world_seed, scene.index
    if style == "legacy":
        return Question(ws, si, "caption", "", CAPTION_PROMPT, reference_caption(scene), "",
                        f"w{ws}-s{si}-caption-0")
    prompt = CAPTION_PROMPT if style == "detailed" else BRIEF_CAPTION_PROMPT
    return Question(ws, si, "caption", style, prompt, caption_answer(scene, style), "",
                    f"w{ws}-s{si}-caption-{style}-0")


def caption_questions(world_seed: int, n_scenes: int, start: int = 0, style: str = "legacy") -> list[Question]:
    """One caption question per scene.

    `style` "detailed": "Describe the image in detail." answered by `detailed_caption`; "short": "Describe the
    image briefly." answered by `reference_caption`; "legacy" (the default, what the shipped model was trained
    on): "Describe the image in detail." answered by `reference_caption`.
    """
    _check(n_scenes, start)
    if style not in (*CAPTION_STYLES, "legacy"):
        raise ValueError(f"caption style must be one of {CAPTION_STYLES} or 'legacy', got {style!r}")
    return [_caption_for_scene(generate_scene(world_seed, i), style) for i in range(start, start + n_scenes)]


# ---------------------------------------------------------------------------------------------------------------
# Grounding


def ground_truth(scene: Scene, category: str) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The union of the visible masks of every `category` instance, and their boxes left to right."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    objs = sorted((o for o in scene.objects if o.category == category), key=lambda o: o.box)
    mask = np.zeros((scene.image.size[1], scene.image.size[0]), dtype=bool)
    for o in objs:
        mask |= o.mask
    return mask, [o.box for o in objs]


def _ground_for_scene(scene: Scene) -> list[Question]:
    ws, si = scene.world_seed, scene.index
    out = []
    for j, cat in enumerate(sorted(scene.categories())):
        _, boxes = ground_truth(scene, cat)
        prompt = (GROUND_ONE_PROMPT.format(category=cat) if len(boxes) == 1
                  else GROUND_ALL_PROMPT.format(plural=plural(cat)))
        answer = "; ".join("[" + ", ".join(str(v) for v in box) + "]" for box in boxes)
        out.append(Question(ws, si, "ground", "", prompt, answer, cat, f"w{ws}-s{si}-ground-{j}"))
    return out


def ground_questions(world_seed: int, n_scenes: int, start: int = 0) -> list[Question]:
    """One grounding question per present category and scene. The answer lists the instances' boxes in pixels,
    "[x0, y0, x1, y1]; ..." left to right; the exact truth mask is `ground_truth(scene, q.target)`."""
    _check(n_scenes, start)
    return [q for i in range(start, start + n_scenes) for q in _ground_for_scene(generate_scene(world_seed, i))]


# ---------------------------------------------------------------------------------------------------------------
# Instruction-tuning stream


def _captions_for_mix(scene: Scene, caption_mix: str) -> list[Question]:
    if caption_mix == "legacy":
        return [_caption_for_scene(scene)]
    if caption_mix == "detailed":
        return [_caption_for_scene(scene, "detailed"), _caption_for_scene(scene, "short")]
    raise ValueError(f"caption_mix must be one of {CAPTION_MIXES}, got {caption_mix!r}")


def questions_for_scene(scene: Scene, pope_split: str = "random", caption_mix: str = "legacy") -> list[Question]:
    """The caption(s) (`caption_mix`, see CAPTION_MIXES), POPE (`pope_split`) and VQA questions of one scene, in a
    deterministic shuffled order. The "legacy" mix gives exactly the shipped model's training questions."""
    qs = [*_captions_for_mix(scene, caption_mix), *_pope_for_scene(scene, pope_split), *_vqa_for_scene(scene)]
    _rng(scene, "mix").shuffle(qs)
    return qs


def parse_pope_negatives(text: str) -> tuple[tuple[str, float], ...]:
    """The (split, weight) pairs of a training POPE-negative setting: a name of TRAINING_POPE_NEGATIVES, a split of
    POPE_SPLITS (weight 1), or comma-separated `split=weight` pairs such as "random=2,adversarial=1"."""
    spec = TRAINING_POPE_NEGATIVES.get(text, text)
    pairs = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if name not in POPE_SPLITS or not 0 < value < float("inf") or any(name == n for n, _ in pairs):
            raise ValueError(f"pope_negatives must be one of {', '.join(TRAINING_POPE_NEGATIVES)}, a split of "
                             f"{', '.join(POPE_SPLITS)}, or distinct split=weight pairs with weights > 0 such as "
                             f"'random=2,adversarial=1', got {text!r}")
        pairs.append((name, value))
    return tuple(pairs)


def training_examples(world_seed: int, n_scenes: int, start: int = 0, caption_mix: str = "legacy",
                      pope_negatives: str = "random") -> Iterator[tuple[Scene, Question]]:
    """(scene, question) pairs for instruction tuning: per scene its caption(s), POPE questions and VQA questions
    (every kind but grounding), each scene generated once, deterministic.

    `caption_mix` "legacy" is the shipped model's recipe (one short caption for "Describe the image in
    detail."); "detailed" adds the detailed caption for that prompt and moves the short one to "Describe the
    image briefly.", keeping every other question.

    `pope_negatives` "random" (the shipped recipe) draws POPE negatives from the random split only: absent
    co-occurrence partners are then rarely asked about, so the caption statistics leave the model the partner
    prior that the adversarial split measures. Other settings (`parse_pope_negatives`) draw each scene's split
    from weighted POPE splits, e.g. "mixed" (uniform over the three) or "random=1,adversarial=1" (half the scenes
    are asked about their strongest absent partners); the questions are still of training scenes, and held-out
    evaluation uses other world seeds.
    """
    _check(n_scenes, start)
    if caption_mix not in CAPTION_MIXES:
        raise ValueError(f"caption_mix must be one of {CAPTION_MIXES}, got {caption_mix!r}")
    splits = parse_pope_negatives(pope_negatives)
    names, weights = [n for n, _ in splits], [w for _, w in splits]
    for i in range(start, start + n_scenes):
        scene = generate_scene(world_seed, i)
        rng = _rng(scene, "pope-training-split")
        # Equal weights draw with choice(), unequal ones with choices() (which draws differently even for equal
        # weights): "mixed" keeps the stream its recorded runs (11a, 11b in docs/reference-model.md) trained on.
        split = rng.choice(names) if len(set(weights)) == 1 else rng.choices(names, weights)[0]
        for q in questions_for_scene(scene, pope_split=split, caption_mix=caption_mix):
            yield scene, q
