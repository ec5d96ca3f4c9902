"""VL-SAM: open-ended grounding from an LVLM's attention, with Segment Anything turning maps into masks.

Pipeline per batch of images (each step batched over images, views, questions and objects):
1. Object words: the LVLM describes each view ("Describe the image in detail."; several questions form an
   ensemble) and its own object list is parsed (`phrases`: head nouns, any words), or a given query is grounded
   ("Where is the {x}?").
2. Maps: one forward over prompt + answer captures the attention rows of the text after the image at every layer
   and head (`attention_maps.capture_rows`); `flow.object_maps` weights heads (MeanMax), regularises columns and
   rolls the attention out into a grid map per object.
3. Prompts: the thresholded map's largest region gives positive points at its maxima and negative ones at the
   minima outside (`prompts.prompts_from_map`); counted mentions ("two cups") prompt several regions.
4. SAM: every image is embedded once; all prompts are decoded in one call per round. Refinement feeds the mask
   back as a mask prompt, then restricts the map to the mask and resamples the points.
5. Multi-scale views (the full image plus four corner crops) and the question ensemble vote. Merge: a mask keeps
   the piece its prompt points at; a crop's label holds only for masks inside that crop; overlapping detections
   of different labels are one object with the label of most summed score; then per-label NMS.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from mmkit.errors import MmkitError

logger = logging.getLogger(__name__)

DESCRIBE_PROMPT = "Describe the image in detail."
QUERY_PROMPT = "Where is the {category}?"


@dataclass
class VLSAMConfig:
    """Settings of the VL-SAM grounding pipeline."""

    describe_prompts: tuple[str, ...] = field(default=(DESCRIBE_PROMPT,), metadata={
        "help": "Questions that make the LVLM list the objects; several form VL-SAM's question ensemble."})
    query_prompt: str = field(default=QUERY_PROMPT, metadata={
        "help": "Prompt for a given query; must contain {category}, whose mention token is mapped."})
    query_route: Literal["describe_first", "prompt"] = field(default="describe_first", metadata={
        "help": "For a query: map its mention in the LVLM's own description when there is one, falling back to "
                "the query prompt (describe_first), or always use the query prompt (prompt)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Answer length for the object-listing questions."})
    token: Literal["mention", "previous"] = field(default="mention", metadata={
        "help": "Row mapped per object: the mention token itself (VL-SAM) or the position that predicted it."})
    layers: tuple[int, ...] = field(default=(), metadata={
        "help": "Decoder layers whose attention enters the flow (empty: all layers, as VL-SAM; negative ok)."})
    rollout: Literal["text", "full"] = field(default="text", metadata={
        "help": "Attention flow: the rows of the text after the image with image tokens as sources (text; no "
                "N x N matrix) or the paper's full rollout over every token's row, image tokens included (full; "
                "captures an L x L matrix per layer and head)."})
    tile_map: Literal["mean", "high", "base"] = field(default="mean", metadata={
        "help": "Anyres models (LLaVA-NeXT, OneVision): which token grids form the map: the base tile and the "
                "high-resolution tiles, each as a distribution over the image, averaged (mean), or one of them."})
    head_weighting: bool = field(default=True, metadata={"help": "MeanMax head weights (else a plain mean)."})
    column_reg: bool = field(default=True, metadata={"help": "Column regularisation against causal collapse."})
    residual: float = field(default=0.5, metadata={"help": "Identity weight of the rollout: A = (1-r) S + r I."})
    upsample: int = field(default=4, metadata={"help": "Bilinear upsampling of the token-grid map before prompts."})
    threshold: float = field(default=0.5, metadata={"help": "Region threshold on the [0, 1]-normalised map."})
    point_at: Literal["max", "centroid"] = field(default="max", metadata={
        "help": "First positive point: the region's maximum (VL-SAM) or its attention-weighted centroid."})
    num_positive: int = field(default=1, metadata={"help": "Positive points per region (at the maxima)."})
    num_negative: int = field(default=1, metadata={"help": "Negative points per prompt (at the minima outside)."})
    max_instances: int = field(default=3, metadata={"help": "Most regions prompted for a counted mention."})
    refine_steps: int = field(default=2, metadata={
        "help": "0: points only; 1: + the mask fed back as a mask prompt; 2: + points resampled inside the mask."})
    multi_scale: bool = field(default=False, metadata={"help": "Also map the four half-size corner crops."})
    crop_fraction: float = field(default=0.5, metadata={"help": "Side of the corner crops, as a fraction."})
    sam_view: Literal["found", "full"] = field(default="found", metadata={
        "help": "multi_scale: which view's SAM embedding decodes a prompt. found: the view whose map found it, as "
                "the paper runs SAM per sub-image (a crop gives small objects twice the resolution; a crop's "
                "mask cut by the crop's inner edge is replaced by the full image's); full: every prompt on the "
                "full image."})
    vocabulary: Literal["open", "world"] = field(default="open", metadata={
        "help": "Object labels of a description: every object phrase the LVLM lists, labelled by its head noun "
                "(open), or only the reference world's 20 categories (world; for the reference model)."})
    nms_iou: float = field(default=0.5, metadata={"help": "Box IoU above which a same-label detection is dropped."})
    nms_across_labels: bool = field(default=True, metadata={
        "help": "One label per object: detections whose masks overlap (IoU above nms_iou) are one object, "
                "labelled by the label with the largest summed score; else NMS only within a label."})
    label_merge_iou: float = field(default=0.5, metadata={
        "help": "Mask IoU above which detections of different labels are one object (with nms_across_labels)."})
    split_components: bool = field(default=True, metadata={
        "help": "When a mask falls apart into pieces, keep the piece holding the first positive point, so a "
                "box never spans two objects."})
    view_containment: float = field(default=0.9, metadata={
        "help": "A detection labelled from a crop's answer is kept only when this share of its mask lies "
                "inside the crop (0: keep all)."})
    min_score: float = field(default=0.0, metadata={"help": "Detections scoring below this are dropped."})
    batch_size: int = field(default=8, metadata={"help": "LVLM rows (views x questions) per forward."})

    def __post_init__(self) -> None:
        if isinstance(self.describe_prompts, str):
            self.describe_prompts = (self.describe_prompts,)
        self.describe_prompts = tuple(self.describe_prompts)
        self.layers = (self.layers,) if isinstance(self.layers, int) else tuple(int(v) for v in self.layers)
        if not self.describe_prompts or not all(isinstance(p, str) and p.strip() for p in self.describe_prompts):
            raise ValueError("describe_prompts must be one or more non-empty questions")
        if "{category}" not in self.query_prompt:
            raise ValueError(f"query_prompt must contain {{category}}, got {self.query_prompt!r}")
        if self.point_at not in ("max", "centroid"):
            raise ValueError(f"point_at must be 'max' or 'centroid', got {self.point_at!r}")
        if self.query_route not in ("describe_first", "prompt"):
            raise ValueError(f"query_route must be 'describe_first' or 'prompt', got {self.query_route!r}")
        if self.sam_view not in ("found", "full"):
            raise ValueError(f"sam_view must be 'found' or 'full', got {self.sam_view!r}")
        if self.vocabulary not in ("open", "world"):
            raise ValueError(f"vocabulary must be 'open' or 'world', got {self.vocabulary!r}")
        if self.rollout not in ("text", "full"):
            raise ValueError(f"rollout must be 'text' or 'full', got {self.rollout!r}")
        if self.tile_map not in ("mean", "high", "base"):
            raise ValueError(f"tile_map must be 'mean', 'high' or 'base', got {self.tile_map!r}")
        if self.token not in ("mention", "previous"):
            raise ValueError(f"token must be 'mention' or 'previous', got {self.token!r}")
        for name, lo in (("max_new_tokens", 1), ("upsample", 1), ("num_positive", 1), ("num_negative", 0),
                         ("max_instances", 1), ("refine_steps", 0), ("batch_size", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {getattr(self, name)!r}")
        if self.refine_steps > 2:
            raise ValueError(f"refine_steps must be 0, 1 or 2, got {self.refine_steps}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.residual < 1.0:
            raise ValueError(f"residual must be in [0, 1), got {self.residual}")
        if not 0.1 <= self.crop_fraction < 1.0:
            raise ValueError(f"crop_fraction must be in [0.1, 1), got {self.crop_fraction}")
        if not 0.0 <= self.view_containment <= 1.0:
            raise ValueError(f"view_containment must be in [0, 1], got {self.view_containment}")
        if not 0.0 < self.label_merge_iou <= 1.0:
            raise ValueError(f"label_merge_iou must be in (0, 1], got {self.label_merge_iou}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")


# Named settings. "paper": VL-SAM as published (mention token, flow over all layers, points at the maxima, the
# full image plus four corner crops, ten object-listing questions).
# "reference": what measures best on the reference model (4 layers, word-level vocabulary): the row that predicts
# the object word (in "a white cup" the colour word, which reads the object's pixels in the first layer), the first
# layer's attention only, the first point at the region's weighted centroid (maxima sit on edges there), the five
# multi-scale views with corner crops of 0.65 of the side, which overlap so that an object near the centre lies
# whole inside one crop (chosen on held-out world seed 2: 0.554 against 0.437 at 0.5), and a two-question ensemble:
# the detailed question (about 60 words, hence 128 new tokens) and the brief one, whose single sentence names every
# object (seed 2: 0.588 against 0.554 for the brief question alone). Measured on held-out seed 1, 1,000 scenes:
# box AP@0.5 0.502 (brief question alone 0.489), about 3.5 s per image on one CPU thread (brief alone 1.2 s).
# VL-SAM's question ensemble: ten ways to ask for every object (the paper has the LVLM write its ten questions;
# mmkit ships them fixed so that runs are reproducible and cost no extra generation).
PAPER_QUESTIONS: tuple[str, ...] = (
    "Describe the image in detail.",
    "List all the objects in the image.",
    "What objects are in this image?",
    "Name every object you can see in the picture.",
    "Which things are visible in this image? List them.",
    "Give a list of all items shown in the image.",
    "What can you see in this picture? Mention every object.",
    "Enumerate the objects present in the image.",
    "Tell me all the objects that appear in this photo.",
    "Identify each object in the image.",
)

PRESETS: dict[str, dict[str, Any]] = {
    # The ablation credits most of VL-SAM's recall to the five views and the ten-question ensemble.
    "paper": {"multi_scale": True, "describe_prompts": PAPER_QUESTIONS, "rollout": "full"},
    "reference": {"token": "previous", "layers": (0,), "point_at": "centroid", "vocabulary": "world",
                  "multi_scale": True, "crop_fraction": 0.65,
                  "describe_prompts": ("Describe the image in detail.", "Describe the image briefly."),
                  "max_new_tokens": 128},
}


def preset_config(name: str, **overrides) -> VLSAMConfig:
    """A VLSAMConfig from a named preset ("paper", "reference") plus field overrides."""
    if name not in PRESETS:
        raise MmkitError(f"unknown VL-SAM preset {name!r}; use one of {', '.join(PRESETS)}")
    return VLSAMConfig(**{**PRESETS[name], **overrides})


def auto_preset(session) -> str:
    """"reference" for the built-in reference model, else "paper"."""
    return "reference" if getattr(session, "source", "") == "reference" else "paper"


@dataclass
class Detection:
    """One grounded object: label, tight box (x0, y0, x1, y1; exclusive), bool mask, score and the prompt."""

    label: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)
    score: float
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)


@dataclass
class GroundingResult:
    """Detections of one image, its full-view attention map per label (covering the image), the LVLM answers and the
    per-image cost (calls are shared by the images of a batch and counted as a share)."""

    size: tuple[int, int]
    detections: list[Detection]
    maps: dict[str, np.ndarray]
    answers: list[str]
    stats: dict[str, float]


@dataclass
class _View:
    image_index: int
    box: tuple[int, int, int, int]   # crop in image pixels
    image: Any                       # PIL


@dataclass
class _Row:
    view: int
    prompt: str
    answer: str
    labels: list[str]                # labels to map in this row
    surface: dict[str, list[str]]    # label -> words that mention it
    in_prompt: bool                  # mentions are searched in the prompt (query) or in the answer


def corner_crops(size: tuple[int, int], fraction: float) -> list[tuple[int, int, int, int]]:
    """The four corner crops of VL-SAM's multi-scale views, each `fraction` of the image's (width, height)."""
    w, h = size
    cw, ch = round(w * fraction), round(h * fraction)
    return [(x0, y0, x0 + cw, y0 + ch) for x0, y0 in ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch))]


def _views(images, cfg: VLSAMConfig) -> list[_View]:
    views = []
    for i, img in enumerate(images):
        w, h = img.size
        views.append(_View(i, (0, 0, w, h), img))
        if cfg.multi_scale:
            views += [_View(i, box, img.crop(box)) for box in corner_crops((w, h), cfg.crop_fraction)]
    return views


def _query_label(query: str) -> tuple[str, list[str]]:
    """(label, mention words) of a query: a reference-world category when the text names one, else the text."""
    from mmkit.world.vocab import mentioned_categories

    query = query.strip()
    if not query:
        raise MmkitError("the query is empty; pass the object to ground, e.g. --query cup")
    cats = mentioned_categories(query)
    if cats:
        return cats[0], _category_words(cats[0])
    return query, [query.split()[-1]]


def _query_match(target: tuple[str, list[str]], labels: list[str]) -> str | None:
    """The label of a description that names the query: the query's own label, or (free-text query) the
    singular of its last word ("red balloons" matches a described "balloon")."""
    from mmkit.grounding.phrases import singular

    label, words = target
    if label in labels:
        return label
    head = singular(words[-1].lower()) if words else ""
    return head if head in labels else None


def _category_words(category: str) -> list[str]:
    from mmkit.world.vocab import SYNONYMS, plural

    words = [category, plural(category)] + [w for s, c in SYNONYMS.items() if c == category for w in (s, plural(s))]
    if category == "fish":
        words.append("fishes")
    return list(dict.fromkeys(words))


_COUNT = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                      "nine", "ten"))}
# A count word must sit within this many words before the object word ("two blue cups": 2 back).
_COUNT_WINDOW = 3


def _count_before(tokenizer, ids: list[int], mention_start: int, text_start: int) -> int:
    """Instances a mention claims: a count word among the few words before it ("two blue cups" -> 2), else 1."""
    text = tokenizer.decode(ids[text_start:mention_start]).lower()
    words = re.findall(r"[a-z0-9]+", text)[-_COUNT_WINDOW:]
    for w in reversed(words):
        if w in _COUNT:
            return max(1, _COUNT[w])
        if w.isdigit():
            return max(1, int(w))
    return 1


def _word_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    seqs = []
    for w in words:
        for text in (" " + w, w, " " + w.capitalize(), w.capitalize()):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


def _find(ids: list[int], start: int, end: int, seqs: list[list[int]]) -> list[tuple[int, int]]:
    """(first, last) token positions of every match of any of `seqs` in ids[start:end]; where matches share an
    end (" cup" and "cup"), the longer one."""
    found: dict[int, int] = {}
    for seq in seqs:
        n = len(seq)
        for p in range(start, end - n + 1):
            if ids[p:p + n] == seq:
                found[p + n - 1] = min(p, found.get(p + n - 1, p))
    return sorted((first, last) for last, first in found.items())


class _Counter:
    def __init__(self):
        self.generate_calls = 0
        self.forward_calls = 0
        self.sequences = 0


def answer_labels(answer: str, vocabulary: str = "open") -> tuple[list[str], dict[str, list[str]]]:
    """The object labels of an answer, in order of first mention, and per label the words that mention it:
    "open" parses the answer's own object phrases (any noun: the head noun of each listed phrase), "world" keeps
    the reference world's categories only (for the reference model, whose answers use those words)."""
    from mmkit.grounding.phrases import answer_objects

    phrases = answer_objects(answer, vocabulary)
    labels = list(dict.fromkeys(p.label for p in phrases))
    if vocabulary == "world":
        return labels, {c: _category_words(c) for c in labels}
    surface: dict[str, list[str]] = {label: [] for label in labels}
    for p in phrases:
        for w in (p.head.lower(), p.label):
            if w not in surface[p.label]:
                surface[p.label].append(w)
    return labels, surface


