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
