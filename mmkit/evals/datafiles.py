"""Readers of benchmark files users already have: POPE question files (JSON lines) and the lmms-eval POPE parquet
layout, generic VQA JSON lines, and a COCO directory for CHAIR.

Every reader checks the whole input before a run starts and raises `MmkitError` with one line naming the file
(and line or row) and what is wrong: a missing image, a malformed JSON line, a POPE label other than yes/no, a
COCO directory without its annotation files, an empty file. Images are loaded lazily, batch by batch.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmkit.errors import MmkitError

# LLaVA-1.5's POPE / short-answer instruction, appended to each question by default.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
# LLaVA-1.5's multiple-choice instruction.
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
CHAIR_PROMPT = "Please describe this image in detail."
CHAIR_DEFAULT_IMAGES = 500
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# COCO splits looked for, in order, when a directory holds several.
COCO_SPLITS = ("val2014", "val2017")
# lmms-eval's POPE parquet columns (the `image` column holds {"bytes", "path"} structs, as HF `datasets` writes).
POPE_PARQUET_COLUMNS = ("question_id", "question", "answer", "image")


@dataclass(frozen=True)
class ImageRef:
    """Where a question's image is: a file, or row `row` of a parquet file's image column."""

    path: str | None = None
    parquet: str | None = None
    row: int = -1
    where: str = ""  # "FILE:LINE" or "FILE row N", for error messages


@dataclass(frozen=True)
class FileQuestion:
    """One question read from a file. `kind` is the POPE category (split) or the VQA type ("" when absent);
    `file` names the source file (per-file metrics); CHAIR questions carry the image's true categories in
    `truth`."""

    qid: str
    prompt: str
    answer: str
    image: ImageRef
    image_name: str
    file: str
    kind: str = ""
    choices: tuple[str, ...] = ()
    truth: tuple[str, ...] = field(default=())
    question_id: str = ""  # as written in the file


def _fail(where: str, what: str) -> MmkitError:
    return MmkitError(f"{where}: {what}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a whole-file JSON array is accepted too."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _fail(str(path), "is not UTF-8 text") from None
    except OSError as err:
        raise _fail(str(path), f"cannot be read ({err.strerror})") from None
    if not text.strip():
        raise _fail(str(path), "is empty")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise _fail(f"{path}:{err.lineno}", f"malformed JSON ({err.msg})") from None
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise _fail(f"{path} item {i}", f"expected a JSON object, got {type(row).__name__}")
            yield i, row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise _fail(f"{path}:{lineno}", f"malformed JSON line ({err.msg})") from None
        if not isinstance(row, dict):
            raise _fail(f"{path}:{lineno}", f"expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _field(row: dict[str, Any], key: str, where: str, kind=str) -> Any:
    if key not in row:
        raise _fail(where, f"missing field {key!r}")
    value = row[key]
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, kind):
        raise _fail(where, f"field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _image_file(name: str, images: Path | None, data_file: Path, where: str) -> ImageRef:
    base = images if images is not None else data_file.parent
    path = Path(name) if os.path.isabs(name) else base / name
    if not path.is_file():
        hint = "" if images is not None else " (pass --images DIR)"
        raise _fail(where, f"image {name!r} not found in {base}{hint}")
    return ImageRef(path=str(path), where=where)


def _yes_no(label: Any, where: str, key: str) -> str:
    value = str(label).strip().lower()
    if value not in ("yes", "no"):
        raise _fail(where, f"{key} {label!r} is not yes or no")
    return value


def _check_unique(qids: set[str], qid: str, where: str) -> None:
    if qid in qids:
        raise _fail(where, f"question id {qid!r} appears twice")
    qids.add(qid)


def _data_files(data: str | os.PathLike, patterns: tuple[str, ...]) -> list[Path]:
    path = Path(data)
    if path.is_dir():
        files = sorted(p for pattern in patterns for p in path.rglob(pattern) if p.is_file())
        if not files:
            raise _fail(str(path), f"holds no {' or '.join(patterns)} files")
        return files
    if not path.is_file():
        raise _fail(str(path), "does not exist")
    return [path]


def _images_dir(images: str | os.PathLike | None) -> Path | None:
    if images is None:
        return None
    path = Path(images)
    if not path.is_dir():
        raise _fail(str(path), "is not a directory (--images)")
    return path


# ---------------------------------------------------------------------------------------------------------------
# POPE


def read_pope(data: str | os.PathLike, images: str | os.PathLike | None = None,
              prompt_suffix: str = SHORT_ANSWER_SUFFIX) -> list[FileQuestion]:
    """POPE questions from a question file (JSON lines with question_id, image, text, label; images under
    `images`), a parquet file in lmms-eval's POPE layout, or a directory of either."""
    images_dir = _images_dir(images)
    # A directory: its parquet shards (lmms-eval's layout), else its question files.
    parquet_dir = Path(data).is_dir() and any(Path(data).rglob("*.parquet"))
    files = _data_files(data, ("*.parquet",) if parquet_dir else ("*.json", "*.jsonl"))
    out: list[FileQuestion] = []
    for path in files:
        if path.suffix == ".parquet":
            out += _pope_parquet(path, prompt_suffix)
        else:
            out += _pope_jsonl(path, images_dir, prompt_suffix)
    return out


