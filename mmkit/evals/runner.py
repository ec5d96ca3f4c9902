"""`run_eval`: evaluate a model (with methods) on a reference-world bench; resumable, atomic outputs.

Layout of an output directory:
    run.json        the settings, written first; a resume must match them
    samples.jsonl   one record per question, appended per batch (fsynced); a killed run resumes from it
    results.json    metrics + efficiency, written (atomically) when every sample is done
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from mmkit.errors import MmkitError
from mmkit.evals.benches import BENCHES, bench_spec, select_questions

logger = logging.getLogger(__name__)

RESULT_VERSION = 1


def _settings(model, bench, split, methods, limit, decoding, seed, world_seed, max_new_tokens,
              ground=None) -> dict[str, Any]:
    settings = {
        "model": model, "bench": bench, "split": split, "methods": list(methods), "limit": limit,
        "decoding": decoding, "seed": seed, "world_seed": world_seed, "max_new_tokens": max_new_tokens,
    }
    if ground is not None:
        settings["ground"] = ground
    return settings


def _check_resume(out: Path, settings: dict[str, Any]) -> None:
    from mmkit.atomic import atomic_write_json

    manifest = out / "run.json"
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            raise MmkitError(f"{manifest} is not valid JSON; remove the directory or pick another --out") from None
        if previous != settings:
            diff = sorted(k for k in settings if previous.get(k) != settings[k])
            raise MmkitError(
                f"{out} holds a different run (differs in {', '.join(diff)}); use another --out to start a new one"
            )
    else:
        atomic_write_json(manifest, settings)


def _score(bench: str, question, text: str, scene) -> dict[str, Any]:
    from mmkit.evals.metrics import parse_yes_no, vqa_metrics
    from mmkit.world.vocab import mentioned_categories

    if bench == "pope":
        parsed = parse_yes_no(text)
        return {"parsed": parsed, "correct": parsed == question.answer}
    if bench == "vqa":
        return {"correct": vqa_metrics([question.kind], [text], [question.answer])["accuracy"] == 1.0}
    if bench == "chair":
        mentions = list(dict.fromkeys(mentioned_categories(text)))
        truth = sorted(scene.categories())
        return {"mentions": mentions, "truth": truth, "hallucinated": [m for m in mentions if m not in truth]}
    raise MmkitError(f"bench {bench!r} is not scored by text answers")


def aggregate(bench: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Bench metrics from per-sample records (order-independent)."""
    from mmkit.evals.metrics import chair_metrics, pope_metrics, vqa_metrics

    if bench == "ground":
        from mmkit.grounding.bench import ground_metrics

        return ground_metrics(records)
    records = sorted(records, key=lambda r: r["qid"])
    if bench == "pope":
        return pope_metrics([r["parsed"] for r in records], [r["answer"] for r in records])
    if bench == "vqa":
        return vqa_metrics([r["kind"] for r in records], [r["text"] for r in records], [r["answer"] for r in records])
    if bench == "chair":
        return chair_metrics([r["mentions"] for r in records], [set(r["truth"]) for r in records],
                             [len(r["text"].split()) for r in records])
    raise MmkitError(f"no aggregation for bench {bench!r}")


def efficiency(records: list[dict[str, Any]], hidden: int, intermediate: int, kv_heads: int, head_dim: int,
               bytes_per_el: int) -> dict[str, Any]:
    """Mean efficiency over samples: visual tokens in/kept, prefill TFLOPs from the tokens each layer kept,
    amortised prefill time, and the largest KV cache a sample needed."""
    from mmkit.evals.flops import kv_cache_bytes, prefill_tflops

    n = max(len(records), 1)
    tflops = [prefill_tflops(r["tokens_per_layer"], hidden, intermediate, cross_visual=r.get("visual_tokens_cross"))
              for r in records]
    kv = [kv_cache_bytes([t + r["new_tokens"] for t in r["tokens_per_layer"]], kv_heads, head_dim, bytes_per_el)
          for r in records]
    return {
        "visual_tokens": sum(r["visual_tokens"] for r in records) / n,
        "visual_tokens_kept": sum(sum(r["visual_tokens_kept"]) / len(r["visual_tokens_kept"]) for r in records) / n,
        "tflops_prefill": sum(tflops) / n,
        "prefill_ms": sum(r["prefill_ms_batch"] / r["batch_size"] for r in records) / n,
        # The whole answer: every branch of a multi-branch method, prefill and decoding (None for records
        # written before this field existed).
        "answer_ms": (sum(r["generate_ms_batch"] / r["batch_size"] for r in records) / n
                      if records and all("generate_ms_batch" in r for r in records) else None),
        "peak_kv_bytes": int(max(kv) if kv else 0),
        "new_tokens": sum(r["new_tokens"] for r in records) / n,
    }


