"""The attention probe: position maps in the current sequence, exact masses, and the model's own attention
implementation on every layer no method edits."""

from __future__ import annotations

import pytest
import torch

import mmkit
from conftest import forward_logits

PROMPTS = ["Is there a cup in the image?", "Describe the image in detail, please, with colours."]


def _views(session, layers):
    seen = {}

    def observe(view):
        if view.prefill:
            seen[view.layer] = view

    return session.probe.observe(layers, observe), seen


def test_views_follow_tokens_through_a_token_dropper(session, images):
    inputs = session.prepare(images[:2], PROMPTS)
    prompt_image = inputs["input_ids"] == session.adapter.image_token_id
    session.apply("fastv:layer=2,keep=0.25")
    handle, seen = _views(session, [1, 3])
    try:
        with torch.inference_mode():
            session.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    before, after = seen[1], seen[3]
    n = inputs["input_ids"].shape[1]
    # Layer 1 holds the prompt as it is.
    assert before.key.shape[2] == n and torch.equal(before.key_positions, torch.arange(n).expand(2, n))
    assert torch.equal(before.image_keys, prompt_image & inputs["attention_mask"].bool())
    # Layer 3 holds fewer tokens; each one's prompt position says whether it is an image token.
    m = after.key.shape[2]
    assert m < n
    positions = after.key_positions
    real = after.real_keys
    assert torch.equal(after.image_keys, prompt_image.gather(1, positions) & real)
    assert int(after.image_keys.sum(1).max()) == 16  # ceil(0.25 * 64) per row
    # Every text token is still there, in order.
    text = ~prompt_image & inputs["attention_mask"].bool()
    for b in range(2):
        kept = positions[b][real[b]]
        assert bool((kept[1:] > kept[:-1]).all())
        assert set(text[b].nonzero().flatten().tolist()) <= set(kept.tolist())
    # Prompt coordinates round trip; dropped image tokens and padding come back as the fill value.
    values = torch.rand(2, m) * real
    back = after.to_prompt(values, fill=-1.0)
    assert back.shape == (2, n)
    assert torch.allclose(after.from_prompt(back, fill=0.0), values)
    padding = int((~inputs["attention_mask"].bool()).sum())
    assert int((back == -1.0).sum()) == int((prompt_image.sum(1) - 16).sum()) + padding


def test_mass_is_the_exact_softmax_row(session, images):
    inputs = session.prepare(images[:2], PROMPTS)
    handle, seen = _views(session, [2])
    try:
        with torch.inference_mode():
            session.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    view = seen[2]
    q, k = view.query.float(), view.key.float()
    groups = q.shape[1] // k.shape[1]
    scores = (q[:, :, -1:] @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * view.scaling
    scores = scores.masked_fill(~inputs["attention_mask"].bool()[:, None, None, :], float("-inf"))
    expected = scores.softmax(-1).mean(1)[:, 0]
    assert torch.allclose(view.mass(), expected, atol=1e-6)
    text = view.text_rows
    assert not bool((text & view._rows_of(view.image_keys)).any())
    assert bool(text[:, -1].all())


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_unedited_layers_run_the_implementation_the_model_was_loaded_with(images, implementation, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    session = mmkit.load("tiny-random", device="cpu")
    try:
        session.model.set_attn_implementation(implementation)
        inputs = session.prepare(images[:2], PROMPTS)
        base = forward_logits(session, inputs)
        calls = []
        if implementation == "eager":
            real = llama.eager_attention_forward

            def spy(*args, **kwargs):
                calls.append(1)
                return real(*args, **kwargs)

            monkeypatch.setattr(llama, "eager_attention_forward", spy)
        handle, seen = _views(session, range(4))
        assert session.model.config.text_config._attn_implementation == "mmkit"
        try:
            observed = forward_logits(session, inputs)
        finally:
            handle.remove()
        assert session.model.config.text_config._attn_implementation == implementation
        assert len(seen) == 4
        real_rows = inputs["attention_mask"].bool()
        assert torch.equal(observed[real_rows], base[real_rows])
        if implementation == "eager":
            assert len(calls) == 4
        # A method on top (FastV keeps everything) still matches the implementation's own logits.
        session.apply("fastv:keep=1.0")
        assert torch.allclose(forward_logits(session, inputs)[real_rows], base[real_rows], atol=1e-5)
    finally:
        session.close()
