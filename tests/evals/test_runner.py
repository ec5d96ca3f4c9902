import json

import pytest
from click.testing import CliRunner

from mmkit.cli import main
from mmkit.errors import MmkitError
from mmkit.evals.runner import run_eval


def test_eval_writes_results_and_resumes_exactly(tmp_path, session):
    out = tmp_path / "run"
    first = run_eval(session=session, bench="pope", split="adversarial", limit=6, batch_size=4, out=out,
                     progress=False)
    assert first["n"] == 6 and set(first["metrics"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert set(first["efficiency"]) >= {"visual_tokens", "visual_tokens_kept", "tflops_prefill", "prefill_ms",
                                        "peak_kv_bytes", "answer_ms"}
    assert first["efficiency"]["answer_ms"] >= first["efficiency"]["prefill_ms"] > 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    # Simulate a kill after the first batch: keep 4 records and a torn fifth line.
    (out / "samples.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    (out / "results.json").unlink()
    second = run_eval(session=session, bench="pope", split="adversarial", limit=6, batch_size=4, out=out,
                      progress=False)
    qids = [json.loads(line)["qid"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(qids) == 6 == len(set(qids))
    assert second["metrics"] == first["metrics"]


def test_resume_with_other_settings_is_refused(tmp_path, session):
    run_eval(session=session, bench="pope", limit=2, batch_size=2, out=tmp_path, progress=False)
    with pytest.raises(MmkitError, match="different run"):
        run_eval(session=session, bench="pope", limit=3, batch_size=2, out=tmp_path, progress=False)


def test_pruning_shows_in_efficiency(session):
    base = run_eval(session=session, bench="vqa", limit=4, batch_size=4, progress=False)
    session.apply("fastv:layer=2,keep=0.25")
    pruned = run_eval(session=session, bench="vqa", limit=4, batch_size=4, progress=False)
    assert pruned["methods"] == ["fastv:keep=0.25"]
    assert pruned["efficiency"]["visual_tokens_kept"] < base["efficiency"]["visual_tokens_kept"]
    assert pruned["efficiency"]["tflops_prefill"] < base["efficiency"]["tflops_prefill"]


def test_chair_bench_scores_mentions(session):
    result = run_eval(session=session, bench="chair", limit=2, batch_size=2, max_new_tokens=8, progress=False)
    assert set(result["metrics"]) >= {"chair_s", "chair_i", "recall", "mean_length"}


def test_eval_cli_bad_input():
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", "--bench", "pope", "--split", "weird"])
    assert result.exit_code == 2
    assert "splits" in result.stderr


def test_efficiency_by_hand():
    """Two records, every figure worked out on paper: d=2, m=3 gives 34n + 4n^2 FLOPs per layer of n tokens."""
    from mmkit.evals.runner import efficiency

    records = [
        {"tokens_per_layer": [10, 10, 4, 4], "visual_tokens": 8, "visual_tokens_kept": [8, 8, 2, 2],
         "prefill_ms_batch": 20.0, "generate_ms_batch": 60.0, "batch_size": 2, "new_tokens": 3},
        {"tokens_per_layer": [12, 12, 12, 12], "visual_tokens": 8, "visual_tokens_kept": [8, 8, 8, 8],
         "prefill_ms_batch": 20.0, "generate_ms_batch": 60.0, "batch_size": 2, "new_tokens": 1},
    ]
    eff = efficiency(records, hidden=2, intermediate=3, kv_heads=1, head_dim=2, bytes_per_el=2)
    # Row 1: 2 x 740 + 2 x 200 = 1880; row 2: 4 x 984 = 3936; mean 2908 FLOPs.
    assert eff["tflops_prefill"] == pytest.approx(2908e-12)
    assert eff["visual_tokens"] == 8 and eff["visual_tokens_kept"] == pytest.approx(6.5)
    assert eff["prefill_ms"] == pytest.approx(10.0) and eff["answer_ms"] == pytest.approx(30.0)
    # KV cache: (tokens + new tokens) x 2 (K and V) x 1 head x 2 dims x 2 bytes, summed over layers; the larger row.
    assert eff["peak_kv_bytes"] == 2 * 52 * 1 * 2 * 2 == 416
    assert eff["new_tokens"] == 2


def test_chair_by_hand():
    """Three captions: one hallucinates two objects, one is clean, one says nothing (CHAIR counts it)."""
    from mmkit.evals.runner import aggregate

    records = [
        {"qid": "a", "mentions": ["cup", "tree", "boat"], "truth": ["cup", "key"], "text": "a cup a tree a boat"},
        {"qid": "b", "mentions": ["key"], "truth": ["key"], "text": "one key"},
        {"qid": "c", "mentions": [], "truth": ["fish", "star"], "text": "nothing"},
    ]
    m = aggregate("chair", records)
    assert m["chair_s"] == pytest.approx(1 / 3)        # one caption of three hallucinates
    assert m["chair_i"] == pytest.approx(2 / 4)        # tree, boat of cup, tree, boat, key
    assert m["recall"] == pytest.approx(2 / 5)         # cup, key of cup, key, key, fish, star
    assert m["mean_length"] == pytest.approx((6 + 2 + 1) / 3)


def test_chair_bench_records_match_the_scenes(tmp_path, session):
    """The CHAIR bench's per-sample records hold the mentions of its caption and the truth of its scene, and its
    metrics are those records' CHAIR."""
    from mmkit.evals.benches import select_questions
    from mmkit.world.scenes import generate_scene
    from mmkit.world.vocab import mentioned_categories

    result = run_eval(session=session, bench="chair", limit=3, batch_size=3, max_new_tokens=12, out=tmp_path,
                      progress=False)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    questions = {q.qid: q for q in select_questions("chair", None, 1, 3)}
    said = truth = bad = 0
    for r in records:
        assert r["mentions"] == list(dict.fromkeys(mentioned_categories(r["text"])))
        assert r["truth"] == sorted(generate_scene(1, questions[r["qid"]].scene_index).categories())
        said += len(set(r["mentions"]))
        bad += len(set(r["mentions"]) - set(r["truth"]))
        truth += len(r["truth"])
    assert result["metrics"]["chair_i"] == pytest.approx(bad / said if said else 0.0)
