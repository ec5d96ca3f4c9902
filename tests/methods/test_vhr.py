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
