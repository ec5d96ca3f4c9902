"""LLaVA-OneVision and Qwen2/2.5/3-VL: built-in tiny models, batched sessions, `mmkit info`, local checkpoints (stock
and image-only processors), loading options."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import mmkit
from mmkit.cli import main
from mmkit.errors import MmkitError
from mmkit.models.builtin_families import build_family_builtin
from mmkit.models.processors import STOCK_PROCESSORS, image_only_class
from mmkit.session import Session

from families_lib import FAMILY_BUILTINS, family_images

PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]
QWEN_BUILTINS = [n for n in FAMILY_BUILTINS if "qwen" in n]


@pytest.fixture(scope="module", params=FAMILY_BUILTINS)
def family_session(request):
    session = mmkit.load(request.param, device="cpu")
    yield session
    session.close()


def test_batched_generate_and_scores_match_single_rows(family_session):
    """Left-padded rows with images of different sizes: each row's answer and scores equal its own unbatched run."""
    session = family_session
    images = family_images()
    batch = session.generate(images, PROMPTS, max_new_tokens=4)
    visual = [r.stats.visual_tokens for r in batch]
    assert len(set(visual)) > 1  # different image sizes give different visual-token counts
    scores = session.answer_logprobs(images, PROMPTS)
    for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
        single = session.generate([image], [prompt], max_new_tokens=4)[0]
        assert single.text == batch[i].text
        assert single.stats.visual_tokens == visual[i]
        one = session.answer_logprobs([image], [prompt])
        assert one.logprobs[0] == pytest.approx(scores.logprobs[i], abs=1e-5)


def test_image_spans_come_from_image_token(family_session):
    session = family_session
    inputs = session.prepare(family_images(), PROMPTS)
    spans = session.adapter.image_spans(inputs["input_ids"])
    counts = (inputs["input_ids"] == session.adapter.image_token_id).sum(1).tolist()
    assert [sum(e - s for s, e in row) for row in spans] == counts
    assert all(len(row) == 1 for row in spans)  # one image per prompt: one run


