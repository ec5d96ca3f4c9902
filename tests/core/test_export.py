import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mmkit
from conftest import forward_logits
from mmkit.cli import main
from mmkit.errors import MmkitError


def test_export_reload_reproduces_outputs(tmp_path, images, prompts):
    session = mmkit.load("tiny-random", methods=["fastv:layer=2,keep=0.25"])
    inputs = session.prepare(images, prompts)
    expected = forward_logits(session, inputs)
    texts = [r.text for r in session.generate(images, prompts, max_new_tokens=5)]
    session.save_pretrained(tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "mmkit_config.json").read_text())
    assert manifest["methods"] == [{"method": "fastv", "config": {"layer": 2, "keep": 0.25}}]

    reloaded = mmkit.load(str(tmp_path / "export"))
    assert [h.spec for h in reloaded.methods] == ["fastv:keep=0.25"]
    assert torch.equal(forward_logits(reloaded, reloaded.prepare(images, prompts)), expected)
    assert [r.text for r in reloaded.generate(images, prompts, max_new_tokens=5)] == texts


def test_export_refuses_non_empty_dir_and_leaves_no_partial(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    session = mmkit.load("tiny-random")
    with pytest.raises(MmkitError, match="not empty"):
        session.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_export_failing_mid_write_keeps_the_previous_export(tmp_path, monkeypatch):
    """A failure after the model files are written (here: the processor) leaves the earlier export whole and no
    temporary directory behind, with and without overwrite."""
    target = tmp_path / "export"
    mmkit.load("tiny-random", methods=["fastv:keep=0.25"]).save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    session = mmkit.load("tiny-random", methods=["fastv:keep=0.1"])
    written = []

    def fail(directory, *args, **kwargs):
        written.extend(p.name for p in Path(directory).iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(session.processor, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        session.save_pretrained(target, overwrite=True)
    assert "model.safetensors" in written  # the failure came after writing had started
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert [h.spec for h in mmkit.load(str(target)).methods] == ["fastv:keep=0.25"]


def test_export_overwrite_replaces_the_directory(tmp_path, images, prompts):
    target = tmp_path / "export"
    mmkit.load("tiny-random", methods=["fastv:keep=0.5"]).save_pretrained(target)
    (target / "stale.txt").write_text("from an older export")
    session = mmkit.load("tiny-random", methods=["visionzip:keep=0.25"])
    expected = forward_logits(session, session.prepare(images, prompts))
    session.save_pretrained(target, overwrite=True)
    assert not (target / "stale.txt").exists()
    reloaded = mmkit.load(str(target))
    assert [h.spec for h in reloaded.methods] == [h.spec for h in session.methods]
    assert torch.equal(forward_logits(reloaded, reloaded.prepare(images, prompts)), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_broken_export_gets_clear_error(tmp_path):
    session = mmkit.load("tiny-random")
    session.save_pretrained(tmp_path / "e")
    (tmp_path / "e" / "mmkit_config.json").write_text("{not json")
    with pytest.raises(MmkitError, match="not valid JSON"):
        mmkit.load(str(tmp_path / "e"))
    (tmp_path / "e" / "mmkit_config.json").write_text(json.dumps({"format": 1, "methods": [
        {"method": "fastv", "config": {}, "state": "missing.safetensors"}]}))
    with pytest.raises(MmkitError, match="incomplete"):
        mmkit.load(str(tmp_path / "e"))


def test_export_cli(tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", "tiny-random", "--method", "fastv:keep=0.5",
                                       "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "mmkit_config.json").is_file()
    assert (tmp_path / "cli" / "config.json").is_file()
    assert not (tmp_path / "cli" / "modeling_mmkit.py").exists()
    result = CliRunner().invoke(main, ["export", "--model", "tiny-random", "--method", "visionzip:keep=0.25",
                                       "--remote-code", "--out", str(tmp_path / "remote")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "remote" / "modeling_mmkit.py").is_file()
    refused = CliRunner().invoke(main, ["export", "--model", "tiny-random", "--method", "agla", "--remote-code",
                                        "--out", str(tmp_path / "agla")])
    assert refused.exit_code == 2 and "without --remote-code" in refused.output


def _check_remote_code(model_name, spec, tmp_path, images, prompts, class_name, expect_spec=None):
    """Export with remote code, load with plain transformers: the methods come back attached, with the exporting
    session's logits and greedy answers; `mmkit.load` of the same directory reproduces it too."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    session = mmkit.load(model_name, methods=[spec])
    inputs = session.prepare(images, prompts)
    expected = forward_logits(session, inputs)
    texts = [r.text for r in session.generate(images, prompts, max_new_tokens=4)]
    specs = [h.spec for h in session.methods]
    session.save_pretrained(tmp_path / "export", remote_code=True)
    session.close()
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForImageTextToText": f"modeling_mmkit.{class_name}"}

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "export")
    assert type(model).__name__ == class_name
    assert [h.spec for h in model.mmkit_session.methods] == (expect_spec or specs)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, expected)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = processor.tokenizer.eos_token_id
    plain = [processor.tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True).strip()
             for row in new.tolist()]
    assert plain == texts
    model.mmkit_session.close()
    # mmkit.load ignores the remote code and reproduces the export as before.
    reloaded = mmkit.load(str(tmp_path / "export"))
    assert torch.equal(forward_logits(reloaded, reloaded.prepare(images, prompts)), expected)
    reloaded.close()


@pytest.mark.parametrize("spec", ["visionzip:keep=0.25", "vflowopt:vision_keep=0.5", "fastv:layer=2,keep=0.25"])
def test_remote_code_export_runs_with_plain_transformers(tmp_path, images, prompts, spec):
    """`AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)` gets the methods attached: the
    same logits as the exporting session, and plain `generate` gives the session's answers."""
    _check_remote_code("tiny-random", spec, tmp_path, images, prompts, "MmkitLlavaForConditionalGeneration",
                       expect_spec=[spec.replace("layer=2,", "")])


def test_remote_code_export_carries_learned_state(tmp_path, images, prompts):
    """DyVTE gates (learned state) travel in a remote-code export and act when plain transformers loads it."""
    from safetensors.torch import save_file

    from mmkit.pruning.dyvte import ExitGates

    gates = ExitGates((1, 2, 3), 64, 4, width=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # layer 2's gate fires for every sample: a visible effect on the logits
        gates.w2.zero_()
        gates.b2.copy_(torch.tensor([-10.0, 10.0, -10.0]))
    path = tmp_path / "gates.safetensors"
    save_file(gates.state_tensors(), str(path))
    _check_remote_code("tiny-random", f"dyvte:gates={path}", tmp_path, images, prompts,
                       "MmkitLlavaForConditionalGeneration", expect_spec=["dyvte:gates=exported"])
    manifest = json.loads((tmp_path / "export" / "mmkit_config.json").read_text())
    assert manifest["remote_code"] and manifest["methods"][0]["state"].endswith(".safetensors")


@pytest.mark.parametrize("spec", ["fastv:layer=2,keep=0.25", "visionzip:dominant=2,contextual=1",
                                  "vflowopt:vision_keep=0.5,merge_cell=1.0"])
def test_remote_code_export_of_llava_next(tmp_path, images, prompts, spec):
    _check_remote_code("tiny-random-next", spec, tmp_path, images, prompts, "MmkitLlavaNextForConditionalGeneration")


@pytest.mark.parametrize("spec", ["vcd", "agla", "vhr"])
def test_remote_code_export_refuses_branched_methods(tmp_path, spec):
    session = mmkit.load("tiny-random", methods=[spec])
    with pytest.raises(MmkitError, match="without --remote-code"):
        session.save_pretrained(tmp_path / "export", remote_code=True)
    assert not (tmp_path / "export").exists()
