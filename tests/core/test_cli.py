import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmkit.cli import main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray((np.random.default_rng(1).random((150, 120, 3)) * 255).astype("uint8")).save(path)
    return path


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_methods_lists_fastv():
    result = run("methods")
    assert result.exit_code == 0
    assert "fastv" in result.output and "pruning" in result.output


def test_generate_json_reports_pruning(image_path):
    result = run("generate", "--model", "tiny-random", "--image", str(image_path), "--prompt", "What is this?",
                 "--method", "fastv:layer=2,keep=0.25", "--json", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["visual_tokens"] == 64
    assert record["visual_tokens_kept"] < record["visual_tokens"]
    assert record["visual_tokens_kept_per_layer"] == [64, 64, 16, 16]
    assert {"text", "prefill_ms"} <= record.keys()


def test_info(image_path):
    result = run("info", "--model", "tiny-random", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["visual_tokens"] == 64


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{bad}", "--prompt", "x"], "not a readable image"),
        (["--image", "{truncated}", "--prompt", "x"], "not a readable image"),
        (["--image", "/no/such.png", "--prompt", "x"], "does not exist"),
        (["--image", "{good}", "--prompt", "x", "--method", "fastv:keep=2"], "keep must be in (0, 1]"),
        (["--image", "{good}", "--prompt", "x", "--method", "warp:speed=9"], "unknown method"),
        (["--image", "{good}", "--prompt", "x", "--model", "./missing-model"], "not a directory"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, image_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(image_path.read_bytes()[:200])
    args = [a.format(bad=bad, truncated=truncated, good=image_path) for a in args]
    if "--model" not in args:
        args = ["--model", "tiny-random"] + args
    result = run("generate", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