@pytest.mark.parametrize("name", QWEN_BUILTINS)
def test_qwen_positions_are_three_dimensional_per_row(name):
    """mRoPE: image tokens of a row share a temporal index and advance over height and width; left padding shifts
    nothing (positions start at each row's first real token)."""
    session = mmkit.load(name, device="cpu")
    inputs = session.prepare(family_images(), PROMPTS)
    position_ids, deltas = session.model.model.get_rope_index(
        inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"])
    assert position_ids.shape[0] == 3
    for row in range(position_ids.shape[1]):
        real = inputs["attention_mask"][row].bool()
        assert int(position_ids[0, row][real][0]) == 0
        image = (inputs["input_ids"][row] == session.adapter.image_token_id)
        grid = inputs["image_grid_thw"][row].tolist()
        h, w = grid[1] // 2, grid[2] // 2
        assert int(image.sum()) == h * w
        assert position_ids[0, row][image].unique().numel() == 1
        assert position_ids[1, row][image].unique().numel() == h
        assert position_ids[2, row][image].unique().numel() == w
    session.close()


@pytest.mark.parametrize("name", QWEN_BUILTINS)
def test_branched_decoding_continues_mrope_positions(name):
    """Multi-branch decoding runs its own decode loop; with the contrast switched off (vcd alpha=0) it must produce
    exactly the greedy tokens of `model.generate`, which needs each row's mRoPE offset carried into decoding."""
    session = mmkit.load(name, device="cpu")
    images = family_images()
    plain = [r.text for r in session.generate(images, PROMPTS, max_new_tokens=5)]
    handle = session.apply("vcd:alpha=0.0")
    branched = [r.text for r in session.generate(images, PROMPTS, max_new_tokens=5)]
    handle.remove()
    assert branched == plain
    # Two real branches (text-only second branch): rows of mm_token_type_ids follow the rows' image tokens.
    session.apply("vhr")
    assert len(session.generate(images, PROMPTS, max_new_tokens=3)) == 3
    session.close()


@pytest.mark.parametrize("name", ["tiny-random-qwen2.5-vl", "tiny-random-onevision", "tiny-random-qwen3-vl"])
def test_info_prints_family_visual_tokens_and_attention(name):
    result = CliRunner().invoke(main, ["info", "--model", name, "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["family"] == {"tiny-random-qwen2.5-vl": "qwen2.5-vl", "tiny-random-onevision": "llava-onevision",
                              "tiny-random-qwen3-vl": "qwen3-vl"}[name]
    assert info["visual_tokens"].startswith("varies with image size: ")
    # The counts printed are what the processor really produces for an image of that size.
    session = mmkit.load(name, device="cpu")
    import numpy as np

    image = np.zeros((336, 504, 3), dtype="uint8")
    real = (session.prepare([image], ["x"])["input_ids"] == session.adapter.image_token_id).sum().item()
    assert f"{real} at 336x504" in info["visual_tokens"]
    assert info["attn_implementation"] == "sdpa"
    assert "sdpa" in info["attn_per_layer"]
    assert info["vision_cls_token"] is False  # SigLIP and the Qwen-VL towers have none
    text = CliRunner().invoke(main, ["info", "--model", name, "--device", "cpu"]).output
    assert "family" in text and "attn_implementation" in text


def test_info_on_llava_families_reports_fixed_and_varying_counts():
    assert mmkit.load("tiny-random", device="cpu").describe()["visual_tokens"] == 64
    assert "varies" in mmkit.load("tiny-random-next", device="cpu").describe()["visual_tokens"]


# -- local checkpoints ------------------------------------------------------------------------------------------
def _write_hub_layout(name: str, path):
    """A checkpoint directory as the hub ships one: config and weights, preprocessor_config.json (the image
    processor), tokenizer files and a chat template; processor settings in processor_config.json (OneVision)."""
    model, processor = build_family_builtin(name)
    model.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    cfg_file = path / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    # Hub files name the default image-processor class and the stock processor.
    cfg["image_processor_type"] = cfg["image_processor_type"].removesuffix("Pil")
    cfg["processor_class"] = STOCK_PROCESSORS[type(model).__name__]
    cfg_file.write_text(json.dumps(cfg))
    processor.tokenizer.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    if "onevision" in name:
        (path / "processor_config.json").write_text(json.dumps({
            "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": processor.num_image_tokens,
            "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    return model, processor


@pytest.mark.parametrize("name", FAMILY_BUILTINS)
def test_local_hub_layout_checkpoint_loads_without_torchvision(name, tmp_path):
    model, processor = _write_hub_layout(name, tmp_path)
    session = mmkit.load(str(tmp_path), device="cpu")
    assert session.adapter.architecture == type(model).__name__
    # No torchvision here: the stock processor cannot be built, the image-only one is used.
    assert isinstance(session.processor, image_only_class(STOCK_PROCESSORS[type(model).__name__]))
    reference = Session(model, processor, name)
    images, prompts = family_images()[:2], PROMPTS[:2]
    ref_inputs = reference.prepare(images, prompts)
    inputs = session.prepare(images, prompts)
    assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], ref_inputs["pixel_values"])
    with torch.inference_mode():
        torch.testing.assert_close(session.model(**inputs).logits, reference.model(**ref_inputs).logits)


def test_saved_session_names_the_stock_processor_and_reloads(tmp_path):
    session = mmkit.load("tiny-random-qwen2-vl", device="cpu", methods=["fastv:layer=2,keep=0.25"])
    out = tmp_path / "export"
    session.save_pretrained(out)
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"  # a user with torchvision gets the stock processor
    again = mmkit.load(str(out), device="cpu")
    assert [h.spec for h in again.methods] == ["fastv:keep=0.25"]
    images = family_images()[:2]
    assert [r.text for r in again.generate(images, PROMPTS[:2], max_new_tokens=3)] == \
           [r.text for r in session.generate(images, PROMPTS[:2], max_new_tokens=3)]


def test_stock_processor_is_used_when_it_can_be_built(tmp_path, monkeypatch):
    """Where torchvision is installed `AutoProcessor` builds the stock processor; mmkit then uses it as is."""
    import transformers

    _write_hub_layout("tiny-random-qwen2.5-vl", tmp_path)
    built = {}

    def stock_from_pretrained(path, *args, **kwargs):
        # Stand-in for the stock class (whose video processor needs torchvision): the stock type, really built.
        stock = transformers.Qwen2_5_VLProcessor.__new__(transformers.Qwen2_5_VLProcessor)
        image_only = image_only_class("Qwen2_5_VLProcessor").from_pretrained  # noqa: F841 (documents the contrast)
        from mmkit.models.processors import build_image_only_from_dir

        donor = build_image_only_from_dir(str(path), "Qwen2_5_VLForConditionalGeneration")
        stock.__dict__.update(donor.__dict__)
        built["stock"] = stock
        return stock

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", staticmethod(stock_from_pretrained))
    session = mmkit.load(str(tmp_path), device="cpu")
    assert session.processor is built["stock"]
    assert type(session.processor) is transformers.Qwen2_5_VLProcessor
    assert len(session.generate(family_images()[:2], PROMPTS[:2], max_new_tokens=2)) == 2


def test_bad_family_checkpoint_is_a_one_line_error(tmp_path):
    _write_hub_layout("tiny-random-qwen2-vl", tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(MmkitError, match="tokenizer files are missing"):
        mmkit.load(str(tmp_path), device="cpu")


# -- loading options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, impl", [("tiny-random-qwen2.5-vl", "eager"), ("tiny-random-qwen2.5-vl", "sdpa"),
                                        ("tiny-random-onevision", "flex_attention"),
                                        ("tiny-random-onevision", "eager")])
def test_attn_implementation_is_loaded_and_reported(name, impl):
    session = mmkit.load(name, device="cpu", attn_implementation=impl)
    assert session.adapter.attn_implementation == impl
    info = session.describe()
    assert info["attn_implementation"] == impl
    assert info["attn_per_layer"] == f"decoder layers 0-3: {impl}; vision tower: {impl}"
    base = mmkit.load(name, device="cpu")
    images = family_images()[:2]
    inputs = session.prepare(images, PROMPTS[:2])
    real = inputs["attention_mask"].bool()  # padded positions' outputs are implementation-defined
    with torch.inference_mode():
        torch.testing.assert_close(session.model(**inputs).logits[real], base.model(**inputs).logits[real],
                                   atol=1e-4, rtol=1e-4)
    session.apply("fastv:layer=2,keep=0.5")
    info = session.describe()
    assert info["attn_per_layer"].startswith(f"decoder layers 0-3: mmkit backend around {impl}")
    assert info["attn_implementation"] == impl


def test_attn_implementation_reaches_from_pretrained(tmp_path):
    _write_hub_layout("tiny-random-onevision", tmp_path)
    session = mmkit.load(str(tmp_path), device="cpu", attn_implementation="eager")
    assert session.adapter.attn_implementation == "eager"
    with pytest.raises(MmkitError, match="attn_implementation"):
        mmkit.load(str(tmp_path), device="cpu", attn_implementation="no_such_attention")


def test_unsupported_attention_is_a_one_line_error():
    # transformers has no flex attention for the Qwen-VL families.
    with pytest.raises(MmkitError, match="flex_attention.*cannot run here"):
        mmkit.load("tiny-random-qwen2-vl", device="cpu", attn_implementation="flex_attention")


@pytest.mark.parametrize("methods", [["fastv:layer=2,keep=0.5"], ["pyramiddrop", "vcd"], ["sparsevlm", "vhr"]])
def test_device_map_splits_the_decoder_and_methods_keep_working(tmp_path, methods):
    """accelerate's big-model placement with the decoder split: layers 0-1 on the CPU, layers 2-3 offloaded (their
    weights stay on the meta device and accelerate's hooks bring them in per forward, as for a second GPU). The
    model is not moved afterwards, and methods give the same answers as on the unsplit model."""
    _write_hub_layout("tiny-random-qwen2-vl", tmp_path / "ckpt")
    device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "cpu",
                  "model.language_model.layers.2": "disk", "model.language_model.layers.3": "disk",
                  "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = mmkit.load(str(tmp_path / "ckpt"), device_map=device_map, offload_folder=str(tmp_path / "offload"),
                        methods=methods)
    assert mapped.adapter.decoder_layers[2].self_attn.q_proj.weight.device.type == "meta"
    assert "model.language_model.layers.2=disk" in mapped.describe()["device_map"]
    plain = mmkit.load(str(tmp_path / "ckpt"), device="cpu", methods=methods)
    images = family_images()
    a = mapped.generate(images, PROMPTS, max_new_tokens=4)
    b = plain.generate(images, PROMPTS, max_new_tokens=4)
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.stats.visual_tokens_kept for r in a] == [r.stats.visual_tokens_kept for r in b]
    sa, sb = mapped.answer_logprobs(images, PROMPTS), plain.answer_logprobs(images, PROMPTS)
    assert torch.tensor(sa.logprobs) == pytest.approx(torch.tensor(sb.logprobs), abs=1e-4)


