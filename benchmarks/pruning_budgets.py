"""The field's operating points: every pruning method at 192 / 128 / 64 retained visual tokens of 576, as a
share of the unpruned model measured in the same run, with paired bootstrap confidence intervals.

Run through `benchmarks/run_pruning.py --budgets` (resumable; one `mmkit eval` directory per run). The score of a
run is the mean over POPE (random, popular, adversarial: F1) and VQA (accuracy) of method / baseline. Intervals
resample the questions of each bench (the same resample for every method and the baseline: paired), so a
difference that the question sample alone could produce shows as overlapping the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BUDGETS = (192, 128, 64)
FULL = 576
BENCHES = (("pope", "random"), ("pope", "popular"), ("pope", "adversarial"), ("vqa", "all"))
# SparseVLM's official schedules (tokens kept after each of its three stages) for these budgets.
SPARSEVLM_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
RESAMPLES = 2000


def budget_specs(budget: int) -> dict[str, str]:
    """Method -> spec at a budget. Pre-LLM methods feed exactly `budget` visual tokens to the LLM. In-LLM methods
    cannot bring every layer to the budget (layers before their first drop read all 576 tokens), so they run at
    the setting the literature uses for that budget: FastV keeps `budget` from layer 2 on, SparseVLM its official
    schedule, PyramidDrop the lambda whose three stages keep `budget` tokens on average (lambda + lambda^2 +
    lambda^3 = 3 budget / 576), as multi-stage methods are matched by their average token count."""
    share = repr(budget / FULL)  # full precision: floor(share * 576) must give the budget back
    schedule = "/".join(repr(t / FULL) for t in SPARSEVLM_SCHEDULES[budget])
    return {
        "divprune": f"divprune:tokens={budget}",
        "cdpruner": f"cdpruner:tokens={budget}",
        "random": f"random:tokens={budget}",
        "pooling": f"pooling:tokens={budget}",
        "visionzip": f"visionzip:keep={share}",
        "vflowopt": f"vflowopt:vision_keep={share}",
        "fastv": f"fastv:layer=2,keep={share}",
        "pyramiddrop": f"pyramiddrop:ratio={pyramid_ratio(budget)!r}",
        "sparsevlm": f"sparsevlm:keep={schedule}",
        # The same selections with each kept token's original position id instead of renumbered ones.
        "divprune, original positions": f"divprune:tokens={budget},positions=original",
        "cdpruner, original positions": f"cdpruner:tokens={budget},positions=original",
        "random, original positions": f"random:tokens={budget},positions=original",
    }


def pyramid_ratio(budget: int) -> float:
    """lambda in (0, 1) with lambda + lambda^2 + lambda^3 = 3 budget / 576 (bisection), rounded to 4 digits."""
    target, low, high = 3 * budget / FULL, 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mid + mid ** 2 + mid ** 3 < target else (low, mid)
    return round((low + high) / 2, 4)


def run_name(spec: str | None) -> str:
    return (spec or "baseline").replace(":", "_").replace(",", "_").replace("/", "-").replace("=", "")


def run_budgets(session, out: Path, limit: int, batch_size: int, methods: list[str] | None = None) -> None:
    from mmkit.evals.runner import run_eval

    for bench, split in BENCHES:
        specs = [None] + [s for b in BUDGETS for m, s in budget_specs(b).items() if not methods or m in methods]
        for spec in specs:
            session.remove_all()
            if spec:
                session.apply(spec)
            result = run_eval(session=session, bench=bench, split=split, limit=limit, batch_size=batch_size,
                              out=out / f"{bench}-{split}" / run_name(spec), progress=False)
            value = result["metrics"].get("f1", result["metrics"].get("accuracy"))
            print(f"budgets {bench}/{split} {spec or 'baseline'}: {value:.3f}", flush=True)
    session.remove_all()


# -- scoring ----------------------------------------------------------------------------------------------------
def _records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["qid"])


def bench_arrays(records: list[dict], bench: str) -> np.ndarray:
    """Per question, what the bench's metric needs: POPE (n, 2) [answered yes, truth yes]; VQA (n, 1) correct."""
    if bench == "pope":
        return np.array([[r["parsed"] == "yes", r["answer"] == "yes"] for r in records], dtype=float)
    return np.array([[bool(r["correct"])] for r in records], dtype=float)


