"""Calibration and training samples from users' files, for the commands that tune or train on samples
(`mmkit tune vflowopt`, `mmkit tune paint-heads`, `mmkit train-gates`, `mmkit train-visor`).

The inputs are those of `mmkit eval`: `--data` (a POPE question file, an lmms-eval POPE parquet file or directory,
or VQA JSON lines) with `--images`, or `--coco` (a COCO directory). Without them every command keeps drawing from
the reference world. From a COCO directory each sampled image gives a detailed-description prompt (answered by its
first reference caption) and two POPE-style existence questions built from its instance annotations: one about a
present category ("yes") and one about a category absent from both instances and captions ("no").
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mmkit.errors import MmkitError
from mmkit.evals import datafiles

EXISTENCE_PROMPT = "Is there {article} {category} in the image?"


class CalibrationItem:
    """One sample: `image` (an RGB PIL image, read when first used), `prompt`, reference `answer` and `kind`
    ("pope", "caption", or the VQA row's type, "vqa" when it has none)."""

    def __init__(self, ref: datafiles.ImageRef, prompt: str, answer: str, kind: str, loader: datafiles.ImageLoader):
        self.ref, self.prompt, self.answer, self.kind = ref, prompt, answer, kind
        self._loader = loader

    @property
    def image(self):
        return self._loader.load(self.ref)

    def __repr__(self) -> str:
        return f"CalibrationItem(prompt={self.prompt!r}, answer={self.answer!r}, kind={self.kind!r})"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _is_pope(data: str) -> bool:
    path = Path(data)
    if not path.exists():
        raise MmkitError(f"{data}: does not exist")
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet")) or sorted(
        p for pattern in ("*.json", "*.jsonl") for p in path.rglob(pattern))
    if not files:
        raise MmkitError(f"{data}: no .parquet, .json or .jsonl files (--data)")
    if files[0].suffix == ".parquet":
        return True
    first = next(datafiles._jsonl_rows(files[0]))[1]
    return "label" in first and "question" not in first


def _from_files(data, images, suffix: str, loader) -> list[CalibrationItem]:
    if _is_pope(str(data)):
        return [CalibrationItem(q.image, q.prompt, q.answer, "pope", loader)
                for q in datafiles.read_pope(data, images, prompt_suffix=suffix)]
    return [CalibrationItem(q.image, q.prompt, q.answer, q.kind or "vqa", loader)
            for q in datafiles.read_vqa(data, images, prompt_suffix=suffix)]


def _from_coco(coco, suffix: str, seed: int, n: int, loader) -> list[CalibrationItem]:
    data = datafiles.load_coco(coco)
    rng = random.Random(f"{seed}-coco-calibration")
    out: list[CalibrationItem] = []
    # Three items per image; read a few more images than needed so every kind is represented.
    for image_id in datafiles.sample_image_ids(data.files, (n + 2) // 3 + 1, seed):
        name = data.files[image_id]
        where = f"{data.root / 'annotations' / f'instances_{data.split}.json'} image {image_id}"
        ref = datafiles._image_file(name, data.root / data.split, data.root, where)
        captions = data.captions.get(image_id, [])
        if captions:
            out.append(CalibrationItem(ref, datafiles.CHAIR_PROMPT, captions[0], "caption", loader))
        present = sorted(data.instance_categories.get(image_id, ()))
        absent = sorted(set(data.categories) - set(data.truth(image_id)))
        for category, answer in ((rng.choice(present) if present else None, "yes"),
                                 (rng.choice(absent) if absent else None, "no")):
            if category is not None:
                prompt = EXISTENCE_PROMPT.format(article=_article(category), category=category) + suffix
                out.append(CalibrationItem(ref, prompt, answer, "pope", loader))
    return out


def user_samples(data=None, images=None, coco=None, n: int | None = None, seed: int = 0,
                 prompt_suffix: str | None = None,
                 kinds_excluded: tuple[str, ...] = ()) -> list[CalibrationItem] | None:
    """`n` samples (all when None) from `data` / `coco` in a seeded order, or None when neither is given (the
    caller's reference-world default applies). Items whose kind is in `kinds_excluded` are dropped first."""
    if data is None and coco is None:
        if images is not None:
            raise MmkitError("--images goes with --data (the images of the question file)")
        return None
    if data is not None and coco is not None:
        raise MmkitError("pass either --data or --coco, not both")
    if images is not None and data is None:
        raise MmkitError("--images goes with --data (the images of the question file)")
    suffix = datafiles.SHORT_ANSWER_SUFFIX if prompt_suffix is None else prompt_suffix
    loader = datafiles.ImageLoader()
    items = _from_files(data, images, suffix, loader) if data is not None else \
        _from_coco(coco, suffix, seed, n or datafiles.CHAIR_DEFAULT_IMAGES * 3, loader)
    items = [it for it in items if it.kind not in kinds_excluded]
    if not items:
        raise MmkitError(f"{data or coco} gives no usable samples")
    random.Random(seed).shuffle(items)
    if n is not None:
        if n < 1:
            raise MmkitError(f"the number of samples must be >= 1, got {n}")
        items = items[:n]
    return items


def describe_source(data=None, images=None, coco=None) -> dict[str, Any] | None:
    """The input files as absolute paths, for reports and cache keys (None: the reference world)."""
    if data is None and coco is None:
        return None
    resolve = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731
    return {"data": resolve(data), "images": resolve(images), "coco": resolve(coco)}


def cycled(items: list, n: int) -> list:
    """`n` items, repeating `items` in order as often as needed (several passes over a small file)."""
    if not items:
        raise MmkitError("no samples")
    return [items[i % len(items)] for i in range(n)]
