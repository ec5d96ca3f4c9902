"""Every registered method on every new family: it runs (batched rows equal single rows, outputs change, `remove()`
restores the model exactly), or `apply` refuses it with one line naming the family and the reason, before any hook
or forward. The README's support matrix is generated from the same tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mmkit
from mmkit.cli import main
from mmkit.errors import MmkitError
from mmkit.models.families import FAMILIES, refusal
from mmkit.registry import list_methods
from mmkit.support_matrix import README, render_matrix, readme_with_matrix

from families_lib import FAMILY_BUILTINS, assert_batch_equals_single, family_images

PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]
# Settings that make each method act on the tiny models (VAR: random weights have no massive activations, so the
# sink threshold is lowered until some tokens are sinks, and few random-weight heads pass the paper's image-centric
# bounds, so they are widened; VISOR's fixed budget 1 forces its cross-attention path).
SPECS = {
    "fastv": "fastv:layer=2,keep=0.25", "pyramiddrop": "pyramiddrop", "sparsevlm": "sparsevlm",
    "var": "var:start_layer=1,tau=1.5,p=0.2,min_visual=0.01,rho=0.99", "vcd": "vcd", "vhr": "vhr",
    "agla": "agla:matcher=attention",
    "dyvte": "dyvte:gates={gates}", "visor": "visor:weights={visor},budget=1",
    "visionzip": "visionzip:dominant=2,contextual=1",  # per 4-patch tile (anyres), per image (Qwen-VL)
    "vflowopt": "vflowopt:vision_keep=0.5,merge_cell=1.0,llm_keep=0.7/0.6",
    # A share: images differ in size (a token count above a small Qwen-VL image's keeps all of it).
    "divprune": "divprune:keep=0.5", "cdpruner": "cdpruner:keep=0.5", "random": "random:keep=0.5",
    "pooling": "pooling:keep=0.25",
    "paint": "paint:start_layer=1",
}


def _family_of(name: str):
    return next(f for f in FAMILIES.values() if f.builtin == name)


@pytest.fixture(scope="module", params=FAMILY_BUILTINS)
def trained(request, tmp_path_factory):
    """(builtin name, session, {"gates": dir, "visor": dir}): DyVTE gates and VISOR blocks trained for this model
    with the smallest settings (their weights are model-specific)."""
    name = request.param
    out = tmp_path_factory.mktemp(name.replace(".", "_"))
    runner = CliRunner()
    paths = {}
    if refusal(_family_of(name), "dyvte") is None:
        result = runner.invoke(main, ["train-gates", "--model", name, "--samples", "8", "--steps", "5", "--width",
                                      "4", "--batch-size", "8", "--out", str(out / "gates"), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        paths["gates"] = str(out / "gates")
    if refusal(_family_of(name), "visor") is None:
        result = runner.invoke(main, ["train-visor", "--model", name, "--tiny", "--out", str(out / "visor")])
        assert result.exit_code == 0, result.output
        paths["visor"] = str(out / "visor")
    session = mmkit.load(name, device="cpu")
    yield name, session, paths
    session.close()


def _logits(session, inputs):
    with torch.inference_mode():
        return session.model(**inputs, use_cache=False).logits[:, -1]


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_method_runs_or_is_refused_at_apply(trained, method):
    name, session, paths = trained
    family = _family_of(name)
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    base_logits = _logits(session, inputs)
    base_scores = session.answer_logprobs(images, PROMPTS).logprobs
    reason = refusal(family, method)
    if reason is not None:
        with pytest.raises(MmkitError) as err:
            session.apply(SPECS.get(method, method).format(**paths) if method in SPECS else method)
        message = str(err.value)
        assert "\n" not in message and family.name in message and family.architecture in message
        assert session.methods == []
        assert torch.equal(_logits(session, inputs), base_logits)  # nothing was installed
        return
    spec = SPECS[method].format(**paths)
    handle = session.apply(spec)
    try:
        batch = session.generate(images, PROMPTS, max_new_tokens=3)
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            assert session.generate([image], [prompt], max_new_tokens=3)[0].text == batch[i].text
        scores = session.answer_logprobs(images, PROMPTS).logprobs
        assert torch.tensor(scores) != pytest.approx(torch.tensor(base_scores), abs=1e-6), f"{spec} changed nothing"
    finally:
        handle.remove()
    assert torch.equal(_logits(session, inputs), base_logits)


def test_every_family_refuses_at_most_a_few_methods():
    names = {m.name for m in list_methods()}
    for family in FAMILIES.values():
        assert set(family.refuses) <= names, f"{family.name} refuses unknown methods"


def test_readme_support_matrix_matches_registry():
    text = README.read_text()
    assert readme_with_matrix(text) == text, "README support matrix is stale: run `python -m mmkit.support_matrix`"
    table = render_matrix()
    for method in list_methods():
        assert f"| {method.name} |" in table
    for family in FAMILIES.values():
        assert family.name in table


@pytest.mark.parametrize("name", ["tiny-random-next", *FAMILY_BUILTINS])
def test_grounding_runs_on_every_family(name, tmp_path):
    """VL-SAM places each layout's image tokens on the image (anyres tiles, native grids): the Python entry point,
    the CLI and the ground bench all run (tests/grounding/test_families_grounding.py checks the geometry)."""
    from PIL import Image

    session = mmkit.load(name, device="cpu")
    assert refusal(_family_of(name), "ground") is None
    results = session.ground(family_images(), query="cube")
    assert [r.size for r in results] == [(i.shape[1], i.shape[0]) for i in family_images()]
    assert all(r.maps for r in results)
    image = tmp_path / "scene.png"
    Image.fromarray(family_images()[1]).save(image)
    result = CliRunner().invoke(main, ["ground", "--model", name, "--image", str(image), "--query", "cube",
                                       "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "scene_coco.json").exists()
    evaluated = CliRunner().invoke(main, ["eval", "--model", name, "--bench", "ground", "--limit", "1",
                                          "--ground-mode", "query", "--out", str(tmp_path / "eval"), "--device",
                                          "cpu", "--no-progress"])
    assert evaluated.exit_code == 0, evaluated.output


def test_a_family_that_refuses_grounding_says_so_up_front(monkeypatch, tmp_path):
    """The refusal mechanism stays: a family marked `grounding_refused` is refused in one line at the Python entry
    points and the CLI, before SAM is looked up or the model runs."""
    import dataclasses
    import re

    from PIL import Image

    from mmkit.grounding.vlsam import ground
    from mmkit.models import families

    session = mmkit.load("tiny-random-qwen2-vl", device="cpu")
    family = session.adapter.family
    marked = dataclasses.replace(family, grounding_refused="its image tokens cannot be placed on the image")
    monkeypatch.setitem(families.FAMILIES, family.architecture, marked)
    assert session.adapter.family is marked
    message = f"VL-SAM grounding does not support {family.name} ({family.architecture}): its image tokens"
    with pytest.raises(MmkitError, match=re.escape(message)):
        session.ground(family_images()[:1], query="cube", sam="/no/such/sam")  # refused before SAM is looked up
    with pytest.raises(MmkitError, match="VL-SAM grounding does not support"):
        ground(session, None, family_images()[:1])
    image = tmp_path / "scene.png"
    Image.fromarray(family_images()[0]).save(image)
    result = CliRunner().invoke(main, ["ground", "--model", "tiny-random-qwen2-vl", "--image", str(image),
                                       "--query", "cube", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()
    assert refusal(marked, "ground") is not None


@pytest.mark.parametrize("name", FAMILY_BUILTINS)
def test_no_op_settings_equal_the_baseline(name):
    """FastV keeping every token and VHR with alpha 1 change nothing on any family, bit for bit."""
    session = mmkit.load(name, device="cpu")
    inputs = session.prepare(family_images(), PROMPTS)
    base = _logits(session, inputs)
    for spec in ("fastv:layer=2,keep=1.0", "vhr:alpha=1"):
        handle = session.apply(spec)
        assert torch.equal(_logits(session, inputs), base), spec
        assert torch.tensor(session.answer_logprobs(family_images(), PROMPTS).logprobs).isfinite().all()
        handle.remove()
    session.close()


@pytest.mark.parametrize("name", FAMILY_BUILTINS)
@pytest.mark.parametrize("pair", [("fastv:layer=2,keep=0.5", "vcd"), ("vhr", "sparsevlm"), ("pyramiddrop", "var"),
                                  ("agla:matcher=attention", "fastv:layer=1,keep=0.5")], ids="+".join)
def test_pruning_composes_with_mitigation_on_families(name, pair):
    """A pruning and a mitigation method in one session, batched rows equal to single rows (3-D positions and
    token types must survive both the drop and the extra branches)."""
    session = mmkit.load(name, device="cpu", methods=list(pair))
    images = family_images()
    assert_batch_equals_single(session, images, PROMPTS)
    session.close()
