"""lmms-eval plug-in: `python -m lmms_eval --model mmkit` on the mmkit POPE and CHAIR tasks matches `mmkit eval`."""

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from mmkit.evals.lmms_adapter import parse_methods

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "mmkit" / "evals" / "tasks"
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


def test_parse_methods():
    assert parse_methods("fastv:layer=2+keep=0.25;agla") == ["fastv:layer=2,keep=0.25", "agla"]
    assert parse_methods(None) == [] and parse_methods("") == []


def _entry_point_env(tmp_path: Path) -> dict:
    """Environment for the lmms-eval subprocess; registers the entry point from a stub dist-info when the
    installed mmkit does not declare it yet, so the plug-in is exercised exactly as lmms-eval loads it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    paths = [str(ROOT)]
    if not any(ep.name == "mmkit" for ep in entry_points(group="lmms_eval.models")):
        info = tmp_path / "ep" / "mmkit_lmms_ep-0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmkit-lmms-ep\nVersion: 0\n")
        (info / "entry_points.txt").write_text("[lmms_eval.models]\nmmkit = mmkit.evals.lmms_adapter:manifest\n")
        paths.insert(0, str(tmp_path / "ep"))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LMMS, reason="lmms_eval is not installed; run scripts/install_lmms.sh")
def test_lmms_eval_pope_and_chair_match_mmkit_eval(tmp_path):
    from mmkit.evals.runner import run_eval

    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmkit",
           "--model_args", "pretrained=reference,methods=fastv:layer=2+keep=0.25",
           "--tasks", "mmkit_pope_random,mmkit_chair",
           "--include_path", str(TASKS), "--limit", "8", "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_entry_point_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted((tmp_path / "out").rglob("*results*.json"))
    assert files, proc.stderr[-3000:]
    results = json.loads(files[-1].read_text())["results"]
    got = results["mmkit_pope_random"]

    expected = run_eval(model="reference", bench="pope", split="random", methods=["fastv:layer=2,keep=0.25"],
                        limit=8, batch_size=8, progress=False)
    assert got["pope_f1,none"] == pytest.approx(expected["metrics"]["f1"], abs=1e-12)
    assert got["pope_accuracy,none"] == pytest.approx(expected["metrics"]["accuracy"], abs=1e-12)
    assert got["pope_yes_ratio,none"] == pytest.approx(expected["metrics"]["yes_ratio"], abs=1e-12)
    # Efficiency comes through too, and the method really ran (fewer visual tokens kept than given).
    assert got["visual_tokens_kept,none"] == pytest.approx(expected["efficiency"]["visual_tokens_kept"])
    assert got["visual_tokens_kept,none"] < expected["efficiency"]["visual_tokens"]
    assert got["tflops_prefill,none"] == pytest.approx(expected["efficiency"]["tflops_prefill"])
    assert got["prefill_ms,none"] > 0

    chair = run_eval(model="reference", bench="chair", methods=["fastv:layer=2,keep=0.25"], limit=8, batch_size=8,
                     progress=False)
    assert results["mmkit_chair"]["chair_s,none"] == pytest.approx(chair["metrics"]["chair_s"], abs=1e-12)
    assert results["mmkit_chair"]["chair_i,none"] == pytest.approx(chair["metrics"]["chair_i"], abs=1e-12)


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.skipif(not HAS_LMMS, reason="lmms_eval is not installed; run scripts/install_lmms.sh")
def test_loglikelihood_batched_matches_single_and_answer_logprobs(images, prompts):
    from mmkit.evals import lmms_adapter

    model = lmms_adapter.MmkitLMM(pretrained="tiny-random", batch_size=3)
    docs = {i: {"image": img} for i, img in enumerate(images)}
    model.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    conts = ["yes", "no thanks", "y"]
    requests = [_Request(p, c, visual, i, "t", "test") for i, (p, c) in enumerate(zip(prompts, conts))]
    batched = model.loglikelihood(requests)
    model.batch_size = 1
    single = [model.loglikelihood([r])[0] for r in requests]
    for (lp_b, g_b), (lp_s, g_s) in zip(batched, single):
        assert lp_b == pytest.approx(lp_s, abs=1e-4) and g_b == g_s
        assert lp_b < 0
    # A one-token continuation scores as `answer_logprobs` scores that token.
    session = model.session
    (token,) = session.choice_token_ids(["y", "n"])[:1]
    text = session.processor.tokenizer.decode([token])
    lp = model.loglikelihood([_Request(prompts[0], text, visual, 0, "t", "test")])[0][0]
    expected = session.answer_logprobs(images[:1], prompts[:1], ["y", "n"]).logprobs[0][0]
    assert lp == pytest.approx(expected, abs=1e-4)
    model.session.close()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LMMS, reason="lmms_eval is not installed; run scripts/install_lmms.sh")
def test_lmms_eval_stock_pope_task_on_a_local_parquet(tmp_path):
    """`--model mmkit` on lmms-eval's own POPE task (its stock pope.yaml and utils module), pointed at a local parquet
    in the lmms-eval POPE schema instead of the hub: the answers and lmms-eval's own metrics equal those of
    `mmkit eval --bench pope --data` on the same parquet."""
    import lmms_eval

    from mmkit.evals.runner import run_eval
    from mmkit.world.coco_export import export_world

    stock = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    world = tmp_path / "world"
    export_world(world, world_seed=1, n_images=2, parquet=True)
    parquet = next((world / "pope" / "parquet").glob("*.parquet"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "pope_local.yaml").write_text(
        f"include: {stock}\ntask: mmkit_stock_pope_local\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {parquet}\n"
        # The world's questions already end in "Answer yes or no.", the instruction the reference model knows.
        "lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ''\n    post_prompt: ''\n")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmkit", "--model_args", "pretrained=reference",
           "--tasks", "mmkit_stock_pope_local", "--include_path", str(tasks), "--limit", "8", "--batch_size", "4",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_entry_point_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted((tmp_path / "out").rglob("*results*.json"))
    assert files, proc.stderr[-3000:]
    got = json.loads(files[-1].read_text())["results"]["mmkit_stock_pope_local"]

    # Same questions and prompts, same length limit (the stock 128 tokens) and batches.
    mine = run_eval(model="reference", bench="pope", data=parquet, limit=8, batch_size=4, max_new_tokens=128,
                    prompt_suffix="", out=tmp_path / "mmkit", progress=False)
    samples = [json.loads(line) for line in (tmp_path / "mmkit" / "samples.jsonl").read_text().splitlines()]
    logged = sorted((tmp_path / "out").rglob("*mmkit_stock_pope_local*.jsonl"))
    assert logged, "lmms-eval wrote no samples log"
    theirs = [json.loads(line) for line in logged[-1].read_text().splitlines()]
    preds = {int(s["pope_accuracy"]["question_id"]): s["pope_accuracy"]["prediction"] for s in theirs}
    assert preds == {int(s["question_id"]): s["text"].lower().strip() for s in samples}
    # lmms-eval's stock aggregation recomputed from mmkit's answers: an exact "yes"/"no" is required there.
    pred = [s["text"].lower().strip() for s in samples]
    gt = [s["answer"] for s in samples]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gt))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gt))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gt))
    assert got["pope_accuracy,none"] == pytest.approx(sum(p == g for p, g in zip(pred, gt)) / len(gt))
    assert got["pope_precision,none"] == pytest.approx(tp / (tp + fp) if tp + fp else 0)
    assert got["pope_recall,none"] == pytest.approx(tp / (tp + fn) if tp + fn else 0)
    # The model really answered (the reference model answers these yes/no questions mostly right).
    assert mine["metrics"]["accuracy"] > 0.5 and mine["metrics"]["unparsed"] == 0