def _describe(session, views: list[_View], cfg: VLSAMConfig, counter: _Counter) -> list[_Row]:
    jobs = [(v, q) for v in range(len(views)) for q in cfg.describe_prompts]
    rows = []
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start:start + cfg.batch_size]
        results = session.generate([views[v].image for v, _ in chunk], [q for _, q in chunk],
                                   max_new_tokens=cfg.max_new_tokens)
        counter.generate_calls += 1
        counter.sequences += len(chunk)
        for (v, q), res in zip(chunk, results):
            labels, surface = answer_labels(res.text, cfg.vocabulary)
            rows.append(_Row(v, q, res.text, labels, surface, False))
    return rows


def _map_rows(session, views: list[_View], rows: list[_Row], cfg: VLSAMConfig,
              counter: _Counter) -> list[list[tuple[str, np.ndarray, int]]]:
    """Per row, one (label, map covering the view, claimed instances) per mention: "a white cup, a pink cup" gives
    two cup maps, "two blue cups" one map claiming two instances."""
    from mmkit.grounding.attention_maps import build_inputs, capture_rows
    from mmkit.grounding.flow import full_rollout_maps, object_maps
    from mmkit.grounding.geometry import row_geometries

    tokenizer = session.processor.tokenizer
    out: list[list[tuple[str, np.ndarray, int]]] = [[] for _ in rows]
    todo = [i for i, r in enumerate(rows) if r.labels]
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start:start + cfg.batch_size]
        inputs, answer_starts = build_inputs(session, [views[rows[i].view].image for i in chunk],
                                             [rows[i].prompt for i in chunk], [rows[i].answer for i in chunk])
        ids = inputs["input_ids"]
        image_mask = session.adapter.image_mask(ids)
        # Where each row's image tokens lie on its view.
        geometries = row_geometries(session, inputs, cfg.tile_map, [views[rows[i].view].image.size for i in chunk])
        seq_len = ids.shape[1]
        per_row_rows, per_row_objects = [], []
        for b, i in enumerate(chunk):
            row = rows[i]
            img_pos = image_mask[b].nonzero().flatten()
            if img_pos.numel() == 0:
                raise MmkitError("the prompt holds no image tokens; grounding needs an image")
            first_text = int(img_pos[-1]) + 1
            lo, hi = (first_text, answer_starts[b]) if row.in_prompt else (answer_starts[b], seq_len)
            objects = []  # (label, captured position, claimed instances)
            id_list = ids[b].tolist()
            for label in row.labels:
                for p0, p in _find(id_list, lo, hi, _word_ids(tokenizer, row.surface[label])):
                    # In a question the position before the object word is an article: map the word itself.
                    q = p0 - 1 if cfg.token == "previous" and not row.in_prompt else p
                    if q >= first_text:
                        objects.append((label, q, _count_before(tokenizer, id_list, p0, lo)))
            last = max((q for _, q, _ in objects), default=first_text)
            # The full rollout reads every token's row (its head weights average over all queries); else the
            # text after the image up to the last object.
            if cfg.rollout == "full":
                per_row_rows.append(list(range(int(inputs["attention_mask"][b].nonzero()[0]), seq_len)))
            else:
                per_row_rows.append(list(range(first_text, last + 1)))
            per_row_objects.append(objects)
        width = max(len(r) for r in per_row_rows)
        positions = torch.tensor([r + [r[-1]] * (width - len(r)) for r in per_row_rows], dtype=torch.long)
        valid = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in per_row_rows])
        cap = capture_rows(session, inputs, positions, valid)
        counter.forward_calls += 1
        counter.sequences += len(chunk)
        for b, i in enumerate(chunk):
            objects = per_row_objects[b]
            if not objects:
                continue
            first = per_row_rows[b][0]
            if cfg.rollout == "full":
                maps = full_rollout_maps(
                    [p[b] for p in cap.probs], cap.rows[b], cap.valid[b], cap.image_mask[b].nonzero().flatten(),
                    cap.key_counts[b], [[q - first] for _, q, _ in objects],
                    head_weighting=cfg.head_weighting, column_reg=cfg.column_reg, layers=cfg.layers,
                    geometry=geometries[b])
                out[i] = [(label, m.cpu().numpy(), n) for (label, _, n), m in zip(objects, maps)]
                continue
            maps = object_maps(
                [p[b] for p in cap.probs], cap.rows[b], cap.valid[b], cap.image_mask[b].nonzero().flatten(),
                cap.key_counts[b], [[q - first] for _, q, _ in objects],
                head_weighting=cfg.head_weighting, column_reg=cfg.column_reg, residual=cfg.residual,
                layers=cfg.layers, geometry=geometries[b],
            )
            out[i] = [(label, m.cpu().numpy(), n) for (label, _, n), m in zip(objects, maps)]
    return out