def _pope_jsonl(path: Path, images: Path | None, suffix: str) -> list[FileQuestion]:
    out, qids = [], set()
    for lineno, row in _jsonl_rows(path):
        where = f"{path}:{lineno}"
        question_id = _field(row, "question_id", where)
        qid = f"{path.name}:{question_id}"
        _check_unique(qids, qid, where)
        name = _field(row, "image", where)
        out.append(FileQuestion(
            qid=qid, question_id=question_id, prompt=_field(row, "text", where) + suffix,
            answer=_yes_no(_field(row, "label", where), where, "label"),
            image=_image_file(name, images, path, where), image_name=name, file=path.name,
            kind=str(row.get("category", "")),
        ))
    return out


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MmkitError("reading parquet needs pyarrow: pip install 'mmkit-vlm[parquet]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise _fail(str(path), f"is not a readable parquet file ({str(err).splitlines()[0]})") from None


def _pope_parquet(path: Path, suffix: str) -> list[FileQuestion]:
    handle = _parquet_file(path)
    names = set(handle.schema_arrow.names)
    missing = [c for c in POPE_PARQUET_COLUMNS if c not in names]
    if missing:
        raise _fail(str(path), f"has no column {', '.join(missing)} (expected lmms-eval's POPE layout: "
                               f"{', '.join(POPE_PARQUET_COLUMNS)}, category, image_source)")
    _check_parquet_images(handle, path)
    columns = [c for c in ("question_id", "question", "answer", "category", "image_source") if c in names]
    table = handle.read(columns=columns).to_pydict()
    n = len(table["question_id"])
    if n == 0:
        raise _fail(str(path), "is empty (0 rows)")
    out = []
    for row in range(n):
        where = f"{path} row {row}"
        values = {c: table[c][row] for c in columns}
        for key in ("question_id", "question", "answer"):
            if values[key] is None:
                raise _fail(where, f"{key} is empty")
        # lmms-eval's POPE numbers questions per category, so ids repeat within a file: rows identify questions.
        qid = f"{path.name}:{row}"
        out.append(FileQuestion(
            qid=qid, question_id=str(values["question_id"]), prompt=str(values["question"]) + suffix,
            answer=_yes_no(values["answer"], where, "answer"),
            image=ImageRef(parquet=str(path), row=row, where=where),
            image_name=str(values.get("image_source") or f"row {row}"), file=path.name,
            kind=str(values.get("category") or ""),
        ))
    return out


def _check_parquet_images(handle, path: Path) -> None:
    """Every row has image bytes: read from the column statistics, so no image is decoded before the run; only a
    row group that reports missing bytes is read, to name the row."""
    meta = handle.metadata
    start = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for j in range(group.num_columns):
            column = group.column(j)
            if column.path_in_schema not in ("image", "image.bytes"):
                continue
            stats = column.statistics
            if stats is None or stats.null_count is None or stats.null_count > 0:
                cells = handle.read_row_group(g, columns=["image"]).column("image").to_pylist()
                for i, cell in enumerate(cells):
                    if not (cell.get("bytes") if isinstance(cell, dict) else cell):
                        raise _fail(f"{path} row {start + i}", "has no image bytes")
        start += group.num_rows


# ---------------------------------------------------------------------------------------------------------------
# Generic VQA


def choice_prompt(question: str, choices: tuple[str, ...]) -> str:
    """LLaVA-1.5's multiple-choice prompt: the question, lettered options, then the letter instruction."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}{CHOICE_SUFFIX}"


def read_vqa(data: str | os.PathLike, images: str | os.PathLike | None = None,
             prompt_suffix: str = SHORT_ANSWER_SUFFIX) -> list[FileQuestion]:
    """VQA rows {"image", "question", "answer"} with optional "choices" (a list; the answer is a letter or one of
    the choices), "type" and "question_id" (default: the line number)."""
    images_dir = _images_dir(images)
    out: list[FileQuestion] = []
    for path in _data_files(data, ("*.jsonl", "*.json")):
        qids: set[str] = set()
        for lineno, row in _jsonl_rows(path):
            where = f"{path}:{lineno}"
            question_id = str(row.get("question_id", lineno))
            qid = f"{path.name}:{question_id}"
            _check_unique(qids, qid, where)
            name = _field(row, "image", where)
            question = _field(row, "question", where)
            answer = _field(row, "answer", where).strip()
            choices: tuple[str, ...] = ()
            if row.get("choices") is not None:
                raw = row["choices"]
                if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS) or \
                        not all(isinstance(c, (str, int, float)) for c in raw):
                    raise _fail(where, f"choices must be a list of 2 to {len(LETTERS)} strings")
                choices = tuple(str(c) for c in raw)
                answer = _choice_letter(answer, choices, where)
                prompt = choice_prompt(question, choices)
            else:
                if not answer:
                    raise _fail(where, "answer is empty")
                prompt = question + prompt_suffix
            out.append(FileQuestion(qid=qid, question_id=question_id, prompt=prompt, answer=answer,
                                    image=_image_file(name, images_dir, path, where), image_name=name,
                                    file=path.name, kind=str(row.get("type", "")), choices=choices))
    return out


def _choice_letter(answer: str, choices: tuple[str, ...], where: str) -> str:
    letters = LETTERS[:len(choices)]
    if len(answer) == 1 and answer.upper() in letters:
        return answer.upper()
    for i, choice in enumerate(choices):
        if answer.strip().lower() == choice.strip().lower():
            return LETTERS[i]
    raise _fail(where, f"answer {answer!r} is neither a letter {letters[0]}-{letters[-1]} nor one of the choices")


# ---------------------------------------------------------------------------------------------------------------
# CHAIR on a COCO directory


def coco_split(coco: str | os.PathLike) -> tuple[Path, str]:
    """The COCO directory and its split: val2014, else val2017, else the only annotations/instances_<split>.json."""
    root = Path(coco)
    if not root.is_dir():
        raise _fail(str(root), "is not a directory (--coco)")
    found = sorted(p.name[len("instances_"):-len(".json")] for p in (root / "annotations").glob("instances_*.json"))
    split = next((s for s in COCO_SPLITS if s in found), found[0] if len(found) == 1 else None)
    if split is None:
        what = "several instance files (" + ", ".join(found) + ")" if found else "no annotations/instances_val2014.json"
        raise _fail(str(root), f"has {what}; expected the COCO layout annotations/instances_<split>.json, "
                               f"annotations/captions_<split>.json and <split>/ images")
    if not (root / "annotations" / f"captions_{split}.json").is_file():
        raise _fail(str(root), f"has no annotations/captions_{split}.json (needed for the CHAIR ground truth)")
    return root, split


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise _fail(f"{path}:{err.lineno}", f"malformed JSON ({err.msg})") from None
    if not data:
        raise _fail(str(path), "is empty")
    if not isinstance(data, dict):
        raise _fail(str(path), f"expected a COCO annotation object, got a JSON {type(data).__name__}")
    return data


def _coco_list(data: dict[str, Any], key: str, path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    items = data.get(key)
    if not isinstance(items, list):
        raise _fail(str(path), f"has no {key!r} list")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(f not in item for f in fields):
            raise _fail(f"{path} {key}[{i}]", f"needs the fields {', '.join(fields)}")
    return items


@dataclass
class CocoCaptions:
    """A COCO split for CHAIR: image files, per image the categories of its instances and its reference
    captions, and the vocabulary that maps words to the split's categories."""

    root: Path
    split: str
    categories: list[str]
    files: dict[int, str]
    instance_categories: dict[int, set[str]]
    captions: dict[int, list[str]]
    vocabulary: Any

    def truth(self, image_id: int) -> list[str]:
        """Objects in the image: its instance categories and every category its reference captions mention."""
        found = set(self.instance_categories.get(image_id, ()))
        for caption in self.captions.get(image_id, ()):
            found.update(self.vocabulary.mentions(caption))
        return sorted(found)


def load_coco(coco: str | os.PathLike) -> CocoCaptions:
    """Read annotations/instances_<split>.json and captions_<split>.json of a COCO directory."""
    from mmkit.evals.objects import vocabulary_for

    root, split = coco_split(coco)
    inst_path = root / "annotations" / f"instances_{split}.json"
    cap_path = root / "annotations" / f"captions_{split}.json"
    instances, captions = _load_json(inst_path), _load_json(cap_path)
    cats = {c["id"]: str(c["name"]) for c in _coco_list(instances, "categories", inst_path, ("id", "name"))}
    files = {im["id"]: str(im["file_name"])
             for im in _coco_list(instances, "images", inst_path, ("id", "file_name"))}
    if not files:
        raise _fail(str(inst_path), "lists no images")
    present: dict[int, set[str]] = {}
    for i, ann in enumerate(_coco_list(instances, "annotations", inst_path, ("image_id", "category_id"))):
        if ann["category_id"] not in cats:
            raise _fail(f"{inst_path} annotations[{i}]", f"unknown category_id {ann['category_id']}")
        present.setdefault(ann["image_id"], set()).add(cats[ann["category_id"]])
    refs: dict[int, list[str]] = {}
    for ann in _coco_list(captions, "annotations", cap_path, ("image_id", "caption")):
        refs.setdefault(ann["image_id"], []).append(str(ann["caption"]))
    # `mmkit world export` marks its files, so an exported world is scored with the world's own mention rules.
    info = instances.get("info") if isinstance(instances.get("info"), dict) else {}
    vocabulary = vocabulary_for(cats.values(), reference_world="mmkit_world_seed" in info)
    return CocoCaptions(root, split, list(cats.values()), files, present, refs, vocabulary)


def sample_image_ids(image_ids, n: int, seed: int) -> list[int]:
    """`n` image ids drawn with `seed` (all of them when `n` covers them), in id order."""
    ids = sorted(image_ids)
    if n < 1:
        raise MmkitError(f"--limit must be >= 1 images, got {n}")
    if n >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, n))


