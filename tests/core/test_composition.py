"""Every pruning method composes with every hallucination-mitigation method, in either order.

Each pair runs in one session with batch 2 and different prompts: greedy and sampled `generate`, and
`answer_logprobs`; removing both restores the model bit-exactly. With a pruning setting that keeps every token the
combination must equal the mitigation alone (the probe's position maps are then the identity). On LLaVA-NeXT,
LLaVA-OneVision and Qwen2-VL every pair whose two methods each support the family runs too; a smaller set runs on the reference model, with export, grounding
and the command line.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mmkit
from conftest import forward_logits, tiny_blip
from mmkit.errors import MmkitError

MITIGATION = {
    "agla": "agla",
    # The paper's uniform heads: calibrated heads are exercised separately (they calibrate once per active method set).
    "paint": "paint:start_layer=1,heads=uniform",
    "vcd": "vcd",
    # tau low enough that the tiny model has sink tokens, so VAR really edits attention.
    "var": "var:start_layer=1,tau=1.0",
    "vhr": "vhr",
}
PROMPTS = ["Is there a cup in the image?", "Describe the image in detail."]
QUESTIONS = ["Is there a cup in the image?", "Is there a tree in the image?"]


@pytest.fixture(scope="module")
def pruning_specs(tiny_session, tmp_path_factory):
    """Each pruning method at a setting that drops tokens on tiny-random (DyVTE and VISOR with fixed weights)."""
    from mmkit.pruning.dyvte import ExitGates
    from mmkit.pruning.visor import new_weights

    tmp = tmp_path_factory.mktemp("weights")
    config = tiny_session.model.config.text_config
    gates = ExitGates((1, 2, 3), config.hidden_size, config.num_hidden_layers, width=8,
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # only the gate of layer 2 fires: rows drop their image tokens there
        gates.w2.zero_()
        gates.b2.copy_(torch.tensor([-10.0, 10.0, -10.0]))
    save_file(gates.state_tensors(), str(tmp / "gates.safetensors"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = new_weights(tiny_session, policy_width=8)
    with torch.no_grad():
        for block in weights.blocks.values():
            block.gate.fill_(1.0)
    save_file(weights.state_tensors(), str(tmp / "visor.safetensors"))
    return {
        "fastv": "fastv:keep=0.25",
        "pyramiddrop": "pyramiddrop:ratio=0.25",
        "sparsevlm": "sparsevlm",
        "visionzip": "visionzip:keep=0.25",
        "vflowopt": "vflowopt",
        "dyvte": f"dyvte:gates={tmp / 'gates.safetensors'}",
        "visor": f"visor:weights={tmp / 'visor.safetensors'},budget=1",
        # 16 of tiny-random's 64 tokens; a share, so the families with smaller images prune too.
        "divprune": "divprune:keep=0.25",
        "cdpruner": "cdpruner:keep=0.25",
        "random": "random:keep=0.25",
        "pooling": "pooling:keep=0.25",
    }


PRUNING_NAMES = ("fastv", "pyramiddrop", "sparsevlm", "visionzip", "vflowopt", "dyvte", "visor", "divprune", "cdpruner",
                 "random", "pooling")
PAIRS = [(p, m, order) for p, m in itertools.product(PRUNING_NAMES, MITIGATION) for order in ("pm", "mp")]


def run_pair(session, images, specs) -> None:
    inputs = session.prepare(images, PROMPTS)
    base = forward_logits(session, inputs)
    handles = [session.apply(spec) for spec in specs]
    greedy = session.generate(images, PROMPTS, max_new_tokens=3)
    sampled = session.generate(images, PROMPTS, max_new_tokens=3, do_sample=True, seed=1)
    scores = session.answer_logprobs(images, QUESTIONS)
    assert len(greedy) == len(sampled) == 2
    for result in greedy + sampled:
        assert 1 <= result.stats.new_tokens <= 3 or result.text == ""
        assert all(0 <= kept <= result.stats.visual_tokens for kept in result.stats.visual_tokens_kept)
    for row in scores.logprobs:
        # Contrastive methods give implausible answers -inf (their plausibility cutoff); never NaN.
        assert all(not math.isnan(x) and x <= 0.0 for x in row)
        assert sum(math.exp(x) for x in row) <= 1.0 + 1e-5
    for handle in reversed(handles):
        handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)


@pytest.mark.parametrize("pruning, mitigation, order", PAIRS, ids=[f"{p}-{m}-{o}" for p, m, o in PAIRS])
def test_every_pair_runs_on_tiny_random(session, images, pruning_specs, pruning, mitigation, order):
    specs = [pruning_specs[pruning], MITIGATION[mitigation]]
    run_pair(session, images[:2], specs if order == "pm" else specs[::-1])
    # The pruning really pruned alongside the mitigation.
    handles = [session.apply(s) for s in specs]
    result = session.generate(images[:2], PROMPTS, max_new_tokens=1)[0]
    for handle in reversed(handles):
        handle.remove()
    assert min(result.stats.visual_tokens_kept) < result.stats.visual_tokens


@pytest.fixture(scope="module")
def agla_blip_spec(tmp_path_factory):
    """AGLA with the paper's matcher: a tiny random BLIP image-text matching checkpoint."""
    path = tmp_path_factory.mktemp("blip")
    tiny_blip(path)
    return f"agla:blip={path},blip_layer=1"


