"""Side-by-side tables and accuracy-versus-cost plots of eval runs (DIR/results.json)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mmkit.errors import MmkitError

# The accuracy-like number each bench is compared on (higher is better).
PRIMARY = {"pope": ("f1", "F1"), "vqa": ("accuracy", "accuracy"), "chair": ("chair_s", "1 - CHAIR_S"),
           "ground": ("box_ap50", "box AP@0.5")}


def load_run(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise MmkitError(f"{path} does not exist; run `mmkit eval --out {directory}` first (or let it finish)")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MmkitError(f"{path} is not valid JSON; re-run the evaluation") from None
    for key in ("bench", "methods", "metrics", "efficiency"):
        if key not in run:
            raise MmkitError(f"{path} has no {key!r}; it is not an mmkit results file")
    return run


def label(run: dict[str, Any]) -> str:
    return " + ".join(run["methods"]) or "baseline"


def primary_value(run: dict[str, Any]) -> float:
    key, _ = PRIMARY[run["bench"]]
    value = float(run["metrics"].get(key, float("nan")))
    return 1.0 - value if run["bench"] == "chair" else value


def _metric_columns(bench: str) -> list[str]:
    return {"pope": ["accuracy", "precision", "recall", "f1", "yes_ratio"],
            "chair": ["chair_s", "chair_i", "recall", "mean_length"],
            "vqa": ["accuracy"], "ground": ["box_ap50", "miou"]}[bench]


def report_table(runs: list[dict[str, Any]]) -> str:
    """One row per run; cost columns also as a ratio to the baseline run of the same bench/split, if present."""
    if not runs:
        raise MmkitError("no runs to report")
    lines = []
    groups: dict[tuple, list] = {}
    for run in runs:
        groups.setdefault((run["bench"], run.get("split", ""), run.get("decoding", "")), []).append(run)
    for (bench, split, decoding), group in groups.items():
        metric_cols = _metric_columns(bench)
        extra = sorted({k for r in group for k in r["metrics"] if k.startswith("accuracy/")}) if bench == "vqa" else []
        cols = metric_cols + extra
        base = next((r for r in group if not r["methods"]), None)
        name_w = max(12, *(len(label(r)) for r in group))
        header = (f"{'method':<{name_w}} {'n':>5} " + " ".join(f"{c.replace('accuracy/', 'acc/'):>9}" for c in cols)
                  + f" {'vis.tok':>7} {'kept':>7} {'TFLOPs':>9} {'xFLOPs':>7} {'prefill':>8} {'xtime':>6}")
        lines.append(f"== {bench} / {split} ({decoding}) ==")
        lines.append(header)
        for r in group:
            eff = r["efficiency"]
            values = " ".join(f"{r['metrics'].get(c, float('nan')):>9.3f}" for c in cols)
            flop_ratio = eff["tflops_prefill"] / base["efficiency"]["tflops_prefill"] if base else float("nan")
            time_ratio = eff["prefill_ms"] / base["efficiency"]["prefill_ms"] if base and base["efficiency"]["prefill_ms"] else float("nan")
            lines.append(
                f"{label(r):<{name_w}} {r['n']:>5} {values} {eff['visual_tokens']:>7.0f} {eff['visual_tokens_kept']:>7.1f} "
                f"{eff['tflops_prefill']:>9.5f} {flop_ratio:>7.2f} {eff['prefill_ms']:>7.1f}ms {time_ratio:>6.2f}"
            )
        lines.append("")
    lines.append("kept = visual tokens per decoder layer (mean); TFLOPs = decoder prefill FLOPs from the tokens each layer "
                 "kept; prefill = ms per sample (batch prefill / batch size); x = ratio to the baseline row, same run set")
    return "\n".join(lines)


def plot_pareto(runs: list[dict[str, Any]], out_png: str | os.PathLike) -> None:
    """Accuracy against kept visual tokens and against TFLOPs, one series per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise MmkitError("no runs to plot")
    bench = runs[0]["bench"]
    _, ylabel = PRIMARY[bench]
    families: dict[str, list[dict]] = {}
    for run in runs:
        family = "baseline" if not run["methods"] else " + ".join(m.split(":")[0] for m in run["methods"])
        families.setdefault(family, []).append(run)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family, group in sorted(families.items()):
        group = sorted(group, key=lambda r: r["efficiency"]["visual_tokens_kept"])
        ys = [primary_value(r) for r in group]
        for ax, key in zip(axes, ("visual_tokens_kept", "tflops_prefill")):
            xs = [r["efficiency"][key] for r in group]
            if family == "baseline":
                ax.scatter(xs, ys, marker="*", s=160, color="black", label=family, zorder=3)
            else:
                ax.plot(xs, ys, marker="o", label=family)
    axes[0].set_xlabel("visual tokens kept (mean over decoder layers)")
    axes[1].set_xlabel("decoder prefill TFLOPs per sample")
    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    split = runs[0].get("split", "")
    fig.suptitle(f"{bench}/{split}: accuracy vs cost ({runs[0].get('model', '')})")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
