"""Object mentions in free text for CHAIR: the 80 COCO categories with a synonym and plural table, a small
rule-based lemmatiser, and longest-phrase matching. No NLTK, no downloads.

The table is mmkit's own (see docs/real-benchmarks.md for its provenance): for every COCO category, the words
and short phrases an English caption commonly uses for it. A word with a common other meaning is left out when
the other meaning would often produce false mentions ("glass", "bat", "board"); "orange" the fruit and "orange"
the colour are told apart by the word that follows.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

# The 80 COCO object categories, in the order of COCO's category ids.
COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# Other singular words and phrases for each category (the category name itself is always included).
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "teenager", "teen", "adult",
               "people", "guy", "lady", "gentleman", "player", "skier", "surfer", "skateboarder", "snowboarder",
               "rider", "biker", "cyclist", "driver", "pedestrian", "passenger", "tourist", "spectator", "worker",
               "chef", "cook", "officer", "policeman", "soldier", "batter", "catcher", "umpire",
               "athlete", "student", "teacher", "customer", "vendor", "mother", "father", "daughter", "son",
               "friend", "businessman", "cowboy", "farmer"),
    "bicycle": ("bike", "tricycle"),
    "car": ("automobile", "sedan", "taxi", "cab", "suv", "jeep", "van", "minivan"),
    "motorcycle": ("motorbike", "motor bike", "scooter", "moped", "dirt bike"),
    "airplane": ("plane", "aeroplane", "airliner", "jet", "aircraft", "jetliner"),
    "bus": ("autobus", "coach bus", "school bus", "double decker"),
    "train": ("locomotive", "tram", "streetcar", "subway train", "railcar"),
    "truck": ("lorry", "pickup truck", "pickup", "fire truck", "firetruck", "semi truck", "dump truck"),
    "boat": ("ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "rowboat", "motorboat", "speedboat",
             "vessel", "raft"),
    "traffic light": ("traffic signal", "stoplight", "stop light", "street light signal"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": ("meter",),
    "bench": ("park bench",),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "sparrow", "owl", "eagle", "hawk",
             "crow", "pelican", "flamingo", "heron", "finch", "robin"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup", "doggy", "terrier", "poodle", "bulldog", "labrador", "retriever", "sheepdog"),
    "horse": ("pony", "foal", "colt", "stallion", "mare"),
    "sheep": ("lamb", "ram", "ewe"),
    "cow": ("cattle", "bull", "calf", "ox", "heifer"),
    "elephant": (),
    "bear": ("grizzly", "polar bear", "brown bear", "black bear"),
    "zebra": (),
    "giraffe": (),
    "backpack": ("back pack", "rucksack", "knapsack"),
    "umbrella": ("parasol",),
    "handbag": ("hand bag", "purse", "pocketbook"),
    "tie": ("necktie", "bow tie", "bowtie"),
    "suitcase": ("suit case", "luggage", "baggage"),
    "frisbee": ("flying disc",),
    "skis": ("ski",),
    "snowboard": ("snow board",),
    # Not "baseball", "football", ... alone: "a baseball player" mentions no ball.
    "sports ball": ("ball", "soccer ball", "tennis ball", "volley ball"),
    "kite": (),
    "baseball bat": ("softball bat",),
    "baseball glove": ("baseball mitt", "mitt", "catcher's mitt", "glove"),
    "skateboard": ("skate board",),
    "surfboard": ("surf board",),
    "tennis racket": ("racket", "racquet", "tennis racquet"),
    "bottle": (),
    "wine glass": ("wineglass",),
    "cup": ("mug", "teacup", "coffee cup"),
    "fork": (),
    "knife": (),
    "spoon": (),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "hamburger", "panini"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog",),
    "pizza": (),
    "donut": ("doughnut",),
    "cake": ("cupcake", "cheesecake"),
    "chair": ("armchair", "stool", "highchair"),
    "couch": ("sofa", "loveseat"),
    "potted plant": ("plant", "houseplant", "house plant", "flowerpot", "flower pot"),
    "bed": (),
    "dining table": ("table", "desk", "kitchen table", "coffee table"),
    "toilet": ("urinal",),
    "tv": ("television", "monitor", "flat screen", "flatscreen"),
    "laptop": ("laptop computer", "notebook computer", "computer"),
    "mouse": ("computer mouse",),
    "remote": ("remote control", "controller"),
    "keyboard": (),
    "cell phone": ("phone", "cellphone", "mobile phone", "smartphone", "iphone"),
    "microwave": ("microwave oven",),
    "oven": ("stove",),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge",),
    "book": ("novel", "textbook"),
    "clock": (),
    "vase": (),
    "scissors": ("scissor",),
    "teddy bear": ("teddy", "teddybear", "stuffed bear"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer", "blowdryer"),
    "toothbrush": ("tooth brush",),
}

# Plurals the suffix rules of `_lemma_candidates` cannot undo.
IRREGULAR_PLURALS: dict[str, str] = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "persons": "person",
    "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "calves": "calf",
    "wolves": "wolf", "oxen": "ox", "buses": "bus", "busses": "bus", "teddies": "teddy", "ponies": "pony",
    "puppies": "puppy", "kitties": "kitty", "taxis": "taxi", "gentlemen": "gentleman",
    "businessmen": "businessman", "policemen": "policeman", "doggies": "doggy", "hotdogs": "hotdog",
}
# Words after "orange" that make it a colour (an orange shirt) rather than the fruit: any word not in this list.
_FRUIT_FOLLOWERS = frozenset({"and", "or", "with", "on", "in", "next", "near", "beside", "is", "are", "sitting",
                              "lying", "slice", "slices", "half", "halves", "wedge", "wedges", "peel", "juice",
                              "tree", "trees", "of", "to", "at", "by"})
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[^\sa-z]")
_MAX_PHRASE = 3


def _lemma_candidates(word: str) -> list[str]:
    """Singular forms a plural `word` may have, most specific first (the word itself is tried by the caller)."""
    out = []
    if word in IRREGULAR_PLURALS:
        out.append(IRREGULAR_PLURALS[word])
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("ves"):
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


class ObjectVocabulary:
    """Maps free text to object categories through a phrase table.

    Args:
        table: category -> words and phrases (singular) that name it; the category name itself should be listed.
            A phrase is matched on lemmatised words, so plurals ("teddy bears", "knives", "buses") match too.
        colour_words: categories that are also colour words: counted only when plural or followed by
            punctuation, the end of the text or a word of `_FRUIT_FOLLOWERS` ("an orange and a banana").
    """

    def __init__(self, table: dict[str, Iterable[str]], colour_words: Iterable[str] = ()):
        self.categories = tuple(table)
        self.colour_words = frozenset(colour_words)
        self._phrases: dict[tuple[str, ...], str] = {}
        for category, phrases in table.items():
            for phrase in (category, *phrases):
                words = tuple(phrase.lower().split())
                owner = self._phrases.setdefault(words, category)
                if owner != category:
                    raise ValueError(f"phrase {phrase!r} names both {owner!r} and {category!r}")
        self._known = frozenset(w for words in self._phrases for w in words)

    def lemma(self, word: str) -> str:
        """`word` itself when the table knows it, else the first singular candidate the table knows, else `word`."""
        if word in self._known:
            return word
        return next((c for c in _lemma_candidates(word) if c in self._known), word)

    def mentions(self, text: str) -> list[str]:
        """Categories `text` mentions, each once, in order of first mention; the longest phrase wins ("hot dog" is
        a hot dog, not a dog; "teddy bears" are teddy bears)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        tokens = _TOKEN.findall(text.lower().replace("\u2019", "'"))
        lemmas = [self.lemma(t) for t in tokens]
        found: list[str] = []
        i = 0
        while i < len(tokens):
            for size in range(min(_MAX_PHRASE, len(tokens) - i), 0, -1):
                category = self._phrases.get(tuple(lemmas[i:i + size]))
                if category is None:
                    continue
                if category in self.colour_words and size == 1 and tokens[i] == lemmas[i]:
                    following = tokens[i + 1] if i + 1 < len(tokens) else "."
                    if following[0].isalpha() and following not in _FRUIT_FOLLOWERS:
                        continue  # "an orange shirt": the colour
                if category not in found:
                    found.append(category)
                i += size - 1
                break
            i += 1
        return found


