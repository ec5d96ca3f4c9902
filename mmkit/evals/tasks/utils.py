"""lmms-eval hooks for the mmkit reference-world tasks (loaded by lmms-eval from the task YAMLs).

Docs are the bench questions of `mmkit eval` (same world seed, same order, same count), images are rendered from
(world_seed, scene_index), and scores come from `mmkit.evals.metrics`, so a run here matches `mmkit eval`.
lmms-eval executes this file once per `!function` tag, so it holds no state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# The json loader needs a file; the docs themselves are generated in `process_docs`.
SEED_FILE = str(Path(__file__).with_name("seed.jsonl"))
# Held out: the reference model was trained on world seed 0 (as `mmkit eval`'s default).
WORLD_SEED = 1


def _docs(bench: str, split: str):
    import datasets

    from mmkit.evals.benches import BENCHES, select_questions

    questions = select_questions(bench, split, WORLD_SEED, BENCHES[bench].default_limit)
    return datasets.Dataset.from_list([vars(q) for q in questions])


def pope_random_docs(_dataset):
    return _docs("pope", "random")


def pope_popular_docs(_dataset):
    return _docs("pope", "popular")


def pope_adversarial_docs(_dataset):
    return _docs("pope", "adversarial")


def chair_docs(_dataset):
    return _docs("chair", "detailed")


def doc_to_visual(doc: dict[str, Any]) -> list:
    from PIL import Image

    from mmkit.world.scenes import generate_scene

    image = generate_scene(int(doc["world_seed"]), int(doc["scene_index"])).image
    return [image if isinstance(image, Image.Image) else Image.fromarray(image)]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["prompt"]


def _efficiency(doc: dict[str, Any]) -> dict[str, float]:
    # Recorded by the `mmkit` model; other models get NaN (no kept-token accounting).
    from mmkit.evals.lmms_adapter import STATS

    stats = STATS.get(doc["qid"], {})
    return {k: stats.get(k, math.nan) for k in ("visual_tokens_kept", "tflops_prefill", "prefill_ms")}


def pope_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    from mmkit.evals.metrics import parse_yes_no

    record = {"qid": doc["qid"], "parsed": parse_yes_no(results[0]), "answer": doc["answer"]}
    return {"pope_f1": record, "pope_accuracy": record, "pope_yes_ratio": record, **_efficiency(doc)}


def _pope(records: list[dict[str, Any]]) -> dict[str, float]:
    from mmkit.evals.metrics import pope_metrics

    records = sorted(records, key=lambda r: r["qid"])
    return pope_metrics([r["parsed"] for r in records], [r["answer"] for r in records])


def pope_f1(records):
    return _pope(records)["f1"]


def pope_accuracy(records):
    return _pope(records)["accuracy"]


def pope_yes_ratio(records):
    return _pope(records)["yes_ratio"]


def chair_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    from mmkit.world.scenes import generate_scene
    from mmkit.world.vocab import mentioned_categories

    text = results[0]
    truth = sorted(generate_scene(int(doc["world_seed"]), int(doc["scene_index"])).categories())
    record = {"mentions": list(dict.fromkeys(mentioned_categories(text))), "truth": truth,
              "length": len(text.split())}
    return {"chair_s": record, "chair_i": record, **_efficiency(doc)}


def _chair(records: list[dict[str, Any]]) -> dict[str, float]:
    from mmkit.evals.metrics import chair_metrics

    return chair_metrics([r["mentions"] for r in records], [set(r["truth"]) for r in records],
                         [r["length"] for r in records])


def chair_s(records):
    return _chair(records)["chair_s"]


def chair_i(records):
    return _chair(records)["chair_i"]
