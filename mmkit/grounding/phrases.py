"""Object phrases in an LVLM's free-text answer: the open-vocabulary object list of VL-SAM.

VL-SAM asks the LVLM to list the objects and grounds every noun it names. Without a tagger, the phrases are found
with a small rule-based chunker that covers how LLaVA-class models list objects:

* a phrase starts at an article, a count or a quantifier ("a", "the", "two", "3", "several", ...), at a list
  continuation (after a comma or "and"/"or" that follows a phrase: "a cup, a key and three stars"; "cups and keys"),
  after "of" that follows a quantity noun ("a group of people"), or after "there is/are" and "with" ("with plates");
* it runs over the following content words (at most MAX_PHRASE_WORDS) until punctuation, a function word or a
  participle after the noun ("a car parked ..."); its last word is the head noun, the words before it are kept as
  attributes (colours, sizes: "a large red cup" -> label "cup", attributes ("large", "red"));
* the label is the singular head noun ("cups" -> "cup", "people" -> "person"); heads that name the picture or a
  place in it ("image", "background", "left", "corner") and adjectives left without a noun ("the car is red") are
  not objects.

`vocabulary` (see `filter_to_world`) may restrict the labels to the reference world's categories; that is only
meaningful for the reference model, whose answers use those words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PHRASE_WORDS = 4

ARTICLES = frozenset({"a", "an", "the", "this", "that", "these", "those", "its", "their", "his", "her", "our",
                      "my", "your"})
QUANTIFIERS = frozenset({"some", "several", "many", "few", "multiple", "various", "numerous", "both", "each",
                         "every", "another", "other", "more", "most", "all", "no", "any", "single", "couple",
                         "pair", "lots", "plenty"})
COUNTS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                      "ten", "eleven", "twelve"))}
# Words that end a phrase: prepositions, conjunctions, pronouns, auxiliaries, common verbs of descriptions.
FUNCTION_WORDS = frozenset("""
about above across after against along among around as at before behind below beneath beside besides between
beyond by down during except for from in inside into like near next off on onto out outside over past since
through throughout to toward towards under underneath until up upon via with within without of than
and or but nor so yet if while because although though whereas then also too very quite rather just only even
not there here where when which who whom whose what why how it they them he she we you i me us him itself
is are was were be been being am has have had having do does did can could will would shall should may might must
appears appear seems seem shows show showing shown features feature featuring depicts depict depicting displays
display displaying contains contain containing includes include including sits sit sitting stands stand standing
lies lie lying placed located positioned situated seen visible present holds hold holding looks look looking
creates create creating adds add adding gives give giving makes make making set
""".split())
# Heads that are not objects: the picture itself, places and directions in it, abstract or quantity nouns.
NON_OBJECT_HEADS = frozenset("""
image picture photo photograph scene view shot frame scenery setting
background foreground left right top bottom center centre middle side sides corner corners edge edges front back
area part parts portion half region space spot position place area
number variety group set lot lots bunch couple pair kind kinds type types sort range collection total
color colour colors colours shape shapes size sizes object objects item items thing things element elements
atmosphere mood sense feeling appearance composition arrangement pattern texture style design detail details
overall one ones nothing something anything everything else rest
""".split())
# Heads that introduce the real noun with "of" ("a group of people", "a pair of shoes").
QUANTITY_NOUNS = frozenset({"group", "groups", "pair", "pairs", "couple", "bunch", "set", "sets", "lot", "lots",
                            "number", "variety", "pile", "stack", "row", "rows", "collection", "plate", "bowl",
                            "cup", "glass", "box", "bottle", "piece", "pieces", "slice", "slices", "kind", "kinds",
                            "type", "types", "herd", "flock", "crowd", "team", "line"})
COLOURS = frozenset("""
red orange yellow green blue purple violet pink brown black white grey gray cyan magenta teal navy beige tan gold
golden silver maroon olive turquoise lime indigo
""".split())
# Words that describe but never head a phrase ("the car is red", "a small one").
ADJECTIVES = COLOURS | frozenset("""
small large big little tiny huge giant medium tall short long wide narrow thin thick round square-shaped dark light
bright pale colorful colourful plain striped checkered shaded mottled wooden metal metallic old new young open closed
empty full clear white-colored single main other same different several various visible
""".split())
IRREGULAR_SINGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
                      "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "leaves": "leaf",
                      "shelves": "shelf", "wolves": "wolf", "loaves": "loaf", "halves": "half", "lives": "life",
                      "wives": "wife", "sheep": "sheep", "fish": "fish", "fishes": "fish", "deer": "deer",
                      "glasses": "glasses", "scissors": "scissors", "pants": "pants", "jeans": "jeans",
                      "shorts": "shorts", "dice": "die", "oxen": "ox", "cacti": "cactus",
                      "potatoes": "potato", "tomatoes": "tomato", "mangoes": "mango", "heroes": "hero"}
# Singular words ending in "s" that must not lose it.
S_SINGULARS = frozenset({"bus", "gas", "glass", "grass", "dress", "cross", "class", "boss", "lens", "bus", "cactus",
                         "octopus", "circus", "virus", "iris", "canvas", "chess", "mattress", "compass", "harness",
                         "walrus", "asparagus", "hippopotamus", "tennis", "species", "series", "news", "bus"})

_TOKEN = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+|[,.;:!?()]")


@dataclass(frozen=True)
class ObjectPhrase:
    """One object phrase of an answer: label (singular head noun), the head word as written, its attributes
    (the words before it), how many objects it names, and the head word's character span in the text."""

    label: str
    head: str
    attributes: tuple[str, ...]
    count: int
    span: tuple[int, int]


