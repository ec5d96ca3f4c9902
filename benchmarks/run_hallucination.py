"""Produce benchmarks/hallucination.md: hallucination-mitigation methods on the reference model against the
baseline measured in the same run (same process, machine and questions).

    .venv/bin/python benchmarks/run_hallucination.py [--limit 150] [--seeds 3] [--quick]

POPE on three splits and CHAIR on detailed captions, each greedy and sampled (T=1, several seeds: the papers'
baselines are sampled), VQA, and the cost per answer. Resumable: finished runs are reused. The report is rewritten after every block; a section
headed "What works and what does not" at its end is kept.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import mmkit
from mmkit.atomic import atomic_write_text
from mmkit.evals.metrics import mean_std
from mmkit.evals.report import report_table
from mmkit.evals.runner import run_eval

METHODS = ("vcd", "agla", "vhr", "paint", "var")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/hallucination")
    parser.add_argument("--quick", action="store_true", help="POPE-adversarial (greedy + sampled) and CHAIR only")
    args = parser.parse_args()
    from mmkit.registry import list_methods

    names = {m.name for m in list_methods()}
    specs = [None] + [m for m in METHODS if m in names]
    session = mmkit.load("reference", device="cpu")
    out = Path(args.out)
    splits = ("adversarial",) if args.quick else ("adversarial", "random", "popular")
    plan = []
    for i, split in enumerate(splits):
        plan += [("pope", split, "greedy", 0)] + [("pope", split, "sample", s) for s in range(args.seeds)]
        if i == 0:  # the captions and VQA early, so that a partial run already covers every bench
            plan += [("chair", "detailed", "greedy", 0)] + [("chair", "detailed", "sample", s) for s in range(args.seeds)]
            plan += [] if args.quick else [("vqa", "all", "greedy", 0)]
    blocks: dict[tuple, list] = {}
    for bench, split, decoding, seed in plan:
        for spec in specs:
            session.remove_all()
            if spec:
                session.apply(spec)
            name = spec or "baseline"
            result = run_eval(session=session, bench=bench, split=split, limit=args.limit, batch_size=args.batch_size,
                              decoding=decoding, seed=seed, progress=False,
                              out=out / f"{bench}-{split}-{decoding}-s{seed}" / name)
            blocks.setdefault((bench, split, decoding, seed), []).append(result)
            print(f"{bench}/{split}/{decoding}/s{seed} {name}: {result['metrics']}", flush=True)
        write_report(args, blocks, [spec or "baseline" for spec in specs])


def _cell(runs: list[dict], key: str, fmt: str = ".3f") -> str:
    values = [r["metrics"][key] for r in runs]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    mean, std = mean_std(values)
    return f"{mean:{fmt}} ± {std:{fmt}}"


def write_report(args, blocks: dict[tuple, list], names: list[str]) -> None:
    """benchmarks/hallucination.md from the blocks measured so far; the hand-written analysis is kept."""
    path = Path("benchmarks/hallucination.md")
    analysis = ""
    if path.exists():
        text = path.read_text()
        if ANALYSIS in text:
            analysis = text[text.index(ANALYSIS):]

    def runs_of(name, bench, split, decoding):
        return [r for (b, s, d, _), runs in blocks.items() if (b, s, d) == (bench, split, decoding)
                for r in runs if (" + ".join(r["methods"]) or "baseline") == name]

    def ratio(name, bench, split):
        base, mine = runs_of("baseline", bench, split, "greedy"), runs_of(name, bench, split, "greedy")
        if not base or not mine or not base[0]["efficiency"].get("answer_ms"):
            return "-"
        return f"{mine[0]['efficiency']['answer_ms'] / base[0]['efficiency']['answer_ms']:.2f}"

    splits = [s for s in ("adversarial", "random", "popular") if runs_of("baseline", "pope", s, "greedy")]
    lines = [
        "# Hallucination mitigation on the reference model",
        "",
        f"Measured with `.venv/bin/python benchmarks/run_hallucination.py --limit {args.limit} --seeds {args.seeds}"
        f"{' --quick' if args.quick else ''}` on {platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, fp32, batch {args.batch_size}, held-out world seed 1, each method at its "
        f"defaults. POPE: {args.limit} questions per split; CHAIR: {args.limit} captions for \"Describe the "
        f"image in detail.\" (split `detailed`, 128 new tokens); VQA: {args.limit} questions. Each block's rows were measured in the same run as its "
        "baseline, on the same questions. Sampling is T=1, top-p 1, seeds 0.."
        f"{args.seeds - 1}; sampled cells are mean ± sample std over the seeds.",
        "",
        "## Summary",
        "",
        "| method | " + " | ".join(f"POPE-{s[:3]} F1 greedy | POPE-{s[:3]} F1 sampled" for s in splits)
        + " | CHAIR_S greedy | CHAIR_S sampled | CHAIR_I greedy | CHAIR_I sampled | CHAIR recall greedy"
        " | caption words greedy | VQA acc | time/answer POPE | time/answer caption |",
        "|---|" + "---:|" * (2 * len(splits) + 9),
    ]
    for name in names:
        cells = []
        for s in splits:
            cells += [_cell(runs_of(name, "pope", s, "greedy"), "f1"), _cell(runs_of(name, "pope", s, "sample"), "f1")]
        chair, sampled = runs_of(name, "chair", "detailed", "greedy"), runs_of(name, "chair", "detailed", "sample")
        cells += [_cell(chair, "chair_s"), _cell(sampled, "chair_s"), _cell(chair, "chair_i"), _cell(sampled, "chair_i"),
                  _cell(chair, "recall"), _cell(chair, "mean_length", ".1f")]
        cells += [_cell(runs_of(name, "vqa", "all", "greedy"), "accuracy"), ratio(name, "pope", "adversarial"),
                  ratio(name, "chair", "detailed")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Time per answer is the whole generate call (every branch, prefill and decoding) per sample, as a ratio to "
        "the baseline of the same block (POPE-adversarial greedy: 4 new tokens at most; CHAIR greedy: 128).",
        "",
        "## All runs",
        "",
        "```",
    ]
    for key, runs in blocks.items():
        lines.append(f"-- {key[0]}/{key[1]} {key[2]} seed {key[3]} --")
        lines.append(report_table(runs))
    lines += ["```", ""]
    atomic_write_text(path, "\n".join(lines) + "\n" + ("\n" + analysis if analysis else ""))


ANALYSIS = "## What works and what does not"


if __name__ == "__main__":
    main()
