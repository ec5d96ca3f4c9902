"""Re-run some methods of benchmarks/pruning.md (each bench's baseline first, in the same process, on the same
questions as the main table) and write their tables as one section of pruning.md, leaving the rest of the file as
it is:

    .venv/bin/python benchmarks/rerun_pruning.py --methods visionzip,vflowopt,visor [--benches pope/random,...]
        [--limit 150]

`--methods` names groups of `run_pruning.method_grid()` (plus `visor`); `--extra SPEC` adds specs to the main
block (repeatable). Resumable like run_pruning.py (finished runs are reused). The section is headed
"## Re-run: ..." and replaced on every run; text after its tables, up to the next "## " heading, is kept.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import mmkit
from mmkit.atomic import atomic_write_text
from mmkit.evals.report import report_table
from run_pruning import BENCHES, _summary, method_grid, run_blocks, visor_specs

REPORT = Path("benchmarks/pruning.md")
NOTES = "<!-- notes: kept across reruns -->"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", required=True, help="comma-separated groups, e.g. visionzip,vflowopt,visor")
    parser.add_argument("--extra", action="append", default=[], help="another spec for the main block")
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--benches", default=",".join(f"{b}/{s}" for b, s in BENCHES),
                        help="comma-separated bench/split pairs, e.g. pope/adversarial,vqa/all")
    parser.add_argument("--out", default="runs/pruning-rerun")
    args = parser.parse_args()
    groups = [g.strip() for g in args.methods.split(",") if g.strip()]
    grid = method_grid()
    unknown = [g for g in groups if g not in grid and g != "visor"]
    if unknown:
        raise SystemExit(f"unknown method groups: {', '.join(unknown)} (choose from {', '.join(grid)}, visor)")
    benches = [tuple(b.strip().split("/", 1)) for b in args.benches.split(",") if b.strip()]
    if any(len(b) != 2 or b not in BENCHES for b in benches):
        raise SystemExit(f"--benches must name bench/split pairs of {', '.join(f'{b}/{s}' for b, s in BENCHES)}")
    specs = [s for g in groups if g != "visor" for s in grid[g]] + args.extra
    visor = visor_specs() if "visor" in groups else []
    out = Path(args.out)
    session = mmkit.load("reference", device="cpu")
    blocks = [("main", b, s, specs, out / f"{b}-{s}") for b, s in benches if specs]
    blocks += [("visor", b, s, visor, out / f"visor-{b}-{s}") for b, s in benches if visor]
    run_blocks(session, blocks, args, lambda done: write_section(args, groups, done))


def write_section(args, groups: list[str], done) -> None:
    head = f"## Re-run: {', '.join(groups)}"
    command = (f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rerun_pruning.py --methods {args.methods}"
               + "".join(f" --extra {e}" for e in args.extra) + f" --benches {args.benches} --limit {args.limit}`")
    lines = [head, "", f"Measured with {command} on {platform.machine()} CPU ({torch.get_num_threads()} thread(s)), "
             f"torch {torch.__version__}, fp32, batch {args.batch_size}, greedy, {args.limit} questions per bench of "
             "held-out world seed 1 (the main table's questions); each block's baseline re-measured first in the "
             "same process. Columns as in the summary above; cost ratios are on the first bench.", ""]
    lines += _summary(done, "main")
    visor = _summary(done, "visor")
    if visor:
        lines += ["", "VISOR, frozen-base approximation (own block):", ""] + visor
    lines += ["", "<details><summary>All runs</summary>", "", "```"]
    lines += [report_table(runs) for _, _, _, runs in done]
    lines += ["```", "", "</details>", ""]
    text = REPORT.read_text() if REPORT.exists() else ""
    notes = ""
    if head in text:
        start = text.index(head)
        rest = text[start + len(head):]
        end = rest.find("\n## ")
        section = rest if end < 0 else rest[:end]
        if NOTES in section:
            notes = section[section.index(NOTES):].rstrip() + "\n"
        text = text[:start].rstrip() + "\n" + ("" if end < 0 else rest[end:])
    body = "\n".join(lines) + "\n" + (notes or NOTES + "\n")
    atomic_write_text(REPORT, text.rstrip() + "\n\n" + body)


if __name__ == "__main__":
    main()
