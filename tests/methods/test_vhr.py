import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.hallucination.vhr import VHRConfig, select_vision_heads, text_only_inputs, vision_head_divergence


def _scores(session, images, prompts):
    return torch.tensor(session.answer_logprobs(images, prompts, ["a", "b", "c"]).logprobs)


def test_head_selection_rule():
    vhd = torch.tensor([
        [1.0, 2.0, 3.0, 4.0, 5.0, 100.0],   # 100 is an outlier; median of the rest is 3 -> heads 3, 4
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],     # all equal: nothing is above the median
    ])
    selected = select_vision_heads(vhd)
    assert selected.tolist() == [
        [False, False, False, True, True, False],
        [False, False, False, False, False, False],
    ]
    a = torch.zeros(1, 2, 4)
    b = torch.ones(1, 2, 4)
    assert torch.allclose(vision_head_divergence(a, b), torch.full((1, 2), 2.0))


def test_text_only_branch_is_left_padded_and_aligned(session, images, prompts):
    inputs = session.prepare(images, prompts)
    image_id = session.adapter.image_token_id
    text = text_only_inputs(inputs, image_id, session.processor.tokenizer.pad_token_id)
    assert text["input_ids"].shape == inputs["input_ids"].shape
    assert not bool((text["input_ids"] == image_id).any())
    assert (text["attention_mask"].sum(1) == inputs["attention_mask"].sum(1) - 64).all()
    # Every row ends on the same last prompt token as its image row, so the two branches' last positions align.
    assert torch.equal(text["input_ids"][:, -1], inputs["input_ids"][:, -1])
    # Padding does not change a text-only row's prediction.
    with torch.inference_mode():
        padded = session.model(**text, logits_to_keep=1).logits[:, -1]
        for i in range(3):
            real = text["attention_mask"][i].bool()
            alone = session.model(input_ids=text["input_ids"][i][real][None], logits_to_keep=1).logits[0, -1]
            assert torch.allclose(alone, padded[i], atol=1e-4)


def test_only_branch_zero_is_reinforced(session, images, prompts):
    inputs = session.prepare(images, prompts)
    handle = session.apply("vhr:alpha=1")  # no-op: runs no branch
    assert handle.impl.expand_inputs(session, inputs) is inputs
    handle.remove()
    handle = session.apply("vhr")
    expanded = handle.impl.expand_inputs(session, inputs)
    assert expanded["input_ids"].shape[0] == 6 and expanded["pixel_values"].shape[0] == 3
    with torch.inference_mode():
        on = session.model(**expanded, logits_to_keep=1).logits[:, -1]
        # Not preceded by expand_inputs: the hooks stay idle.
        off = session.model(**expanded, logits_to_keep=1).logits[:, -1]
    assert torch.equal(on[3:], off[3:])
    assert not torch.allclose(on[:3], off[:3], atol=1e-4)
    for layer in range(session.adapter.num_layers):
        chosen = handle.impl.last_selected[layer]
        assert chosen.shape == (3, 4)
        assert torch.equal(chosen, select_vision_heads(handle.impl.last_vhd[layer]))
        assert bool(chosen.any(1).all())


def test_alpha_one_is_identical_to_baseline(session, images, prompts):
    base_scores = _scores(session, images, prompts)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    session.apply("vhr:alpha=1")
    assert torch.equal(_scores(session, images, prompts), base_scores)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=6)] == base_text


def test_changes_outputs_and_remove_restores(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base_logits = forward_logits(session, inputs)
    base_scores = _scores(session, images, prompts)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=8)]
    handle = session.apply("vhr:alpha=4")
    assert not torch.allclose(_scores(session, images, prompts), base_scores, atol=1e-3)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=8)] != base_text
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base_logits)
    assert torch.equal(_scores(session, images, prompts), base_scores)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=8)] == base_text


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    session.apply("vhr")
    batched = [r.text for r in session.generate(images, prompts, max_new_tokens=8)]
    batch_scores = _scores(session, images, prompts)
    for i in range(3):
        assert session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0].text == batched[i]
        assert torch.allclose(_scores(session, [images[i]], [prompts[i]])[0], batch_scores[i], atol=1e-4)


def test_sampling_is_seeded_and_stats_count_branch_zero(session, images, prompts):
    session.apply("vhr")
    a = session.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=5)
    b = session.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=5)
    assert [r.text for r in a] == [r.text for r in b]
    assert all(r.stats.visual_tokens == 64 for r in a)