@pytest.mark.parametrize("order", ("pm", "mp"))
@pytest.mark.parametrize("pruning", PRUNING_NAMES)
def test_every_pruning_method_runs_with_agla_blip_matcher(session, images, pruning_specs, agla_blip_spec, pruning,
                                                          order):
    """BLIP reads the image and the prompt from the inputs, whatever a token dropper does inside the model."""
    specs = [pruning_specs[pruning], agla_blip_spec]
    run_pair(session, images[:2], specs if order == "pm" else specs[::-1])


@pytest.mark.parametrize("mitigation", ["agla", "paint", "var"])
def test_keeping_every_token_leaves_the_mitigation_unchanged(session, images, mitigation):
    """Through a token dropper that keeps everything, an attention-reading mitigation sees the same tokens."""
    inputs = session.prepare(images[:2], PROMPTS)
    handle = session.apply(MITIGATION[mitigation])
    alone = session.answer_logprobs(images[:2], PROMPTS).logprobs
    alone_text = [r.text for r in session.generate(images[:2], PROMPTS, max_new_tokens=4)]
    handle.remove()
    handles = [session.apply("fastv:keep=1.0"), session.apply(MITIGATION[mitigation])]
    together = session.answer_logprobs(images[:2], PROMPTS).logprobs
    together_text = [r.text for r in session.generate(images[:2], PROMPTS, max_new_tokens=4)]
    for h in reversed(handles):
        h.remove()
    assert np.allclose(alone, together, atol=1e-4)
    assert alone_text == together_text
    assert inputs["input_ids"].shape[0] == 2


def test_paint_calibrates_with_token_dropping_active(session, images):
    """PAINT's head calibration runs through the probe, so it works after a pruning method (the masses are then
    over the image tokens each layer still holds) and the pair decodes."""
    session.apply("fastv:keep=0.25")
    handle = session.apply("paint:start_layer=1,heads=calibrated")
    mass = handle.impl.mass
    assert mass.shape == (4, 4) and bool((mass >= 0).all()) and bool((mass <= 1).all())
    assert len(session.generate(images[:2], PROMPTS, max_new_tokens=2)) == 2


def test_two_methods_of_one_kind_in_one_slot_are_refused_with_the_reason(session):
    session.apply("fastv:keep=0.5")
    with pytest.raises(MmkitError, match="cannot combine pyramiddrop with fastv: both drop tokens"):
        session.apply("pyramiddrop")
    session.apply("vcd")
    with pytest.raises(MmkitError, match="own set of input branches"):
        session.apply("agla")


OTHER_FAMILIES = ("tiny-random-next", "tiny-random-onevision", "tiny-random-qwen2-vl")


def _supports(session, spec) -> bool:
    try:
        session.apply(spec).remove()
        return True
    except MmkitError:
        return False


@pytest.mark.parametrize("mitigation", list(MITIGATION))
@pytest.mark.parametrize("model", OTHER_FAMILIES)
def test_every_supported_pair_runs_on_other_families(model, mitigation, images, pruning_specs):
    next_session = mmkit.load(model, device="cpu")
    try:
        _run_supported_pairs(next_session, images, pruning_specs, mitigation)
    finally:
        next_session.close()


def _run_supported_pairs(next_session, images, pruning_specs, mitigation):
    from mmkit.models.families import refusal

    specs = dict(pruning_specs)
    # Learned weights of tiny-random do not fit the other models; each method's support is checked alone.
    specs.pop("dyvte"), specs.pop("visor")
    if not _supports(next_session, MITIGATION[mitigation]):
        assert mitigation not in ("vcd", "var", "vhr", "agla")
        assert refusal(next_session.adapter.family, mitigation) is not None  # refused by the family table
        return
    supported_p = [p for p, s in specs.items() if _supports(next_session, s)]
    assert {"fastv", "pyramiddrop", "sparsevlm"} <= set(supported_p)
    for p in supported_p:
        for order in ((specs[p], MITIGATION[mitigation]), (MITIGATION[mitigation], specs[p])):
            next_session.remove_all()
            run_pair(next_session, images[:2], list(order))
    next_session.remove_all()


