import math

import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.hallucination import head_sensitivity
from mmkit.hallucination.paint import (
    PAINTConfig,
    PAINTHandle,
    image_positions_to_sequence,
    iqr_outliers,
    top_fraction,
)

ON = "paint:start_layer=1,alpha=4,beta=2,heads=uniform"


def test_unit_factors_install_nothing_and_keep_logits_identical(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply("paint:start_layer=1,alpha=1,beta=1")
    assert session.model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(forward_logits(session, inputs), base)
    handle.remove()


def test_forced_override_with_unit_factors_matches_sdpa(session, images, prompts):
    """The score-modified attention itself, with log(1) = 0 bias, reproduces SDPA (not bit-exact: other kernels)."""
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    impl = PAINTHandle(session, PAINTConfig(start_layer=1, alpha=1.0, beta=1.0, heads="uniform"),
                       force_override=True)
    try:
        same = forward_logits(session, inputs)
    finally:
        impl.remove()
    assert torch.allclose(same, base, atol=1e-5)
    assert torch.equal(forward_logits(session, inputs), base)


def test_boost_changes_logits_and_remove_restores_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(ON)
    boosted = forward_logits(session, inputs)
    state = handle.impl._state
    assert bool(state.local.any()) and not bool((state.local & state.summary).any())
    assert (state.local.sum(1) <= math.ceil(0.25 * 64)).all()
    assert not torch.allclose(boosted[:, -1], base[:, -1], atol=1e-4)
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert session.model.config.text_config._attn_implementation == "sdpa"


def test_last_row_mode_leaves_earlier_positions_alone(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    session.apply(ON + ",rows=last")
    out = forward_logits(session, inputs)
    assert torch.allclose(out[:, :-1], base[:, :-1], atol=1e-5)
    assert not torch.allclose(out[:, -1], base[:, -1], atol=1e-4)


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    session.apply(ON)
    batched = session.generate(images, prompts, max_new_tokens=6)
    batch_scores = torch.tensor(session.answer_logprobs(images, prompts).logprobs)
    for i in range(3):
        assert session.generate([images[i]], [prompts[i]], max_new_tokens=6)[0].text == batched[i].text
        single = torch.tensor(session.answer_logprobs([images[i]], [prompts[i]]).logprobs[0])
        assert torch.allclose(single, batch_scores[i], atol=1e-4)


def test_sampled_decoding_is_seeded_and_static_cache_matches_dynamic(session, images, prompts):
    session.apply(ON)
    first = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=3)]
    again = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=3)]
    assert first == again
    inputs = session.prepare(images, prompts)
    pad = session.processor.tokenizer.pad_token_id
    with torch.inference_mode():
        dynamic = session.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=pad)
        static = session.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=pad,
                                        cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_decoding_steps_are_boosted(session, images, prompts, monkeypatch):
    """Every generated token's attention gets the boost on the prompt's chosen image keys."""
    import mmkit.hallucination.paint as paint

    calls = []
    real = paint.scaled_attention

    def spy(query, key, value, *, key_bias, row_mask, **kwargs):
        calls.append((query.shape[2], key.shape[2], float(key_bias.abs().max()), row_mask is None))
        return real(query, key, value, key_bias=key_bias, row_mask=row_mask, **kwargs)

    monkeypatch.setattr(paint, "scaled_attention", spy)
    session.apply(ON)
    session.generate(images, prompts, max_new_tokens=3)
    decode = [c for c in calls if c[0] == 1]
    assert len(decode) == 2 * 3  # 2 decoding steps (the 3rd token is never fed back) x layers 1..3
    assert all(c[2] > 0 and c[3] for c in decode)
    assert sorted({c[1] for c in decode}) == [calls[0][1] + 1, calls[0][1] + 2]


def test_head_scaled_factors_follow_the_documented_formula(session, tmp_path):
    mass = torch.tensor([[0.1, 0.2, 0.4, 0.0], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.5, 0.1]])
    path = head_sensitivity.save(mass, tmp_path / "sens.safetensors")
    handle = session.apply(f"paint:start_layer=1,alpha=3,beta=1.5,sensitivity={path}")
    s = head_sensitivity.normalise(mass)
    assert torch.allclose(s[0], torch.tensor([0.25, 0.5, 1.0, 0.0]))
    assert torch.equal(s[2], torch.zeros(4))
    assert torch.allclose(handle.impl._log_alpha.cpu(), torch.log(1 + 2.0 * s))
    assert torch.allclose(handle.impl._log_beta.cpu(), torch.log(1 + 0.5 * s))


def test_calibrated_heads_differ_from_uniform(session, images, prompts, tmp_path):
    mass = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    path = head_sensitivity.save(mass, tmp_path / "one_head.safetensors")
    inputs = session.prepare(images, prompts)
    handle = session.apply(f"paint:start_layer=1,alpha=4,beta=2,sensitivity={path}")
    one_head = forward_logits(session, inputs)
    handle.remove()
    session.apply(ON)
    uniform = forward_logits(session, inputs)
    assert not torch.allclose(one_head[:, -1], uniform[:, -1], atol=1e-4)


