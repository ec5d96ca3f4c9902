"""Produce benchmarks/composition.md and benchmarks/img/composition-pareto.png: does a hallucination mitigation's gain
survive token pruning, and what speed does the combination keep?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_composition.py [--limit 40] [--chair-limit 10] [--seeds 2]

Every configuration runs on the reference model in one process: the baseline, each mitigation alone (defaults),
each pruning method at about 25 % of the visual tokens alone, and every pruning x mitigation pair (pruning applied
first). Blocks, in order: POPE-adversarial greedy, POPE-adversarial sampled (seed 0), CHAIR greedy (detailed captions of up
to 128 tokens, so only the configurations without pruning or with `--chair-pruning`), POPE-random greedy,
POPE-popular greedy, POPE-adversarial sampled (seeds 1..). `--blocks N` stops after N blocks.
Resumable (finished runs are reused); the report and plot are rewritten after every block.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

import mmkit
from mmkit.atomic import atomic_write_text
from mmkit.evals.metrics import mean_std
from mmkit.evals.report import report_table
from mmkit.evals.runner import run_eval

MITIGATION = ("vcd", "agla", "vhr", "paint", "var")
# Each pruning method's own knob at about 25 % of the visual tokens (DyVTE and VISOR: their learned operating point).
PRUNING = {
    "fastv": "fastv:layer=2,keep=0.25",
    "pyramiddrop": "pyramiddrop:ratio=0.25",
    "sparsevlm": "sparsevlm:layers=1/2,keep=0.25/0.25",
    "visionzip": "visionzip:keep=0.25",
    "vflowopt": "vflowopt:config=reference-0.25",
    "dyvte": "dyvte",
    "visor": "visor",
}
REPORT = Path("benchmarks/composition.md")
ANALYSIS = "## What the numbers say"  # a hand-written section at the end of the report, kept across rewrites
PLOT = Path("benchmarks/img/composition-pareto.png")


def configurations(pruning: list[str], mitigation: list[str]) -> list[tuple[str, ...]]:
    configs: list[tuple[str, ...]] = [()]
    configs += [(m,) for m in mitigation]
    configs += [(PRUNING[p],) for p in pruning]
    configs += [(PRUNING[p], m) for p in pruning for m in mitigation]
    return configs


def name_of(config: tuple[str, ...]) -> str:
    """The run label the results carry: canonical specs (fields at their defaults are left out)."""
    from mmkit.registry import config_to_spec, parse_spec

    return " + ".join(config_to_spec(parse_spec(spec)) for spec in config) or "baseline"


def dir_of(config: tuple[str, ...]) -> str:
    return "__".join(c.replace(":", "_").replace(",", "_").replace("/", "-").replace("=", "") for c in config) or "baseline"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=40, help="POPE questions per split")
    parser.add_argument("--chair-limit", type=int, default=10, help="CHAIR captions")
    parser.add_argument("--seeds", type=int, default=2, help="sampling seeds on POPE-adversarial")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=None, help="stop after this many blocks")
    parser.add_argument("--pruning", default=",".join(PRUNING))
    parser.add_argument("--chair-pruning", default="fastv,visionzip",
                        help="pruning methods whose combinations also run CHAIR (each pruning alone always does)")
    parser.add_argument("--mitigation", default=",".join(MITIGATION))
    parser.add_argument("--out", default="runs/composition")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report and plot from the finished runs under --out, measuring nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pruning = [p for p in args.pruning.split(",") if p]
    mitigation = [m for m in args.mitigation.split(",") if m]
    configs = configurations(pruning, mitigation)
    plan = [("pope", "adversarial", "greedy", 0), ("pope", "adversarial", "sample", 0), ("cost", "", "", 0),
            ("chair", "detailed", "greedy", 0), ("pope", "random", "greedy", 0), ("pope", "popular", "greedy", 0)]
    plan += [("pope", "adversarial", "sample", s) for s in range(1, args.seeds)]
    chair_specs = {PRUNING[p] for p in args.chair_pruning.split(",") if p}
    if args.blocks is not None:
        plan = plan[: args.blocks]
    out = Path(args.out)
    if args.report_only:
        report_from_disk(args, out, plan, configs, pruning, mitigation)
        return
    session = mmkit.load("reference", device="cpu")
    blocks: dict[tuple, list] = {}
    costs: dict[str, float] = {}
    for bench, split, decoding, seed in plan:
        if bench == "cost":
            for config in configs:
                session.remove_all()
                for spec in config:
                    session.apply(spec)
                costs[name_of(config)] = cpu_cost(session, out / "cost" / f"{dir_of(config)}.json", args.batch_size)
                print(f"cost {name_of(config)}: {costs[name_of(config)]:.4f} CPU s/answer", flush=True)
            write_report(args, blocks, configs, pruning, mitigation, costs)
            continue
        for config in configs:
            if bench == "chair" and len(config) > 1 and config[0] not in chair_specs:
                continue
            session.remove_all()
            for spec in config:
                session.apply(spec)
            limit = args.chair_limit if bench == "chair" else args.limit
            result = run_eval(session=session, bench=bench, split=split, limit=limit, batch_size=args.batch_size,
                              decoding=decoding, seed=seed, progress=False,
                              out=out / f"{bench}-{split}-{decoding}-s{seed}" / dir_of(config))
            blocks.setdefault((bench, split, decoding, seed), []).append(result)
            print(f"{bench}/{split}/{decoding}/s{seed} {name_of(config)}: {result['metrics']}", flush=True)
        write_report(args, blocks, configs, pruning, mitigation, costs)
    session.close()


COST_QUESTIONS = 16


def report_from_disk(args, out: Path, plan, configs, pruning, mitigation) -> None:
    """The report of every block whose runs all finished (results.json present), and the stored CPU costs."""
    import json

    blocks: dict[tuple, list] = {}
    costs: dict[str, float] = {}
    for bench, split, decoding, seed in plan:
        if bench == "cost":
            paths = {name_of(c): out / "cost" / f"{dir_of(c)}.json" for c in configs}
            if all(p.is_file() for p in paths.values()):
                costs = {name: json.loads(p.read_text())["cpu_s_per_answer"] for name, p in paths.items()}
            continue
        wanted = [c for c in configs if not (bench == "chair" and len(c) > 1 and c[0] not in
                                             {PRUNING[p] for p in args.chair_pruning.split(",") if p})]
        files = [out / f"{bench}-{split}-{decoding}-s{seed}" / dir_of(c) / "results.json" for c in wanted]
        if all(f.is_file() for f in files):
            blocks[(bench, split, decoding, seed)] = [json.loads(f.read_text()) for f in files]
    write_report(args, blocks, configs, pruning, mitigation, costs)


def cpu_cost(session, path: Path, batch_size: int) -> float:
    """Process CPU seconds per answer of greedy POPE-adversarial answers (the first `COST_QUESTIONS` questions,
    `batch_size` per generate call, one untimed warm-up call first). Process time with one torch thread counts this
    process's work only, so other jobs on a shared machine do not inflate it as they inflate wall time. Stored at
    `path` and reused when the run resumes."""
    import json
    import time

    from mmkit.evals.benches import bench_spec, select_questions
    from mmkit.world.scenes import generate_scene

    if path.is_file():
        return json.loads(path.read_text())["cpu_s_per_answer"]
    spec, _ = bench_spec("pope", "adversarial")
    questions = select_questions("pope", "adversarial", world_seed=1, limit=COST_QUESTIONS)
    scenes = [generate_scene(1, q.scene_index).image for q in questions]
    batches = [(scenes[i:i + batch_size], [q.prompt for q in questions[i:i + batch_size]])
               for i in range(0, len(questions), batch_size)]
    session.generate(*batches[0], max_new_tokens=spec.max_new_tokens)  # warm-up: first-call allocations
    started = time.process_time()
    for images, prompts in batches:
        session.generate(images, prompts, max_new_tokens=spec.max_new_tokens)
    value = (time.process_time() - started) / len(questions)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"cpu_s_per_answer": value, "questions": len(questions)}))
    return value


def _runs(blocks, config, bench, split, decoding) -> list[dict]:
    name = name_of(config)
    return [r for (b, s, d, _), runs in blocks.items() if (b, s, d) == (bench, split, decoding)
            for r in runs if (" + ".join(r["methods"]) or "baseline") == name]


def _cell(runs: list[dict], key: str, fmt: str = ".3f") -> str:
    values = [r["metrics"][key] for r in runs if key in r["metrics"]]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    mean, std = mean_std(values)
    return f"{mean:{fmt}} ± {std:{fmt}}"


def _ratio(blocks, config, key: str) -> float | None:
    base = _runs(blocks, (), "pope", "adversarial", "greedy")
    mine = _runs(blocks, config, "pope", "adversarial", "greedy")
    if not base or not mine or not base[0]["efficiency"].get(key):
        return None
    return mine[0]["efficiency"][key] / base[0]["efficiency"][key]


def _f1(blocks, config) -> float | None:
    runs = _runs(blocks, config, "pope", "adversarial", "greedy")
    return runs[0]["metrics"]["f1"] if runs else None


def _cpu_ratio(costs, config) -> float | None:
    base, mine = costs.get("baseline"), costs.get(name_of(config))
    return None if not base or mine is None else mine / base


def write_report(args, blocks, configs, pruning, mitigation, costs) -> None:
    command = (f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_composition.py --limit {args.limit} "
               f"--chair-limit {args.chair_limit} --seeds {args.seeds}"
               + (f" --blocks {args.blocks}" if args.blocks is not None else "")
               + (f" --pruning {args.pruning}" if args.pruning != ",".join(PRUNING) else "")
               + (f" --mitigation {args.mitigation}" if args.mitigation != ",".join(MITIGATION) else "")
               + (f" --chair-pruning {args.chair_pruning}" if args.chair_pruning != "fastv,visionzip" else ""))
    measured = ", ".join(f"{b}/{s} {d}{'' if d == 'greedy' else f' seed {seed}'}" for b, s, d, seed in blocks)
    measured += ", CPU cost" if costs else ""
    lines = [
        "# Composition: pruning x hallucination mitigation on the reference model",
        "",
        f"Measured with `{command}` on {platform.machine()} CPU (1 thread), torch {torch.__version__}, fp32, batch "
        f"{args.batch_size}, held-out world seed 1. Blocks measured: {measured}. POPE: {args.limit} questions per "
        f"split; CHAIR: {args.chair_limit} detailed captions (split `detailed`, 128 new tokens; combinations "
        f"only with {args.chair_pruning or 'no'} pruning). Every row of a block ran in the same "
        "process on the same questions as that block's baseline. Mitigations at their defaults; pruning at about "
        "25 % of the visual tokens (" + ", ".join(f"`{PRUNING[p]}`" for p in pruning) + "; DyVTE and VISOR at "
        "their learned operating point), applied before the mitigation. Sampled cells: T=1, top-p 1, mean ± sample "
        "std over seeds. With this few questions one answer moves F1 by about 0.02-0.03: read differences below "
        "that as noise. The machine was shared with other CPU jobs while this ran (1-minute load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when this report was written), so wall-time ratios (`xanswer`) carry tens of percent of noise; the speed column to read is "
        f"`xCPU`: process CPU time per answer (one torch thread; {COST_QUESTIONS} POPE-adversarial questions, "
        "greedy, after a warm-up call), which other jobs do not inflate. FLOP ratios and kept tokens are exact.",
        "",
        "## Does the mitigation's gain survive pruning?",
        "",
        "POPE-adversarial F1 (greedy) of the pruning alone, and the change each mitigation adds on top of it "
        "(the first row is the unpruned model):",
        "",
        "| pruning | F1 alone | " + " | ".join(f"+{m}" for m in mitigation) + " |",
        "|---|---:|" + "---:|" * len(mitigation),
    ]
    for p in [None] + pruning:
        base_config = () if p is None else (PRUNING[p],)
        alone = _f1(blocks, base_config)
        cells = []
        for m in mitigation:
            f1 = _f1(blocks, base_config + (m,))
            cells.append("-" if f1 is None or alone is None else f"{f1 - alone:+.3f}")
        lines.append(f"| {p or 'none'} | {'-' if alone is None else f'{alone:.3f}'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every configuration",
        "",
        "Cost columns are ratios to the baseline: `xCPU` process CPU time per answer (all branches, prefill and "
        "decoding), `xTFLOPs` decoder prefill FLOPs from the tokens each layer kept and `xanswer` wall time of the "
        "generate call per answer, both on POPE-adversarial greedy. "
        "`kept` is visual tokens per decoder layer (mean over layers and samples; 576 = all).",
        "",
        "| configuration | POPE-adv F1 greedy | POPE-adv F1 sampled | POPE-ran F1 | POPE-pop F1 | CHAIR_S | CHAIR_I | "
        "CHAIR recall | caption words | kept | xCPU | xTFLOPs | xanswer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        adv = _runs(blocks, config, "pope", "adversarial", "greedy")
        kept = f"{adv[0]['efficiency']['visual_tokens_kept']:.0f}" if adv and \
            "visual_tokens_kept" in adv[0]["efficiency"] else "-"
        flops, answer = _ratio(blocks, config, "tflops_prefill"), _ratio(blocks, config, "answer_ms")
        chair = _runs(blocks, config, "chair", "detailed", "greedy")
        cells = [_cell(adv, "f1"), _cell(_runs(blocks, config, "pope", "adversarial", "sample"), "f1"),
                 _cell(_runs(blocks, config, "pope", "random", "greedy"), "f1"),
                 _cell(_runs(blocks, config, "pope", "popular", "greedy"), "f1"),
                 _cell(chair, "chair_s"), _cell(chair, "chair_i"), _cell(chair, "recall"),
                 _cell(chair, "mean_length", ".1f"), kept,
                 "-" if _cpu_ratio(costs, config) is None else f"{_cpu_ratio(costs, config):.2f}",
                 "-" if flops is None else f"{flops:.2f}", "-" if answer is None else f"{answer:.2f}"]
        lines.append(f"| {name_of(config)} | " + " | ".join(cells) + " |")
    if plot(blocks, configs, pruning, mitigation, costs):
        cost_name = "CPU time" if costs else "wall time"
        lines += ["", "## Truth against cost", "",
                  f"![POPE-adversarial F1 against {cost_name} per answer]({PLOT.relative_to('benchmarks')})", "",
                  f"POPE-adversarial greedy F1 against {cost_name} per answer (ratio to the baseline); colour = pruning "
                  "method, marker = mitigation; the line joins the Pareto-optimal configurations (no other is both "
                  "faster and more truthful)."]
    lines += ["", "## All runs", "", "```"]
    for key, runs in blocks.items():
        lines.append(f"-- {key[0]}/{key[1]} {key[2]} seed {key[3]} --")
        lines.append(report_table(runs))
    lines += ["```", ""]
    analysis = ""
    if REPORT.exists() and ANALYSIS in REPORT.read_text():
        text = REPORT.read_text()
        analysis = text[text.index(ANALYSIS):]
    atomic_write_text(REPORT, "\n".join(lines) + ("\n" + analysis if analysis else ""))


def plot(blocks, configs, pruning, mitigation, costs) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for config in configs:
        f1 = _f1(blocks, config)
        cost = _cpu_ratio(costs, config) if costs else _ratio(blocks, config, "answer_ms")
        if f1 is not None and cost is not None:
            points.append((cost, f1, config))
    if not points:
        return False
    colours = {None: "black"} | {p: plt.cm.tab10(i) for i, p in enumerate(pruning)}
    markers = {None: "o"} | {m: mk for m, mk in zip(mitigation, "s^vDP")}
    by_spec = {PRUNING[p]: p for p in pruning}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for cost, f1, config in points:
        p = next((by_spec[c] for c in config if c in by_spec), None)
        m = next((c for c in config if c in markers), None)
        ax.scatter(cost, f1, color=colours[p], marker=markers[m], s=45, edgecolors="none")
    frontier, best = [], -1.0
    for cost, f1, _ in sorted(points, key=lambda t: (t[0], -t[1])):
        if f1 > best:
            frontier.append((cost, f1))
            best = f1
    ax.plot([c for c, _ in frontier], [f for _, f in frontier], color="grey", lw=1, zorder=0)
    for p, colour in colours.items():
        ax.scatter([], [], color=colour, marker="o", label=p or "no pruning")
    for m, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=m or "no mitigation")
    ax.set_xlabel(("CPU" if costs else "wall") + " time per answer (x baseline, POPE-adversarial greedy)")
    ax.set_ylabel("POPE-adversarial F1 (greedy)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    tmp = PLOT.with_name(PLOT.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(PLOT)
    return True


if __name__ == "__main__":
    main()
