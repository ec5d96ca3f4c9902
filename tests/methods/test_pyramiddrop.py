import math

import numpy as np
import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.pruning.pyramiddrop import PyramidDropConfig

# tiny-random has 4 decoder layers: the default stages are layers 1, 2, 3 (L/4, L/2, 3L/4).


def test_ratio_one_is_identical_to_baseline(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    session.apply("pyramiddrop:ratio=1.0")
    assert torch.equal(forward_logits(session, inputs), base)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=6)] == base_text


def test_pruning_changes_logits_and_remove_restores_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(PyramidDropConfig(ratio=0.5))
    pruned = forward_logits(session, inputs)
    assert pruned.shape[1] == base.shape[1] - 56  # 64 image tokens -> 8 after three stages
    assert not torch.allclose(pruned[:, -1], base[:, -1])
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert session.model.config.text_config._attn_implementation == "sdpa"
    assert all(not layer._forward_pre_hooks for layer in session.adapter.decoder_layers)


@pytest.mark.parametrize("spec, expected", [
    ("pyramiddrop", [64, 32, 16, 8]),
    ("pyramiddrop:ratio=0.25", [64, 16, 4, 1]),
    ("pyramiddrop:layers=1/3,ratio=0.5", [64, 32, 32, 16]),
])
def test_stats_report_kept_tokens_per_layer(session, images, prompts, spec, expected):
    session.apply(spec)
    for r in session.generate(images, prompts, max_new_tokens=3):
        assert r.stats.visual_tokens_kept == expected
        assert r.stats.tokens_per_layer[0] - r.stats.tokens_per_layer[-1] == 64 - expected[-1]


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    session.apply("pyramiddrop:ratio=0.5")
    batched = session.generate(images, prompts, max_new_tokens=8)
    batch_scores = session.answer_logprobs(images, prompts, ["yes", "no"]).logprobs
    for i in range(3):
        single = session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0]
        assert single.text == batched[i].text
        single_scores = session.answer_logprobs([images[i]], [prompts[i]], ["yes", "no"]).logprobs[0]
        assert torch.allclose(torch.tensor(single_scores), torch.tensor(batch_scores[i]), atol=1e-4)


def test_each_stage_caches_only_its_own_kept_tokens(session, images, prompts):
    session.apply("pyramiddrop:ratio=0.5")
    inputs = session.prepare(images, prompts)
    with torch.inference_mode():
        out = session.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                     return_dict_in_generate=True,
                                     pad_token_id=session.processor.tokenizer.pad_token_id)
    n = inputs["input_ids"].shape[1]
    # The prompt (minus what each stage dropped) plus the 3 decoded tokens that were fed back.
    assert [out.past_key_values.get_seq_length(l) for l in range(4)] == [n + 3, n - 32 + 3, n - 48 + 3, n - 56 + 3]


def test_static_cache_generation_matches_dynamic(session, images, prompts):
    session.apply("pyramiddrop:ratio=0.5")
    inputs = session.prepare(images, prompts)
    pad = session.processor.tokenizer.pad_token_id
    with torch.inference_mode():
        dynamic = session.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        static = session.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad,
                                        cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_ranking_uses_the_stage_layers_own_attention_row(session, images, prompts):
    """The kept tokens are the top image tokens of the last prompt token's attention row, computed with eager
    attention of the stage layer on that layer's full input (as the paper ranks), averaged over heads."""
    captured = {}
    layer = session.adapter.decoder_layers[2]
    # Registered before the method, so it sees the layer input before the stage drops tokens.
    def grab(module, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    probe = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        handle = session.apply("pyramiddrop:layers=2,ratio=0.25")
        inputs = session.prepare(images[:1], prompts[:1])
        forward_logits(session, inputs)
        kept, valid = handle.impl.dropper.index_at(2)
    finally:
        probe.remove()
    assert valid is None
    x = captured["x"]
    n = x.shape[1]
    lm = session.adapter.language_model
    cos_sin = lm.rotary_emb(x, torch.arange(n)[None])
    session.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            _, weights = layer.self_attn(layer.input_layernorm(x), position_embeddings=cos_sin, attention_mask=None)
    finally:
        session.model.set_attn_implementation({"text_config": "sdpa"})
    row = weights[0, :, -1].mean(0)  # the last row sees every key, causal or not
    image = inputs["input_ids"][0] == session.adapter.image_token_id
    image_pos = image.nonzero().squeeze(1)
    expected = image_pos[row[image_pos].topk(16).indices].sort().values
    kept_image = kept[0][image[kept[0]]]
    assert torch.equal(kept_image, expected)


def test_config_validation():
    for bad in [dict(ratio=0.0), dict(ratio=1.5), dict(layers=()), dict(layers=(0, 2)), dict(layers=(2, 2)),
                dict(layers=(3, 1))]:
        with pytest.raises(ValueError):
            PyramidDropConfig(**bad)
    assert PyramidDropConfig().stage_layers(32) == (8, 16, 24)
    assert PyramidDropConfig().stage_layers(40) == (10, 20, 30)
    with pytest.raises(ValueError, match="too shallow"):
        PyramidDropConfig().stage_layers(2)


def test_spec_parsing_and_refusals(session):
    from mmkit.registry import parse_spec

    cfg = parse_spec("pyramiddrop:layers=1/3,ratio=0.25")
    assert cfg.layers == (1, 3) and cfg.ratio == 0.25
    with pytest.raises(MmkitError, match="ratio"):
        parse_spec("pyramiddrop:ratio=2")
    with pytest.raises(MmkitError, match="past the last decoder layer"):
        session.apply("pyramiddrop:layers=2/4")
    session.apply("pyramiddrop")
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("fastv")


def test_llava_next_rows_with_different_visual_token_counts():
    """Anyres images give each row its own number of image tokens; each row keeps its own geometric share."""
    import mmkit

    session = mmkit.load("tiny-random-next", device="cpu")
    rng = np.random.default_rng(2)
    imgs = [(rng.random(shape) * 255).astype("uint8") for shape in [(28, 56, 3), (56, 56, 3), (28, 28, 3)]]
    prompts = ["hi", "describe this image", "what?"]
    base = session.generate(imgs, prompts, max_new_tokens=5)
    counts = [r.stats.visual_tokens for r in base]
    assert len(set(counts)) > 1
    session.apply("pyramiddrop:ratio=0.5")
    batched = session.generate(imgs, prompts, max_new_tokens=5)
    for r, n in zip(batched, counts):
        assert r.stats.visual_tokens_kept == [n] + [math.floor(n * 0.5**s) for s in (1, 2, 3)]
    singles = [session.generate([imgs[i]], [prompts[i]], max_new_tokens=5)[0].text for i in range(3)]
    assert [r.text for r in batched] == singles
    batch_scores = torch.tensor(session.answer_logprobs(imgs, prompts).logprobs)
    single_scores = torch.tensor([session.answer_logprobs([imgs[i]], [prompts[i]]).logprobs[0] for i in range(3)])
    assert torch.allclose(batch_scores, single_scores, atol=1e-4)
    session.close()