def test_builtin_calibration_runs_by_default(session, images, prompts):
    handle = session.apply("paint:start_layer=1")
    mass = handle.impl.mass
    assert mass.shape == (4, 4)
    assert bool((mass > 0).all()) and bool((mass <= 1).all())
    assert handle.impl.export_state()["mass"] is mass


def test_calibrate_save_load_roundtrip(session, images, prompts, tmp_path):
    mass = head_sensitivity.calibrate(session, images, prompts, batch_size=2)
    assert mass.shape == (4, 4) and mass.dtype == torch.float32
    # Each head's mass is a probability sum over the image tokens of one softmax row.
    assert bool((mass > 0).all()) and bool((mass < 1).all())
    path = head_sensitivity.save(mass, tmp_path / "sub" / "s.safetensors")
    assert torch.equal(head_sensitivity.load(path, layers=4, heads=4), mass)
    with pytest.raises(ValueError, match="calibrated for 4 layers x 4 heads"):
        head_sensitivity.load(path, layers=32, heads=32)
    with pytest.raises(ValueError, match="does not exist"):
        head_sensitivity.load(tmp_path / "missing.safetensors")


def test_score_bias_equals_scaling_unnormalised_attention():
    """Adding log(a) to chosen keys' scores == multiplying their exp-scores by a, then renormalising."""
    torch.manual_seed(0)
    from mmkit.kernels import scaled_attention

    b, h, hkv, n, d = 2, 4, 2, 7, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    chosen = torch.zeros(b, n, dtype=torch.bool)
    chosen[:, 1:4] = True
    factor = torch.tensor([1.0, 2.0, 3.0, 0.5])
    key_bias = chosen[:, None, :] * factor.log()[None, :, None]
    rows = torch.zeros(b, n, dtype=torch.bool)
    rows[:, 4:] = True
    out = scaled_attention(q, k, v, scaling=d ** -0.5, row_mask=rows, key_bias=key_bias).transpose(1, 2)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    weights = torch.exp(q @ kr.transpose(-1, -2) * d ** -0.5)
    weights = weights * torch.ones(n, n).tril()
    scale = torch.where(rows[:, None, :, None] & chosen[:, None, None, :], factor[None, :, None, None], 1.0)
    weights = weights * scale
    ref = (weights / weights.sum(-1, keepdim=True)) @ vr
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)


def test_token_selection_helpers():
    scores = torch.tensor([[1.0, 1.1, 0.9, 1.0, 9.0, 1.05, 0.95, 1.0]])
    assert iqr_outliers(scores).tolist() == [[False, False, False, False, True, False, False, False]]
    top = top_fraction(torch.tensor([[0.1, 0.5, 0.3, 0.9]]), 0.5)
    assert top.tolist() == [[False, True, False, True]]
    image_mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    per_image = torch.tensor([[True, False], [False, True]])
    assert image_positions_to_sequence(image_mask, per_image).tolist() == [[False, True, False, False],
                                                                          [False, True, False, False]]
    with pytest.raises(RuntimeError, match="the vision tower encoded 3 images"):
        image_positions_to_sequence(image_mask, torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("spec, message", [
    ("paint:alpha=0", "alpha must be in"),
    ("paint:local_ratio=1.5", "local_ratio must be in"),
    ("paint:start_layer=3,end_layer=2", "end_layer"),
    ("paint:rows=all", "rows must be one of"),
    ("paint:start_layer=4", "do not fit"),
    ("paint:local_layer=5,heads=uniform", "vision layers"),
])
def test_bad_settings_are_refused(session, spec, message):
    with pytest.raises(MmkitError, match=message):
        session.apply(spec)


def test_missing_sensitivity_file_is_refused(session, tmp_path):
    with pytest.raises(MmkitError, match="does not exist"):
        session.apply(f"paint:sensitivity={tmp_path / 'none.safetensors'}")


def test_cannot_combine_with_another_score_method(session):
    session.apply(ON)
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("var:start_layer=1")


def test_export_keeps_the_calibrated_sensitivities(session, images, prompts, tmp_path):
    import mmkit

    mass = torch.tensor([[0.4, 0.1, 0.2, 0.3]] * 4)
    path = head_sensitivity.save(mass, tmp_path / "s.safetensors")
    session.apply(f"paint:start_layer=1,alpha=3,sensitivity={path}")
    inputs = session.prepare(images, prompts)
    expected = forward_logits(session, inputs)
    session.save_pretrained(tmp_path / "export")
    head_sensitivity.save(torch.ones(4, 4), path)  # the export carries its own copy of the sensitivities
    reloaded = mmkit.load(str(tmp_path / "export"), device="cpu")
    try:
        (handle,) = reloaded.methods
        assert torch.equal(handle.impl.mass, mass)
        assert torch.allclose(forward_logits(reloaded, reloaded.prepare(images, prompts)), expected, atol=1e-5)
    finally:
        reloaded.close()