def metric(arrays: np.ndarray, bench: str, index: np.ndarray) -> np.ndarray:
    """The bench metric on each resample: index (R, n) -> (R,). POPE: F1 with "yes" positive (unparsed = not yes,
    as `pope_metrics`); VQA: accuracy."""
    sample = arrays[index]                                            # (R, n, c)
    if bench == "vqa":
        return sample[..., 0].mean(-1)
    said, truth = sample[..., 0], sample[..., 1]
    tp = (said * truth).sum(-1)
    fp = (said * (1 - truth)).sum(-1)
    fn = ((1 - said) * truth).sum(-1)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def share_of_unpruned(out: Path, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{run name: (R+1,) resampled mean over the benches of method / baseline; entry 0 is the full-sample value},
    plus per spec the mean visual tokens per decoder layer and the prefill-TFLOPs ratio on POPE-random."""
    rng = np.random.default_rng(seed)
    shares: dict[str, list[np.ndarray]] = {}
    cost: dict[str, tuple[float, float]] = {}
    for bench, split in BENCHES:
        directory = out / f"{bench}-{split}"
        base_dir = directory / run_name(None)
        base = _records(base_dir)
        qids = [r["qid"] for r in base]
        n = len(base)
        index = np.concatenate([np.arange(n)[None], rng.integers(0, n, size=(resamples, n))])
        base_value = metric(bench_arrays(base, bench), bench, index)
        base_result = json.loads((base_dir / "results.json").read_text())
        for run_dir in sorted(p for p in directory.iterdir() if p.is_dir() and p != base_dir):
            if not (run_dir / "results.json").exists():
                continue
            result = json.loads((run_dir / "results.json").read_text())
            spec = run_dir.name
            records = _records(run_dir)
            if [r["qid"] for r in records] != qids:
                raise RuntimeError(f"{run_dir} answered other questions than its baseline")
            value = metric(bench_arrays(records, bench), bench, index)
            shares.setdefault(spec, []).append(value / np.maximum(base_value, 1e-9))
            if (bench, split) == ("pope", "random"):
                eff, beff = result["efficiency"], base_result["efficiency"]
                cost[spec] = (eff["visual_tokens_kept"], eff["tflops_prefill"] / beff["tflops_prefill"])
    means = {spec: 100.0 * np.mean(v, axis=0) for spec, v in shares.items() if len(v) == len(BENCHES)}
    return {"shares": means, "cost": cost}


def table(out: Path, resamples: int = RESAMPLES) -> list[str]:
    """Markdown: % of the unpruned model per method and budget, 95 % interval, noise marks; then the costs."""
    scored = share_of_unpruned(out, resamples)
    shares, cost = scored["shares"], scored["cost"]
    methods = list(budget_specs(BUDGETS[0]))
    cells: dict[tuple[str, int], str] = {}
    for budget in BUDGETS:
        specs = {m: run_name(s) for m, s in budget_specs(budget).items() if run_name(s) in shares}
        if not specs:
            continue
        best = max(specs, key=lambda m: shares[specs[m]][0])
        for m, spec in specs.items():
            v = shares[spec]
            low, high = np.percentile(v[1:], [2.5, 97.5])
            mark = "**" if m == best else ""
            note = ""
            if m != best:
                diff = v[1:] - shares[specs[best]][1:]
                if np.percentile(diff, 97.5) >= 0:
                    note += " ≈"  # not distinguishable from the best at this budget
            if low <= 100.0 <= high:
                note += " ="  # not distinguishable from the unpruned model
            cells[(m, budget)] = f"{mark}{v[0]:.1f}{mark} [{low:.1f}, {high:.1f}]{note}"
    lines = ["| method | " + " | ".join(f"{b} tokens" for b in BUDGETS) + " |",
             "|---|" + "---:|" * len(BUDGETS)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cells.get((m, b), "-") for b in BUDGETS) + " |")
    lines += ["", "Against the random floor: method − random, in points of % of the unpruned model, with the 95 % "
              "paired bootstrap interval (same resamples); (noise): the interval includes 0. Rows with original "
              "positions are compared with random with original positions (that row itself with random).", "",
              "| method | " + " | ".join(f"{b} tokens" for b in BUDGETS) + " |", "|---|" + "---:|" * len(BUDGETS)]
    for m in methods:
        if m == "random":
            continue
        row = []
        for b in BUDGETS:
            floor_name = "random, original positions" if "original" in m and not m.startswith("random") else "random"
            spec, floor = run_name(budget_specs(b)[m]), run_name(budget_specs(b)[floor_name])
            if spec not in shares or floor not in shares:
                row.append("-")
                continue
            diff = shares[spec] - shares[floor]
            low, high = np.percentile(diff[1:], [2.5, 97.5])
            row.append(f"{diff[0]:+.1f} [{low:+.1f}, {high:+.1f}]" + (" (noise)" if low <= 0 <= high else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Cost on POPE-random: visual tokens per decoder layer (mean over layers and samples) / prefill "
              "TFLOPs as a share of the baseline's.", "",
              "| method | " + " | ".join(f"{b} tokens" for b in BUDGETS) + " |", "|---|" + "---:|" * len(BUDGETS)]
    for m in methods:
        row = []
        for b in BUDGETS:
            c = cost.get(run_name(budget_specs(b)[m]))
            row.append("-" if c is None else f"{c[0]:.1f} / {c[1]:.2f}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines


# -- report -----------------------------------------------------------------------------------------------------
HEAD = "## Token budgets"
END = "## Reading the numbers"


def write_budget_section(session, args, out: Path) -> None:
    """Run (or reuse) every budget run, then rewrite the "Token budgets" section of benchmarks/pruning.md."""
    import platform

    import torch

    from mmkit.evals.io import atomic_write_text

    run_budgets(session, out, args.limit, args.batch_size)
    figure = Path("benchmarks/img/pruning-kept-64.png")
    kept_figure(session, figure)
    lines = [
        HEAD, "",
        f"Measured with `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_pruning.py --budgets --limit {args.limit}` "
        f"on {platform.machine()} CPU ({torch.get_num_threads()} thread), torch {torch.__version__}, fp32, batch "
        f"{args.batch_size}, greedy, the first {args.limit} questions of each bench (held-out world seed 1), every "
        "method against the unpruned baseline of the same run.",
        "",
        "Each cell is the mean over POPE random / popular / adversarial (F1) and VQA (accuracy) of method / "
        f"unpruned, in %, with a 95 % paired bootstrap interval ({RESAMPLES} resamples of each bench's questions, "
        "the same resamples for the method and the baseline). **Bold**: the best method at that budget; ≈: the "
        "paired interval of its difference to the best includes 0 (within question-sampling noise of the best); "
        "=: its interval includes 100 % (not distinguishable from the unpruned model). Pre-LLM methods (divprune, "
        "cdpruner, random, pooling, visionzip, vflowopt's first stage) feed exactly that many visual tokens to the "
        "LLM. In-LLM methods cannot bring layers before their first drop below 576 tokens, so they run at the "
        "setting the literature uses for the budget: FastV keeps the budget from layer 2 on, SparseVLM its official "
        "schedule (192: 300/200/110, 128: 303/110/36, 64: 66/30/17), PyramidDrop the lambda whose three stages "
        "keep the budget on average (lambda + lambda^2 + lambda^3 = 3 x budget / 576); the cost table says what "
        "that costs. vflowopt also drops inside the LLM "
        "(its default stages). DyVTE and VISOR have no token budget (they exit or read the image per layer) and "
        "are not in this table.",
        "",
    ]
    path = Path("benchmarks/pruning.md")
    text = path.read_text() if path.exists() else ""
    lines += table(out)
    reading = kept_reading(text[text.index(HEAD):] if HEAD in text else "")
    lines += ["", reading] if reading else []
    lines += ["", f"Specs: " + "; ".join(f"{b}: " + ", ".join(f"`{s}`" for s in budget_specs(b).values())
                                        for b in BUDGETS) + ".", ""]
    lines += [
        "### What each method keeps at 64 tokens", "",
        "One scene of held-out world seed 1 and its first POPE-random question, every method at 64 tokens: the "
        "patches the last decoder layer reads are in colour, the dropped ones greyed; pooling's tokens are all "
        "merged (every patch is represented through an average: orange tint). Drawn by the same command with "
        "`mmkit.pruning.show_kept` (`mmkit generate --show-kept PATH.png` draws one method, one panel per decoder "
        "layer).", "",
        f"![kept patches at 64 tokens](img/{figure.name})", "",
    ]
    if HEAD in text:
        start = text.index(HEAD)
        rest = text[start:]
        stop = start + (rest.index(END) if END in rest else len(rest))
        text = text[:start] + text[stop:]
    section = "\n".join(lines) + "\n"
    text = text[:text.index(END)] + section + "\n" + text[text.index(END):] if END in text else \
        text.rstrip() + "\n\n" + section
    atomic_write_text(path, text)


READING_START = "Reading (these tables"


def kept_reading(text: str) -> str:
    """The hand-written reading paragraph of the current section ("Reading (these tables, ..."), kept across
    re-runs like the file's other reading sections: it interprets measured numbers, so it is rewritten by hand
    after a re-run, never generated."""
    for line in text.splitlines():
        if line.startswith(READING_START):
            return line
    return ""


def kept_figure(session, path: Path, budget: int = 64, scene_index: int = 0) -> None:
    """One scene of held-out world seed 1 and its first POPE-random question: the patches the last decoder layer
    reads under every method at `budget` tokens (and the unpruned model), one panel each."""
    from mmkit.pruning.show_kept import _caption, kept_patches, render, save_panels
    from mmkit.world.questions import pope_questions
    from mmkit.world.scenes import generate_scene

    question = pope_questions(1, scene_index + 1, split="random", start=scene_index)[0]
    scene = generate_scene(1, question.scene_index)
    panels = []
    for name, spec in [("unpruned", None)] + list(budget_specs(budget).items()):
        session.remove_all()
        if spec:
            session.apply(spec)
        kept = kept_patches(session, scene.image, question.prompt)
        last = kept.layers[-1]
        panels.append(render(kept.image, kept.grid, last, f"{name}: {_caption(last, kept.grid)}"))
    session.remove_all()
    save_panels(panels, path, columns=5)
    print(f"kept-patch figure: {path} ({question.prompt!r}, answer {question.answer})", flush=True)
