"""Produce benchmarks/pruning.md: token-pruning methods on the reference model, each against the baseline
measured in the same run (same process, same machine, same questions).

    .venv/bin/python benchmarks/run_pruning.py [--limit 150] [--out runs/pruning]
    .venv/bin/python benchmarks/run_pruning.py --budgets [--limit 60] [--out runs/pruning-budgets]

`--budgets` runs every method at the literature's 192 / 128 / 64 retained tokens instead and rewrites only the
"Token budgets" section (benchmarks/pruning_budgets.py: table with bootstrap intervals, kept-patch figure).

POPE (three splits) and VQA at keep ratios of 50 / 25 / 10 %, DyVTE and VISOR at their own operating points.
Resumable: finished runs are reused (each run directory is an `mmkit eval` output directory); the report is
rewritten after every block, keeping a final section headed "Reading the numbers".
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import Counter
from pathlib import Path

import torch

import mmkit
from mmkit.atomic import atomic_write_text
from mmkit.evals.report import label, plot_pareto, primary_value, report_table
from mmkit.evals.runner import run_eval
from mmkit.registry import list_methods

KEEPS = (0.5, 0.25, 0.1)
BENCHES = (("pope", "random"), ("pope", "popular"), ("pope", "adversarial"), ("vqa", "all"))


def method_grid() -> dict[str, list[str]]:
    """Method specs at roughly 50 / 25 / 10 % of the visual tokens (each method's own knob; the table reports the
    visual tokens actually kept per layer), plus DyVTE at its own operating point."""
    grid = {
        "fastv": [f"fastv:layer=2,keep={k}" for k in KEEPS],
        "pyramiddrop": [f"pyramiddrop:ratio={k}" for k in KEEPS],
        "sparsevlm": [f"sparsevlm:layers=1/2,keep={k}/{k}" for k in KEEPS],
        "visionzip": [f"visionzip:keep={k}" for k in KEEPS],
        "vflowopt": [f"vflowopt:vision_keep={k}" for k in KEEPS] + [f"vflowopt:config=reference-{k}" for k in KEEPS],
        "dyvte": ["dyvte"],
    }
    names = {m.name for m in list_methods()}
    return {k: v for k, v in grid.items() if k in names}


def visor_specs() -> list[str]:
    """VISOR at each fixed budget (self-attention layers over the visual tokens) and with its policy; empty while
    its reference-model weights are not shipped."""
    if "visor" not in {m.name for m in list_methods()}:
        return []
    from mmkit.pruning.visor import SHIPPED_DIR

    if not any(SHIPPED_DIR.rglob("*.safetensors")):
        return []
    return [f"visor:budget={k}" for k in (1, 2, 3)] + ["visor"]


def run_name(spec: str | None) -> str:
    return (spec or "baseline").replace(":", "_").replace(",", "_").replace("/", "-").replace("=", "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--budgets", action="store_true", help="the 192/128/64-token comparison only")
    args = parser.parse_args()
    session = mmkit.load("reference", device="cpu")
    if args.budgets:
        from pruning_budgets import write_budget_section

        write_budget_section(session, args, Path(args.out or "runs/pruning-budgets"))
        return
    out = Path(args.out or "runs/pruning")
    specs = [s for group in method_grid().values() for s in group]
    # Blocks: (title, bench, split, specs, directory). Each block runs its own baseline first, so every ratio is
    # against a baseline measured in the same process, right before the method runs.
    blocks = [("main", bench, split, specs, out / f"{bench}-{split}") for bench, split in BENCHES]
    visor = visor_specs()
    blocks += [("visor", bench, split, visor, out / f"visor-{bench}-{split}") for bench, split in BENCHES if visor]
    run_blocks(session, blocks, args, lambda done: write_report(args, done))


def _exit_layers(run_dir: str) -> Counter:
    """DyVTE: per sample, the first decoder layer that ran without visual tokens (None = no exit)."""
    exits: Counter = Counter()
    for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines():
        kept = json.loads(line)["visual_tokens_kept"]
        exits[next((i for i, k in enumerate(kept) if k == 0), None)] += 1
    return exits


def _summary(done, title: str) -> list[str]:
    """One row per method spec: the primary metric per bench, kept tokens and cost ratios on POPE-random."""
    blocks = [(bench, split, runs) for t, bench, split, runs in done if t == title]
    if not blocks:
        return []
    heads = [f"{'F1' if b == 'pope' else 'acc'} {b}-{s[:3] if b == 'pope' else s}" for b, s, _ in blocks]
    lines = ["| method | " + " | ".join(heads) + " | kept/layer | xTFLOPs | xprefill |",
             "|---|" + "---:|" * (len(heads) + 3)]
    labels = [label(r) for r in blocks[0][2]]
    for name in labels:
        cells, first = [], None
        for bench, _, runs in blocks:
            run = next((r for r in runs if label(r) == name), None)
            base = runs[0]
            if run is None:
                cells.append("-")
                continue
            first = first or (run, base)
            delta = primary_value(run) - primary_value(base)
            cells.append(f"{primary_value(run):.3f}" + ("" if run is base else f" ({delta:+.3f})"))
        run, base = first
        eff, beff = run["efficiency"], base["efficiency"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {eff['visual_tokens_kept']:.1f} | "
                     f"{eff['tflops_prefill'] / beff['tflops_prefill']:.2f} | "
                     f"{eff['prefill_ms'] / beff['prefill_ms']:.2f} |")
    return lines


def write_report(args, done) -> None:
    lines = [
        "# Visual-token pruning on the reference model",
        "",
        f"Measured with `.venv/bin/python benchmarks/run_pruning.py --limit {args.limit}` on "
        f"{platform.machine()} CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}), "
        f"torch {torch.__version__}, fp32, batch {args.batch_size}, greedy, {args.limit} questions per bench of "
        "held-out world seed 1. Every block runs its own baseline first, in the same process, on the same questions; "
        "`kept` = visual tokens per decoder layer (mean over the 4 layers and the samples); TFLOPs = decoder "
        "prefill FLOPs per sample from the tokens each layer kept (FastV's formula; VISOR's cross-attention "
        "counted too); prefill = measured ms per sample on a shared 2-core machine (noisy: other jobs ran "
        "alongside; the TFLOPs ratio is the stable cost measure). Values in brackets are differences to the "
        "block's baseline; cost ratios are on POPE-random.",
        "",
        "Each method's own knob is set to 50 / 25 / 10 % (`keep`, `ratio`, `vision_keep`); the kept column says "
        "what that gives per layer. `vflowopt:config=reference-B` are the configurations `mmkit tune vflowopt` "
        "found for the reference model at budget B (mean share of visual tokens per decoder layer). DyVTE and VISOR "
        "run at their own operating points.",
        "",
        "## Summary",
        "",
    ]
    lines += _summary(done, "main")
    visor = _summary(done, "visor")
    if visor:
        lines += ["", "### VISOR, frozen-base approximation (own block: baseline re-measured in the same run)", ""] + visor
    for title, bench, split, runs in done:
        for r in runs:
            if r["methods"] == ["dyvte"]:
                exits = _exit_layers(r["_dir"])
                shown = ", ".join(f"layer {k}: {v}" if k is not None else f"no exit: {v}"
                                  for k, v in sorted(exits.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
                lines += ["", f"DyVTE exit layers on {bench}/{split} (first layer without visual tokens, samples): "
                          f"{shown}."] if (bench, split) == ("pope", "random") else []
    lines += ["", "## All runs", "", "```"]
    for _, _, _, runs in done:
        lines.append(report_table(runs))
    lines += ["```", "", "![Pareto](img/pruning-pareto.png)", ""]
    # VISOR's points join the main plot; its block's own baseline is left out (one star per bench).
    plotted = [r for t, _, _, runs in done for r in runs if t == "main" or r["methods"]]
    plot_pareto(plotted, Path("benchmarks/img/pruning-pareto.png"))
    path = Path("benchmarks/pruning.md")
    analysis = ""  # the hand-written reading of the numbers and the budget section are kept across reruns
    if path.exists() and ANALYSIS in path.read_text():
        analysis = "\n" + path.read_text()[path.read_text().index(ANALYSIS):]
    atomic_write_text(path, "\n".join(lines) + "\n" + kept_section(path, BUDGETS_HEAD, ANALYSIS) + analysis)


ANALYSIS = "## Reading the numbers"
BUDGETS_HEAD = "## Token budgets"


def kept_section(path: Path, head: str, end: str) -> str:
    """The report's section from `head` up to `end` (or the end of the file), "" if it has none."""
    text = path.read_text() if path.exists() else ""
    if head not in text:
        return ""
    section = text[text.index(head):]
    return "\n" + (section[:section.index(end)] if end in section else section).rstrip() + "\n"


def run_blocks(session, blocks, args, on_block) -> None:
    """Run each block (title, bench, split, specs, directory): its baseline first, then every spec, in one process
    (so every ratio is against a baseline measured right before the method); `on_block(done)` after each block."""
    done: list[tuple[str, str, str, list]] = []
    for title, bench, split, block_specs, directory in blocks:
        results = []
        for spec in [None] + block_specs:
            session.remove_all()
            if spec:
                session.apply(spec)
            result = run_eval(session=session, bench=bench, split=split, limit=args.limit,
                              batch_size=args.batch_size, out=directory / run_name(spec), progress=False)
            result["_dir"] = str(directory / run_name(spec))
            results.append(result)
            value = result["metrics"].get("f1", result["metrics"].get("accuracy"))
            print(f"{title} {bench}/{split} {spec or 'baseline'}: {value:.3f}", flush=True)
        done.append((title, bench, split, results))
        on_block(done)


if __name__ == "__main__":
    main()
