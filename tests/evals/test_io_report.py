import json

import numpy as np
import pytest
from PIL import Image

from mmkit.errors import MmkitError
from mmkit.evals import io as evals_io
from mmkit.evals.io import ResumableJsonl, atomic_write_json, atomic_write_text
from mmkit.evals.report import family, load_run, plot_pareto, primary_value, report_table


def test_atomic_write_leaves_only_the_file(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1, "arr": np.arange(2), "s": {"b", "a"}})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1, "arr": [0, 1], "s": ["a", "b"]}
    atomic_write_text(tmp_path / "r.json", "replaced")
    assert (tmp_path / "r.json").read_text() == "replaced"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(evals_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_resumable_jsonl_drops_torn_line_and_refuses_duplicates(tmp_path):
    path = tmp_path / "s.jsonl"
    store = ResumableJsonl(path)
    assert store.done() == set() and not path.exists()
    store.append([{"qid": "a", "x": 1}, {"qid": "b", "x": 2}])
    with open(path, "a") as handle:
        handle.write('{"qid": "c", "x"')  # a batch write cut off by a kill
    reopened = ResumableJsonl(path)
    assert reopened.done() == {"a", "b"}
    assert path.read_text() == '{"qid": "a", "x": 1}\n{"qid": "b", "x": 2}\n'  # torn line removed from the file
    with pytest.raises(ValueError, match="already stored"):
        reopened.append([{"qid": "a"}])
    with pytest.raises(ValueError, match="repeated"):
        reopened.append([{"qid": "d"}, {"qid": "d"}])
    with pytest.raises(ValueError, match="'qid' field"):
        reopened.append([{"x": 1}])
    assert reopened.done() == {"a", "b"}  # refused batches wrote nothing
    reopened.append([{"qid": "c", "x": 3}])
    again = ResumableJsonl(path)
    assert [r["qid"] for r in again.records()] == ["a", "b", "c"] and len(again) == 3


def test_resumable_jsonl_complete_json_without_newline_is_dropped(tmp_path):
    # A kill between the record and its newline: the record is recomputed rather than trusted.
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}')
    assert ResumableJsonl(path, key="id").done() == {1}
    assert path.read_text() == '{"id": 1}\n'


def test_resumable_jsonl_damage_in_the_middle_raises(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"qid": "a"}\n{"qid": \n{"qid": "c"}\n')
    with pytest.raises(ValueError, match="damaged"):
        ResumableJsonl(path)
    path.write_text('{"qid": "a"}\n{"qid": "a"}\n')
    with pytest.raises(ValueError, match="twice"):
        ResumableJsonl(path)
    assert path.read_text() == '{"qid": "a"}\n{"qid": "a"}\n'  # nothing cut from a file it refused


def _run(methods, f1, kept, tflops, ms, model="reference", bench="pope", split="random"):
    metrics = {"accuracy": f1, "precision": f1, "recall": f1, "f1": f1, "yes_ratio": 0.5}
    if bench == "chair":
        metrics = {"chair_s": 1 - f1, "chair_i": 0.1, "recall": 0.8, "f1": 0.8, "mean_length": 20.0}
    return {"model": model, "bench": bench, "split": split, "methods": methods, "decoding": "greedy", "seed": 0,
            "world_seed": 1, "n": 10, "metrics": metrics,
            "efficiency": {"visual_tokens": 576, "visual_tokens_kept": kept, "tflops_prefill": tflops,
                           "prefill_ms": ms, "answer_ms": 3 * ms, "peak_kv_bytes": 1}}


def _row(table, name):
    return next(line for line in table.splitlines() if line.startswith(name + " "))


def test_report_table_ratios_to_baseline():
    runs = [_run([], 0.9, 576, 2.0, 40.0), _run(["fastv:keep=0.25"], 0.88, 180, 1.0, 20.0),
            _run(["fastv:keep=0.1"], 0.8, 120, 0.8, 30.0)]
    table = report_table(runs)
    header = next(line for line in table.splitlines() if line.startswith("run "))
    for col in ("bench/split", "n", "f1", "kept", "TFLOPs", "xTFLOPs", "prefill_ms", "xprefill", "answer_ms", "xanswer"):
        assert col in header.split()
    base, quarter, tenth = _row(table, "baseline"), _row(table, "fastv:keep=0.25"), _row(table, "fastv:keep=0.1")
    assert "pope/random" in quarter
    assert base.split()[-5:] == ["1.00", "40.00", "1.00", "120.00", "1.00"]
    assert quarter.split()[-7:] == ["180.0", "1.0000", "0.50", "20.00", "0.50", "60.00", "0.50"]
    assert tenth.split()[-5:] == ["0.40", "30.00", "0.75", "90.00", "0.75"]
    assert "0.880" in quarter


def test_report_table_without_baseline_and_per_model_blocks():
    table = report_table([_run(["fastv:keep=0.25"], 0.88, 180, 1.0, 20.0),
                          _run([], 0.9, 576, 2.0, 40.0, model="other")])
    # The baseline of another model must not be used: the ratio columns show "-".
    assert _row(table, "fastv:keep=0.25").split()[-5:] == ["-", "20.00", "-", "60.00", "-"]
    assert "== reference" in table and "== other" in table


def test_plot_pareto_writes_a_png(tmp_path):
    runs = [_run([], 0.9, 576, 2.0, 40.0), _run(["fastv:keep=0.25"], 0.88, 180, 1.0, 20.0),
            _run(["fastv:keep=0.1"], 0.8, 120, 0.8, 16.0), _run(["visionzip:keep=0.25"], 0.87, 144, 0.9, 18.0)]
    out = tmp_path / "plots" / "p.png"
    plot_pareto(runs, out)
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
    assert [p.name for p in out.parent.iterdir()] == ["p.png"]
    # Two (bench, split) pairs: two rows of panels, a taller image.
    plot_pareto(runs + [_run([], 0.6, 576, 2.0, 40.0, bench="chair", split="all")], tmp_path / "two.png")
    with Image.open(tmp_path / "two.png") as img, Image.open(out) as one:
        assert img.size[1] > one.size[1]


def test_primary_value_and_family():
    assert primary_value(_run([], 0.9, 576, 2.0, 40.0)) == pytest.approx(0.9)
    assert primary_value(_run([], 0.7, 576, 2.0, 40.0, bench="chair")) == pytest.approx(0.7)  # 1 - CHAIR_S
    assert family(_run(["fastv:layer=2,keep=0.5", "agla"], 0, 0, 0, 0)) == "fastv + agla"
    assert family(_run([], 0, 0, 0, 0)) == "baseline"


def test_load_run_roundtrip_and_errors(tmp_path):
    with pytest.raises(MmkitError, match="does not exist"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(MmkitError, match="not valid JSON"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text('{"bench": "pope"}')
    with pytest.raises(MmkitError, match="no 'methods'"):
        load_run(tmp_path)
    run = _run([], 0.9, 576, 2.0, 40.0)
    atomic_write_json(tmp_path / "results.json", run)
    assert load_run(tmp_path) == run
    with pytest.raises(MmkitError, match="no runs"):
        report_table([])