@functools.lru_cache(maxsize=1)
def coco_vocabulary() -> ObjectVocabulary:
    """The 80 COCO categories with mmkit's synonym table."""
    return ObjectVocabulary({c: COCO_SYNONYMS[c] for c in COCO_CATEGORIES}, colour_words=("orange",))


class _WorldVocabulary:
    """The reference world's own mention rules (`mmkit.world.vocab.mentioned_categories`), with the same interface."""

    def __init__(self):
        from mmkit.world.scenes import CATEGORIES

        self.categories = CATEGORIES

    def mentions(self, text: str) -> list[str]:
        from mmkit.world.vocab import mentioned_categories

        return list(dict.fromkeys(mentioned_categories(text)))


def vocabulary_for(categories: Iterable[str], reference_world: bool = False):
    """The vocabulary for a dataset's category names: the reference world's mention rules for an exported world,
    else the COCO table for the 80 COCO categories; for other category sets, each name (matched as written, with
    plurals) with its COCO words when it is a COCO category."""
    if reference_world:
        return _WorldVocabulary()
    names = list(dict.fromkeys(n.lower() for n in categories))
    if set(names) == set(COCO_CATEGORIES):
        return coco_vocabulary()
    # Only the dataset's categories can be true, so only they are looked for (with the COCO words where known).
    return ObjectVocabulary({n: COCO_SYNONYMS.get(n, ()) for n in names},
                            colour_words=("orange",) if "orange" in names else ())