PAINT_FAMILIES = ("tiny-random-next", "tiny-random-onevision", "tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl",
                  "tiny-random-qwen3-vl")


@pytest.mark.parametrize("model", PAINT_FAMILIES)
def test_paint_composes_with_every_supported_pruning_on_families(model, images, pruning_specs):
    """PAINT's token sets (from the vision tower, in prompt positions) under every pruning method the family runs,
    both orders: pre-LLM reductions (anyres placement, Qwen-VL kept slots) and in-LLM token drops."""
    session = mmkit.load(model, device="cpu")
    try:
        specs = {p: s for p, s in pruning_specs.items() if p not in ("dyvte", "visor")}
        supported = [p for p, s in specs.items() if _supports(session, s)]
        assert {"fastv", "pyramiddrop", "sparsevlm", "visionzip", "vflowopt"} <= set(supported)
        for p in supported:
            for order in ((specs[p], MITIGATION["paint"]), (MITIGATION["paint"], specs[p])):
                session.remove_all()
                run_pair(session, images[:2], list(order))
    finally:
        session.close()


@pytest.mark.parametrize("pair", [("fastv:layer=2,keep=0.25", "paint:start_layer=1"), ("visionzip:keep=0.25", "var"),
                                  ("sparsevlm:layers=1/2,keep=0.25/0.25", "agla"),
                                  ("vhr", "sparsevlm:budget=rank,rank_scale=2")])
def test_pairs_export_and_reload_with_identical_outputs(session, images, tmp_path, pair):
    for spec in pair:
        session.apply(spec)
    inputs = session.prepare(images[:2], PROMPTS)
    expected = session.answer_logprobs(images[:2], PROMPTS).logprobs
    session.save_pretrained(tmp_path / "export")
    reloaded = mmkit.load(str(tmp_path / "export"), device="cpu")
    try:
        assert [h.spec for h in reloaded.methods] == [h.spec for h in session.methods]
        assert np.allclose(reloaded.answer_logprobs(images[:2], PROMPTS).logprobs, expected, atol=1e-5)
    finally:
        reloaded.close()
    assert inputs["input_ids"].shape[0] == 2


REFERENCE_PAIRS = [("fastv:keep=0.25", "agla"), ("vflowopt:config=reference-0.25", "paint"),
                   ("visionzip:keep=0.25", "var"), ("dyvte", "vcd"), ("visor", "vhr"), ("sparsevlm", "paint"),
                   ("pyramiddrop", "var")]


@pytest.fixture(scope="module")
def reference():
    session = mmkit.load("reference", device="cpu")
    yield session
    session.close()


@pytest.fixture(scope="module")
def scene():
    from mmkit.world.scenes import generate_scene

    return [generate_scene(1, 0).image, generate_scene(1, 1).image]


@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=["+".join(p) for p in REFERENCE_PAIRS])
def test_pairs_run_on_the_reference_model(reference, scene, pair):
    reference.remove_all()
    try:
        run_pair(reference, scene, list(pair[::-1]) if "paint" in pair[1] else list(pair))
    finally:
        reference.remove_all()


def test_grounding_works_with_pre_llm_pruning(reference, scene, tmp_path):
    """The README example: VL-SAM maps come from the probe, in prompt coordinates, after VFlowOpt's reduction."""
    reference.remove_all()
    path = tmp_path / "scene.png"
    scene[0].save(path)
    reference.apply("vflowopt:config=reference-0.25")
    try:
        found = reference.ground([str(path)])
    finally:
        reference.remove_all()
    assert found[0].detections, "the reference model names objects in this scene"
    assert all(0.0 <= d.score <= 1.0 for d in found[0].detections)


def test_command_line_answers_with_pruning_and_mitigation(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from mmkit.cli import main

    path = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(2).random((96, 96, 3)) * 255).astype("uint8")).save(path)
    result = CliRunner().invoke(main, ["generate", "--model", "tiny-random", "--method", "fastv:keep=0.25",
                                       "--method", "agla", "--image", str(path), "--prompt", "What is this?",
                                       "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["methods"] == ["fastv:keep=0.25", "agla"]
    assert record["visual_tokens_kept"] < record["visual_tokens"]


@pytest.mark.parametrize("mitigation", ["vcd", "var", "vhr"])
def test_visionzip_composes_on_llava_onevision(images, mitigation):
    """The anyres pre-LLM reduction (SigLIP, no CLS) under a mitigation method, both orders, on OneVision."""
    session = mmkit.load("tiny-random-onevision", device="cpu")
    for order in (("visionzip:dominant=2,contextual=1", MITIGATION[mitigation]),
                  (MITIGATION[mitigation], "visionzip:dominant=2,contextual=1")):
        run_pair(session, images[:2], list(order))
    session.close()