def _grid_mask(mask: np.ndarray, box: tuple[int, int, int, int], grid: tuple[int, int]) -> np.ndarray:
    """A full-image mask cropped to a view and pooled to the map grid (cell inside when half covered)."""
    from PIL import Image

    x0, y0, x1, y1 = box
    sub = Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255)
    small = np.asarray(sub.resize((grid[1], grid[0]), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return small >= 0.5


def _found_in_view(mask: np.ndarray, view_box: tuple[int, int, int, int], containment: float) -> bool:
    """Whether a mask counts as found in the view whose answer labelled it: at least `containment` of its
    pixels lie inside the view (the full image always holds it; 0 accepts every mask)."""
    total = int(np.count_nonzero(mask))
    if containment <= 0.0 or total == 0:
        return True
    x0, y0, x1, y1 = view_box
    return np.count_nonzero(mask[y0:y1, x0:x1]) >= containment * total


def _decode_prompts(sam, emb, emb_index: dict[int, int], views: list[_View], rows: list[_Row], maps: list,
                    prompts: list, decode_view: list[int], sizes: list[tuple[int, int]],
                    cfg: VLSAMConfig) -> tuple[list[np.ndarray], np.ndarray, list, list]:
    """Decode point prompts (full-image pixels) with the SAM, prompt k on the embedding of view decode_view[k].

    `emb` holds SAM embeddings of views, `emb_index` maps a view to its row there; `sizes` holds each image's
    (width, height). Returns full-image masks (with `split_components`, only the piece the prompt points at),
    predicted IoUs, and the final points and labels in full-image pixels (refine_steps 2 resamples them inside
    the first mask)."""
    from mmkit.grounding.prompts import keep_prompted_component, resample_prompt, upsample_map

    idx = [emb_index[v] for v in decode_view]
    offsets = [views[v].box[:2] for v in decode_view]
    pts, labs = [], []
    for p, v in zip(prompts, decode_view):
        view_pts, view_labs = _points_in_view(p[2].points, p[2].labels, views[v].box)
        pts.append(view_pts)
        labs.append(view_labs)
    pred = sam.predict(emb, idx, pts, labs)
    if cfg.refine_steps >= 1:
        pred = sam.predict(emb, idx, pts, labs, mask_inputs=pred.low_res_logits)
    if cfg.refine_steps >= 2:
        # Restrict each map to its mask and resample the points there, keeping the mask prompt.
        for k, (i, _, _, (ri, ei), _) in enumerate(prompts):
            view = views[rows[ri].view]
            up = upsample_map(maps[ri][ei][1], cfg.upsample)
            full = paste_view_mask(pred.masks[k], views[decode_view[k]].box, sizes[i])
            grid_mask = _grid_mask(full, view.box, up.shape)
            x0, y0, x1, y1 = view.box
            new = resample_prompt(up, grid_mask, (x1 - x0, y1 - y0), cfg.num_positive, cfg.num_negative,
                                  min_point_distance=2.0 * cfg.upsample, point_at=cfg.point_at)
            if new is not None:
                ox, oy = offsets[k]
                pts[k] = [(x + x0 - ox, y + y0 - oy) for x, y in new.points]
                labs[k] = new.labels
        pred = sam.predict(emb, idx, pts, labs, mask_inputs=pred.low_res_logits)
    masks = [paste_view_mask(m, views[v].box, sizes[p[0]]) for m, v, p in zip(pred.masks, decode_view, prompts)]
    pts = [[(x + ox, y + oy) for x, y in pp] for pp, (ox, oy) in zip(pts, offsets)]
    if cfg.split_components:
        masks = [keep_prompted_component(m, pp, lab) for m, pp, lab in zip(masks, pts, labs)]
    return masks, np.asarray(pred.scores, dtype=np.float64), pts, labs


def _points_in_view(points, point_labels, box: tuple[int, int, int, int]) -> tuple[list, list]:
    """Full-image points in a view's pixels. Points outside the view are dropped (a crop's SAM cannot see them);
    positive points are clamped into it when none of them lies inside."""
    x0, y0, x1, y1 = box
    inside = [(x0 <= x < x1 and y0 <= y < y1) for x, y in points]
    if not any(ok and lab == 1 for ok, lab in zip(inside, point_labels)):
        points = [(min(max(x, x0), x1 - 1), min(max(y, y0), y1 - 1)) if lab == 1 else (x, y)
                  for (x, y), lab in zip(points, point_labels)]
        inside = [ok or lab == 1 for ok, lab in zip(inside, point_labels)]
    kept = [((x - x0, y - y0), lab) for (x, y), lab, ok in zip(points, point_labels, inside) if ok]
    return [pt for pt, _ in kept], [lab for _, lab in kept]


def paste_view_mask(mask: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """A view's mask (view pixels) placed in its image's full frame of `size` (width, height)."""
    w, h = size
    x0, y0, x1, y1 = box
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return np.asarray(mask, dtype=bool)
    out = np.zeros((h, w), dtype=bool)
    out[y0:y1, x0:x1] = mask
    return out


def _cut_by_crop(mask: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> bool:
    """Whether a crop-decoded mask (full frame) reaches an edge of the crop that lies inside the image: the object
    goes on beyond the crop, so the crop's mask would be a cut piece of it."""
    x0, y0, x1, y1 = box
    w, h = size
    return bool((x0 > 0 and mask[y0:y1, x0].any()) or (y0 > 0 and mask[y0, x0:x1].any())
                or (x1 < w and mask[y0:y1, x1 - 1].any()) or (y1 < h and mask[y1 - 1, x0:x1].any()))


def ground(session, sam, images: Sequence, query: str | Sequence[str] | None = None,
           config: VLSAMConfig | None = None) -> list[GroundingResult]:
    """Ground objects in images with VL-SAM.

    Args:
        session: an mmkit Session (any supported family; `geometry.py` places each layout's tokens).
        sam: a `SamBackend` (see `sam_backend.load_sam`).
        images: PIL images, arrays or paths.
        query: None to ground every object the LVLM lists, a category/phrase to ground in every image, or one
            query per image.
        config: VLSAMConfig (None: the "reference" preset for the reference model, else "paper").

    Returns:
        One GroundingResult per image.
    """
    from mmkit.grounding.prompts import mask_to_box, nms, one_label_per_object, prompts_from_map, upsample_map
    from mmkit.images import load_image
    from mmkit.models.families import check_grounding

    check_grounding(session.adapter.family)  # family handling: refuse layouts the maps cannot place, up front
    cfg = config or preset_config(auto_preset(session))
    pil = [load_image(img) for img in images]
    if not pil:
        raise MmkitError("ground needs at least one image")
    if isinstance(query, str) or query is None:
        queries = [query] * len(pil)
    else:
        queries = list(query)
        if len(queries) != len(pil):
            raise MmkitError(f"got {len(queries)} queries for {len(pil)} images; pass one per image")
    t0 = time.perf_counter()
    counter = _Counter()
    sam_before = dict(sam.stats.as_dict())
    views = _views(pil, cfg)

    rows: list[_Row] = []
    query_labels = {i: _query_label(q) for i, q in enumerate(queries) if q is not None}
    describe_views = [v for v, view in enumerate(views)
                      if view.image_index not in query_labels or cfg.query_route == "describe_first"]
    described: set[int] = set()
    if describe_views:
        sub = _describe(session, [views[v] for v in describe_views], cfg, counter)
        for r in sub:
            r.view = describe_views[r.view]
            target = query_labels.get(views[r.view].image_index)
            if target is None:
                rows.append(r)
            elif _query_match(target, r.labels) is not None:
                # The description mentions the query: map that mention (the route the model is fluent in).
                said = _query_match(target, r.labels)
                words = list(dict.fromkeys(target[1] + r.surface.get(said, [])))
                r.labels, r.surface = [target[0]], {target[0]: words}
                rows.append(r)
                described.add(r.view)
    for v, view in enumerate(views):
        if view.image_index in query_labels and v not in described:
            label, words = query_labels[view.image_index]
            prompt = cfg.query_prompt.format(category=words[0] if label in words else queries[view.image_index].strip())
            rows.append(_Row(v, prompt, "", [label], {label: words}, True))
    maps = _map_rows(session, views, rows, cfg, counter)

    # Votes: which labels each row (view x question) mentions; a detection's vote is the share of the rows of
    # its image whose view holds its mask that mention its label.
    row_labels = [{entry[0] for entry in m} for m in maps]

    # Prompts (in full-image pixels) for every (row, label, region).
    prompts = []  # (image index, label, PointPrompt, (row index, entry index), score prior)
    for ri, (r, m) in enumerate(zip(rows, maps)):
        view = views[r.view]
        x0, y0, x1, y1 = view.box
        for ei, (label, attn, claimed) in enumerate(m):
            up = upsample_map(attn, cfg.upsample)
            instances = min(cfg.max_instances, claimed)
            for p in prompts_from_map(up, (x1 - x0, y1 - y0), cfg.threshold, cfg.num_positive, cfg.num_negative,
                                      instances, min_point_distance=2.0 * cfg.upsample, point_at=cfg.point_at):
                p.points = [(x + x0, y + y0) for x, y in p.points]
                prompts.append((view.image_index, label, p, (ri, ei), p.peak))

    results_masks: list[np.ndarray] = []
    results_scores = np.zeros(0)
    pts: list = []
    labs: list = []
    if prompts:
        # Each prompt is decoded on a view's SAM embedding: the full image, or the crop whose map found it,
        # zoomed to SAM's whole input like the paper's per-sub-image SAM (sam_view).
        full_view = {view.image_index: v for v, view in enumerate(views)
                     if view.box == (0, 0, *pil[view.image_index].size)}
        on_crops = cfg.multi_scale and cfg.sam_view != "full"
        decode_view = [rows[ri].view if on_crops else full_view[i] for i, _, _, (ri, _), _ in prompts]
        sizes = [img.size for img in pil]
        # One embedding call: every view that decodes a prompt, and the full images a cut crop falls back to.
        embedded = sorted(set(decode_view) | (set(full_view.values()) if on_crops else set()))
        emb = sam.embed([views[v].image for v in embedded])
        emb_index = {v: j for j, v in enumerate(embedded)}
        results_masks, results_scores, pts, labs = _decode_prompts(sam, emb, emb_index, views, rows, maps, prompts,
                                                                   decode_view, sizes, cfg)
        cut = [k for k, v in enumerate(decode_view)
               if v != full_view[prompts[k][0]] and _cut_by_crop(results_masks[k], views[v].box, sizes[prompts[k][0]])]
        if cut:  # an object the crop cuts through: its mask comes from the full image
            again = _decode_prompts(sam, emb, emb_index, views, rows, maps, [prompts[k] for k in cut],
                                    [full_view[prompts[k][0]] for k in cut], sizes, cfg)
            for j, k in enumerate(cut):
                results_masks[k], results_scores[k], pts[k], labs[k] = (again[0][j], again[1][j], again[2][j],
                                                                        again[3][j])

    per_image: list[list[Detection]] = [[] for _ in pil]
    view_area: list[list[int]] = [[] for _ in pil]   # per detection, the area of the view that labelled it
    for k, (i, label, p, (ri, _), peak) in enumerate(prompts):
        mask = results_masks[k]  # already the prompted piece with split_components (_decode_prompts)
        if not _found_in_view(mask, views[rows[ri].view].box, cfg.view_containment):
            continue  # the label came from a crop that shows only part of this object
        box = mask_to_box(mask)
        holding = [rj for rj, r in enumerate(rows) if views[r.view].image_index == i
                   and _found_in_view(mask, views[r.view].box, cfg.view_containment)]
        vote = sum(label in row_labels[rj] for rj in holding) / max(1, len(holding))
        score = float(np.clip(results_scores[k], 0.0, 1.0)) * vote * peak
        if box is None or score < cfg.min_score:
            continue
        per_image[i].append(Detection(label, box, mask, score, pts[k], labs[k]))
        vx0, vy0, vx1, vy1 = views[rows[ri].view].box
        view_area[i].append((vx1 - vx0) * (vy1 - vy0))
    for i, dets in enumerate(per_image):
        if cfg.nms_across_labels:
            merged = one_label_per_object([d.mask for d in dets], [d.score for d in dets],
                                          [d.label for d in dets], cfg.label_merge_iou, priority=view_area[i])
            dets = [Detection(label, dets[j].box, dets[j].mask, dets[j].score, dets[j].points,
                              dets[j].point_labels) for j, label in merged]
        keep = nms([d.box for d in dets], [d.score for d in dets], [d.label for d in dets], cfg.nms_iou)
        per_image[i] = [dets[j] for j in keep]

    n = len(pil)
    sam_after = sam.stats.as_dict()
    seconds = time.perf_counter() - t0
    stats = {
        "lvlm_calls": (counter.generate_calls + counter.forward_calls) / n,
        "lvlm_generate_calls": counter.generate_calls / n,
        "lvlm_forward_calls": counter.forward_calls / n,
        "lvlm_sequences": counter.sequences / n,
        "sam_calls": (sam_after["image_calls"] - sam_before["image_calls"]
                      + sam_after["decode_calls"] - sam_before["decode_calls"]) / n,
        "sam_image_calls": (sam_after["image_calls"] - sam_before["image_calls"]) / n,
        "sam_decode_calls": (sam_after["decode_calls"] - sam_before["decode_calls"]) / n,
        "sam_prompts": (sam_after["prompts"] - sam_before["prompts"]) / n,
        "seconds": seconds / n,
    }
    results = []
    for i, img in enumerate(pil):
        full_maps: dict[str, np.ndarray] = {}
        answers = []
        for r, m in zip(rows, maps):
            view = views[r.view]
            if view.image_index != i:
                continue
            if r.answer:
                answers.append(r.answer)
            if view.box == (0, 0, *img.size):
                for label, attn, _ in m:
                    full_maps.setdefault(label, attn)
        results.append(GroundingResult(img.size, per_image[i], full_maps, answers, dict(stats)))
    return results


_SAM_CACHE: dict[tuple[str, str], Any] = {}


def default_sam(source, device) -> Any:
    """A SAM backend for `source` on `device`: a checkpoint directory or hub id (str or path), loaded once per
    process; None = the shipped small SAM; anything else is taken as an already loaded backend and returned."""
    from mmkit.grounding.sam_backend import SHIPPED_NAME, load_sam

    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source
    source = None if source is None else str(source)
    key = (source or SHIPPED_NAME, str(device))
    if key not in _SAM_CACHE:
        _SAM_CACHE[key] = load_sam(source, device=device)
    return _SAM_CACHE[key]


def ground_image(session, image, query: str | None = None, sam=None,
                 config: VLSAMConfig | None = None) -> GroundingResult:
    """Ground one image (every listed object, or `query`) with `session`'s LVLM and a SAM backend: `sam` may be a
    `SamBackend`, a checkpoint directory / hub id, or None for the shipped small SAM."""
    return ground(session, default_sam(sam, session.device), [image], query=query, config=config)[0]
