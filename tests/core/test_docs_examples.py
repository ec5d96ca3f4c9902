"""The README's and docs' examples run as written, so that an example can never drift from the code.

Every fenced code block is classified below. Python examples run (on the tiny or reference models, in a temporary
directory holding generated images under the names the examples use); benchmark recipes, which take minutes to
hours, run their imports and compile. Every `mmkit ...` command line parses against the command table (options,
choices, arguments), and the cheap ones run for real.
"""

import ast
import os
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mmkit.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

# (file, a line the block contains) -> how the test treats it. Each Python block must match exactly one entry, so a
# new or rewritten block is classified before it runs (a benchmark recipe must never run by accident).
PYTHON_BLOCKS = {
    ("README.md", 'reference.save_pretrained("exported/")'): "run",
    ("README.md", 'methods=["visionzip:keep=0.25", "paint"]'): "run",   # composition: a fragment (mmkit imported)
    ("docs/cdpruner.md", 'methods=["cdpruner:tokens=64"]'): "run",
    ("docs/divprune.md", '"llava-hf/llava-1.5-7b-hf", methods=["divprune"]'): "imports",  # needs the 7B checkpoint
    ("docs/dyvte.md", "dyvte.last_exit_layers"): "run",
    ("docs/grounding.md", "results[0].stats"): "run",
    ("docs/grounding.md", "run_ground_bench(s, ground_questions(1, 50)"): "imports",  # the 50-scene grounding bench
    ("docs/grounding.md", "run_ground_bench(s, ground_questions(1, 100)"): "imports",  # the 100-scene multi-scale run
    ("docs/grounding.md", "run_ground_bench(s, ground_questions(1, 1000)"): "imports",  # the 1,000-scene preset run
    ("docs/grounding.md", "run_ground_bench(s, ground_questions(1, 300)"): "imports",  # the 300-scene sam_view runs
    ("docs/reference-model.md", "conversation = "): "run",
    ("docs/sparsevlm.md", "impl.last_ranks"): "run",                   # tiny-random, a few seconds
    ("docs/reference-model.md", "detailed_share=share"): "run",        # caption statistics of the training stream
    ("docs/reference-model.md", "n_scenes=150, n_captions=150"): "imports",  # the 150-scene evaluation (4 minutes)
    ("docs/reference-model.md", "p_partner.append"): "imports",  # run 9's partner share and probe (needs its runs)
    ("docs/reference-model.md", "pope_negatives=spec"): "imports",  # POPE answer shares of 4 x 2,000 training scenes
    ("docs/visor.md", "session.methods[0].impl.last_budgets"): "run",
    ("docs/visor.md", "closed-gates.safetensors"): "imports",          # the 1 350-question VISOR benchmark
}
# Blocks known to fail today, with the reason; strict, so each is noticed once it passes.
XFAIL: dict[tuple[str, str], str] = {}
# Command lines that also run for real (cheap on the reference or tiny models).
RUN_COMMANDS = {"methods", "info", "generate", "export"}


def code_blocks(text: str) -> list[tuple[str, str]]:
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def python_blocks() -> dict[tuple[str, str], str]:
    """(file, marker) -> source of every Python block; blocks matching no entry, several entries or an entry another
    block already matched get their own key, so that the classification test names them."""
    found = {}
    for name in DOC_FILES:
        blocks = [body for lang, body in code_blocks((ROOT / name).read_text()) if lang == "python"]
        for i, body in enumerate(blocks):
            keys = [key for key in PYTHON_BLOCKS if key[0] == name and key[1] in body]
            key = keys[0] if len(keys) == 1 else (name, f"block {i}, matching {len(keys)} entries")
            # A second block matching the same entry would replace the first and leave it unchecked.
            found[(name, f"block {i}, sharing entry {key[1]!r}") if key in found else key] = body
    return found