def read_chair(coco: str | os.PathLike, n: int = CHAIR_DEFAULT_IMAGES, seed: int = 0,
               prompt: str = CHAIR_PROMPT) -> tuple[list[FileQuestion], CocoCaptions]:
    """One captioning question per sampled image of the COCO split, with the image's true objects."""
    data = load_coco(coco)
    out = []
    for image_id in sample_image_ids(data.files, n, seed):
        name = data.files[image_id]
        where = f"{data.root / 'annotations' / f'instances_{data.split}.json'} image {image_id}"
        out.append(FileQuestion(qid=f"coco:{image_id}", prompt=prompt, answer="",
                                image=_image_file(name, data.root / data.split, data.root, where), image_name=name,
                                file=data.split, truth=tuple(data.truth(image_id))))
    return out, data


# ---------------------------------------------------------------------------------------------------------------
# Images


class ImageLoader:
    """Opens question images as RGB PIL images; parquet images are read one row group at a time and the last
    group is kept, since questions are asked in file order."""

    def __init__(self):
        self._group: tuple[str, int] | None = None
        self._group_images: list[Any] = []
        self._offsets: dict[str, list[int]] = {}
        self._handles: dict[str, Any] = {}

    def load(self, ref: ImageRef):
        from PIL import Image, UnidentifiedImageError

        try:
            if ref.path is not None:
                with Image.open(ref.path) as image:
                    return image.convert("RGB")
            cell = self._parquet_cell(ref)
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if not data:
                raise _fail(ref.where, "has no image bytes")
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise _fail(ref.where, f"image cannot be decoded ({type(err).__name__})") from None

    def _parquet_cell(self, ref: ImageRef):
        import bisect

        if ref.parquet not in self._handles:
            self._handles[ref.parquet] = _parquet_file(Path(ref.parquet))
        handle = self._handles[ref.parquet]
        if ref.parquet not in self._offsets:
            meta = handle.metadata
            starts, total = [], 0
            for g in range(meta.num_row_groups):
                starts.append(total)
                total += meta.row_group(g).num_rows
            self._offsets[ref.parquet] = starts
        starts = self._offsets[ref.parquet]
        group = bisect.bisect_right(starts, ref.row) - 1
        if self._group != (ref.parquet, group):
            self._group_images = handle.read_row_group(group, columns=["image"]).column("image").to_pylist()
            self._group = (ref.parquet, group)
        return self._group_images[ref.row - starts[group]]
