"""`mmkit eval` on benchmark files: the readers on the exported world answer and score as the built-in benches,
resume after a kill, CHAIR on a COCO directory, per-file / per-category metrics and `mmkit report`."""

import json
from pathlib import Path

import pytest
from realdata import POPE_ROWS, write_coco, write_pope

from mmkit.evals.metrics import chair_metrics, pope_metrics
from mmkit.evals.objects import coco_vocabulary
from mmkit.evals.report import load_run, report_table
from mmkit.evals.runner import run_eval

WORLD_SEED, SCENES = 1, 2
SHARED = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmkit.world.coco_export import export_world

    out = tmp_path_factory.mktemp("export") / "world"
    export_world(out, world_seed=WORLD_SEED, n_images=SCENES, parquet=True)
    return out


@pytest.fixture(scope="module")
def reference():
    import mmkit

    session = mmkit.load("reference", device="cpu")
    yield session
    session.close()


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_pope_files_match_the_builtin_bench(world, reference, tmp_path, split):
    """POPE question files of the exported world: the built-in bench's answers and metrics, split by split."""
    path = world / "pope" / f"world_pope_{split}.json"
    n = len(path.read_text().splitlines())
    builtin = run_eval(session=reference, bench="pope", split=split, world_seed=WORLD_SEED, limit=n, batch_size=8,
                       out=tmp_path / "builtin", progress=False)
    # The file's questions already carry the world's instruction, so nothing is appended.
    files = run_eval(session=reference, bench="pope", data=path, images=world / "val", prompt_suffix="",
                     batch_size=8, out=tmp_path / "files", progress=False)
    assert [r["text"] for r in _samples(tmp_path / "files")] == [r["text"] for r in _samples(tmp_path / "builtin")]
    assert {k: files["metrics"][k] for k in SHARED} == {k: builtin["metrics"][k] for k in SHARED}
    assert files["metrics"]["by_file"][path.name]["f1"] == files["metrics"]["f1"]
    assert files["metrics"]["unparsed"] == sum(r["unparsed"] for r in _samples(tmp_path / "files"))


def test_pope_parquet_matches_the_builtin_bench(world, reference, tmp_path):
    """The lmms-eval parquet layout, a split picked by its category column: the built-in bench's answers again."""
    split = "adversarial"
    n = len((world / "pope" / f"world_pope_{split}.json").read_text().splitlines())
    builtin = run_eval(session=reference, bench="pope", split=split, world_seed=WORLD_SEED, limit=n, batch_size=8,
                       out=tmp_path / "builtin", progress=False)
    parquet = run_eval(session=reference, bench="pope", data=world / "pope" / "parquet", split=split,
                       prompt_suffix="", batch_size=8, out=tmp_path / "parquet", progress=False)
    assert [r["text"] for r in _samples(tmp_path / "parquet")] == [r["text"] for r in _samples(tmp_path / "builtin")]
    assert {k: parquet["metrics"][k] for k in SHARED} == {k: builtin["metrics"][k] for k in SHARED}
    assert list(parquet["metrics"]["by_category"]) == [split]
    assert parquet["efficiency"]["visual_tokens"] == builtin["efficiency"]["visual_tokens"]


def test_chair_and_vqa_readers_match_the_builtin_benches(world, reference, tmp_path):
    builtin = run_eval(session=reference, bench="chair", world_seed=WORLD_SEED, limit=SCENES, batch_size=4,
                       out=tmp_path / "b", progress=False)
    coco = run_eval(session=reference, bench="chair", coco=world, limit=500, prompt="Describe the image in detail.",
                    max_new_tokens=128, batch_size=4, out=tmp_path / "c", progress=False)
    b, c = _samples(tmp_path / "b"), _samples(tmp_path / "c")
    assert [r["text"] for r in c] == [r["text"] for r in b]
    assert [(r["mentions"], r["truth"], r["hallucinated"]) for r in c] == \
        [(r["mentions"], r["truth"], r["hallucinated"]) for r in b]
    assert coco["metrics"] == builtin["metrics"]

    n = len((world / "vqa.jsonl").read_text().splitlines())
    builtin = run_eval(session=reference, bench="vqa", world_seed=WORLD_SEED, limit=n, batch_size=8,
                       out=tmp_path / "bv", progress=False)
    files = run_eval(session=reference, bench="vqa", data=world / "vqa.jsonl", images=world / "val",
                     prompt_suffix="", batch_size=8, out=tmp_path / "fv", progress=False)
    assert [r["text"] for r in _samples(tmp_path / "fv")] == [r["text"] for r in _samples(tmp_path / "bv")]
    per_kind = {k: v for k, v in builtin["metrics"].items() if k.startswith("accuracy")}
    assert {k: files["metrics"][k] for k in per_kind} == per_kind