def test_quantization_config_is_passed_through(tmp_path, monkeypatch):
    import transformers

    _write_hub_layout("tiny-random-qwen2-vl", tmp_path)
    seen = {}
    original = transformers.Qwen2VLForConditionalGeneration.from_pretrained

    def spy(path, *args, **kwargs):
        seen.update(kwargs)
        kwargs.pop("quantization_config")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(transformers.Qwen2VLForConditionalGeneration, "from_pretrained", spy)
    marker = {"quant_method": "stand-in"}
    mmkit.load(str(tmp_path), device="cpu", quantization_config=marker)
    assert seen["quantization_config"] is marker


def test_builtin_refuses_device_map_with_the_fix():
    with pytest.raises(MmkitError, match="save it with `save_pretrained`"):
        mmkit.load("tiny-random-qwen2-vl", device_map="auto")


@pytest.mark.parametrize("name", QWEN_BUILTINS)
def test_vcd_noise_on_flattened_patches_is_per_pixel_and_batch_independent(name):
    """Qwen-VL's pixel_values rows are patches, not images: VCD's noise must vary over patches and pixels (not
    repeat one patch-sized vector), be shared by the temporal copies of a still frame, and not depend on the batch."""
    from mmkit.models.family_inputs import patch_pixel_noise

    session = mmkit.load(name, device="cpu")
    images = family_images()
    batch = session.prepare(images, PROMPTS)
    noise = patch_pixel_noise(session.adapter, batch, seed=7)
    assert noise.shape == batch["pixel_values"].shape
    vision = session.model.config.vision_config
    per_t = noise.view(noise.shape[0], vision.in_channels, vision.temporal_patch_size, -1)
    assert torch.equal(per_t[:, :, 0], per_t[:, :, 1])
    assert not torch.allclose(noise[0], noise[1])
    assert abs(float(noise.std()) - 1.0) < 0.1
    counts = batch["image_grid_thw"].prod(-1).tolist()
    for i, image in enumerate(images):
        single = patch_pixel_noise(session.adapter, session.prepare([image], [PROMPTS[i]]), seed=7)
        start = sum(counts[:i])
        assert torch.equal(noise[start:start + counts[i]], single)
    assert patch_pixel_noise(mmkit.load("tiny-random", device="cpu").adapter, {}, seed=7) is None


