"""Export round trips of methods with learned or tuned state: `save_pretrained` then `mmkit.load` reproduces the
logits bit-exactly, and the export does not depend on the files the state came from."""

import json

import pytest
import torch

import mmkit
from conftest import forward_logits, tiny_blip, tiny_clip
from mmkit.errors import MmkitError
from mmkit.hallucination import head_sensitivity
from mmkit.pruning.dyvte import ExitGates
from safetensors.torch import save_file

HIDDEN, LAYERS = 64, 4  # tiny-random


def _round_trip(spec: str, images, prompts, tmp_path, forget) -> tuple[mmkit.Session, torch.Tensor, list[str]]:
    """Apply `spec`, record logits and greedy texts, export, call `forget()` (clobbers the source files), reload."""
    session = mmkit.load("tiny-random", methods=[spec])
    expected = forward_logits(session, session.prepare(images, prompts))
    texts = [r.text for r in session.generate(images, prompts, max_new_tokens=4)]
    session.save_pretrained(tmp_path / "export")
    session.close()
    forget()
    reloaded = mmkit.load(str(tmp_path / "export"))
    assert torch.equal(forward_logits(reloaded, reloaded.prepare(images, prompts)), expected)
    assert [r.text for r in reloaded.generate(images, prompts, max_new_tokens=4)] == texts
    return reloaded, expected, texts