def command_lines() -> list[tuple[str, list[str]]]:
    """(file, argv after `mmkit`) of every mmkit command line in bash blocks (continuations joined)."""
    found = []
    for name in DOC_FILES:
        for lang, body in code_blocks((ROOT / name).read_text()):
            if lang not in ("bash", "sh"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "mmkit" in words and (words[0] == "mmkit" or words[words.index("mmkit") - 1] == "-m"):
                    found.append((name, words[words.index("mmkit") + 1:]))
    return found


def test_every_python_block_is_classified():
    assert set(python_blocks()) == set(PYTHON_BLOCKS)


@pytest.fixture
def example_dir(tmp_path, monkeypatch):
    """A working directory holding the files the examples name, and the shipped weights at their documented path."""
    from mmkit.world.scenes import generate_scene

    for i, name in enumerate(["scene.png", "a.png", "b.png", "photo.jpg"]):
        generate_scene(1, i).image.convert("RGB").save(tmp_path / name)
    (tmp_path / "mmkit" / "models").mkdir(parents=True)
    (tmp_path / "mmkit" / "models" / "weights").symlink_to(ROOT / "mmkit" / "models" / "weights")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _namespace():
    """Names the fragments use without defining: a batch of reference-world images and questions."""
    import mmkit
    from mmkit.world.scenes import generate_scene

    return {"mmkit": mmkit, "images": [generate_scene(1, i).image for i in range(2)],
            "prompts": ["Is there a cup in the image? Answer yes or no.", "Describe the image in detail."]}


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(k for k, mode in PYTHON_BLOCKS.items() if mode == "run"),
                         ids=lambda k: f"{k[0]}: {k[1]}")
def test_python_example_runs(key, example_dir, request):
    if key in XFAIL:
        from mmkit.errors import MmkitError

        request.applymarker(pytest.mark.xfail(strict=True, raises=MmkitError, reason=XFAIL[key]))
    source = python_blocks()[key]
    exec(compile(source, key[0], "exec"), _namespace())  # noqa: S102 - the example under test


@pytest.mark.parametrize("key", sorted(k for k, mode in PYTHON_BLOCKS.items() if mode == "imports"),
                         ids=lambda k: f"{k[0]}: {k[1]}")
def test_benchmark_recipe_imports_and_compiles(key):
    source = python_blocks()[key]
    tree = ast.parse(source)
    imports = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    assert imports.body, "a recipe without imports is not checked by anything"
    exec(compile(imports, key[0], "exec"), {})  # noqa: S102
    # Every keyword argument passed to an mmkit function exists in its signature.
    namespace: dict = {}
    exec(compile(imports, "imports", "exec"), namespace)  # noqa: S102
    import inspect

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in namespace:
            target = namespace[node.func.id]
            if callable(target) and getattr(target, "__module__", "").startswith("mmkit"):
                params = inspect.signature(target).parameters
                if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    unknown = [k.arg for k in node.keywords if k.arg and k.arg not in params]
                    assert not unknown, f"{node.func.id}() has no {unknown}"


def _resolve(argv: list[str]) -> tuple[click.Command, list[str], str]:
    command, rest, path = main, list(argv), "mmkit"
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        command = command.get_command(None, name)
        assert command is not None, f"{path} has no command {name!r}"
        path += f" {name}"
    return command, rest, path


@pytest.mark.parametrize("doc, argv", command_lines(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_documented_command_line_parses(doc, argv):
    command, rest, path = _resolve(argv)
    if isinstance(command, click.Group):
        assert not rest, f"{path} needs a subcommand"
        return
    # Existence checks of paths (`click.Path(exists=True)`) need the user's files; options and choices must parse.
    checks = []
    for param in command.params:
        if isinstance(param.type, click.Path) and param.type.exists:
            checks.append(param.type)
            param.type.exists = False
    try:
        command.make_context(path, rest)
    except click.UsageError as err:
        pytest.fail(f"{doc}: `{path} {' '.join(rest)}` does not parse: {err.format_message()}")
    finally:
        for t in checks:
            t.exists = True


@pytest.mark.slow
def test_cheap_documented_commands_run(example_dir):
    from mmkit.models.builtin import BUILTIN_NAMES

    ran = set()
    for doc, argv in command_lines():
        model = argv[argv.index("--model") + 1] if "--model" in argv else "reference"
        if argv[0] not in RUN_COMMANDS or model not in BUILTIN_NAMES:
            continue  # a user's checkpoint (a 7B hub id or directory) is not here
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, f"{doc}: mmkit {' '.join(argv)}\n{result.output}"
        ran.add(argv[0])
    assert ran == RUN_COMMANDS
    assert (example_dir / "exported" / "mmkit_config.json").is_file()
    assert (example_dir / "zipped" / "modeling_mmkit.py").is_file()


def test_readme_lists_every_method():
    from mmkit.registry import list_methods

    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `([a-z]+)` \|", readme, flags=re.M))
    assert table == {m.name for m in list_methods()}