@pytest.mark.parametrize("name,spec", [*((name, "fastv:layer=2,keep=0.25") for name in FAMILY_BUILTINS),
                                       ("tiny-random-onevision", "visionzip:dominant=2,contextual=1"),
                                       ("tiny-random-qwen2.5-vl", "visionzip:dominant=2,contextual=1"),
                                       ("tiny-random-qwen3-vl",
                                        "vflowopt:vision_keep=0.5,merge_cell=0.5,llm_keep=0.7")])
def test_remote_code_export_runs_with_plain_transformers(name, spec, tmp_path):
    """Both export kinds on the new families: `mmkit.load(DIR)` and plain transformers with trust_remote_code give
    the exporting session's logits and answers (the remote path builds the image-only processor here)."""
    from transformers import AutoModelForImageTextToText

    session = mmkit.load(name, device="cpu", methods=[spec])
    specs = [h.spec for h in session.methods]
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    with torch.inference_mode():
        expected = session.model(**inputs).logits
    texts = [r.text for r in session.generate(images, PROMPTS, max_new_tokens=4)]
    session.save_pretrained(tmp_path / "export", remote_code=True)
    session.close()
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    arch = config["architectures"][0]
    assert config["auto_map"] == {"AutoModelForImageTextToText": f"modeling_mmkit.Mmkit{arch}"}

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert [h.spec for h in model.mmkit_session.methods] == specs
    tokenizer = model.mmkit_session.processor.tokenizer
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs).logits, expected)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    plain = [tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True).strip()
             for row in new]
    assert plain == texts
    reloaded = mmkit.load(str(tmp_path / "export"), device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.model(**reloaded.prepare(images, PROMPTS)).logits, expected)


