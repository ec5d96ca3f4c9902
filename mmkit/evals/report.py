"""Side-by-side tables and accuracy-versus-cost plots of eval runs (each run is DIR/results.json)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

from mmkit.errors import MmkitError

# Per bench: the accuracy-like number runs are compared on (higher is better after `primary_value`) and its name.
PRIMARY = {"pope": ("f1", "F1"), "vqa": ("accuracy", "accuracy"), "chair": ("chair_s", "1 - CHAIR_S"),
           "ground": ("box_ap50", "box AP@0.5")}
# Per bench: the metric columns of the table, in order.
METRIC_COLUMNS = {"pope": ["accuracy", "precision", "recall", "f1", "yes_ratio"],
                  "chair": ["chair_s", "chair_i", "recall", "f1", "mean_length"],
                  "vqa": ["accuracy"],
                  "ground": ["box_ap50", "miou", "answered", "lvlm_calls_per_image", "sam_calls_per_image"]}
EFFICIENCY_KEYS = ("visual_tokens", "visual_tokens_kept", "tflops_prefill", "prefill_ms")
NAN = float("nan")
_PLOT_AXES = (("visual_tokens_kept", "visual tokens kept (mean over decoder layers)"),
              ("tflops_prefill", "decoder prefill TFLOPs per sample"))


def load_run(directory: str | os.PathLike) -> dict[str, Any]:
    """Read DIR/results.json (written by `mmkit eval`); raise MmkitError saying what is wrong if it is missing,
    unreadable or not an mmkit results file."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise MmkitError(f"{path} does not exist; run `mmkit eval --out {directory}` first (or let it finish)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MmkitError(f"{path} is not valid JSON; re-run the evaluation") from None
    if not isinstance(run, dict):
        raise MmkitError(f"{path} holds a JSON {type(run).__name__}, not an mmkit results object")
    for key in ("bench", "methods", "n", "metrics", "efficiency"):
        if key not in run:
            raise MmkitError(f"{path} has no {key!r}; it is not an mmkit results file")
    if run["bench"] not in PRIMARY:
        raise MmkitError(f"{path}: unknown bench {run['bench']!r}; expected one of {', '.join(PRIMARY)}")
    missing = [k for k in EFFICIENCY_KEYS if k not in run["efficiency"]]
    if missing:
        raise MmkitError(f"{path}: efficiency lacks {', '.join(missing)}; re-run the evaluation")
    return run


def label(run: dict[str, Any]) -> str:
    """The run's method specs joined with " + ", or "baseline" without methods."""
    return " + ".join(run["methods"]) or "baseline"


def family(run: dict[str, Any]) -> str:
    """The method names without their options ("fastv:keep=0.25" -> "fastv"), or "baseline"."""
    return " + ".join(m.split(":", 1)[0] for m in run["methods"]) or "baseline"


def primary_value(run: dict[str, Any]) -> float:
    """The bench's accuracy-like number, higher is better: F1 (POPE), accuracy (VQA), 1 - CHAIR_S, box AP@0.5."""
    key, _ = PRIMARY[run["bench"]]
    value = _num(run["metrics"].get(key))
    return 1.0 - value if run["bench"] == "chair" else value


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN


def _ratio(a: Any, b: Any) -> float:
    a, b = _num(a), _num(b)
    return a / b if b and not math.isnan(b) else NAN


def _fmt(value: float, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}{spec}}"