def test_pope_file_resumes_after_a_kill(tmp_path, session):
    coco = write_coco(tmp_path / "coco")
    data = write_pope(tmp_path / "coco_pope_random.json", POPE_ROWS)
    out = tmp_path / "run"
    kw = dict(session=session, bench="pope", data=data, images=coco / "val2014", batch_size=4, out=out,
              progress=False, max_new_tokens=3)
    first = run_eval(**kw)
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:15])
    (out / "results.json").unlink()
    second = run_eval(**kw)
    assert second["metrics"] == first["metrics"] and second["n"] == len(POPE_ROWS)
    samples = _samples(out)
    assert len({r["qid"] for r in samples}) == len(POPE_ROWS)
    expected = pope_metrics([r["parsed"] for r in samples], [r["answer"] for r in samples])
    assert first["metrics"]["f1"] == expected["f1"] and first["files"]["questions"] == len(POPE_ROWS)
    assert "different run" in _error(lambda: run_eval(**dict(kw, prompt_suffix="")))
    # The same file name with other questions is another run too.
    write_pope(data, [(i, obj, "no" if label == "yes" else "yes") for i, obj, label in POPE_ROWS])
    assert "differs in files" in _error(lambda: run_eval(**kw))


def _error(fn) -> str:
    from mmkit.errors import MmkitError

    with pytest.raises(MmkitError) as info:
        fn()
    return str(info.value)


def test_chair_on_a_coco_directory_records_mentions_and_truth(tmp_path, session):
    coco = write_coco(tmp_path / "coco")
    out = tmp_path / "chair"
    result = run_eval(session=session, bench="chair", coco=coco, limit=3, seed=5, batch_size=3, out=out,
                      max_new_tokens=12, progress=False)
    samples = _samples(out)
    assert result["n"] == 3 and result["split"] == "val2014"
    assert all(r["prompt"] == "Please describe this image in detail." for r in samples)
    for r in samples:
        assert r["mentions"] == coco_vocabulary().mentions(r["text"])
        assert r["hallucinated"] == [m for m in r["mentions"] if m not in r["truth"]]
    assert result["metrics"] == chair_metrics([r["mentions"] for r in samples], [set(r["truth"]) for r in samples],
                                              [len(r["text"].split()) for r in samples])
    assert result["files"]["sample_seed"] == 5


def test_vqa_file_per_type_and_report_with_builtin_runs(tmp_path, session):
    coco = write_coco(tmp_path / "coco")
    rows = [{"image": "COCO_val2014_000000000139.jpg", "question": "What is on the table?", "answer": "mug",
             "type": "object"},
            {"image": "COCO_val2014_000000000285.jpg", "question": "Is it a bear?", "answer": "yes", "type": "yes/no"},
            {"image": "COCO_val2014_000000000285.jpg", "question": "Which animal?", "answer": "bear",
             "choices": ["cat", "bear"], "type": "choice"}]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = run_eval(session=session, bench="vqa", data=tmp_path / "vqa.jsonl", images=coco / "val2014",
                     batch_size=3, out=tmp_path / "f", max_new_tokens=3, progress=False)
    samples = _samples(tmp_path / "f")
    assert {k for k in files["metrics"] if k.startswith("accuracy/")} == {"accuracy/object", "accuracy/yes/no",
                                                                          "accuracy/choice"}
    assert files["metrics"]["accuracy"] == sum(r["correct"] for r in samples) / 3
    builtin = run_eval(session=session, bench="vqa", limit=2, batch_size=2, out=tmp_path / "b", progress=False)
    table = report_table([load_run(tmp_path / "f"), load_run(tmp_path / "b")])
    assert "vqa/vqa " in table and "vqa/all" in table and "acc/object" in table
    assert builtin["n"] == 2


def test_parquet_categories_in_results_and_report(world, tmp_path, session):
    result = run_eval(session=session, bench="pope", data=world / "pope" / "parquet", batch_size=8,
                      max_new_tokens=3, out=tmp_path / "p", progress=False)
    samples = _samples(tmp_path / "p")
    assert set(result["metrics"]["by_category"]) == {"random", "popular", "adversarial"}
    for category, metrics in result["metrics"]["by_category"].items():
        rows = [r for r in samples if r["kind"] == category]
        assert metrics["accuracy"] == pope_metrics([r["parsed"] for r in rows], [r["answer"] for r in rows])["accuracy"]
        assert metrics["n"] == len(rows) > 0
    table = report_table([load_run(tmp_path / "p")])
    assert "  category=adversarial" in table and "unparsed" in table
