"""Reference-model builders and training pipeline: tokenizer, processor, data, loss, tiny training run."""

import json

import numpy as np
import pytest
import torch

from mmkit.world.reference_model import (
    REFERENCE_SPEC, SPECIAL_TOKENS, TINY_SPEC, ReferenceSpec, build_model, build_processor, build_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def scene():
    from mmkit.world.scenes import generate_scene

    return generate_scene(0, 0)


def test_specials_and_round_trip(tokenizer):
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    ids = tokenizer("yes").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == "yes"
    from mmkit.world.questions import reference_caption
    from mmkit.world.scenes import generate_scene

    text = reference_caption(generate_scene(0, 3))
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.decode(encoded) == text


def test_training_text_has_no_unknown_words(tokenizer):
    from mmkit.world.questions import training_examples

    unk = tokenizer.unk_token_id
    for _, q in training_examples(0, 8):
        assert unk not in tokenizer(q.prompt).input_ids, q.prompt
        assert unk not in tokenizer(q.answer).input_ids, q.answer


def test_processor_matches_training_inputs(tokenizer, scene):
    from mmkit.world.train import _encode_prompt, normalise_pixels

    processor = build_processor(tokenizer, TINY_SPEC)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a cup?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == "USER: <image>\nIs there a cup? ASSISTANT:"
    inputs = processor(images=[scene.image], text=[text], return_tensors="pt")
    assert int((inputs.input_ids == tokenizer.convert_tokens_to_ids("<image>")).sum()) == TINY_SPEC.num_image_tokens
    assert inputs.input_ids[0].tolist() == _encode_prompt(tokenizer.backend_tokenizer, "Is there a cup?",
                                                          TINY_SPEC.num_image_tokens)
    pixels = torch.from_numpy(np.asarray(scene.image.convert("RGB")).transpose(2, 0, 1).copy())[None]
    torch.testing.assert_close(normalise_pixels(pixels), inputs.pixel_values, atol=1e-5, rtol=0)


def test_reference_spec_layout(tokenizer):
    from mmkit.world.reference_model import build_config

    config = build_config(tokenizer, REFERENCE_SPEC)
    assert REFERENCE_SPEC.num_image_tokens == 576
    assert config.text_config.num_hidden_layers >= 4
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(ValueError, match="patch_size"):
        ReferenceSpec(patch_size=13)


def test_parse_steps_and_config_validation():
    from mmkit.world.train import TrainConfig, parse_steps

    assert parse_steps("10,20,30") == {"vision_steps": 10, "align_steps": 20, "instruct_steps": 30}
    assert sum(parse_steps("80").values()) == 80
    for bad in ("x", "1,2", "-1,2,3", "2"):
        with pytest.raises(ValueError):
            parse_steps(bad)
    with pytest.raises(ValueError, match="held-out"):
        TrainConfig(world_seed=1, eval_world_seed=1)
    with pytest.raises(ValueError, match="size"):
        TrainConfig(size="huge")


def test_collate_marks_answer_tokens_only():
    from mmkit.world.train import collate

    item = {"pixels": np.zeros((3, 4, 4), np.uint8), "category": np.zeros((2, 2), np.int64),
            "colour": np.zeros((2, 2), np.int64)}
    batch = collate([dict(item, ids=np.array([1, 5, 6, 7, 2]), n_prompt=3),
                     dict(item, ids=np.array([1, 5, 8]), n_prompt=2)], pad_id=0)
    assert batch["ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 0, 0]]
    assert batch["targets"].tolist() == [[False, False, False, True, True], [False, False, True, False, False]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_lm_loss_equals_hf_loss(tokenizer, scene):
    """The training loss (patch features projected by hand) equals HF's own forward on the same labels."""
    from mmkit.world.train import _encode_answer, _encode_prompt, _lm_loss, _patch_features, collate, normalise_pixels

    model = build_model(tokenizer, TINY_SPEC, seed=0).eval()
    core = tokenizer.backend_tokenizer
    prompt = _encode_prompt(core, "Is there a cup?", TINY_SPEC.num_image_tokens)
    ids = np.array(prompt + _encode_answer(core, "yes", tokenizer.eos_token_id))
    pixels = np.asarray(scene.image.convert("RGB")).transpose(2, 0, 1).copy()
    zeros = np.zeros((TINY_SPEC.grid, TINY_SPEC.grid), np.int64)
    batch = collate([{"pixels": pixels, "category": zeros, "colour": zeros, "ids": ids, "n_prompt": len(prompt)}], 0)
    with torch.no_grad():
        pv = normalise_pixels(batch["pixels"])
        ours = _lm_loss(model, _patch_features(model, pv), batch)
        labels = batch["ids"].masked_fill(~batch["targets"], -100)
        theirs = model(input_ids=batch["ids"], attention_mask=batch["attention_mask"], pixel_values=pv,
                       labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tiny_training_learns_and_saves_loadable_dir(tmp_path):
    """`train-reference --tiny`: losses fall, and the directory loads with stock from_pretrained/AutoProcessor."""
    from click.testing import CliRunner
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmkit.cli.train_reference import train_reference

    out = tmp_path / "ref"
    result = CliRunner().invoke(train_reference, ["--tiny", "--device", "cpu", "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    log = json.loads((out / "training_log.json").read_text())
    steps = [e for e in log if "phase" in e]
    vision = [e["loss"] for e in steps if e["phase"] == "vision"]
    language = [e["lm_loss"] for e in steps if e["phase"] != "vision"]
    assert vision[-1] < vision[0] and language[-1] < language[0]
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    from mmkit.world.scenes import generate_scene

    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a cup?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[generate_scene(1, 0).image], text=[text], return_tensors="pt")
    out_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] > inputs.input_ids.shape[1]


def test_tiny_training_is_deterministic(tmp_path):
    """Two CPU runs with one seed give identical weights (a few steps of each phase)."""
    from dataclasses import replace

    from mmkit.world.train import TINY_CONFIG, train

    cfg = replace(TINY_CONFIG, vision_steps=2, align_steps=2, instruct_steps=2, eval_scenes=0, num_workers=0,
                  vision_batch=2, batch=2, shuffle_buffer=2)
    first, _, _ = train(cfg, device="cpu")
    second, _, _ = train(cfg, device="cpu")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_continued_training_and_stop_at(tmp_path):
    """`init_from` starts from saved weights (not a fresh init) and `stop_at` cuts the run at that step."""
    from dataclasses import replace

    from mmkit.world.train import TINY_CONFIG, save_reference, train

    cfg = replace(TINY_CONFIG, vision_steps=1, align_steps=1, instruct_steps=1, eval_scenes=0, num_workers=0,
                  vision_batch=2, batch=2, shuffle_buffer=2)
    first, processor, _ = train(cfg, device="cpu")
    save_reference(first, processor, tmp_path / "first")
    cut, _, log = train(replace(cfg, instruct_steps=5, stop_at=2), device="cpu")
    assert log[-1]["step"] == 2 and log[-1]["stopped_early"]
    # Zero steps of training from the saved weights must give the saved weights back exactly.
    continued, _, _ = train(replace(cfg, vision_steps=0, align_steps=0, instruct_steps=1, stop_at=None, lr=1e-12,
                                    init_from=str(tmp_path / "first"), seed=5), device="cpu")
    fresh = dict(train(replace(cfg, seed=5, vision_steps=0, align_steps=0, lr=1e-12), device="cpu")[0].named_parameters())
    name, param = next(iter(continued.named_parameters()))
    torch.testing.assert_close(param, dict(first.named_parameters())[name], atol=1e-6, rtol=0)
    assert not torch.allclose(param, fresh[name])


@pytest.mark.slow
def test_shipped_reference_model_loads_and_answers():
    """The shipped directory loads with stock classes and answers held-out POPE questions well above chance."""
    from pathlib import Path

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmkit.models.builtin import REFERENCE_DIR
    from mmkit.world.train import evaluate

    assert (Path(REFERENCE_DIR) / "model.safetensors").is_file(), "the shipped reference weights are missing"
    model = LlavaForConditionalGeneration.from_pretrained(REFERENCE_DIR).eval()
    processor = AutoProcessor.from_pretrained(REFERENCE_DIR)
    from mmkit.world.scenes import generate_scene

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a cup?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[generate_scene(1, 0).image], text=[text], return_tensors="pt")
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == model.config.image_seq_length == 576
    result = evaluate(model, processor.tokenizer, world_seed=1, n_scenes=2, n_captions=0, batch_size=16)
    accuracy = sum(m["accuracy"] * m["n"] for m in result.pope.values()) / sum(m["n"] for m in result.pope.values())
    assert accuracy >= 0.7, result.summary()