def test_generate_and_info_commands_on_a_family_model(tmp_path):
    from PIL import Image

    image = tmp_path / "scene.png"
    Image.fromarray(family_images()[1]).save(image)
    result = CliRunner().invoke(main, ["generate", "--model", "tiny-random-qwen3-vl", "--image", str(image),
                                       "--prompt", "What is shown?", "--method", "fastv:layer=2,keep=0.5",
                                       "--max-new-tokens", "3", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["visual_tokens"] > 0 and record["visual_tokens_kept_per_layer"][3] == record["visual_tokens"] // 2
    eager = CliRunner().invoke(main, ["info", "--model", "tiny-random-qwen2-vl", "--device", "cpu",
                                      "--attn-implementation", "eager", "--json"])
    assert json.loads(eager.output)["attn_implementation"] == "eager"
    bad = CliRunner().invoke(main, ["info", "--model", "tiny-random-qwen2-vl", "--device", "cpu",
                                    "--attn-implementation", "flex_attention"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert "does not support an attention implementation through torch's flex_attention" in bad.output


@pytest.mark.parametrize("bench", ["pope", "vqa"])
def test_eval_command_on_a_family_model(bench, tmp_path):
    """`mmkit eval` on the reference world with a method: visual tokens and kept tokens per sample are what the
    family's processor and the method produce (random weights: the answer metrics themselves mean nothing)."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random-qwen2.5-vl", "--bench", bench, "--limit", "4",
                                       "--batch-size", "2", "--method", "fastv:layer=2,keep=0.5", "--device", "cpu",
                                       "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    efficiency = record["efficiency"]
    assert efficiency["visual_tokens"] == 16  # reference-world images are 336 px squares: 4 x 4 merged tokens
    assert efficiency["visual_tokens_kept"] == pytest.approx((16 + 16 + 8 + 8) / 4)


QWEN_HUB_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_qwen_checkpoint_with_hub_style_tokenizer(tmp_path):
    """A Qwen2.5-VL directory as Qwen ships it: the tokenizer knows `<|image_pad|>` and the vision markers only as
    added special tokens (no `image_token` attribute), the chat template writes them, and config.json holds their
    ids. The image-only processor falls back to the stock placeholder name, and spans are found at that id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}

    model, processor = build_family_builtin("tiny-random-qwen2.5-vl")
    model.resize_token_embeddings(len(tokenizer))
    model.config.image_token_id = ids["<|image_pad|>"]
    model.config.video_token_id = ids["<|video_pad|>"]
    model.config.vision_start_token_id = ids["<|vision_start|>"]
    model.config.vision_end_token_id = ids["<|vision_end|>"]
    model.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_HUB_TEMPLATE}))

    session = mmkit.load(str(tmp_path), device="cpu")
    assert session.processor.image_token == "<|image_pad|>"
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    counts = (inputs["input_ids"] == ids["<|image_pad|>"]).sum(1).tolist()
    assert counts == (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert "<|im_start|>assistant" in session.chat_prompt("x")
    batch = session.generate(images, PROMPTS, max_new_tokens=3)
    assert [r.stats.visual_tokens for r in batch] == counts
    session.apply("fastv:layer=2,keep=0.5")
    kept = [r.stats.visual_tokens_kept[3] for r in session.generate(images, PROMPTS, max_new_tokens=2)]
    assert all(abs(k - c / 2) <= 0.5 for k, c in zip(kept, counts))  # half of each row's own image tokens
