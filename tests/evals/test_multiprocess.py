import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmkit.evals.runner import run_eval


@pytest.mark.slow
def test_two_process_eval_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes shards the batches and merges into the same results (timing aside)."""
    args = ["eval", "--model", "reference", "--bench", "pope", "--split", "adversarial", "--limit", "24",
            "--batch-size", "4", "--no-progress"]
    single = run_eval(model="reference", bench="pope", split="adversarial", limit=24, batch_size=4,
                      out=tmp_path / "one", progress=False)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "mmkit", *args, "--out", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True, timeout=600)
    merged = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sorted(p.name for p in (tmp_path / "two").glob("samples*.jsonl")) == ["samples.rank0.jsonl",
                                                                                  "samples.rank1.jsonl"]
    timing = {"prefill_ms", "answer_ms"}
    assert merged["metrics"] == single["metrics"]
    assert {k: v for k, v in merged["efficiency"].items() if k not in timing} == \
        {k: v for k, v in single["efficiency"].items() if k not in timing}
    assert {k: v for k, v in merged.items() if k not in ("efficiency",)} == \
        {k: v for k, v in single.items() if k not in ("efficiency",)}
    one = {json.loads(line)["qid"]: json.loads(line)["text"]
           for line in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()}
    two = {}
    for path in (tmp_path / "two").glob("samples*.jsonl"):
        two.update({json.loads(line)["qid"]: json.loads(line)["text"] for line in path.read_text().splitlines()})
    assert one == two


@pytest.mark.slow
def test_two_process_file_bench_matches_one_process(tmp_path):
    """Sharding applies to file benches too: a POPE question file over 2 processes merges into one result."""
    from realdata import POPE_ROWS, write_coco, write_pope

    coco = write_coco(tmp_path / "coco")
    data = write_pope(tmp_path / "coco_pope_random.json", POPE_ROWS)
    files = ["--data", str(data), "--images", str(coco / "val2014")]
    args = ["eval", "--model", "tiny-random", "--bench", "pope", *files, "--batch-size", "2", "--max-new-tokens", "3",
            "--no-progress"]
    single = run_eval(model="tiny-random", bench="pope", data=data, images=coco / "val2014", batch_size=2,
                      max_new_tokens=3, out=tmp_path / "one", progress=False)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "mmkit", *args, "--out", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True, timeout=600)
    merged = json.loads((tmp_path / "two" / "results.json").read_text())
    assert merged["metrics"] == single["metrics"] and merged["n"] == len(POPE_ROWS)
    assert sorted(p.name for p in (tmp_path / "two").glob("samples*.jsonl")) == ["samples.rank0.jsonl",
                                                                                  "samples.rank1.jsonl"]
