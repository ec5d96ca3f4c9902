import json

import pytest
from PIL import Image

from mmkit.errors import MmkitError
from mmkit.evals.io import ResumableJsonl, atomic_write_json
from mmkit.evals.report import load_run, plot_pareto, report_table


def test_atomic_write_leaves_only_the_file(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_resumable_jsonl_drops_torn_line_and_refuses_duplicates(tmp_path):
    path = tmp_path / "s.jsonl"
    store = ResumableJsonl(path)
    store.append([{"qid": "a", "x": 1}, {"qid": "b", "x": 2}])
    with open(path, "a") as handle:
        handle.write('{"qid": "c", "x"')  # a write cut off by a kill
    reopened = ResumableJsonl(path)
    assert reopened.done() == {"a", "b"}
    assert path.read_text().endswith("}\n")
    with pytest.raises(ValueError):
        reopened.append([{"qid": "a"}])
    reopened.append([{"qid": "c", "x": 3}])
    assert [r["qid"] for r in ResumableJsonl(path).records()] == ["a", "b", "c"]


def _run(methods, f1, kept, tflops, ms):
    return {"model": "reference", "bench": "pope", "split": "random", "methods": methods, "decoding": "greedy",
            "n": 10, "metrics": {"accuracy": f1, "precision": f1, "recall": f1, "f1": f1, "yes_ratio": 0.5},
            "efficiency": {"visual_tokens": 576, "visual_tokens_kept": kept, "tflops_prefill": tflops,
                           "prefill_ms": ms, "peak_kv_bytes": 1}}


def test_report_table_and_plot(tmp_path):
    runs = [_run([], 0.9, 576, 2.0, 40.0), _run(["fastv:keep=0.25"], 0.88, 180, 1.0, 20.0),
            _run(["fastv:keep=0.1"], 0.8, 120, 0.8, 16.0)]
    table = report_table(runs)
    assert "baseline" in table and "fastv:keep=0.25" in table
    assert " 0.50 " in table  # TFLOPs ratio of the 25% run to the baseline
    plot_pareto(runs, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as img:
        assert img.size[0] > 300


def test_load_run_errors(tmp_path):
    with pytest.raises(MmkitError, match="does not exist"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(MmkitError, match="not valid JSON"):
        load_run(tmp_path)
