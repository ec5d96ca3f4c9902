"""A killed evaluation, restarted, finishes with exactly the results of a run that was never interrupted: for every
bench, greedy and sampled, with another number of processes on the restart; a corrupt run.json and missing
samples are caught."""

import json

import pytest

import mmkit.evals.runner as runner
from mmkit.errors import MmkitError
from mmkit.evals.runner import run_eval

TIMING = ("prefill_ms", "answer_ms", "seconds_per_image")


class Killed(BaseException):
    """Stands in for SIGKILL / Ctrl-C: not an Exception, so nothing on the way may swallow it."""


class _FakeGroup:
    """The process group seen by one rank of a simulated multi-process run (ranks run one after another)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def wait_for_everyone(self) -> None:
        pass


def _kill_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make `module.name` (one call per batch) raise Killed once `calls` batches have been stored."""
    real = getattr(module, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        if count["n"] == calls:
            raise Killed()
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _as_ranks(monkeypatch, world: int):
    """Run the evaluation as each rank of a `world`-process run in turn; rank 0 last, as it merges."""

    def run(**kwargs):
        result = None
        for rank in list(range(1, world)) + [0]:
            monkeypatch.setattr(runner, "_process_shard", lambda rank=rank: (rank, world, _FakeGroup(rank, world)))
            result = run_eval(**kwargs)
        monkeypatch.setattr(runner, "_process_shard", lambda: (0, 1, None))
        return result

    return run


def _records(out):
    by_qid = {}
    for path in sorted(out.glob("samples*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record["qid"] not in by_qid, "a sample was stored twice"
            by_qid[record["qid"]] = {k: v for k, v in record.items() if not _is_timing(k)}
    return by_qid


def _is_timing(key: str) -> bool:
    return key in TIMING or "seconds" in key or key.endswith("_ms_batch")


def _same_result(a, b):
    def strip(r):
        return {**r, **{part: {k: v for k, v in r[part].items() if not _is_timing(k)}
                        for part in ("efficiency", "metrics")}}

    # Through JSON, as results.json stores them: NaN metrics (nothing to score) compare equal.
    assert json.dumps(strip(a), sort_keys=True) == json.dumps(strip(b), sort_keys=True)


# Every bench greedy and sampled; each restarted once with one process and once with two (on the other decoding).
TEXT_BENCHES = [("pope", "adversarial", "greedy", 1), ("pope", "random", "sample", 2), ("vqa", "all", "greedy", 2),
                ("vqa", "all", "sample", 1), ("chair", None, "greedy", 1), ("chair", None, "sample", 2)]


@pytest.mark.parametrize("bench, split, decoding, restart_world", TEXT_BENCHES)
def test_killed_run_resumes_to_the_uninterrupted_result(session, tmp_path, monkeypatch, bench, split, decoding,
                                                        restart_world):
    kwargs = dict(session=session, bench=bench, split=split, limit=6, batch_size=2, decoding=decoding, seed=3,
                  max_new_tokens=4, progress=False)
    whole = run_eval(out=tmp_path / "whole", **kwargs)

    with monkeypatch.context() as patch:
        _kill_after(patch, runner, "_answer_records", 1)
        with pytest.raises(Killed):
            run_eval(out=tmp_path / "killed", **kwargs)
    assert len(_records(tmp_path / "killed")) == 2 and not (tmp_path / "killed" / "results.json").exists()
    resumed = _as_ranks(monkeypatch, restart_world)(out=tmp_path / "killed", **kwargs)
    _same_result(resumed, whole)
    assert _records(tmp_path / "killed") == _records(tmp_path / "whole")
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["metrics"] == whole["metrics"]


def test_two_process_run_killed_and_resumed_by_one(session, tmp_path, monkeypatch):
    kwargs = dict(session=session, bench="pope", split="popular", limit=6, batch_size=2, decoding="sample", seed=1,
                  progress=False)
    whole = run_eval(out=tmp_path / "whole", **kwargs)
    # Rank 1 of a two-process run finishes its shard; rank 0 is killed after its first batch.
    monkeypatch.setattr(runner, "_process_shard", lambda: (1, 2, _FakeGroup(1, 2)))
    assert run_eval(out=tmp_path / "run", **kwargs) == {}
    monkeypatch.setattr(runner, "_process_shard", lambda: (0, 2, _FakeGroup(0, 2)))
    with monkeypatch.context() as patch:
        _kill_after(patch, runner, "_answer_records", 1)
        with pytest.raises(Killed):
            run_eval(out=tmp_path / "run", **kwargs)
    monkeypatch.setattr(runner, "_process_shard", lambda: (0, 1, None))
    resumed = run_eval(out=tmp_path / "run", **kwargs)
    _same_result(resumed, whole)
    assert _records(tmp_path / "run") == _records(tmp_path / "whole")


def test_ground_bench_resumes_after_a_kill(session, tmp_path, monkeypatch):
    import mmkit.grounding.bench as ground_bench

    kwargs = dict(session=session, bench="ground", limit=8, batch_size=1, progress=False, ground_mode="query")
    whole = run_eval(out=tmp_path / "whole", **kwargs)
    with monkeypatch.context() as patch:
        _kill_after(patch, ground_bench, "ground_scene_records", 1)
        with pytest.raises(Killed):
            run_eval(out=tmp_path / "killed", **kwargs)
    stored = _records(tmp_path / "killed")
    assert 0 < len(stored) < whole["n"]
    resumed = _as_ranks(monkeypatch, 2)(out=tmp_path / "killed", **kwargs)
    _same_result(resumed, whole)
    assert _records(tmp_path / "killed") == _records(tmp_path / "whole")


def test_missing_samples_are_recomputed(session, tmp_path):
    kwargs = dict(session=session, bench="vqa", split="all", limit=6, batch_size=3, decoding="sample", seed=2,
                  max_new_tokens=4, progress=False, out=tmp_path)
    whole = run_eval(**kwargs)
    samples = tmp_path / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:1] + lines[2:4]) + "\n")  # two samples lost, one mid-batch
    (tmp_path / "results.json").unlink()
    _same_result(run_eval(**kwargs), whole)
    assert sorted(json.loads(line)["qid"] for line in samples.read_text().splitlines()) == \
        sorted(json.loads(line)["qid"] for line in lines)


