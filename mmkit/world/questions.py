"""Question sets over reference-world scenes: POPE existence, attribute / counting / spatial VQA, detailed
captions and grounding, plus the mixed stream used for instruction tuning.

Prompts are plain user text (the chat template is applied by the caller). Every question is a pure function of
(world_seed, scene index, kind), with a stable `qid`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mmkit.world.scenes import CATEGORIES, Scene, category_frequencies, cooccurrence, generate_scene
from mmkit.world.vocab import NUMBER_WORDS, plural

KINDS = ("pope", "color", "count", "spatial", "caption", "ground")
POPE_SPLITS = ("random", "popular", "adversarial")
# At most this many positive (and as many negative) POPE questions per scene.
POPE_PER_SCENE = 3

POPE_PROMPT = "Is there {article} {category} in the image? Answer yes or no."
COLOR_PROMPT = "What color is the {category}?"
COUNT_PROMPT = "How many {plural} are there?"
COUNT_ALL_PROMPT = "How many objects are there?"
LEFT_PROMPT = "Is the {a} to the left of the {b}?"
ABOVE_PROMPT = "Is the {a} above the {b}?"
CAPTION_PROMPT = "Describe the image in detail."
GROUND_ONE_PROMPT = "Where is the {category}?"
GROUND_ALL_PROMPT = "Where are the {plural}?"
TEMPLATES = (
    POPE_PROMPT, COLOR_PROMPT, COUNT_PROMPT, COUNT_ALL_PROMPT, LEFT_PROMPT, ABOVE_PROMPT, CAPTION_PROMPT,
    GROUND_ONE_PROMPT, GROUND_ALL_PROMPT,
)
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


def _caption_for_scene(scene: Scene) -> Question:
    ws, si = scene.world_seed, scene.index
    return Question(ws, si, "caption", "", CAPTION_PROMPT, reference_caption(scene), "", f"w{ws}-s{si}-caption-0")


def caption_questions(world_seed: int, n_scenes: int, start: int = 0) -> list[Question]:
    """One "Describe the image in detail." question per scene; the answer is `reference_caption`."""
    _check(n_scenes, start)
    return [_caption_for_scene(generate_scene(world_seed, i)) for i in range(start, start + n_scenes)]


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


def questions_for_scene(scene: Scene, pope_split: str = "random") -> list[Question]:
    """The caption, POPE (`pope_split`) and VQA questions of one scene, in a deterministic shuffled order."""
    qs = [_caption_for_scene(scene), *_pope_for_scene(scene, pope_split), *_vqa_for_scene(scene)]
    _rng(scene, "mix").shuffle(qs)
    return qs


def training_examples(world_seed: int, n_scenes: int, start: int = 0) -> Iterator[tuple[Scene, Question]]:
    """(scene, question) pairs for instruction tuning: per scene its caption, POPE questions and VQA questions
    (every kind but grounding), each scene generated once, deterministic.

    POPE negatives here use the random split only: absent co-occurrence partners are then rarely asked about,
    so the caption statistics leave the model the partner prior that the adversarial split measures.
    """
    _check(n_scenes, start)
    for i in range(start, start + n_scenes):
        scene = generate_scene(world_seed, i)
        for q in questions_for_scene(scene):
            yield scene, q
