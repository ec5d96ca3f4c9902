"""Benches read from files (`mmkit eval --data` / `--coco`): which questions, how to score them, how to aggregate.

POPE answers are parsed as the POPE reference does: the first word decides ("yes" or "no"); any other answer
counts as "no" and is counted in `unparsed`. VQA answers are scored by exact match after normalisation, yes/no
references by the first word, multiple choice by the option letter. CHAIR maps caption words to the dataset's
categories (`mmkit.evals.objects`) and compares them with the objects of the instance annotations and the
reference captions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkit.errors import MmkitError
from mmkit.evals import datafiles

# Answer lengths of the file benches (LLaVA-1.5's protocols: short answers, and 512 tokens for CHAIR captions).
MAX_NEW_TOKENS = {"pope": 8, "vqa": 16, "chair": 512}
_FIRST_WORD = re.compile(r"[a-z]+")
_LETTER = re.compile(r"\b([A-Z])\b")


@dataclass
class FileBench:
    """Questions of a file bench with what scoring needs; `settings` goes into run.json (a resume must match)."""

    bench: str
    split: str
    questions: list
    settings: dict[str, Any]
    vocabulary: Any = None
    loader: datafiles.ImageLoader = field(default_factory=datafiles.ImageLoader)


def _fingerprint(questions: list) -> str:
    """A digest of the questions asked (ids, prompts, answers, images, truths): a resume refuses changed files."""
    digest = hashlib.sha256()
    for q in questions:
        digest.update("\t".join([q.qid, q.prompt, q.answer, q.image_name, ",".join(q.truth)]).encode() + b"\n")
    return digest.hexdigest()[:16]


def _name(path: str) -> str:
    p = Path(path)
    return p.stem if p.is_file() else p.name


def load_file_bench(bench: str, data=None, images=None, coco=None, split: str | None = None,
                    limit: int | None = None, seed: int = 0, prompt: str | None = None,
                    prompt_suffix: str | None = None) -> FileBench:
    """Read and check the files of a file bench (see `mmkit eval --help`); nothing runs before this succeeds."""
    if bench == "chair":
        if coco is None or data is not None:
            raise MmkitError("--bench chair reads a COCO directory: pass --coco DIR (not --data)")
        if images is not None:
            raise MmkitError("--images is for --data files; CHAIR finds images in the COCO directory")
        if split is not None:
            raise MmkitError("--split does not apply to --coco; use --limit N images and --seed")
        n = datafiles.CHAIR_DEFAULT_IMAGES if limit is None else limit
        prompt = datafiles.CHAIR_PROMPT if prompt is None else prompt
        questions, coco_data = datafiles.read_chair(coco, n=n, seed=seed, prompt=prompt)
        settings = {"coco": str(Path(coco).resolve()), "coco_split": coco_data.split, "images": n,
                    "sample_seed": seed, "prompt": prompt, "fingerprint": _fingerprint(questions)}
        return FileBench(bench, coco_data.split, questions, settings, vocabulary=coco_data.vocabulary)
    if bench not in ("pope", "vqa"):
        raise MmkitError(f"--data / --coco apply to the pope, vqa and chair benches, not {bench!r}")
    if data is None or coco is not None:
        raise MmkitError(f"--bench {bench} reads question files: pass --data FILE (and --images DIR), not --coco")
    if prompt is not None:
        raise MmkitError("--prompt applies to --bench chair; the questions come from the file")
    suffix = datafiles.SHORT_ANSWER_SUFFIX if prompt_suffix is None else prompt_suffix
    reader = datafiles.read_pope if bench == "pope" else datafiles.read_vqa
    questions = reader(data, images, prompt_suffix=suffix)
    label = _name(str(data))
    if split is not None:
        questions = [q for q in questions if q.kind == split]
        if not questions:
            what = "category" if bench == "pope" else "type"
            raise MmkitError(f"{data} has no questions of {what} {split!r} (--split selects a {what})")
        label = f"{label}:{split}"
    if limit is not None:
        if limit < 1:
            raise MmkitError(f"--limit must be >= 1, got {limit}")
        questions = questions[:limit]
    settings = {"data": str(Path(data).resolve()), "images": None if images is None else str(Path(images).resolve()),
                "select": split, "questions": len(questions), "prompt_suffix": suffix,
                "fingerprint": _fingerprint(questions)}
    return FileBench(bench, label, questions, settings)


def parse_pope_answer(text: str | None) -> tuple[str, bool]:
    """(answer, unparsed) as the POPE reference reads an answer: "yes" or "no" when the first word is one of them,
    else ("no", True)."""
    words = _FIRST_WORD.findall((text or "").lower())
    if words and words[0] in ("yes", "no"):
        return words[0], False
    return "no", True


def parse_choice(text: str | None, choices: tuple[str, ...]) -> str | None:
    """The option letter an answer picks: a leading letter ("B", "B.", "(B) cat"), else the only choice whose text
    the answer starts with; None when neither."""
    from mmkit.evals.metrics import normalize_answer

    text = (text or "").strip()
    letters = datafiles.LETTERS[:len(choices)]
    match = _LETTER.match(text.lstrip("(["))
    if match and match.group(1) in letters:
        return match.group(1)
    said = normalize_answer(text)
    hits = [datafiles.LETTERS[i] for i, c in enumerate(choices)
            if normalize_answer(c) and (said == normalize_answer(c) or said.startswith(normalize_answer(c) + " "))]
    return hits[0] if len(hits) == 1 else None


def vqa_file_correct(pred: str | None, answer: str, choices: tuple[str, ...] = ()) -> bool:
    """Multiple choice: the picked letter; yes/no references: the first word; others: exact match after
    `normalize_answer` (case, punctuation, articles, number words)."""
    from mmkit.evals.metrics import normalize_answer

    if choices:
        return parse_choice(pred, choices) == answer
    p, a = normalize_answer(pred), normalize_answer(answer)
    if a in ("yes", "no"):
        return p.split()[:1] == [a]
    return bool(a) and p == a


def score(fb: FileBench, question, text: str) -> dict[str, Any]:
    """Per-sample scores of one answer."""
    if fb.bench == "pope":
        parsed, unparsed = parse_pope_answer(text)
        return {"parsed": parsed, "unparsed": unparsed, "correct": parsed == question.answer}
    if fb.bench == "vqa":
        out: dict[str, Any] = {"correct": vqa_file_correct(text, question.answer, question.choices)}
        if question.choices:
            out["choice"] = parse_choice(text, question.choices)
        return out
    mentions = fb.vocabulary.mentions(text)
    truth = list(question.truth)
    return {"mentions": mentions, "truth": truth, "hallucinated": [m for m in mentions if m not in truth]}


def _pope(records: list[dict[str, Any]]) -> dict[str, Any]:
    from mmkit.evals.metrics import pope_metrics

    out = pope_metrics([r["parsed"] for r in records], [r["answer"] for r in records])
    out["unparsed"] = sum(bool(r["unparsed"]) for r in records)  # a count here, not a share
    return out


def _vqa(records: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    out: dict[str, Any] = {"accuracy": sum(r["correct"] for r in records) / n}
    for kind in sorted({r["kind"] for r in records} - {""}):
        hits = [r["correct"] for r in records if r["kind"] == kind]
        out[f"accuracy/{kind}"] = sum(hits) / len(hits)
    out["n"] = n
    return out


def aggregate_files(bench: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Bench metrics over all records, plus `by_file` and (POPE categories) `by_category` breakdowns."""
    from mmkit.evals.metrics import chair_metrics

    if not records:
        raise MmkitError("no samples to score")
    records = sorted(records, key=lambda r: r["qid"])
    if bench == "chair":
        return chair_metrics([r["mentions"] for r in records], [set(r["truth"]) for r in records],
                             [len(r["text"].split()) for r in records])
    fn = _pope if bench == "pope" else _vqa
    out = fn(records)
    files = sorted({r["file"] for r in records})
    out["by_file"] = {f: fn([r for r in records if r["file"] == f]) for f in files}
    if bench == "pope":
        kinds = sorted({r["kind"] for r in records} - {""})
        if kinds:
            out["by_category"] = {k: fn([r for r in records if r["kind"] == k]) for k in kinds}
    return out
