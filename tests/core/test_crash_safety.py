"""Crash safety of every writer: a failure injected after writing has started leaves the previous file (or
directory) exactly as it was, and no temporary file behind. `mmkit train-sam` runs here on a tiny setting."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mmkit.atomic import atomic_directory, atomic_path, atomic_save_safetensors, atomic_write_json


class DiskFull(OSError):
    pass


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes), hidden temporaries included."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _half_write_then_fail(path, *args, **kwargs):
    # A writer that got half way: some bytes on disk, then the failure.
    Path(path).write_bytes(b"half a file")
    raise DiskFull("disk full")


def _half_save_file(tensors, filename, metadata=None):
    _half_write_then_fail(filename)


def test_atomic_file_helpers_keep_the_previous_file(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"n": 1})
    before = _snapshot(tmp_path)
    with pytest.raises(DiskFull):
        with atomic_path(target) as tmp:
            _half_write_then_fail(tmp)
    assert _snapshot(tmp_path) == before
    with pytest.raises(TypeError):  # not JSON-serialisable: fails while encoding
        atomic_write_json(target, {"n": object()})
    assert _snapshot(tmp_path) == before and json.loads(target.read_text()) == {"n": 1}


def test_atomic_directory_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"good")
    before = _snapshot(tmp_path)
    with pytest.raises(DiskFull):
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"new")
            raise DiskFull("disk full")
    assert _snapshot(tmp_path) == before
    with pytest.raises(FileExistsError):
        with atomic_directory(target, replace=False) as tmp:
            (tmp / "weights.bin").write_bytes(b"new")
    assert _snapshot(tmp_path) == before


def test_head_sensitivities(tmp_path, monkeypatch):
    import safetensors.torch

    from mmkit.hallucination import head_sensitivity

    path = tmp_path / "sens.safetensors"
    head_sensitivity.save(torch.full((4, 2), 0.5), path)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", _half_save_file)
    with pytest.raises(DiskFull):
        head_sensitivity.save(torch.ones(4, 2), path)
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()
    assert torch.equal(head_sensitivity.load(path), torch.full((4, 2), 0.5))


def test_dyvte_gates_and_visor_weights(session, tmp_path, monkeypatch):
    """Both trainers write their state with the same safetensors writer; gates trained on tiny-random."""
    import safetensors.torch

    from mmkit.pruning.dyvte import GATES_FILE, load_gates
    from mmkit.pruning.dyvte_train import GateTrainConfig, train_gates

    cfg = GateTrainConfig(samples=8, steps=3, width=4, max_new_tokens=2, batch_size=8)
    cache = tmp_path / "features.safetensors"
    gates, _ = train_gates(cfg=cfg, session=session, out_dir=tmp_path / "gates", features_cache=cache, progress=False)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", _half_save_file)
    with pytest.raises(DiskFull):
        train_gates(cfg=GateTrainConfig(samples=8, steps=4, width=4, max_new_tokens=2, batch_size=8),
                    session=session, out_dir=tmp_path / "gates", features_cache=cache, progress=False)
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()
    assert (tmp_path / "gates" / GATES_FILE).is_file()
    assert all(torch.equal(a, b) for a, b in zip(load_gates(tmp_path / "gates").state_tensors().values(),
                                                  gates.state_tensors().values()))


def test_grounding_outputs(tmp_path, monkeypatch):
    from PIL import Image

    from mmkit.grounding.outputs import write_outputs
    from mmkit.grounding.vlsam import Detection, GroundingResult

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:12, 4:12] = True
    result = GroundingResult(size=(32, 32), detections=[Detection("cup", (4, 4, 12, 12), mask, 0.9)],
                             maps={"cup": np.random.default_rng(1).random((4, 4))}, answers=["a cup"], stats={})
    write_outputs(image, result, tmp_path, stem="scene")
    before = _snapshot(tmp_path)
    assert set(before) == {"scene_overlay.png", "scene_attn_cup.png", "scene_coco.json"}
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:40])  # a torn PNG
        raise DiskFull("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(DiskFull):
        write_outputs(image, result, tmp_path, stem="scene")
    assert _snapshot(tmp_path) == before


def test_eval_results_and_report_plot(session, tmp_path, monkeypatch):
    import mmkit.atomic
    from mmkit.evals.report import load_run, plot_pareto
    from mmkit.evals.runner import run_eval

    run_eval(session=session, bench="pope", limit=2, batch_size=2, out=tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    plot_pareto([run], tmp_path / "pareto.png")
    before = _snapshot(tmp_path)

    def fail_on_rename(src, dst):
        raise DiskFull("disk full")

    monkeypatch.setattr(mmkit.atomic.os, "replace", fail_on_rename)
    with pytest.raises(DiskFull):  # the resumed run rewrites results.json
        run_eval(session=session, bench="pope", limit=2, batch_size=2, out=tmp_path / "run", progress=False)
    with pytest.raises(DiskFull):
        plot_pareto([run], tmp_path / "pareto.png")
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def _tiny_sam(tmp_path):
    from mmkit.grounding.sam_train import SamTrainConfig, build_small_sam

    cfg = SamTrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
                         channels=16, decoder_mlp=32)
    return build_small_sam(cfg)


def test_sam_checkpoint(tmp_path):
    from mmkit.grounding.sam_backend import load_sam
    from mmkit.grounding.sam_train import save_sam

    model, processor = _tiny_sam(tmp_path)
    save_sam(model, processor, tmp_path / "sam", extra={"steps": 1})
    before = _snapshot(tmp_path)

    class FailingProcessor:
        def save_pretrained(self, directory):
            processor.save_pretrained(directory)
            raise DiskFull("disk full")

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(DiskFull):
        save_sam(model, FailingProcessor(), tmp_path / "sam", extra={"steps": 2})
    assert _snapshot(tmp_path) == before
    load_sam(str(tmp_path / "sam"), device="cpu")


def test_reference_model_directory(tmp_path):
    from mmkit.models.builtin import build_tiny_random
    from mmkit.world.train import save_reference

    model, processor = build_tiny_random()
    save_reference(model, processor, tmp_path / "ref", log=[{"step": 1}])
    before = _snapshot(tmp_path)

    class FailingProcessor:
        def save_pretrained(self, directory):
            processor.save_pretrained(directory)
            raise DiskFull("disk full")

    with pytest.raises(DiskFull):
        save_reference(model, FailingProcessor(), tmp_path / "ref", log=[{"step": 2}])
    assert _snapshot(tmp_path) == before


def test_train_sam_command_on_a_tiny_setting(tmp_path, monkeypatch):
    """`mmkit train-sam` trains, checkpoints, evaluates and reloads; a failing later run keeps the checkpoint."""
    from mmkit.cli import main
    from mmkit.grounding import sam_train
    from mmkit.grounding.sam_backend import load_sam

    out = tmp_path / "sam"
    args = ["train-sam", "--out", str(out), "--steps", "2", "--batch", "1", "--eval-scenes", "2", "--threads", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "saved" in result.output and "(2 steps" in result.output
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps_done"] == 2 and len(log["config"]) > 5
    heldout = json.loads((out / "eval_heldout.json").read_text())
    assert heldout == json.loads(result.stdout.strip().splitlines()[-1])
    backend = load_sam(str(out), device="cpu")
    assert backend is not None
    before = _snapshot(tmp_path)
    monkeypatch.setattr(sam_train, "train_step", lambda *a, **k: (_ for _ in ()).throw(DiskFull("disk full")))
    failed = CliRunner().invoke(main, args + ["--init", str(out)])
    assert failed.exit_code == 1 and "internal error: DiskFull" in failed.output
    assert _snapshot(tmp_path) == before


def test_no_module_reimplements_atomic_writes():
    """Temporary files and renames live in mmkit.atomic only: a writer elsewhere would be a seventh copy."""
    import re

    package = Path(__file__).resolve().parents[2] / "mmkit"
    pattern = re.compile(r"tempfile\.|\.rename\(|os\.replace\(|shutil\.move\(")
    found = [f"{p.relative_to(package.parent)}:{i}" for p in sorted(package.rglob("*.py")) if p.name != "atomic.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
