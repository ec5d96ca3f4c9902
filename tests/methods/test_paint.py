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
    select_per_image,
    top_fraction,
)

# The paper's edit at its defaults (alpha 0.7, beta 0.3, uniform heads, current row), on decoder layers 1..3 of the
# 4-layer tiny model.
ON = "paint:start_layer=1"


def test_zero_gains_install_nothing_and_keep_logits_identical(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    for spec in ("paint:start_layer=1,alpha=0,beta=0", "paint:alpha=0,beta=0,edit=log_bias,rows=text"):
        handle = session.apply(spec)
        assert handle.impl._handles == [] and handle.impl._scorer is None
        assert session.model.config.text_config._attn_implementation == "sdpa"
        assert torch.equal(forward_logits(session, inputs), base)
        handle.remove()


@pytest.mark.parametrize("edit", ["abs", "log_bias"])
def test_forced_override_with_zero_gains_matches_sdpa(session, images, prompts, edit):
    """The score-modified attention itself, with gain 0 (or log(1) = 0 bias), reproduces SDPA (not bit-exact:
    other kernels)."""
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    impl = PAINTHandle(session, PAINTConfig(start_layer=1, alpha=0.0, beta=0.0, edit=edit, rows="text"),
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
    assert (state.local.sum(1) <= 0.25 * 64).all()
    assert not torch.allclose(boosted[:, -1], base[:, -1], atol=1e-4)
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert session.model.config.text_config._attn_implementation == "sdpa"


def test_only_the_current_row_is_edited_by_default(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(ON)
    out = forward_logits(session, inputs)
    assert torch.allclose(out[:, :-1], base[:, :-1], atol=1e-5)
    assert not torch.allclose(out[:, -1], base[:, -1], atol=1e-4)
    handle.remove()
    session.apply(ON + ",rows=text")  # every text row after the image
    text_rows = forward_logits(session, inputs)
    assert not torch.allclose(text_rows[:, -2], base[:, -2], atol=1e-4)


def test_log_bias_variant_multiplies_the_unnormalised_attention(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply("paint:start_layer=1,edit=log_bias,alpha=1,beta=0.5")
    assert torch.allclose(handle.impl._local_coef.cpu(), torch.full((4, 4), math.log(2.0)))
    assert torch.allclose(handle.impl._summary_coef.cpu(), torch.full((4, 4), math.log(1.5)))
    out = forward_logits(session, inputs)
    handle.remove()
    session.apply(ON)
    paper = forward_logits(session, inputs)
    assert not torch.allclose(out[:, -1], base[:, -1], atol=1e-4)
    assert not torch.allclose(out[:, -1], paper[:, -1], atol=1e-4)


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
    """Every generated token's row gets the edit on the prompt's chosen image keys."""
    import mmkit.hallucination.paint as paint

    calls = []
    real = paint.scaled_attention

    def spy(query, key, value, *, key_gain, row_mask, **kwargs):
        calls.append((query.shape[2], key.shape[2], float(key_gain.abs().max()), row_mask.sum(1).tolist()))
        return real(query, key, value, key_gain=key_gain, row_mask=row_mask, **kwargs)

    monkeypatch.setattr(paint, "scaled_attention", spy)
    session.apply(ON)
    session.generate(images, prompts, max_new_tokens=3)
    decode = [c for c in calls if c[0] == 1]
    assert len(decode) == 2 * 3  # 2 decoding steps (the 3rd token is never fed back) x layers 1..3
    assert all(c[2] == pytest.approx(0.7) and c[3] == [1, 1, 1] for c in decode)
    assert sorted({c[1] for c in decode}) == [calls[0][1] + 1, calls[0][1] + 2]
    prefill = [c for c in calls if c[0] > 1]
    assert len(prefill) == 3 and all(c[3] == [1, 1, 1] for c in prefill)  # one row per prompt: its last


def test_tokens_dropped_by_pruning_are_not_boosted(session, images, prompts, monkeypatch):
    """After FastV drops image tokens, each layer's gains sit exactly on the chosen tokens that layer still holds."""
    import mmkit.hallucination.paint as paint

    gains = []
    real = paint.scaled_attention

    def spy(query, key, value, *, key_gain, **kwargs):
        gains.append(key_gain.clone())
        return real(query, key, value, key_gain=key_gain, **kwargs)

    monkeypatch.setattr(paint, "scaled_attention", spy)
    session.apply("fastv:layer=2,keep=0.25")
    handle = session.apply(ON)
    inputs = session.prepare(images, prompts)
    with torch.inference_mode():
        session.model(**inputs, use_cache=False)
    chosen = handle.impl._state.local | handle.impl._state.summary                 # (B, n) prompt positions
    assert len(gains) == 3 and torch.equal(gains[0][:, 0] != 0, chosen)          # layer 1 holds the whole prompt
    shorter = 0
    for layer, gain in zip((2, 3), gains[1:]):
        entry = session.context.layer_maps[layer]
        index, valid = entry
        expected = chosen.gather(1, index) & (True if valid is None else valid)
        assert torch.equal(gain[:, 0] != 0, expected)
        shorter += gain.shape[-1] < chosen.shape[1]
    assert shorter and int((gains[-1][:, 0] != 0).sum()) < int(chosen.sum())


def test_head_scaled_gains_follow_the_documented_formula(session, tmp_path):
    mass = torch.tensor([[0.1, 0.2, 0.4, 0.0], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.5, 0.1]])
    path = head_sensitivity.save(mass, tmp_path / "sens.safetensors")
    handle = session.apply(f"paint:start_layer=1,alpha=0.7,beta=0.3,heads=calibrated,sensitivity={path}")
    s = head_sensitivity.normalise(mass)
    assert torch.allclose(s[0], torch.tensor([0.25, 0.5, 1.0, 0.0]))
    assert torch.equal(s[2], torch.zeros(4))
    # alpha_{l,h} = alpha * s_{l,h}, beta_{l,h} = beta * s_{l,h}
    assert torch.allclose(handle.impl._local_coef.cpu(), 0.7 * s)
    assert torch.allclose(handle.impl._summary_coef.cpu(), 0.3 * s)
    handle.remove()
    uniform = session.apply("paint:start_layer=1")
    assert uniform.impl.mass is None
    assert torch.equal(uniform.impl._local_coef.cpu(), torch.full((4, 4), 0.7))


def test_calibrated_heads_differ_from_uniform(session, images, prompts, tmp_path):
    mass = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    path = head_sensitivity.save(mass, tmp_path / "one_head.safetensors")
    inputs = session.prepare(images, prompts)
    handle = session.apply(f"paint:start_layer=1,heads=calibrated,sensitivity={path}")
    one_head = forward_logits(session, inputs)
    handle.remove()
    session.apply(ON)
    uniform = forward_logits(session, inputs)
    assert not torch.allclose(one_head[:, -1], uniform[:, -1], atol=1e-4)


def test_builtin_calibration_runs_without_a_file(session, images, prompts):
    handle = session.apply("paint:start_layer=1,heads=calibrated")
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
    # int(ratio * N) tokens, as the official code (int(576 * 0.25) = 144): 0.3 * 4 = 1.2 -> 1
    assert top_fraction(torch.tensor([[0.1, 0.5, 0.3, 0.9]]), 0.3).tolist() == [[False, False, False, True]]
    image_mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    per_image = torch.tensor([[True, False], [False, True]])
    assert image_positions_to_sequence(image_mask, per_image).tolist() == [[False, True, False, False],
                                                                          [False, True, False, False]]
    with pytest.raises(RuntimeError, match="the vision tower encoded 3 images"):
        image_positions_to_sequence(image_mask, torch.ones(3, 2, dtype=torch.bool))
    # Images of different lengths (anyres, Qwen-VL), placed in prompt order row by row.
    flags = [torch.tensor([True, False, True]), torch.tensor([False])]
    mask = torch.tensor([[False, True, True, True], [True, False, False, False]])
    assert image_positions_to_sequence(mask, flags).tolist() == [[False, True, False, True],
                                                                 [False, False, False, False]]


def test_newline_tokens_are_never_chosen():
    """NaN scores mark row newlines: out of the ranking, the quartiles and both sets; int(ratio n) counts only the
    scored tokens."""
    nan = float("nan")
    local_scores = [torch.tensor([0.9, 0.1, nan, 0.8, 0.2, nan, 0.3, 0.4, nan])]
    summary_scores = [torch.tensor([1.0, 1.1, nan, 0.9, 9.0, nan, 1.0, 1.05, nan])]
    local, summary = select_per_image(local_scores, summary_scores, 0.5)
    assert summary[0].tolist() == [False, False, False, False, True, False, False, False, False]
    assert local[0].tolist() == [True, False, False, True, False, False, False, True, False]   # top 3 of 6


@pytest.mark.parametrize("spec, message", [
    ("paint:alpha=-0.5", "alpha must be in"),
    ("paint:edit=mul", "edit must be one of"),
    ("paint:sensitivity=x.safetensors", "only read with heads=calibrated"),
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
        session.apply(f"paint:heads=calibrated,sensitivity={tmp_path / 'none.safetensors'}")


def test_cannot_combine_with_another_score_method(session):
    session.apply(ON)
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("var:start_layer=1")


def test_export_keeps_the_calibrated_sensitivities(session, images, prompts, tmp_path):
    import mmkit

    mass = torch.tensor([[0.4, 0.1, 0.2, 0.3]] * 4)
    path = head_sensitivity.save(mass, tmp_path / "s.safetensors")
    session.apply(f"paint:start_layer=1,alpha=3,heads=calibrated,sensitivity={path}")
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


# -- independent reference: one edited layer recomputed by hand from the paper's formula ---------------------------
def _cls_attention(tower, pixel_values, layer):
    """(I, patches): CLS row of CLIP layer `layer`'s attention summed over heads, recomputed from the tower's
    hidden states (hidden_states[i] is layer i's input) through that layer's own norm and q/k projections."""
    states = tower(pixel_values, output_hidden_states=True).hidden_states
    block = tower.vision_model.encoder.layers[layer] if hasattr(tower, "vision_model") else tower.encoder.layers[layer]
    x = block.layer_norm1(states[layer])
    attn = block.self_attn
    heads = attn.num_heads
    i, t, width = x.shape
    q = attn.q_proj(x).view(i, t, heads, width // heads).transpose(1, 2).double()
    k = attn.k_proj(x).view(i, t, heads, width // heads).transpose(1, 2).double()
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
    return probs[:, :, 0, 1:].sum(1)


def _paper_token_sets(session, pixel_values, ratio=0.25):
    """(local, summary) bool (I, patches) as the official `update_modpai_alpha`: local = top int(ratio N) of CLS
    attention at layer 0, summary = IQR outliers (numpy percentiles) at the second-to-last layer, local -= summary."""
    import numpy as np

    tower = session.adapter.vision_tower
    layers = session.model.config.vision_config.num_hidden_layers
    first, penultimate = _cls_attention(tower, pixel_values, 0), _cls_attention(tower, pixel_values, layers - 2)
    n = first.shape[1]
    local = torch.zeros(first.shape, dtype=torch.bool)
    summary = torch.zeros(first.shape, dtype=torch.bool)
    for i in range(first.shape[0]):
        local[i, torch.topk(first[i], int(n * ratio)).indices] = True
        scores = penultimate[i].numpy()
        q1, q3 = np.percentile(scores, 25), np.percentile(scores, 75)
        summary[i] = torch.from_numpy(scores > q3 + 1.5 * (q3 - q1))
    return local & ~summary, summary


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@pytest.mark.parametrize("heads", ["uniform", "calibrated"])
def test_edited_layer_equals_the_papers_formula_recomputed_by_hand(session, images, prompts, heads, tmp_path):
    """Prefill and one decoding step of a left-padded batch of 3 different prompts: layer 2's attention output
    (the input of o_proj) equals softmax(z with z + alpha_h |z| on local keys and z + beta_h |z| on summary keys
    of the current row) @ v, with q, k, v from the layer's projections and rotary embedding."""
    alpha, beta, layer = 0.7, 0.3, 2
    mass = torch.tensor([[0.4, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4], [0.5, 0.05, 0.25, 0.2], [0.3, 0.3, 0.2, 0.1]])
    spec = f"paint:start_layer=1,alpha={alpha},beta={beta}"
    scale = torch.ones(4, 4)
    if heads == "calibrated":
        path = head_sensitivity.save(mass, tmp_path / "sens.safetensors")
        spec += f",heads=calibrated,sensitivity={path}"
        scale = mass / mass.max(1, keepdim=True).values
    inputs = session.prepare(images, prompts)
    ids, pad = inputs["input_ids"], inputs["attention_mask"].bool()
    assert not bool(pad.all()), "the prompts must differ in length (left padding)"
    with torch.no_grad():
        local_img, summary_img = _paper_token_sets(session, inputs["pixel_values"])
    image = ids == session.model.config.image_token_id
    local = torch.zeros(ids.shape, dtype=torch.bool)
    summary = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(ids.shape[0]):  # one image per prompt, its patches in order
        local[b, image[b]] = local_img[b]
        summary[b, image[b]] = summary_img[b]
    assert bool(local.any()) and bool(summary.any())

    attn = session.adapter.decoder_layers[layer].self_attn
    seen, outputs = [], []
    hooks = [attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"], kw["position_embeddings"])), with_kwargs=True),
        attn.o_proj.register_forward_pre_hook(lambda m, a: outputs.append(a[0]))]
    session.apply(spec)
    try:
        with torch.inference_mode():
            session.model.generate(**inputs, max_new_tokens=2, do_sample=False,
                                   pad_token_id=session.processor.tokenizer.pad_token_id)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(outputs) == 2  # the prefill and one decoding step

    heads_n, kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    dim = attn.head_dim

    def project(hidden, cos, sin):
        batch, length, _ = hidden.shape
        q = attn.q_proj(hidden).view(batch, length, heads_n, dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(batch, length, kv, dim).transpose(1, 2)
        v = attn.v_proj(hidden).view(batch, length, kv, dim).transpose(1, 2)
        return _rope(q, cos, sin).double(), _rope(k, cos, sin).double(), v.double()

    with torch.no_grad():
        (h0, (cos0, sin0)), (h1, (cos1, sin1)) = seen
        q0, k0, v0 = project(h0, cos0, sin0)
        q1, k1, v1 = project(h1, cos1, sin1)
    n = ids.shape[1]
    steps = [(q0, k0, v0, torch.ones(n, n, dtype=torch.bool).tril() & pad[:, None, :], outputs[0]),
             (q1, torch.cat([k0, k1], 2), torch.cat([v0, v1], 2),
              torch.cat([pad, torch.ones(pad.shape[0], 1, dtype=torch.bool)], 1)[:, None, :], outputs[1])]
    gain = (local[:, None, :] * alpha + summary[:, None, :] * beta).double()        # (B, 1, n) before head scaling
    for q, k, v, allowed, got in steps:
        k, v = k.repeat_interleave(heads_n // kv, 1), v.repeat_interleave(heads_n // kv, 1)
        z = q @ k.transpose(-1, -2) / math.sqrt(dim)                                  # (B, H, Lq, Lk)
        g = torch.zeros_like(z)
        g[:, :, -1, :n] = gain * scale[layer].double()[None, :, None]                # current row, prompt keys
        edited = (z + g * z.abs()).masked_fill(~allowed[:, None], float("-inf"))
        plain = z.masked_fill(~allowed[:, None], float("-inf"))
        expected = (torch.softmax(edited, -1) @ v).transpose(1, 2).flatten(2)
        unedited = (torch.softmax(plain, -1) @ v).transpose(1, 2).flatten(2)
        real = allowed[:, -1, -q.shape[2]:] if q.shape[2] > 1 else torch.ones(q.shape[0], 1, dtype=torch.bool)
        assert torch.allclose(got.double()[real], expected[real], atol=1e-5)
        assert not torch.allclose(got.double()[:, -1], unedited[:, -1], atol=1e-4)  # the edit matters here
