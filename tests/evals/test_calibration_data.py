"""Calibration and training on users' files: `mmkit tune vflowopt`, `mmkit tune paint-heads`, `mmkit train-gates`
and `mmkit train-visor` accept `--data` / `--images` / `--coco` (the reference world stays the default)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from realdata import COCO_IMAGES, POPE_ROWS, write_coco, write_pope

from mmkit.cli import main
from mmkit.errors import MmkitError
from mmkit.evals.calibration_data import user_samples


@pytest.fixture
def files(tmp_path):
    coco = write_coco(tmp_path / "coco")
    pope = write_pope(tmp_path / "coco_pope_random.json", POPE_ROWS)
    return coco, pope


def test_samples_from_files_and_coco(files):
    coco, pope = files
    assert user_samples() is None
    items = user_samples(data=pope, images=coco / "val2014", seed=1)
    assert sorted((it.prompt, it.answer) for it in items) == sorted(
        (f"Is there a {obj} in the image?\nAnswer the question using a single word or phrase.", label)
        for _, obj, label in POPE_ROWS)
    assert [it.prompt for it in items] == [it.prompt for it in user_samples(data=pope, images=coco / "val2014", seed=1)]
    assert len(user_samples(data=pope, images=coco / "val2014", n=2)) == 2
    assert np.asarray(items[0].image).shape[2] == 3

    from_coco = user_samples(coco=coco, seed=0, prompt_suffix="")
    truth = {name: set(cats) for name, (cats, _) in COCO_IMAGES.items()}
    for it in from_coco:
        image_id = int(it.ref.path.rsplit("_", 1)[1].split(".")[0])
        if it.kind == "caption":
            assert it.answer == COCO_IMAGES[image_id][1][0]
            continue
        category = it.prompt.split(" ", 3)[3].rsplit(" in the image?", 1)[0]
        assert (category in truth[image_id]) == (it.answer == "yes")
    assert {it.kind for it in from_coco} == {"caption", "pope"}
    assert all(it.kind == "pope" for it in user_samples(coco=coco, kinds_excluded=("caption",)))
    with pytest.raises(MmkitError, match="either --data or --coco"):
        user_samples(data=pope, coco=coco)
    with pytest.raises(MmkitError, match="--images goes with --data"):
        user_samples(images=coco)


def test_paint_heads_on_coco_equal_a_direct_calibration(files, tmp_path, session):
    from mmkit.hallucination import head_sensitivity

    coco, _ = files
    out = tmp_path / "heads.safetensors"
    result = CliRunner().invoke(main, ["tune", "paint-heads", "--model", "tiny-random", "--coco", str(coco),
                                       "--samples", "6", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    items = user_samples(coco=coco, n=6)
    images = [Image.open(it.ref.path).convert("RGB") for it in items]  # read here, not through the loader
    expected = head_sensitivity.calibrate(session, images, [it.prompt for it in items])
    assert torch.allclose(head_sensitivity.load(out), expected, atol=1e-6)
    assert not torch.allclose(expected, head_sensitivity.builtin_calibration(session), atol=1e-4)
    session.apply(f"paint:heads=calibrated,sensitivity={out}")  # loads as PAINT's sensitivities


def test_tune_vflowopt_on_files(files, tmp_path, session):
    from mmkit.tuning.vflowopt import tune_vflowopt

    coco, pope = files
    out = tmp_path / "vflowopt.json"
    args = ["tune", "vflowopt", "--model", "tiny-random", "--budget", "0.5", "--samples", "4", "--trials", "2",
            "--data", str(pope), "--images", str(coco / "val2014"), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["tuning"]["calibration_data"]["data"] == str(pope.resolve())
    items = user_samples(data=pope, images=coco / "val2014", n=4)
    images = [Image.open(it.ref.path).convert("RGB") for it in items]
    config, record = tune_vflowopt(session, 0.5, samples=4, trials=2, seed=0,
                                   calibration=(images, [it.prompt for it in items]))
    assert document["tuning"]["distance"] == pytest.approx(record["distance"])
    assert document["config"]["vision_keep"] == pytest.approx(config.vision_keep)
    bad = CliRunner().invoke(main, [*args[:-4], "--data", str(tmp_path / "nope.json"), "--out", str(out)])
    assert bad.exit_code == 2 and "nope.json: does not exist" in bad.stderr


def test_train_gates_and_visor_on_files(files, tmp_path):
    coco, pope = files
    data = ["--data", str(pope), "--images", str(coco / "val2014")]
    gates = CliRunner().invoke(main, ["train-gates", "--model", "tiny-random", "--samples", "8", "--steps", "3",
                                      "--width", "4", "--batch-size", "8", "--out", str(tmp_path / "g"), *data,
                                      "--device", "cpu"])
    assert gates.exit_code == 0, gates.output
    info = json.loads((tmp_path / "g" / "gates.json").read_text())
    assert info["data"]["data"] == str(pope.resolve())
    visor = CliRunner().invoke(main, ["train-visor", "--model", "tiny-random", "--tiny", "--coco", str(coco),
                                      "--out", str(tmp_path / "v"), "--device", "cpu"])
    assert visor.exit_code == 0, visor.output
    report = json.loads((tmp_path / "v" / "visor.json").read_text())
    assert report["data"]["coco"] == str(coco.resolve())
    # The policy is labelled on disjoint samples: half of the 10 existence questions (the captions are left out).
    assert report["policy"]["train"]["n"] + report["policy"]["val"]["n"] == len(COCO_IMAGES)