def singular(word: str) -> str:
    """The singular of an English noun by rule ("cups" -> "cup", "boxes" -> "box", "berries" -> "berry")."""
    w = word.lower()
    if w in IRREGULAR_SINGULAR:
        return IRREGULAR_SINGULAR[w]
    if w in S_SINGULARS or len(w) <= 3 or not w.endswith("s") or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "xes", "sses", "zes")):
        return w[:-2]
    return w[:-1]


def _participle(word: str) -> bool:
    return len(word) > 4 and (word.endswith("ed") or word.endswith("ing"))


def object_phrases(text: str) -> list[ObjectPhrase]:
    """Every object phrase of `text`, in order (see the module docstring for the rules)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    tokens = [(m.group(0), m.start(), m.end()) for m in _TOKEN.finditer(text)]
    found: list[ObjectPhrase] = []
    i, n = 0, len(tokens)
    can_continue = False  # a comma / "and" right after a phrase starts another one (a list)
    starter_next = False  # the previous word opens a phrase without an article ("there are", "with", "of")
    while i < n:
        word = tokens[i][0].lower()
        start_here = starter_next
        starter_next = False
        count = 1
        j = i
        if word in ARTICLES or word in QUANTIFIERS or word in COUNTS or word.isdigit():
            start_here = True
            # Skip a run of openers: "all the", "the two", "a couple of".
            while j < n and (tokens[j][0].lower() in ARTICLES | QUANTIFIERS or tokens[j][0].lower() in COUNTS
                             or tokens[j][0].isdigit() or (tokens[j][0].lower() == "of" and j > i)):
                w = tokens[j][0].lower()
                if w in COUNTS:
                    count = max(1, COUNTS[w])
                elif w.isdigit():
                    count = max(1, int(w))
                elif w in ("several", "many", "multiple", "various", "numerous", "some", "few", "couple", "pair",
                           "both", "lots", "plenty"):
                    count = max(count, 2)
                j += 1
        elif word in (",", "and", "or") and can_continue:
            i += 1
            starter_next = True
            continue
        elif word in (":", "are", "is", "with", "including", "includes", "features", "shows", "contains"):
            starter_next = True
            can_continue = False
            i += 1
            continue
        if not start_here:
            can_continue = word in (",",) and can_continue
            i += 1
            continue
        words: list[tuple[str, int, int]] = []
        while j < n and len(words) < MAX_PHRASE_WORDS:
            tok, s, e = tokens[j]
            low = tok.lower()
            if not tok[0].isalpha() or low in FUNCTION_WORDS or low in ARTICLES:
                break
            if words and _participle(low) and words[-1][0].lower() not in ADJECTIVES:
                break  # "a car parked": the noun came first
            words.append((tok, s, e))
            j += 1
        # Drop trailing adjectives ("the car is red" has none; "a red one" ends at "one").
        while words and words[-1][0].lower() in ADJECTIVES:
            words.pop()
        if words:
            head, s, e = words[-1]
            low = head.lower()
            if j < n and tokens[j][0].lower() == "of" and low in QUANTITY_NOUNS:
                # "a group of people": the object is after "of"; the quantity noun is not one.
                can_continue = False
                starter_next = True
                i = j + 1
                continue
            if low in NON_OBJECT_HEADS or (_participle(low) and low.endswith("ed")):
                can_continue = False
            else:
                label = singular(low)
                if label != low and count == 1 and low not in IRREGULAR_SINGULAR.values():
                    count = 2  # a bare plural ("there are cups") names several
                found.append(ObjectPhrase(label, head, tuple(w.lower() for w, _, _ in words[:-1]), count,
                                          (s, e)))
                can_continue = True
        else:
            can_continue = False
        i = max(j, i + 1)
    return found


def answer_objects(text: str, vocabulary: str = "open") -> list[ObjectPhrase]:
    """Object phrases of an answer; vocabulary "world" keeps only reference-world categories (labels become the
    category: "mug" -> "cup"), "open" keeps every phrase."""
    phrases = object_phrases(text)
    if vocabulary == "open":
        return phrases
    if vocabulary == "world":
        return filter_to_world(phrases)
    raise ValueError(f"vocabulary must be 'open' or 'world', got {vocabulary!r}")


def filter_to_world(phrases: list[ObjectPhrase]) -> list[ObjectPhrase]:
    """The phrases whose head is a reference-world category word, relabelled with the category."""
    from mmkit.world.vocab import mentioned_categories

    out = []
    for p in phrases:
        cats = mentioned_categories(p.head)
        if cats:
            out.append(ObjectPhrase(cats[0], p.head, p.attributes, p.count, p.span))
    return out