def test_merge_with_a_shard_missing_is_refused(session, tmp_path, monkeypatch):
    kwargs = dict(session=session, bench="pope", limit=4, batch_size=2, progress=False, out=tmp_path)
    monkeypatch.setattr(runner, "_process_shard", lambda: (0, 2, _FakeGroup(0, 2)))
    with pytest.raises(MmkitError, match="samples are missing after the run"):
        run_eval(**kwargs)  # rank 1 never ran
    assert not (tmp_path / "results.json").exists()
    monkeypatch.setattr(runner, "_process_shard", lambda: (0, 1, None))
    assert run_eval(**kwargs)["n"] == 4  # running it again finishes the missing shard


@pytest.mark.parametrize("content", ["{not json", "", json.dumps({"bench": "pope"})])
def test_corrupt_run_json_is_a_clear_error(session, tmp_path, content):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(MmkitError, match="not valid JSON|holds a different run"):
        run_eval(session=session, bench="pope", limit=2, batch_size=2, progress=False, out=tmp_path)
    assert (tmp_path / "run.json").read_text() == content
    assert not (tmp_path / "results.json").exists()


def test_corrupt_run_json_from_the_cli_is_one_line(tmp_path):
    from click.testing import CliRunner

    from mmkit.cli import main

    (tmp_path / "run.json").write_text("{not json")
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", "--limit", "2", "--out", str(tmp_path),
                                       "--no-progress"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "run.json is not valid JSON" in result.stderr