def test_dyvte_gates_travel_with_the_export(images, prompts, tmp_path):
    gates = ExitGates((1, 2, 3), HIDDEN, LAYERS, width=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the gate of layer 2 fires for every sample: a visible effect on the logits
        gates.w2.zero_()
        gates.b2.copy_(torch.tensor([-10.0, 10.0, -10.0]))
    path = tmp_path / "gates.safetensors"
    save_file(gates.state_tensors(), str(path))
    baseline = mmkit.load("tiny-random")
    plain = forward_logits(baseline, baseline.prepare(images, prompts))
    baseline.close()

    reloaded, expected, _ = _round_trip(f"dyvte:gates={path}", images, prompts, tmp_path, path.unlink)
    try:
        assert not torch.equal(expected, plain)
        manifest = json.loads((tmp_path / "export" / "mmkit_config.json").read_text())
        assert manifest["methods"][0]["state"].endswith(".safetensors")
        assert str(path) not in json.dumps(manifest)
    finally:
        reloaded.close()


def test_paint_calibrated_sensitivities_travel_with_the_export(images, prompts, tmp_path):
    mass = torch.tensor([[0.4, 0.1, 0.2, 0.3]] * LAYERS)
    path = head_sensitivity.save(mass, tmp_path / "s.safetensors")
    reloaded, _, _ = _round_trip(f"paint:start_layer=1,alpha=3,heads=calibrated,sensitivity={path}", images, prompts, tmp_path,
                                 lambda: head_sensitivity.save(torch.ones(LAYERS, 4), path))
    try:
        assert torch.equal(reloaded.methods[0].impl.mass, mass)
    finally:
        reloaded.close()


def _vflowopt_file(tmp_path):
    path = tmp_path / "vflowopt.json"
    path.write_text(json.dumps({"method": "vflowopt", "config": {
        "vision_keep": 0.5, "threshold": 2.0, "merge_cell": 0.25, "entropy_weight": 0.5,
        "llm_layers": [2], "llm_keep": [0.5], "positions": "original"}}))
    return path


def test_vflowopt_tuned_config_round_trip(images, prompts, tmp_path):
    path = _vflowopt_file(tmp_path)
    reloaded, _, _ = _round_trip(f"vflowopt:config={path}", images, prompts, tmp_path, lambda: None)
    try:
        config = reloaded.methods[0].config
        assert (config.vision_keep, config.llm_layers, config.llm_keep) == (0.5, (2,), (0.5,))
    finally:
        reloaded.close()


def test_vflowopt_export_does_not_need_the_tuned_config_file(images, prompts, tmp_path):
    path = _vflowopt_file(tmp_path)
    reloaded, _, _ = _round_trip(f"vflowopt:config={path}", images, prompts, tmp_path, path.unlink)
    try:
        manifest = json.loads((tmp_path / "export" / "mmkit_config.json").read_text())
        assert str(path) not in json.dumps(manifest)
        config = reloaded.methods[0].config
        assert (config.vision_keep, config.merge_cell, config.llm_keep) == (0.5, 0.25, (0.5,))
    finally:
        reloaded.close()


def test_visor_weights_travel_with_the_export(images, prompts, tmp_path):
    from mmkit.pruning.visor import new_weights

    session = mmkit.load("tiny-random")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = new_weights(session, policy_width=8)
    with torch.no_grad():  # open gates and a policy that always picks budget 2: a visible effect on the logits
        for block in weights.blocks.values():
            block.gate.fill_(1.0)
        weights.policy.fc2.weight.zero_()
        weights.policy.fc2.bias.copy_(torch.tensor([-9.0, 9.0, 9.0]))
    plain = forward_logits(session, session.prepare(images, prompts))
    session.close()
    path = tmp_path / "visor.safetensors"
    save_file(weights.state_tensors(), str(path))

    reloaded, expected, _ = _round_trip(f"visor:weights={path}", images, prompts, tmp_path, path.unlink)
    try:
        assert expected.shape != plain.shape or not torch.equal(expected, plain)
        assert reloaded.methods[0].impl.last_budgets == [2, 2, 2]
        manifest = json.loads((tmp_path / "export" / "mmkit_config.json").read_text())
        assert manifest["methods"][0]["state"].endswith(".safetensors")
        assert str(path) not in json.dumps(manifest)
    finally:
        reloaded.close()


def _scores(session, images, prompts) -> torch.Tensor:
    return torch.tensor(session.answer_logprobs(images, prompts, choices=["yes", "no"]).logprobs)


# Methods without learned state: each exports and reloads to identical logits, greedy texts and branched scores.
PLAIN_SPECS = ["pyramiddrop", "sparsevlm", "vcd", "agla", "vhr", "var:start_layer=1,tau=2", "paint:start_layer=1",
               "divprune:keep=0.25", "cdpruner:keep=0.25", "random:keep=0.25", "pooling:keep=0.25"]


@pytest.mark.parametrize("spec", PLAIN_SPECS)
def test_every_method_exports_and_reloads_to_identical_outputs(spec, images, prompts, tmp_path):
    baseline = mmkit.load("tiny-random")
    plain_scores = _scores(baseline, images, prompts)
    baseline.close()
    session = mmkit.load("tiny-random", methods=[spec])
    scores = _scores(session, images, prompts)
    session.close()
    assert not torch.allclose(scores, plain_scores, atol=1e-6), f"{spec} does nothing on these prompts"
    reloaded, _, _ = _round_trip(spec, images, prompts, tmp_path, lambda: None)
    try:
        assert torch.equal(_scores(reloaded, images, prompts), scores)
        manifest = json.loads((tmp_path / "export" / "mmkit_config.json").read_text())
        assert [m["method"] for m in manifest["methods"]] == [spec.split(":")[0]]
    finally:
        reloaded.close()


def test_agla_clip_export_is_self_contained(images, prompts, tmp_path):
    """The CLIP checkpoint travels with the export: the export loads after the original directory is gone."""
    import shutil

    clip = tmp_path / "clip"
    tiny_clip(clip)
    spec = f"agla:matcher=clip,clip_model={clip}"
    session = mmkit.load("tiny-random", methods=[spec])
    scores = _scores(session, images, prompts)
    session.close()
    reloaded, _, _ = _round_trip(spec, images, prompts, tmp_path, lambda: shutil.rmtree(clip))
    try:
        assert torch.equal(_scores(reloaded, images, prompts), scores)
        manifest = json.loads((tmp_path / "export" / "mmkit_config.json").read_text())
        assert str(clip) not in json.dumps(manifest)
        moved = tmp_path / "moved"
        (tmp_path / "export").rename(moved)
        again = mmkit.load(str(moved))
        assert torch.equal(_scores(again, images, prompts), scores)
        again.close()
    finally:
        reloaded.close()


def test_agla_clip_export_refuses_a_vanished_checkpoint(tmp_path):
    import shutil

    clip = tmp_path / "clip"
    tiny_clip(clip)
    session = mmkit.load("tiny-random", methods=[f"agla:matcher=clip,clip_model={clip}"])
    shutil.rmtree(clip)
    with pytest.raises(MmkitError, match="no longer exists"):
        session.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    session.close()


def test_agla_blip_export_is_self_contained(images, prompts, tmp_path):
    """The paper's BLIP matcher checkpoint travels with the export like CLIP's."""
    import shutil

    blip = tmp_path / "blip"
    tiny_blip(blip)
    spec = f"agla:blip={blip},blip_layer=1"
    session = mmkit.load("tiny-random", methods=[spec])
    assert type(session.methods[0].impl.matcher).__name__ == "BlipMatcher"
    scores = _scores(session, images, prompts)
    session.close()
    reloaded, _, _ = _round_trip(spec, images, prompts, tmp_path, lambda: shutil.rmtree(blip))
    try:
        assert type(reloaded.methods[0].impl.matcher).__name__ == "BlipMatcher"
        assert torch.equal(_scores(reloaded, images, prompts), scores)
        manifest = json.loads((tmp_path / "export" / "mmkit_config.json").read_text())
        assert str(blip) not in json.dumps(manifest)
        assert manifest["methods"][0]["files"] == {"blip": "method_0_agla_blip"}
    finally:
        reloaded.close()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding a tiny BLIP as the hub repo `mmkit-test/tiny-blip`."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    repo = root / "models--mmkit-test--tiny-blip"
    revision = "0" * 40
    tiny_blip(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_agla_blip_hub_id_loads_through_from_pretrained_and_exports_its_snapshot(images, prompts, tmp_path,
                                                                                  hub_cache):
    import shutil

    spec = "agla:blip=mmkit-test/tiny-blip,blip_layer=1"
    session = mmkit.load("tiny-random", methods=[spec])
    scores = _scores(session, images, prompts)
    session.close()
    reloaded, _, _ = _round_trip(spec, images, prompts, tmp_path, lambda: shutil.rmtree(hub_cache))
    try:
        assert torch.equal(_scores(reloaded, images, prompts), scores)
    finally:
        reloaded.close()


def test_agla_blip_export_refuses_a_hub_id_no_longer_cached(tmp_path, hub_cache):
    import shutil

    session = mmkit.load("tiny-random", methods=["agla:blip=mmkit-test/tiny-blip,blip_layer=1"])
    shutil.rmtree(hub_cache)
    with pytest.raises(MmkitError, match="not a checkpoint in the local Hugging Face cache"):
        session.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()
    session.close()


def test_every_registered_method_has_a_round_trip():
    """A new method needs a round trip: PLAIN_SPECS above, or a state-carrying test in this file or test_export.py
    (fastv, visionzip: test_export.py; dyvte, visor, vflowopt, paint's calibrated state: above)."""
    from mmkit.registry import list_methods

    covered = {s.split(":")[0] for s in PLAIN_SPECS} | {"fastv", "visionzip", "dyvte", "visor", "vflowopt"}
    assert {m.name for m in list_methods()} <= covered