@pytest.mark.parametrize("spec, message", [
    ("vhr:alpha=0", "alpha"),
    ("vhr:alpha=-2", "alpha"),
    ("vhr:layers=1/1", "repeat"),
    ("vhr:layers=7", "past the last decoder layer"),
])
def test_config_validation(session, spec, message):
    with pytest.raises(MmkitError, match=message):
        session.apply(spec)
    with pytest.raises(ValueError, match="layers"):
        VHRConfig(layers=())


def test_reinforcing_a_subset_of_layers(session, images, prompts):
    handle = session.apply("vhr:layers=1/3")
    session.generate(images[:1], prompts[:1], max_new_tokens=2)
    assert sorted(handle.impl.last_selected) == [1, 3]


def _hand_selection(vhd: list[float]) -> list[bool]:
    """The paper's rule written out: drop outliers (VHD > mean + population std), then take the heads above the
    median of the rest (the lower middle value for an even count)."""
    mean = sum(vhd) / len(vhd)
    std = (sum((v - mean) ** 2 for v in vhd) / len(vhd)) ** 0.5
    inliers = sorted(v for v in vhd if v <= mean + std)
    median = inliers[(len(inliers) - 1) // 2]
    return [v <= mean + std and v > median for v in vhd]


def _reference_step(session, image, prompt, alpha: float):
    """Independent VHR prefill step for one prompt, with eager attention and two separate forwards:
    1. the prompt with its image tokens removed (a plain text-only forward): each layer's head outputs at the last
       position, o^{l,h}(x);
    2. the prompt with the image, where each layer's last-position head outputs o^{l,h}(x, v) give
       VHD_{l,h} = ||o^{l,h}(x, v) - o^{l,h}(x)||_2, and the selected heads are multiplied by alpha before o_proj
       (so later layers see the boosts of earlier ones).
    Returns ({layer: VHD (H,)}, last-position logits)."""
    adapter = session.adapter
    heads, dim = int(adapter.text_config.num_attention_heads), adapter.head_dim
    inputs = session.prepare([image], [prompt])
    ids = inputs["input_ids"]
    text_ids = ids[ids != adapter.image_token_id][None]
    text_heads, vhd = {}, {}

    def capture(layer):
        def hook(module, args):
            text_heads[layer] = args[0][0, -1].view(heads, dim).float().clone()
        return hook

    def reinforce(layer):
        def hook(module, args):
            x = args[0].clone()
            with_image = x[0, -1].view(heads, dim)
            d = (with_image.float() - text_heads[layer]).pow(2).sum(-1).sqrt()
            vhd[layer] = d
            chosen = torch.tensor(_hand_selection(d.tolist()))
            x[0, -1] = (with_image * torch.where(chosen, alpha, 1.0)[:, None].to(x.dtype)).flatten()
            return (x, *args[1:])
        return hook

    o_projs = [layer.self_attn.o_proj for layer in adapter.decoder_layers]
    session.model.set_attn_implementation({"text_config": "eager"})
    try:
        hooks = [o.register_forward_pre_hook(capture(l)) for l, o in enumerate(o_projs)]
        with torch.inference_mode():
            session.model(input_ids=text_ids)
        for h in hooks:
            h.remove()
        hooks = [o.register_forward_pre_hook(reinforce(l)) for l, o in enumerate(o_projs)]
        with torch.inference_mode():
            logits = session.model(**inputs).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
        session.model.set_attn_implementation({"text_config": "sdpa"})
    return vhd, logits


def test_head_divergence_and_logits_equal_a_separate_text_only_forward(session, images, prompts):
    """VHR's per-head VHD (from its in-batch, left-padded text-only branch) and its reinforced logits equal an eager
    reference built from a separate plain text-only forward, row by row, for a batch of different prompts."""
    alpha = 2.0
    handle = session.apply(f"vhr:alpha={alpha}")
    inputs = session.prepare(images, prompts)
    expanded = handle.impl.expand_inputs(session, inputs)
    with torch.inference_mode():
        logits = session.model(**expanded).logits[:3, -1]
    got = {layer: v.clone() for layer, v in handle.impl.last_vhd.items()}
    handle.remove()
    assert sorted(got) == list(range(session.adapter.num_layers))
    for i in range(3):
        vhd, ref_logits = _reference_step(session, images[i], prompts[i], alpha)
        for layer in got:
            assert torch.allclose(got[layer][i], vhd[layer], rtol=1e-4, atol=1e-5), (i, layer)
        assert torch.allclose(logits[i], ref_logits, atol=1e-4)
        # The reinforcement is not a no-op here: the logits moved away from the plain forward's.
        with torch.inference_mode():
            plain = session.model(**session.prepare([images[i]], [prompts[i]])).logits[0, -1]
        assert not torch.allclose(ref_logits, plain, atol=1e-3)