def _groups(runs: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    # Runs are only comparable (and a baseline only applies) within one model, bench, split and decoding.
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        key = (run.get("model", ""), run["bench"], run.get("split", ""), run.get("decoding", ""))
        groups.setdefault(key, []).append(run)
    return groups


def report_table(runs: list[dict[str, Any]]) -> str:
    """A text table of runs side by side, one block per (model, bench, split, decoding).

    Columns: run label, bench/split, n, seed, the bench's main metrics (per-kind accuracies for VQA), visual
    tokens in and kept (mean over decoder layers), prefill TFLOPs and ms per sample, and their ratios to the
    block's baseline run (the first run without methods; "-" when there is none). Runs of file benches add one
    row per POPE category and per file (when several were read) with their metrics.
    """
    if not runs:
        raise MmkitError("no runs to report")
    lines: list[str] = []
    for (model, bench, split, decoding), group in _groups(runs).items():
        cols = list(METRIC_COLUMNS[bench])
        if bench == "vqa":
            cols += sorted({k for r in group for k in r["metrics"] if k.startswith("accuracy/")})
        if bench == "pope" and any("files" in r for r in group):
            cols.append("unparsed")  # file benches: the number of answers that began with neither yes nor no
        heads = [c.replace("accuracy/", "acc/") for c in cols]
        widths = [max(7, len(h)) for h in heads]
        base = next((r for r in group if not r["methods"]), None)
        name_w = max(len("run"), *(len(label(r)) for r in group),
                     *(len(kind) + 2 for r in group for kind, _ in _breakdowns(r)))
        where_w = max(len("bench/split"), len(f"{bench}/{split}"))
        lines.append(f"== {model or '?'}  {bench}/{split}  ({decoding or '?'} decoding) ==")
        lines.append(
            f"{'run':<{name_w}}  {'bench/split':<{where_w}} {'n':>5} {'seed':>4} "
            + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
            + f" {'vis.tok':>7} {'kept':>7} {'TFLOPs':>8} {'xTFLOPs':>7} {'prefill_ms':>10} {'xprefill':>8}"
            + f" {'answer_ms':>9} {'xanswer':>7}"
        )
        for r in group:
            eff = r["efficiency"]
            flop_ratio = _ratio(eff["tflops_prefill"], base["efficiency"]["tflops_prefill"]) if base else NAN
            time_ratio = _ratio(eff["prefill_ms"], base["efficiency"]["prefill_ms"]) if base else NAN
            answer_ratio = _ratio(eff.get("answer_ms"), base["efficiency"].get("answer_ms")) if base else NAN
            metrics = _metric_cells(r["metrics"], cols, widths, files="files" in r)
            seed = r.get("seed", "-")
            lines.append(
                f"{label(r):<{name_w}}  {bench + '/' + split:<{where_w}} {r['n']:>5} {seed!s:>4} {metrics} "
                f"{_fmt(_num(eff['visual_tokens']), '.0f', 7)} {_fmt(_num(eff['visual_tokens_kept']), '.1f', 7)} "
                f"{_fmt(_num(eff['tflops_prefill']), '.4f', 8)} {_fmt(flop_ratio, '.2f', 7)} "
                f"{_fmt(_num(eff['prefill_ms']), '.2f', 10)} {_fmt(time_ratio, '.2f', 8)} "
                f"{_fmt(_num(eff.get('answer_ms')), '.2f', 9)} {_fmt(answer_ratio, '.2f', 7)}"
            )
            for kind, breakdown in _breakdowns(r):
                cells = _metric_cells(breakdown, cols, widths, files=True)
                lines.append(f"{'  ' + kind:<{name_w}}  {'':<{where_w}} {breakdown.get('n', '-')!s:>5} {'':>4} {cells}")
        lines.append("")
    lines.append("kept = visual tokens per decoder layer (mean over layers and samples); TFLOPs = decoder prefill "
                 "FLOPs per sample from the tokens each layer kept; prefill_ms = prefill time per sample; "
                 "answer_ms = whole generate call (all branches, prefill and decoding) per sample; "
                 "x = ratio to the block's baseline run")
    return "\n".join(lines)


def _metric_cells(metrics: dict[str, Any], cols: list[str], widths: list[int], files: bool) -> str:
    # A file bench's `unparsed` is a count of answers; every other metric is a ratio.
    return " ".join(_fmt(_num(metrics.get(c)), ".0f" if files and c == "unparsed" else ".3f", w)
                    for c, w in zip(cols, widths))


def _breakdowns(run: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Sub-rows of a file bench run: per POPE category, and per file when the run read several."""
    metrics = run["metrics"]
    rows = [(f"category={k}", v) for k, v in metrics.get("by_category", {}).items()]
    if len(metrics.get("by_file", {})) > 1:
        rows += [(f"file={k}", v) for k, v in metrics["by_file"].items()]
    return rows


def plot_pareto(runs: list[dict[str, Any]], out_png: str | os.PathLike) -> None:
    """Plot accuracy against kept visual tokens (left) and against prefill TFLOPs (right), written atomically.

    The accuracy is `primary_value`. Each method family (method names without options) is one line of markers
    ordered by cost; baseline runs are black stars. Runs of several (bench, split) pairs give one row of two
    panels each.
    """
    if not runs:
        raise MmkitError("no runs to plot")
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    from mmkit.atomic import atomic_write_bytes

    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        rows.setdefault((run["bench"], run.get("split", "")), []).append(run)
    families = sorted({family(r) for r in runs if r["methods"]})
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4 * len(rows)), squeeze=False)
    for (bench, split), ax_row in zip(rows, axes):
        group = rows[(bench, split)]
        for ax, (key, xlabel) in zip(ax_row, _PLOT_AXES):
            by_family: dict[str, list[tuple[float, float]]] = {}
            for r in group:
                point = (_num(r["efficiency"][key]), primary_value(r))
                if not any(math.isnan(v) for v in point):
                    by_family.setdefault(family(r), []).append(point)
            for fam, points in sorted(by_family.items()):
                xs, ys = zip(*sorted(points))
                if fam == "baseline":
                    ax.scatter(xs, ys, marker="*", s=180, color="black", label="baseline", zorder=3)
                else:
                    ax.plot(xs, ys, marker="o", color=colors[fam], label=fam)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(PRIMARY[bench][1])
            ax.set_title(f"{bench}/{split}")
            ax.grid(alpha=0.3)
            if by_family:
                ax.legend(fontsize=8)
    models = sorted({str(r.get("model", "")) for r in runs} - {""})
    fig.suptitle(f"accuracy vs cost ({', '.join(models) or 'model unknown'})")
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(out_png, buffer.getvalue())
