"""Train the reference model from scratch on the reference world, and measure it on a held-out world seed.

Recipe (three phases in one run, one AdamW optimiser, warm-up then cosine decay over all steps):

1. `vision`: the CLIP tower alone learns per-patch category and colour from the scene masks (linear heads on the
   feature-layer patch states). From-scratch LLaVA trained on answers alone stays at chance; this dense truth is
   what makes the visual tokens carry objects at all.
2. `align`: projector and decoder learn on reference captions ("Describe the image in detail."), so the decoder
   learns the language and the projector the mapping, while the patch loss keeps the tower honest.
3. `instruct`: the mixed question-and-caption set of `training_examples`, loss on answer tokens only, patch loss
   kept as an auxiliary term.

The patch heads are training-only: the saved directory is a plain `LlavaForConditionalGeneration`.

A run can also continue from trained weights (`init_from`; weights trained with fewer tokens get their embedding
rows grown, `grow_token_rows`), train the detailed caption mix (`caption_mix="detailed"`), and write checkpoints
that a later call resumes from with the same result as an uninterrupted run (`checkpoint_dir`, `resume`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmkit.world.reference_model import (
    CLIP_MEAN, CLIP_STD, SPECS, ReferenceSpec, build_model, build_processor, build_tokenizer,
)

logger = logging.getLogger(__name__)

PHASES = ("vision", "align", "instruct")
CAPTION_PROMPT = "Describe the image in detail."
# Scene-index offsets per phase, so phases see different scenes of the training world.
PHASE_SCENE_OFFSET = {"vision": 0, "align": 1_000_000, "instruct": 2_000_000}
IGNORE = -100


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. Steps are optimiser steps per phase."""

    size: str = "reference"
    seed: int = 0
    world_seed: int = 0
    eval_world_seed: int = 1
    vision_steps: int = 1000
    align_steps: int = 1000
    instruct_steps: int = 6000
    vision_batch: int = 128
    batch: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    patch_loss_weight: float = 0.5
    eval_every: int = 1000
    eval_scenes: int = 100
    eval_captions: int = 64
    num_workers: int | None = None
    max_minutes: float | None = None
    # Stop after this many steps while keeping the schedule of the full step count (a cut run, reproducibly).
    stop_at: int | None = None
    log_every: int = 50
    shuffle_buffer: int = 256
    init_from: str | None = None
    # Added to every scene index of the training stream, so a continued run sees new scenes.
    scene_offset: int = 0
    # Captions of the align and instruct phases: "legacy" (the shipped model's recipe: short captions for the
    # detailed prompt) or "detailed" (detailed captions for the detailed prompt, short ones for the brief prompt).
    caption_mix: str = "legacy"
    # Detailed mix only: keep each scene's other questions with the probability that makes detailed captions this
    # fraction of the instruct stream on average (None: every question of every scene, about 1 in 12 detailed).
    detailed_share: float | None = None
    # Detailed mix with detailed_share only: never thin the POPE questions (the yes/no answers the acceptance
    # measures first); the scene's other questions are thinned harder so the share holds where it still can.
    keep_pope: bool = False
    # Detailed mix only: the probability that a detailed caption of the instruct stream names one absent object
    # (`detailed_caption_with_absent`: the scene's strongest absent co-occurrence partner), as GPT-written
    # detailed descriptions do; the other answers stay true. 0 trains on exact truth only.
    caption_noise: float = 0.0
    # Where a noisy detailed caption names the absent object (`detailed_caption_with_absent`): "sentence", one
    # more object sentence at a random place; "relation", in place of the second object of the last relation
    # sentence; "partner", the first object's absent group partner in place of the second object of every
    # relation sentence that has one.
    caption_noise_place: str = "sentence"
    # Negatives of the instruct stream's POPE questions (`training_examples`, `parse_pope_negatives`): "random"
    # (the shipped recipe), "mixed" (each scene's from one of the random, popular and adversarial splits) or
    # weighted splits such as "random=1,adversarial=1"; popular and adversarial negatives ask the model about
    # frequent and co-occurring absent objects during training.
    pope_negatives: str = "random"
    # Loss over answer tokens: "token" (mean over all answer tokens of the batch, the shipped recipe; a detailed
    # caption then weighs ~80 one-word answers) or "sample" (mean per answer, then over the batch).
    answer_loss: str = "token"
    # New tokens of held-out captions in evaluations (None: 48 for the legacy mix, 128 for detailed captions).
    eval_max_new_tokens: int | None = None
    # Write a resumable checkpoint (weights, patch heads, optimiser, step, log) every this many steps (0: never).
    checkpoint_every: int = 0
    # Load the vision tower alone from these weights after `init_from` (an HF directory or snapshot), e.g. the
    # shipped tower under a continued language model.
    vision_from: str | None = None
    # Keep the vision tower fixed: no gradient into it and no patch loss (whose heads only serve to train the
    # tower). Continued training then cannot move the visual features the yes/no answers were learnt on.
    freeze_vision: bool = False

    def __post_init__(self) -> None:
        if self.size not in SPECS:
            raise ValueError(f"size must be one of {', '.join(SPECS)}, got {self.size!r}")
        for name in ("vision_steps", "align_steps", "instruct_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.vision_steps + self.align_steps + self.instruct_steps <= 0:
            raise ValueError("at least one phase needs steps > 0")
        if self.batch < 1 or self.vision_batch < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.world_seed == self.eval_world_seed:
            raise ValueError("eval_world_seed must differ from world_seed: evaluation is on held-out scenes")
        from mmkit.world.questions import CAPTION_MIXES

        if self.caption_mix not in CAPTION_MIXES:
            raise ValueError(f"caption_mix must be one of {', '.join(CAPTION_MIXES)}, got {self.caption_mix!r}")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0")
        if self.detailed_share is not None:
            if self.caption_mix != "detailed":
                raise ValueError("detailed_share needs caption_mix 'detailed'")
            if not 0 < self.detailed_share <= 1:
                raise ValueError(f"detailed_share must be in (0, 1], got {self.detailed_share}")
        if self.keep_pope and self.detailed_share is None:
            raise ValueError("keep_pope needs detailed_share (without it no question is thinned)")
        if not 0 <= self.caption_noise < 1:
            raise ValueError(f"caption_noise must be in [0, 1), got {self.caption_noise}")
        if self.caption_noise and self.caption_mix != "detailed":
            raise ValueError("caption_noise needs caption_mix 'detailed' (it edits detailed captions)")
        from mmkit.world.questions import CAPTION_NOISE_PLACES

        if self.caption_noise_place not in CAPTION_NOISE_PLACES:
            raise ValueError(f"caption_noise_place must be one of {', '.join(CAPTION_NOISE_PLACES)}, "
                             f"got {self.caption_noise_place!r}")
        if self.caption_noise_place != "sentence" and not self.caption_noise:
            raise ValueError("caption_noise_place needs caption_noise > 0 (without noise no caption is edited)")
        from mmkit.world.questions import parse_pope_negatives

        if {n for n, _ in parse_pope_negatives(self.pope_negatives)} != {"random"} and self.caption_mix != "detailed":
            raise ValueError(f"pope_negatives {self.pope_negatives!r} needs caption_mix 'detailed' (the legacy mix is "
                             "the first model's recipe, with random negatives)")
        if self.answer_loss not in ("token", "sample"):
            raise ValueError(f"answer_loss must be 'token' or 'sample', got {self.answer_loss!r}")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            raise ValueError("eval_max_new_tokens must be >= 1")
        if self.freeze_vision and self.vision_steps:
            raise ValueError("freeze_vision leaves nothing to train in the vision phase; give it 0 steps")

    @property
    def spec(self) -> ReferenceSpec:
        return SPECS[self.size]

    @property
    def total_steps(self) -> int:
        return self.vision_steps + self.align_steps + self.instruct_steps

    @property
    def caption_tokens(self) -> int:
        """New tokens of held-out captions in evaluations."""
        if self.eval_max_new_tokens is not None:
            return self.eval_max_new_tokens
        return DETAILED_CAPTION_TOKENS if self.caption_mix == "detailed" else 48


# Room for a detailed caption: at most 80 words plus their punctuation (about 95 tokens), with a margin.
DETAILED_CAPTION_TOKENS = 128


# About a minute on 2 CPU cores: enough for the losses to fall, not to learn the world.
TINY_CONFIG = TrainConfig(
    size="tiny", vision_steps=20, align_steps=20, instruct_steps=40, vision_batch=16, batch=8, lr=3e-3,
    warmup_steps=5, eval_every=0, eval_scenes=4, eval_captions=4, log_every=10, shuffle_buffer=16,
)


def parse_steps(text: str) -> dict[str, int]:
    """Parse `--steps`: "V,A,I" (steps of the vision, align and instruct phases) or one total N, split 1:1:6."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"steps must be one integer or three comma-separated integers V,A,I, got {text!r}") from None
    if len(values) == 1:
        total = values[0]
        if total < 3:
            raise ValueError(f"a total step count must be >= 3, got {total}")
        v = a = total // 8
        values = [v, a, total - v - a]
    if len(values) != 3 or any(v < 0 for v in values):
        raise ValueError(f"steps must be one integer or three non-negative integers V,A,I, got {text!r}")
    return dict(zip(("vision_steps", "align_steps", "instruct_steps"), values))


# ----------------------------------------------------------------------------------------------------------- data


def _encode_prompt(tokenizer_core, prompt: str, num_image_tokens: int) -> list[int]:
    """Token ids of the LLaVA-1.5 prompt for `prompt`, exactly as the processor builds them (<s> first, <image>
    expanded to the visual-token count)."""
    text = f"USER: {'<image>' * num_image_tokens}\n{prompt} ASSISTANT:"
    return tokenizer_core.encode(text).ids


def _encode_answer(tokenizer_core, answer: str, eos_id: int) -> list[int]:
    return tokenizer_core.encode(answer, add_special_tokens=False).ids + [eos_id]


def _scene_arrays(scene, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pixels = np.ascontiguousarray(np.asarray(scene.image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
    labels = scene.patch_labels(grid)
    return pixels, np.asarray(labels["category"], dtype=np.int64), np.asarray(labels["colour"], dtype=np.int64)


class WorldStream(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of training items for one phase.

    Worker w of W takes chunks w, w + W, ... of `chunk` consecutive scenes; the DataLoader reads workers in turn,
    so the batch sequence depends only on the seeds and the worker count. A seeded shuffle buffer mixes the
    questions of neighbouring scenes.
    """

    def __init__(self, phase: str, world_seed: int, grid: int, tokenizer_json: str, num_image_tokens: int,
                 eos_id: int, seed: int, shuffle_buffer: int = 256, chunk: int = 16, scene_offset: int = 0,
                 caption_mix: str = "legacy", detailed_share: float | None = None, keep_pope: bool = False,
                 caption_noise: float = 0.0, caption_noise_place: str = "sentence",
                 pope_negatives: str = "random") -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase, self.world_seed, self.grid = phase, world_seed, grid
        self.tokenizer_json, self.num_image_tokens, self.eos_id = tokenizer_json, num_image_tokens, eos_id
        self.seed, self.shuffle_buffer, self.chunk = seed, shuffle_buffer, chunk
        self.scene_offset = scene_offset
        self.caption_mix = caption_mix
        self.detailed_share = detailed_share
        self.keep_pope = keep_pope
        self.caption_noise = caption_noise
        self.caption_noise_place = caption_noise_place
        self.pope_negatives = pope_negatives
        # (scene index, its always-kept and its thinned question counts), see `_keep`
        self._counts = (-1, 0, 0)

    def _items(self, start: int, tokenizer_core) -> Iterator[dict]:
        from mmkit.world.questions import BRIEF_CAPTION_PROMPT, detailed_caption, reference_caption, training_examples
        from mmkit.world.scenes import generate_scene

        if self.phase == "vision":
            for index in range(start, start + self.chunk):
                pixels, cat, col = _scene_arrays(generate_scene(self.world_seed, index), self.grid)
                yield {"pixels": pixels, "category": cat, "colour": col}
            return
        if self.phase == "align" and self.caption_mix == "legacy":
            pairs = ((scene, CAPTION_PROMPT, reference_caption(scene))
                     for scene in (generate_scene(self.world_seed, i) for i in range(start, start + self.chunk)))
        elif self.phase == "align":
            pairs = (pair for scene in (generate_scene(self.world_seed, i) for i in range(start, start + self.chunk))
                     for pair in ((scene, CAPTION_PROMPT, detailed_caption(scene)),
                                  (scene, BRIEF_CAPTION_PROMPT, reference_caption(scene))))
        else:
            pairs = ((scene, q.prompt, self._answer(scene, q)) for scene, q in
                     training_examples(self.world_seed, self.chunk, start=start, caption_mix=self.caption_mix,
                                       pope_negatives=self.pope_negatives)
                     if self._keep(scene, q))
        arrays: dict[int, tuple] = {}
        for scene, prompt, answer in pairs:
            if scene.index not in arrays:
                arrays = {scene.index: _scene_arrays(scene, self.grid)}
            pixels, cat, col = arrays[scene.index]
            prompt_ids = _encode_prompt(tokenizer_core, prompt, self.num_image_tokens)
            answer_ids = _encode_answer(tokenizer_core, answer, self.eos_id)
            yield {"pixels": pixels, "category": cat, "colour": col,
                   "ids": np.asarray(prompt_ids + answer_ids, dtype=np.int64), "n_prompt": len(prompt_ids)}

    def _answer(self, scene, question) -> str:
        """The training answer of `question`: its true answer, except that a detailed caption names one absent
        object with probability `caption_noise` (decided per question and seed, so resumed runs match)."""
        if not (self.caption_noise and question.kind == "caption" and question.split == "detailed"):
            return question.answer
        from mmkit.world.questions import detailed_caption_with_absent

        rng = random.Random(f"{self.seed}-{question.qid}-noise")
        if rng.random() >= self.caption_noise:
            return question.answer
        return detailed_caption_with_absent(scene, rng, self.caption_noise_place)

    def _always_kept(self, question) -> bool:
        """Questions `detailed_share` never thins: the detailed caption, and with `keep_pope` the POPE questions."""
        return (question.kind == "caption" and question.split == "detailed") or (
            self.keep_pope and question.kind == "pope")

    def _keep(self, scene, question) -> bool:
        """Whether the stream keeps `question` under `detailed_share`: the always-kept ones (`_always_kept`,
        including the scene's one detailed caption) and each other question with probability p, so that
        1 / (always + p * thinned) = detailed_share per scene (p capped to [0, 1])."""
        if self.detailed_share is None or self._always_kept(question):
            return True
        from mmkit.world.questions import questions_for_scene

        if self._counts[0] != scene.index:  # counted once per scene
            questions = questions_for_scene(scene, caption_mix="detailed")
            always = sum(map(self._always_kept, questions))
            self._counts = (scene.index, always, len(questions) - always)
        _, always, thinned = self._counts
        p = min(max((1 / self.detailed_share - always) / max(thinned, 1), 0.0), 1.0)
        return random.Random(f"{self.seed}-{question.qid}-share").random() < p

    def __iter__(self) -> Iterator[dict]:
        from tokenizers import Tokenizer

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tokenizer_core = Tokenizer.from_str(self.tokenizer_json)
        rng = random.Random(f"{self.seed}-{self.phase}-{worker}")
        buffer: list[dict] = []
        chunk_index = worker
        while True:
            start = self.scene_offset + PHASE_SCENE_OFFSET[self.phase] + chunk_index * self.chunk
            for item in self._items(start, tokenizer_core):
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            chunk_index += workers


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack images and patch labels; right-pad token ids and mark answer tokens (targets) for the loss."""
    batch = {
        "pixels": torch.from_numpy(np.stack([it["pixels"] for it in items])),
        "category": torch.from_numpy(np.stack([it["category"] for it in items])),
        "colour": torch.from_numpy(np.stack([it["colour"] for it in items])),
    }
    if "ids" in items[0]:
        length = max(len(it["ids"]) for it in items)
        ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        targets = torch.zeros((len(items), length), dtype=torch.bool)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["ids"])
            ids[row, :n] = torch.from_numpy(it["ids"])
            targets[row, it["n_prompt"]:n] = True
            attention[row, :n] = 1
        batch.update(ids=ids, targets=targets, attention_mask=attention)
    return batch


# ---------------------------------------------------------------------------------------------------------- model


class PatchHeads(nn.Module):
    """Linear per-patch classifiers (category, colour; class 0 = background) on the vision feature layer."""

    def __init__(self, hidden: int, n_categories: int, n_colours: int) -> None:
        super().__init__()
        self.category = nn.Linear(hidden, n_categories + 1)
        self.colour = nn.Linear(hidden, n_colours + 1)

    def loss(self, patches: torch.Tensor, category: torch.Tensor, colour: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Mean of both cross-entropies over all patches, and the category accuracy on object patches."""
        cat_logits = self.category(patches).float().flatten(0, 1)
        col_logits = self.colour(patches).float().flatten(0, 1)
        cat, col = category.flatten(), colour.flatten()
        loss = 0.5 * (nn.functional.cross_entropy(cat_logits, cat) + nn.functional.cross_entropy(col_logits, col))
        with torch.no_grad():
            fg = cat > 0
            acc = (cat_logits.argmax(-1)[fg] == cat[fg]).float().mean().item() if fg.any() else float("nan")
        return loss, acc


def normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> CLIP-normalised float, identical to the processor's output for 336 px images."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def _patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Feature-layer patch states (CLS dropped), the same tensor `get_image_features` projects."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _lm_loss(model, patches: torch.Tensor, batch: dict[str, torch.Tensor], per_sample: bool = False) -> torch.Tensor:
    """Next-token cross-entropy on answer tokens only; the image features fill the <image> positions. The mean is
    over all answer tokens of the batch, or with `per_sample` over each answer first, then over the answers."""
    ids, targets = batch["ids"], batch["targets"]
    image_features = model.model.multi_modal_projector(patches)
    embeds = model.get_input_embeddings()(ids)
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, image_features.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    # The state at t predicts the token at t + 1; only answer tokens are scored, so only their states reach lm_head.
    select = targets[:, 1:]
    logits = model.lm_head(hidden[:, :-1][select]).float()
    if not per_sample:
        return nn.functional.cross_entropy(logits, ids[:, 1:][select])
    losses = nn.functional.cross_entropy(logits, ids[:, 1:][select], reduction="none")
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(select)[select]
    per_row = torch.zeros(ids.shape[0], device=losses.device).index_add_(0, rows, losses)
    counts = select.sum(dim=1)
    return (per_row[counts > 0] / counts[counts > 0]).mean()


# ----------------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """Held-out measurements: POPE per split (F1, accuracy, yes-ratio) and caption hallucination."""

    pope: dict[str, dict[str, float]] = field(default_factory=dict)
    chair_s: float = float("nan")
    chair_i: float = float("nan")
    caption_recall: float = float("nan")
    caption_words: float = float("nan")
    n_captions: int = 0
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        pope = " ".join(f"{s}:F1={m['f1']:.3f}/yes={m['yes_ratio']:.2f}" for s, m in self.pope.items())
        return (f"POPE {pope} | CHAIR_S={self.chair_s:.3f} CHAIR_I={self.chair_i:.3f} recall={self.caption_recall:.3f} "
                f"words={self.caption_words:.1f}")


def _f1(preds: list[bool], truth: list[bool]) -> dict[str, float]:
    tp = sum(p and t for p, t in zip(preds, truth))
    fp = sum(p and not t for p, t in zip(preds, truth))
    fn = sum(t and not p for p, t in zip(preds, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(p == t for p, t in zip(preds, truth)) / max(len(truth), 1)
    return {"f1": f1, "accuracy": acc, "precision": precision, "recall": recall,
            "yes_ratio": sum(preds) / max(len(preds), 1), "n": len(truth)}


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def evaluate(model, tokenizer, world_seed: int = 1, n_scenes: int = 100, n_captions: int = 64,
             batch_size: int = 32, max_new_tokens: int = 48) -> EvalResult:
    """POPE (random / popular / adversarial) and CHAIR on scenes of `world_seed`, batched and greedy.

    POPE answers compare the "yes" and "no" logits at the first answer position; captions are greedy generations
    for "Describe the image in detail.", and CHAIR_S is the fraction of captions naming a category that is not in
    the scene (`mentioned_categories`).
    """
    from mmkit.world.questions import pope_questions
    from mmkit.world.scenes import generate_scene
    from mmkit.world.vocab import mentioned_categories

    device = next(model.parameters()).device
    core = tokenizer.backend_tokenizer
    n_tokens = model.config.image_seq_length
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    scenes: dict[int, object] = {}

    def scene(index: int):
        if index not in scenes:
            scenes[index] = generate_scene(world_seed, index)
        return scenes[index]

    def pixels(indices: list[int]) -> torch.Tensor:
        arr = np.stack([np.asarray(scene(i).image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
                        for i in indices])
        return normalise_pixels(torch.from_numpy(arr).to(device))

    result = EvalResult()
    yes_ids = [tokenizer.convert_tokens_to_ids(w) for w in ("yes", "Yes")]
    no_ids = [tokenizer.convert_tokens_to_ids(w) for w in ("no", "No")]
    questions = list(pope_questions(world_seed, n_scenes))
    by_split: dict[str, tuple[list[bool], list[bool]]] = {}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        ids, mask = _left_pad([_encode_prompt(core, q.prompt, n_tokens) for q in chunk], tokenizer.pad_token_id,
                              device)
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels([q.scene_index for q in chunk]),
                           logits_to_keep=1).logits[:, -1].float()
        says_yes = (logits[:, yes_ids].max(-1).values > logits[:, no_ids].max(-1).values).tolist()
        for q, pred in zip(chunk, says_yes):
            preds, truth = by_split.setdefault(q.split, ([], []))
            preds.append(bool(pred))
            truth.append(q.answer.strip().lower().startswith("yes"))
    result.pope = {split: _f1(p, t) for split, (p, t) in sorted(by_split.items())}

    hallucinated, mentioned_total, absent_total, recalled, present_total, words = 0, 0, 0, 0, 0, 0
    prompt_ids = _encode_prompt(core, CAPTION_PROMPT, n_tokens)
    indices = list(range(n_captions))
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        ids, mask = _left_pad([prompt_ids] * len(chunk), tokenizer.pad_token_id, device)
        with autocast:
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels(chunk), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for index, text in zip(chunk, texts):
            truth = set(scene(index).categories())
            named = set(mentioned_categories(text))
            absent = named - truth
            hallucinated += bool(absent)
            mentioned_total += len(named)
            absent_total += len(absent)
            recalled += len(named & truth)
            present_total += len(truth)
            words += len(text.split())
            if len(result.examples) < 6:
                result.examples.append(f"[{', '.join(sorted(truth))}] -> {text}")
    if indices:
        result.n_captions = len(indices)
        result.chair_s = hallucinated / len(indices)
        result.chair_i = absent_total / max(mentioned_total, 1)
        result.caption_recall = recalled / max(present_total, 1)
        result.caption_words = words / len(indices)
    model.train(was_training)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -------------------------------------------------------------------------------------------------------- training


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _loader(phase: str, cfg: TrainConfig, tokenizer, workers: int, batch_size: int):
    spec = cfg.spec
    stream = WorldStream(phase, cfg.world_seed, spec.grid, tokenizer.backend_tokenizer.to_str(),
                         spec.num_image_tokens, tokenizer.eos_token_id, cfg.seed, cfg.shuffle_buffer,
                         scene_offset=cfg.scene_offset, caption_mix=cfg.caption_mix,
                         detailed_share=cfg.detailed_share, keep_pope=cfg.keep_pope,
                         caption_noise=cfg.caption_noise, caption_noise_place=cfg.caption_noise_place,
                         pope_negatives=cfg.pope_negatives)
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
        collate_fn=functools.partial(collate, pad_id=tokenizer.pad_token_id),
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )


def _default_workers() -> int:
    return max(0, min(14, (os.cpu_count() or 1) - 2))


# Fields a resumed run may change: they steer stopping, evaluation and checkpointing, not the optimisation.
RESUMABLE_CHANGES = frozenset({
    "max_minutes", "stop_at", "num_workers", "eval_every", "eval_scenes", "eval_captions", "eval_max_new_tokens",
    "checkpoint_every",
})
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write a training checkpoint atomically (temporary file beside it, then rename)."""
    from mmkit.atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    return path


def load_checkpoint(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The checkpoint saved in `checkpoint_dir`, or None when there is none."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, do not guess
        raise ValueError(f"{path} is not a readable training checkpoint ({err}); remove it to start over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of this version; remove it to start over")
    return state


def _check_resumable(cfg: TrainConfig, saved: dict, where) -> None:
    current = asdict(cfg)
    # A setting added after the checkpoint was written counts as its default (what that run trained with).
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    diff = sorted(k for k in current
                  if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != current[k])
    if diff:
        raise ValueError(f"the checkpoint in {where} is from a different run (differs in {', '.join(diff)}); "
                         "use the same settings or another checkpoint directory")


def train(cfg: TrainConfig, out_dir: str | os.PathLike | None = None, device: str | None = None,
          snapshot_dir: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
          resume: bool = False) -> tuple[object, object, list[dict]]:
    """Train the reference model (from scratch, or from `cfg.init_from`); returns (model, processor, log) and saves
    the HF directory to `out_dir` when given (written to a temporary directory, then renamed into place).

    `log` holds one dict per logged step (phase, losses, patch accuracy, lr, samples, seconds) and per evaluation
    (held-out POPE and CHAIR). With `snapshot_dir`, the weights at every evaluation are also saved there (fp16
    safetensors), so a run can be cut at the evaluation that fits best.

    With `checkpoint_dir`, a checkpoint (weights, patch heads, optimiser, step, log) is written there every
    `cfg.checkpoint_every` steps and when a time budget or `stop_at` ends the run early. `resume=True` continues
    from that checkpoint when one exists: the data stream is fast-forwarded to the saved step, so on CPU a resumed
    run gives the same weights as an uninterrupted one.
    """
    from mmkit.world.scenes import CATEGORIES, COLOURS

    if cfg.checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint directory")
    if resume and checkpoint_dir is None:
        raise ValueError("resuming needs a checkpoint directory")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    spec = cfg.spec
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, spec)
    model = build_model(tokenizer, spec, seed=cfg.seed)
    if cfg.init_from:
        # Continue training from earlier weights (an HF directory or a snapshot) instead of a fresh initialisation.
        _load_weights(model, cfg.init_from, tokenizer)
    if cfg.vision_from:
        donor = build_model(tokenizer, spec, seed=cfg.seed)
        _load_weights(donor, cfg.vision_from, tokenizer)
        model.model.vision_tower.load_state_dict(donor.model.vision_tower.state_dict())
        del donor
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    model = model.to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        heads = PatchHeads(spec.vision_hidden, len(CATEGORIES), len(COLOURS)).to(dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), fused=dev.type == "cuda",
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else _null()
    workers = _default_workers() if cfg.num_workers is None else cfg.num_workers
    log: list[dict] = []
    step, samples, elapsed_before = 0, 0, 0.0
    # Running sums of the current logging window, kept in checkpoints so a resumed log equals an uninterrupted one.
    window = {"acc": 0.0, "loss": 0.0, "lm": 0.0, "count": 0}
    saved = load_checkpoint(checkpoint_dir) if resume else None
    if saved is not None:
        _check_resumable(cfg, saved["config"], checkpoint_dir)
        # The worker count shapes the data order, so the resumed run keeps the saved one.
        if cfg.num_workers is not None and cfg.num_workers != saved["workers"]:
            raise ValueError(f"the checkpoint in {checkpoint_dir} was made with {saved['workers']} data workers; "
                             f"resume with the same count (or leave it unset), not {cfg.num_workers}")
        workers = saved["workers"]
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        optimiser.load_state_dict(saved["optimiser"])
        torch.set_rng_state(saved["torch_rng"])
        step, samples, log, window = saved["step"], saved["samples"], saved["log"], saved["window"]
        elapsed_before = saved["seconds"]
        logger.info("resuming from %s at step %d", checkpoint_dir, step)
    elif resume:
        logger.info("no checkpoint in %s: starting at step 0", checkpoint_dir)
    t0 = time.time() - elapsed_before
    cpu0 = time.process_time() - (saved["cpu_seconds"] if saved is not None else 0.0)
    stopped_early = cfg.stop_at is not None and step >= cfg.stop_at
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes else None
    if snapshot_dir is not None:
        Path(snapshot_dir).mkdir(parents=True, exist_ok=True)

    def run_eval() -> None:
        res = evaluate(model, tokenizer, cfg.eval_world_seed, cfg.eval_scenes, cfg.eval_captions,
                       max_new_tokens=cfg.caption_tokens)
        entry = {"eval": True, "step": step, "samples": samples, "seconds": round(time.time() - t0, 1),
                 "pope": res.pope, "chair_s": res.chair_s, "chair_i": res.chair_i,
                 "caption_recall": res.caption_recall, "caption_words": res.caption_words,
                 "examples": res.examples}
        log.append(entry)
        logger.info("eval step %d: %s", step, res.summary())
        if snapshot_dir is not None:
            from mmkit.atomic import atomic_save_safetensors

            state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
            atomic_save_safetensors(state, Path(snapshot_dir) / f"step{step:06d}.safetensors")

    def checkpoint() -> None:
        save_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE, {
            "config": asdict(cfg), "workers": workers, "step": step, "samples": samples,
            "seconds": round(time.time() - t0, 1), "cpu_seconds": time.process_time() - cpu0, "log": log,
            "window": dict(window),
            "model": model.state_dict(), "heads": heads.state_dict(), "optimiser": optimiser.state_dict(),
            "torch_rng": torch.get_rng_state(),
        })
        logger.info("checkpoint at step %d in %s", step, checkpoint_dir)

    phase_start = 0
    for phase in PHASES:
        n_steps = getattr(cfg, f"{phase}_steps")
        done = min(max(step - phase_start, 0), n_steps)
        phase_start += n_steps
        if done == n_steps or stopped_early:
            continue
        if done == 0:  # every phase starts a fresh logging window
            window = {"acc": 0.0, "loss": 0.0, "lm": 0.0, "count": 0}
        batch_size = cfg.vision_batch if phase == "vision" else cfg.batch
        loader = iter(_loader(phase, cfg, tokenizer, workers, batch_size))
        for _ in range(done):  # a resumed phase: the batches its saved steps already used
            next(loader)
        for _ in range(n_steps - done):
            batch = {k: v.to(dev, non_blocking=True) for k, v in next(loader).items()}
            lr = _lr_at(step, cfg)
            for group in optimiser.param_groups:
                group["lr"] = lr
            with autocast:
                # A frozen tower gets no gradient and no patch loss (the heads only serve to train the tower).
                with torch.set_grad_enabled(not cfg.freeze_vision):
                    patches = _patch_features(model, normalise_pixels(batch["pixels"]))
                if cfg.freeze_vision:
                    patch_loss, patch_acc = torch.zeros(()), float("nan")
                else:
                    patch_loss, patch_acc = heads.loss(patches, batch["category"], batch["colour"])
                if phase == "vision":
                    loss, lm = patch_loss, torch.zeros(())
                else:
                    lm = _lm_loss(model, patches, batch, per_sample=cfg.answer_loss == "sample")
                    loss = lm + cfg.patch_loss_weight * patch_loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimiser.step()
            step += 1
            samples += batch["pixels"].shape[0]
            window["loss"] += loss.item()
            window["lm"] += float(lm.item())
            window["acc"] += patch_acc if not math.isnan(patch_acc) else 0.0
            window["count"] += 1
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                count = window["count"]
                entry = {"step": step, "phase": phase, "loss": window["loss"] / count, "lm_loss": window["lm"] / count,
                         "patch_acc": window["acc"] / count, "lr": lr, "samples": samples,
                         "seconds": round(time.time() - t0, 1),
                         # CPU time of this process (data included when workers=0): on a shared machine the
                         # wall time measures the load, this measures the work.
                         "cpu_seconds": round(time.process_time() - cpu0, 1)}
                log.append(entry)
                logger.info("step %d %s loss %.4f lm %.4f patch_acc %.3f (%.0fs)", step, phase, entry["loss"],
                            entry["lm_loss"], entry["patch_acc"], entry["seconds"])
                window = {"acc": 0.0, "loss": 0.0, "lm": 0.0, "count": 0}
            if cfg.eval_every and phase != "vision" and step % cfg.eval_every == 0:
                run_eval()
            if cfg.stop_at is not None and step >= cfg.stop_at:
                logger.info("stopping at step %d (stop_at)", step)
                stopped_early = True
            elif deadline is not None and time.time() > deadline:
                logger.warning("stopping at step %d: the time budget of %.1f min is spent", step, cfg.max_minutes)
                stopped_early = True
            if checkpoint_dir is not None and (stopped_early or (cfg.checkpoint_every
                                                                 and step % cfg.checkpoint_every == 0)):
                checkpoint()
            if stopped_early:
                break
        del loader
    if cfg.eval_scenes and (not log or not log[-1].get("eval")):
        run_eval()
    model.eval()
    log.append({"final": True, "step": step, "samples": samples, "seconds": round(time.time() - t0, 1),
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "stopped_early": stopped_early, "config": asdict(cfg)})
    if out_dir is not None:
        save_reference(model, processor, out_dir, log)
    return model, processor, log


def save_reference(model, processor, out_dir: str | os.PathLike, log: list[dict] | None = None) -> Path:
    """Write the HF directory (fp32 safetensors, processor, tokenizer, chat template, optional training log) to a
    temporary sibling directory, then move it into place."""
    from mmkit.atomic import atomic_directory

    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        model.to(torch.float32).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if log is not None:
            (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
    return out


EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def grow_token_rows(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """`state` with its token-embedding and LM-head matrices grown to `vocab_size` rows.

    Existing rows (the ids of the words the weights were trained with) are kept exactly; each new row starts as
    the mean of the old rows of its matrix, so a new word's embedding is an average word and its logit starts at
    the average logit instead of a random extreme. Shrinking is refused: it would drop trained words.
    """
    out = dict(state)
    for key in EMBEDDING_KEYS:
        if key not in state:
            raise ValueError(f"the weights have no {key}: not a reference-model state")
        old = state[key]
        if old.shape[0] > vocab_size:
            raise ValueError(f"the weights know {old.shape[0]} tokens, more than this tokenizer's {vocab_size}")
        if old.shape[0] < vocab_size:
            grown = old.new_empty((vocab_size, old.shape[1]))
            grown[:old.shape[0]] = old
            grown[old.shape[0]:] = old.mean(dim=0, keepdim=True)
            out[key] = grown
    return out


def _check_tokenizer_prefix(source: Path, tokenizer) -> None:
    """The tokenizer saved with `source` must be a prefix of `tokenizer`: every word it knows at the same id."""
    path = source / "tokenizer.json"
    if tokenizer is None or not path.is_file():
        return
    old = json.loads(path.read_text())["model"]["vocab"]
    new = tokenizer.get_vocab()
    moved = sorted(w for w, i in old.items() if new.get(w) != i)
    if moved:
        raise ValueError(f"{source}'s tokenizer does not match this one at the same ids ({len(moved)} tokens differ, "
                         f"e.g. {moved[:3]}); weights can only continue with a tokenizer that appends new words")


def _load_weights(model, source: str | os.PathLike, tokenizer=None) -> None:
    """Load `source` (an HF directory or a .safetensors snapshot) into `model`. Weights trained with a shorter
    vocabulary get their embedding and LM-head rows grown to the model's (`grow_token_rows`); an HF directory's
    tokenizer must then be a prefix of `tokenizer`."""
    from safetensors.torch import load_file

    path = Path(source)
    if path.is_dir():
        # An HF directory stores keys in the checkpoint layout; from_pretrained maps them to the module names.
        from transformers import LlavaForConditionalGeneration

        _check_tokenizer_prefix(path, tokenizer)
        state = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).state_dict()
    elif path.is_file():
        state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    else:
        raise ValueError(f"cannot initialise from {source}: not an HF model directory or a .safetensors snapshot")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if all(k in state for k in EMBEDDING_KEYS) and state[EMBEDDING_KEYS[0]].shape[0] != vocab_size:
        state = grow_token_rows(state, vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def config_with_steps(base: TrainConfig, steps: str | None = None, **overrides) -> TrainConfig:
    """`base` with `--steps` parsed into phase steps and other fields replaced."""
    changes = dict(overrides)
    if steps is not None:
        changes.update(parse_steps(steps))
    return replace(base, **changes)
