"""Every CLI command: registered, documented, `--help` works, and bad input gives one line and exit code 2."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmkit.cli import COMMANDS, OPTIONAL_COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
SUBCOMMANDS = {"tune": ["vflowopt", "paint-heads"], "world": ["export"]}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def registered() -> set[str]:
    return set(main.list_commands(None))


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def documented() -> dict[str, set[str]]:
    """Command name -> the doc files that show it as a command (in code blocks or inline code)."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        names = set(re.findall(r"`mmkit ([a-z][a-z-]*)", text))
        for lang, block in code_blocks(text):
            if lang in ("", "bash", "sh", "console"):
                names |= set(re.findall(r"(?:^|[\s;&|(])(?:-m )?mmkit ([a-z][a-z-]*)", block, flags=re.M))
        for name in names:
            found.setdefault(name, set()).add(doc.name)
    return found


def test_every_documented_command_is_registered_and_every_command_documented():
    docs = documented()
    assert registered() == set(COMMANDS) | set(OPTIONAL_COMMANDS)  # every optional module is part of the package
    missing = {name: files for name, files in docs.items() if name not in registered()}
    assert not missing, f"documented but not registered: {missing}"
    undocumented = registered() - set(docs)
    assert not undocumented, f"registered but in no README/docs page: {undocumented}"


@pytest.mark.parametrize("path", [[name] for name in sorted(set(COMMANDS) | set(OPTIONAL_COMMANDS))]
                         + [[group, sub] for group, subs in SUBCOMMANDS.items() for sub in subs])
def test_help_of_every_command(path):
    result = run(*path, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:") and " ".join(path) in result.output.splitlines()[0]
    docstring = main.get_command(None, path[0])
    for sub in path[1:]:
        docstring = docstring.get_command(None, sub)
    assert docstring.help and docstring.help.split("\n")[0] in " ".join(result.output.split())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    image = base / "scene.png"
    Image.fromarray((np.random.default_rng(1).random((96, 96, 3)) * 255).astype("uint8")).save(image)
    a_file = base / "a-file.txt"
    a_file.write_text("not a directory")
    not_lvlm = base / "not-an-lvlm"
    not_lvlm.mkdir()
    (not_lvlm / "config.json").write_text(json.dumps({"hidden_size": 8, "num_layers": 2}))
    bert = base / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    return {"image": image, "file": a_file, "not_lvlm": not_lvlm, "bert": bert, "dir": base}


# One bad input per command (several for the commands with the most to check), each caught before any long work.
BAD_INPUTS = [
    (["methods", "--nope"], "No such option"),
    (["info", "--model", "./no-such-model"], "not a directory"),
    (["info", "--model", "{not_lvlm}"], "not a supported vision-language model"),
    (["info", "--model", "{bert}"], "'bert' model; mmkit supports"),
    (["generate", "--model", "tiny-random", "--image", "{image}", "--prompt", "<image> What is this?"],
     "image marker"),
    (["generate", "--model", "tiny-random", "--image", "{image}", "--prompt", "x", "--dtype", "float8"],
     "unknown dtype"),
    (["eval", "--model", "tiny-random", "--out", "{file}", "--limit", "2"], "is a file"),
    (["eval", "--model", "tiny-random", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["export", "--model", "tiny-random", "--out", "{file}"], "is a file"),
    (["export", "--model", "tiny-random", "--method", "fastv:layer=99", "--out", "{dir}/x"], "layer"),
    (["report", "{dir}/no-run"], "does not exist"),
    (["report", "--plot", "x.png"], "Missing argument"),
    (["bench", "--cases", "prefill,bogus", "--preset", "tiny", "--device", "cpu"], "unknown case(s) bogus"),
    (["bench", "--preset", "huge"], "Invalid value for '--preset'"),
    (["ground", "--model", "tiny-random", "--image", "/no/such.png", "--out", "{dir}/g"], "does not exist"),
    (["ground", "--model", "tiny-random", "--image", "{image}", "--out", "{dir}/g", "--query", " "], "--query is empty"),
    (["tune", "vflowopt", "--model", "tiny-random", "--budget", "1.5", "--out", "{dir}/t.json", "--samples", "2",
      "--trials", "1"], "budget"),
    (["tune", "paint-heads", "--model", "tiny-random", "--data", "{dir}/no-such.json", "--out", "{dir}/t.json"],
     "does not exist"),
    (["world", "export", "--out", "{file}"], "is a file"),
    (["world", "export", "--out", "{dir}/x", "--images", "0"], "--images must be >= 1"),
    (["eval", "--model", "tiny-random", "--bench", "pope", "--data", "{file}"], "a-file.txt:1: malformed JSON"),
    (["train-reference", "--steps", "1,2", "--out", "{dir}/r"], "steps"),
    (["train-reference", "--tiny", "--caption-noise", "0.3", "--out", "{dir}/r"], "caption_noise needs caption_mix"),
    (["train-reference", "--tiny", "--captions", "detailed", "--caption-noise", "0.3", "--caption-noise-place", "end",
      "--out", "{dir}/r"], "Invalid value for '--caption-noise-place'"),
    (["train-reference", "--tiny", "--pope-negatives", "mixed", "--out", "{dir}/r"],
     "pope_negatives 'mixed' needs caption_mix"),
    (["train-reference", "--tiny", "--captions", "detailed", "--pope-negatives", "random=2,often=1", "--out",
      "{dir}/r"], "pope_negatives must be one of"),
    (["train-gates", "--samples", "2"], "'--samples'"),
    (["train-visor", "--batch-size", "0"], "'--batch-size'"),
    (["train-sam", "--minutes", "0", "--out", "{dir}/s"], "'--minutes'"),
    (["train-sam", "--init", "{dir}/no-such-sam", "--out", "{dir}/s"], "'--init'"),
]


def test_bad_input_table_covers_every_command():
    assert {args[0] for args, _ in BAD_INPUTS} == registered()


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a[:2]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(files, args, message):
    result = run(*[a.format(**files) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert not (files["dir"] / "x").exists() and not (files["dir"] / "t.json").exists()
    assert files["file"].read_text() == "not a directory"