def ground_efficiency(metrics: dict[str, Any], visual_tokens: int) -> dict[str, Any]:
    """Cost of the ground bench per image, from its metrics: the pipeline makes several LVLM and SAM calls per
    image, so per-sample prefill figures do not apply (None); calls, prompts and wall seconds per image do."""
    per_image = [f"{k}_per_image" for k in ("lvlm_calls", "lvlm_sequences", "sam_calls", "sam_prompts", "seconds")]
    return {"visual_tokens": visual_tokens, "visual_tokens_kept": None, "tflops_prefill": None, "prefill_ms": None,
            "peak_kv_bytes": None, **{k: metrics[k] for k in per_image}}


def run_eval(model: str = "reference", bench: str = "pope", split: str | None = None, methods: Sequence = (),
             limit: int | None = None, batch_size: int = 8, decoding: str = "greedy", seed: int = 0,
             world_seed: int = 1, out: str | os.PathLike | None = None, max_new_tokens: int | None = None,
             device=None, dtype=None, session=None, progress: bool = True, sam: str | None = None,
             ground_mode: str = "describe", data: str | os.PathLike | None = None,
             images: str | os.PathLike | None = None, coco: str | os.PathLike | None = None,
             prompt: str | None = None, prompt_suffix: str | None = None) -> dict[str, Any]:
    """Evaluate and return the results dict (also written to `out/results.json` when `out` is given).

    `world_seed` defaults to 1: the reference model was trained on world seed 0, so evaluation is held out.
    The ground bench runs VL-SAM (`ground_mode` describe or query) with `sam` (a SAM checkpoint directory or hub
    id; None = the shipped small SAM), `batch_size` scenes per pipeline call.

    File benches: `data` (POPE question file / lmms-eval POPE parquet file or directory, or VQA JSON lines) with
    `images`, or `coco` (a COCO directory, CHAIR on `limit` images sampled with `seed`, default 500) replace the
    generated bench; `split` then selects a POPE category or VQA type, `prompt` overrides the CHAIR prompt and
    `prompt_suffix` the instruction appended to file questions (see `mmkit.evals.filebench`).
    """
    import torch

    from mmkit.atomic import atomic_write_json
    from mmkit.evals.io import ResumableJsonl

    file_bench = None
    if data is not None or coco is not None or images is not None:
        from mmkit.evals.filebench import MAX_NEW_TOKENS, load_file_bench

        if images is not None and data is None:
            raise MmkitError("--images goes with --data (the images of the question file)")
        # Read and check every file before anything is loaded or written.
        file_bench = load_file_bench(bench, data=data, images=images, coco=coco, split=split, limit=limit,
                                     seed=seed, prompt=prompt, prompt_suffix=prompt_suffix)
        spec, split = BENCHES[bench], file_bench.split
        limit = len(file_bench.questions)
        max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[bench]
        world_seed = None
    elif prompt is not None or prompt_suffix is not None:
        raise MmkitError("--prompt and --prompt-suffix apply to file benches (--data / --coco)")
    else:
        spec, split = bench_spec(bench, split)
    if bench == "ground":
        from mmkit.grounding.bench import MODES

        if decoding != "greedy":
            raise MmkitError("the ground bench decodes greedily; drop --decoding sample")
        if ground_mode not in MODES:
            raise MmkitError(f"--ground-mode must be one of {', '.join(MODES)}, got {ground_mode!r}")
    if decoding not in ("greedy", "sample"):
        raise MmkitError(f"--decoding must be greedy or sample, got {decoding!r}")
    if batch_size < 1:
        raise MmkitError(f"--batch-size must be >= 1, got {batch_size}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise MmkitError(f"--out {out} is a file; the run writes a directory there, pick a new --out")
    limit = spec.default_limit if limit is None else limit
    max_new_tokens = max_new_tokens or spec.max_new_tokens_for(split)
    rank, world, state = _process_shard()
    if session is None:
        import mmkit

        if state is not None and device is None:
            device = state.device  # one GPU per process under accelerate launch
        session = mmkit.load(model, methods=list(methods), device=device, dtype=dtype)
    if bench == "ground":
        from mmkit.models.families import check_grounding

        check_grounding(session.adapter.family)  # before anything is written to the output directory
    method_specs = [h.spec for h in session.methods]
    ground = {"mode": ground_mode, "sam": sam or "shipped"} if bench == "ground" else None
    settings = _settings(session.source or model, bench, split, method_specs, limit, decoding, seed, world_seed,
                         max_new_tokens, ground)
    if file_bench is not None:
        settings["files"] = file_bench.settings
        questions = file_bench.questions
    else:
        questions = select_questions(bench, split, world_seed, limit)
    sam_backend = None
    if bench == "ground":
        from mmkit.grounding.bench import check_ground_args, ground_scene_records, scene_chunks
        from mmkit.grounding.vlsam import default_sam

        check_ground_args(questions, ground_mode, batch_size)
        sam_backend = default_sam(sam, session.device)

    if world > 1 and out is None:
        raise MmkitError("a multi-process evaluation needs --out: the processes merge their samples there")
    store = None
    done: set[str] = set()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            _check_resume(out, settings)
        if state is not None:
            state.wait_for_everyone()
        if rank != 0:
            _check_resume(out, settings)
        # Every process skips what any process already finished (a resume may use another process count), but
        # each appends only to its own file.
        store = ResumableJsonl(out / _samples_name(rank, world))
        for other in sorted(out.glob("samples*.jsonl")):
            done |= store.done() if other.name == store.path.name else ResumableJsonl(other).done()
    records: list[dict[str, Any]] = [] if store is None else list(store.records())

    from tqdm import tqdm

    if bench == "ground":  # a batch is `batch_size` scenes with all of their questions
        chunks = scene_chunks(questions, batch_size)
    else:
        chunks = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    bar = tqdm(total=len(questions), initial=len(done), desc=f"{bench}/{split}", unit="q", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for chunk_idx, chunk in enumerate(chunks):
        if chunk_idx % world != rank:
            continue  # another process's shard; chunks (and so batches and seeds) are the same for any count
        todo = [q for q in chunk if q.qid not in done]
        if not todo:
            continue
        # The whole chunk is re-run so that sampled answers depend only on (seed, chunk), not on where a killed
        # run stopped; only records not already stored are kept.
        if bench == "ground":
            new_records = [r for r in ground_scene_records(session, sam_backend, chunk, world_seed, mode=ground_mode)
                           if r["qid"] not in done]
        elif file_bench is not None:
            new_records = _file_answer_records(session, file_bench, chunk, chunk_idx, done, max_new_tokens,
                                               decoding, seed)
        else:
            new_records = _answer_records(session, bench, chunk, chunk_idx, done, world_seed, max_new_tokens,
                                          decoding, seed)
        if store is not None:
            store.append(new_records)
        records.extend(new_records)
        done.update(r["qid"] for r in new_records)
        bar.update(len(new_records))
    bar.close()

    if world > 1:
        state.wait_for_everyone()
        if rank != 0:
            return {}
    if out is not None:
        records = _merged_records(out, questions)
    adapter = session.adapter
    bytes_per_el = torch.finfo(session.dtype).bits // 8
    if file_bench is not None:
        from mmkit.evals.filebench import aggregate_files

        metrics = aggregate_files(bench, records)
    else:
        metrics = aggregate(bench, records)
    result = {
        "version": RESULT_VERSION,
        **{k: settings[k] for k in ("model", "bench", "split", "methods", "decoding", "seed", "world_seed")},
        "n": len(records),
        "batch_size": batch_size,
        "device": str(session.device),
        "dtype": str(session.dtype).replace("torch.", ""),
        "metrics": metrics,
        "efficiency": (ground_efficiency(metrics, session.describe()["visual_tokens"]) if bench == "ground" else
                       efficiency(records, adapter.hidden_size, adapter.intermediate_size, adapter.num_kv_heads,
                                  adapter.head_dim, bytes_per_el)),
    }
    if ground is not None:
        result["ground"] = ground
    if file_bench is not None:
        result["files"] = file_bench.settings
    if out is not None:
        atomic_write_json(out / "results.json", result)
    return result


def _generate_chunk(session, images: list, chunk: list, chunk_idx: int, max_new_tokens: int, decoding: str,
                    seed: int) -> list[tuple[Any, dict[str, Any]]]:
    """Answer the chunk in one batch: per question, the generation result and its efficiency fields."""
    started = time.perf_counter()
    results = session.generate(images, [q.prompt for q in chunk], max_new_tokens=max_new_tokens,
                               do_sample=decoding == "sample", seed=seed * 1_000_003 + chunk_idx)
    generate_ms = (time.perf_counter() - started) * 1000.0
    return [(res, {
        "visual_tokens": res.stats.visual_tokens, "visual_tokens_kept": res.stats.visual_tokens_kept,
        "tokens_per_layer": res.stats.tokens_per_layer, "new_tokens": res.stats.new_tokens,
        "visual_tokens_cross": res.stats.visual_tokens_cross,
        "prefill_ms_batch": res.stats.prefill_ms, "generate_ms_batch": generate_ms, "batch_size": len(chunk),
    }) for res in results]


def _answer_records(session, bench: str, chunk: list, chunk_idx: int, done: set[str], world_seed: int,
                    max_new_tokens: int, decoding: str, seed: int) -> list[dict[str, Any]]:
    """Generate the chunk's answers in one batch; one scored record per question not in `done`."""
    from mmkit.world.scenes import generate_scene

    scenes = [generate_scene(world_seed, q.scene_index) for q in chunk]
    answers = _generate_chunk(session, [s.image for s in scenes], chunk, chunk_idx, max_new_tokens, decoding, seed)
    return [{
        "qid": q.qid, "scene_index": q.scene_index, "kind": q.kind, "split": q.split, "prompt": q.prompt,
        "answer": q.answer, "text": res.text, **_score(bench, q, res.text, scene), **cost,
    } for q, scene, (res, cost) in zip(chunk, scenes, answers) if q.qid not in done]


def _file_answer_records(session, file_bench, chunk: list, chunk_idx: int, done: set[str], max_new_tokens: int,
                         decoding: str, seed: int) -> list[dict[str, Any]]:
    """`_answer_records` for a file bench: images from the files, scores from `mmkit.evals.filebench`."""
    from mmkit.evals.filebench import score

    images = [file_bench.loader.load(q.image) for q in chunk]
    answers = _generate_chunk(session, images, chunk, chunk_idx, max_new_tokens, decoding, seed)
    return [{
        "qid": q.qid, "question_id": q.question_id, "file": q.file, "image": q.image_name, "kind": q.kind,
        "prompt": q.prompt, "answer": q.answer, "text": res.text, **score(file_bench, q, res.text), **cost,
    } for q, (res, cost) in zip(chunk, answers) if q.qid not in done]


class _Group:
    """The process group of a `torchrun` / `accelerate launch` evaluation (gloo on CPU, nccl on GPUs)."""

    def __init__(self):
        import torch
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")

    def wait_for_everyone(self) -> None:
        self.dist.barrier()


def _process_shard():
    """(rank, world size, group) under `torchrun` / `accelerate launch`; (0, 1, None) in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    group = _Group()
    return group.rank, group.world, group


def _samples_name(rank: int, world: int) -> str:
    return "samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl"


def _merged_records(out: Path, questions) -> list[dict[str, Any]]:
    """All processes' records, one per question, in question order."""
    from mmkit.evals.io import ResumableJsonl

    by_qid: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("samples*.jsonl")):
        for record in ResumableJsonl(path).records():
            by_qid.setdefault(record["qid"], record)
    missing = [q.qid for q in questions if q.qid not in by_qid]
    if missing:
        raise MmkitError(f"{len(missing)} samples are missing after the run (first: {missing[0]}); run it again")
    return [by_qid[q.qid] for q in questions]
