import numpy as np
import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.hallucination.var import VARConfig, VARHandle, detect_massive_dims, redistribute, sink_flags

# Random tiny weights have no massive activations; a low tau makes some tokens sinks so the edit has work to do.
ON = "var:start_layer=1,tau=2"


def test_p_one_installs_nothing_and_keeps_logits_identical(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    session.apply("var:start_layer=1,tau=2,p=1")
    assert session.model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(forward_logits(session, inputs), base)


def test_exact_probabilities_reproduce_sdpa_when_nothing_moves(session, images, prompts):
    """The override's explicit softmax (p = 1 forced through it) matches SDPA, padding rows included."""
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    impl = VARHandle(session, VARConfig(start_layer=1, end_layer=4, tau=2.0, p=1.0), force_override=True)
    try:
        same = forward_logits(session, inputs)
        assert sum(int(v) for v in impl.edited.values()) > 0  # heads were image-centric, the edit was a no-op
    finally:
        impl.remove()
    assert torch.allclose(same, base, atol=1e-5)


def test_redistribution_changes_logits_and_remove_restores_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(ON)
    out = forward_logits(session, inputs)
    assert set(handle.impl.edited) == {1, 2}  # layers 1 .. L-2 by default
    assert all(int(v) > 0 for v in handle.impl.edited.values())
    assert not torch.allclose(out[:, -1], base[:, -1], atol=1e-4)
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert session.model.config.text_config._attn_implementation == "sdpa"


def test_no_sinks_means_no_change_and_says_so(session, images, prompts, caplog):
    """A tau no activation reaches finds no sinks: nothing moves (up to the explicit softmax's rounding), and the
    handle warns once that it changed nothing."""
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply("var:start_layer=1,tau=1000")
    with caplog.at_level("WARNING", logger="mmkit.hallucination.var"):
        out = forward_logits(session, inputs)
        forward_logits(session, inputs)
    assert torch.allclose(out, base, atol=1e-5)
    assert handle.impl.sink_tokens == {1: 0, 2: 0}
    warnings = [r for r in caplog.records if "no sink tokens" in r.getMessage()]
    assert len(warnings) == 1 and "tau=1000" in warnings[0].getMessage()
    handle.remove()
    with caplog.at_level("WARNING", logger="mmkit.hallucination.var"):
        handle = session.apply(ON)
        forward_logits(session, inputs)
    assert all(n > 0 for n in handle.impl.sink_tokens.values())
    assert len([r for r in caplog.records if "no sink tokens" in r.getMessage()]) == 1


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
    handle = session.apply(ON)
    first = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=5)]
    again = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=5)]
    assert first == again
    inputs = session.prepare(images, prompts)
    pad = session.processor.tokenizer.pad_token_id
    with torch.inference_mode():
        dynamic = session.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=pad)
        static = session.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=pad,
                                        cache_implementation="static")
    assert torch.equal(dynamic, static)
    # Decoded tokens are tracked as sink candidates too: prompt + 4 fed-back tokens.
    assert torch.cat(handle.impl._sinks[1].flags, 1).shape[1] == inputs["input_ids"].shape[1] + 4


def test_fixed_dims(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply("var:start_layer=1,tau=1.5,dims=3/17")
    out = forward_logits(session, inputs)
    assert handle.impl._sinks[1].dims.tolist() == [[3, 17]] * 3
    assert not torch.allclose(out[:, -1], base[:, -1], atol=1e-4)


def test_redistribute_moves_sink_mass_to_non_sink_image_tokens():
    # keys: 0 text sink, 1 text, 2 image sink, 3 image, 4 image
    image = torch.tensor([[False, False, True, True, True]])
    sink = torch.tensor([[True, False, True, False, False]])
    probs = torch.tensor([[[[0.3, 0.1, 0.1, 0.3, 0.2],       # image 0.6, visual-sink share 1/6: centric
                            [0.6, 0.3, 0.05, 0.03, 0.02],    # image 0.1 < 0.2: left alone
                            [0.1, 0.1, 0.5, 0.2, 0.1]]]])    # visual-sink share 0.625 > 0.5: left alone
    out, centric = redistribute(probs, image, sink, None, p=0.6, rho=0.5, min_visual=0.2)
    assert centric.tolist() == [[[True, False, False]]]
    row = out[0, 0, 0]
    assert torch.allclose(row[[0, 2]], torch.tensor([0.18, 0.06]))      # sinks x 0.6
    assert torch.isclose(row[1], torch.tensor(0.1))                     # text non-sink untouched
    freed = 0.4 * 0.4
    assert torch.allclose(row[[3, 4]], torch.tensor([0.3 + freed * 0.6, 0.2 + freed * 0.4]))
    assert torch.allclose(out.sum(-1), torch.ones(1, 1, 3))
    assert torch.equal(out[0, 0, 1:], probs[0, 0, 1:])
    rows = torch.tensor([[False, True, True]])
    out, centric = redistribute(probs, image, sink, rows, p=0.6, rho=0.5, min_visual=0.2)
    assert not bool(centric.any()) and torch.equal(out, probs)


def test_massive_dims_are_detected():
    normed = torch.randn(2, 6, 16)
    normed[0, 2, 5] = 80.0
    normed[0, 0, 11] = -60.0
    normed[1, 4, 9] = 50.0
    normed[1, 5, 1] = 300.0  # a padded position: ignored
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 5] = False
    dims = detect_massive_dims(normed, valid, 2)
    assert set(dims[0].tolist()) == {5, 11} and dims[1, 0].item() == 9
    flags = sink_flags(normed, dims, 20.0)
    assert flags[0].tolist() == [True, False, True, False, False, False]
    assert flags[1, 4].item()


def test_llava_next_rows_with_different_visual_token_counts():
    import mmkit

    session = mmkit.load("tiny-random-next", device="cpu")
    rng = np.random.default_rng(2)
    imgs = [(rng.random(shape) * 255).astype("uint8") for shape in [(28, 56, 3), (56, 56, 3), (28, 28, 3)]]
    prompts = ["hi", "describe this image", "what?"]
    base = session.answer_logprobs(imgs, prompts).logprobs
    session.apply(ON)
    batch_scores = torch.tensor(session.answer_logprobs(imgs, prompts).logprobs)
    assert not torch.allclose(batch_scores, torch.tensor(base), atol=1e-4)
    single_scores = torch.tensor([session.answer_logprobs([imgs[i]], [prompts[i]]).logprobs[0] for i in range(3)])
    assert torch.allclose(batch_scores, single_scores, atol=1e-4)
    session.close()


@pytest.mark.parametrize("spec, message", [
    ("var:p=1.5", "p must be in"),
    ("var:rho=1", "rho must be in"),
    ("var:min_visual=0", "min_visual must be in"),
    ("var:num_dims=0", "num_dims"),
    ("var:dims=3/3", "must not repeat"),
    ("var:start_layer=2,end_layer=2", "end_layer"),
    ("var:start_layer=4", "do not fit"),
    ("var:dims=4096", "hidden size"),
])
def test_bad_settings_are_refused(session, spec, message):
    with pytest.raises(MmkitError, match=message):
        session.apply(spec)


# -- the whole forward against a hand-written eager reference ---------------------------------------------------------

def _rms_norm(norm, x):
    """LLaMA RMSNorm by hand: x / sqrt(mean(x^2) + eps) * weight, in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.float()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _var_reference_logits(session, image, prompt, *, p, tau, rho, min_visual, layers, num_dims):
    """Eager forward of the tiny LLaMA decoder written out here, with VAR's edit per the paper and its official
    code in `layers`: sinks are tokens whose |h / rms(h)| (h the layer's input, no learned weight) exceeds tau on
    one of the row's massive dims (the num_dims dims with the largest such value over the prompt); if any image
    token is a sink, a text query row after the image is image-centric in a head when its image attention is
    >= min_visual and at most rho of that goes to visual sinks; there every sink's probability is multiplied by p
    and the freed (1 - p) mass goes to the non-sink image tokens in proportion to their attention. Returns the
    logits (n, vocab) of every position."""
    adapter = session.adapter
    cfg = adapter.text_config
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, adapter.head_dim
    inputs = session.prepare([image], [prompt])
    ids = inputs["input_ids"][0]
    n = ids.numel()
    image_tok = ids == adapter.image_token_id
    first_image = int(image_tok.nonzero().min())
    text_rows = (torch.arange(n) > first_image) & ~image_tok

    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    hook = adapter.decoder_layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            session.model(**inputs)  # only to read the decoder's input embeddings (image features scattered in)
    finally:
        hook.remove()
    h = captured["h"][0].float()

    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    edited_any = False
    with torch.inference_mode():
        for index, layer in enumerate(adapter.decoder_layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, h)
            q = (x @ attn.q_proj.weight.float().T).view(n, heads, dim).transpose(0, 1)
            k = (x @ attn.k_proj.weight.float().T).view(n, kv_heads, dim).transpose(0, 1)
            v = (x @ attn.v_proj.weight.float().T).view(n, kv_heads, dim).transpose(0, 1)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k = k.repeat_interleave(heads // kv_heads, 0)
            v = v.repeat_interleave(heads // kv_heads, 0)
            scores = (q @ k.transpose(-1, -2)) * dim ** -0.5
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)          # (H, n, n)
            if index in layers:
                plain = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)     # RMSNorm without its weight
                dims = plain.abs().amax(0).topk(num_dims).indices
                sink = (plain.abs()[:, dims] > tau).any(-1)                         # (n,)
                for hd in range(heads if bool((sink & image_tok).any()) else 0):
                    for row in text_rows.nonzero().squeeze(1).tolist():
                        a = probs[hd, row]
                        visual = float(a[image_tok].sum())
                        if visual < min_visual or float(a[image_tok & sink].sum()) > rho * visual:
                            continue
                        free = image_tok & ~sink
                        moved = (1 - p) * a[sink].sum()
                        new = a.clone()
                        new[sink] = a[sink] * p
                        new[free] = a[free] + moved * a[free] / a[free].sum()
                        probs[hd, row] = new
                        edited_any = True
            out = (probs @ v).transpose(0, 1).reshape(n, heads * dim)
            h = h + out @ attn.o_proj.weight.float().T
            y = _rms_norm(layer.post_attention_layernorm, h)
            mlp = layer.mlp
            gate = torch.nn.functional.silu(y @ mlp.gate_proj.weight.float().T)
            h = h + (gate * (y @ mlp.up_proj.weight.float().T)) @ mlp.down_proj.weight.float().T
        final = _rms_norm(adapter.language_model.norm, h)
        logits = final @ session.model.lm_head.weight.float().T
    assert edited_any, "the reference edited no head: the comparison would not test the redistribution"
    return logits


def test_whole_forward_equals_a_hand_written_eager_reference(session, images, prompts):
    """VAR's logits (batch of three different prompts, left padded) equal a per-prompt eager reference forward
    with the paper's redistribution, at every position of each row."""
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    session.apply(ON)
    out = forward_logits(session, inputs)
    real = inputs["attention_mask"].bool()
    for i in range(3):
        ref = _var_reference_logits(session, images[i], prompts[i], p=0.6, tau=2.0, rho=0.5, min_visual=0.2,
                                    layers={1, 2}, num_dims=2)
        got = out[i][real[i]]
        assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())
        # ... and the edit matters at this tolerance.
        assert (base[i][real[i]] - ref).abs().max() > 1e-2


def test_text_sinks_alone_move_nothing_and_generated_tokens_are_never_sinks(session, images, prompts):
    """As the official HeadFork: a layer whose sample has no visual sink has no image-centric head, so attention to
    text sinks stays where it is. A massive dim on which some text token, but no image token, passes tau is found
    here from the layers' inputs; VAR on that dim alone then leaves the logits as they were."""
    inputs = session.prepare(images, prompts)
    layers = session.adapter.decoder_layers
    captured = {}
    hooks = [layers[l].register_forward_pre_hook(
        lambda m, a, k, l=l: captured.__setitem__(l, (a[0] if a else k["hidden_states"]).float()), with_kwargs=True)
        for l in (1, 2)]
    try:
        base = forward_logits(session, inputs)
    finally:
        for h in hooks:
            h.remove()
    real = inputs["attention_mask"].bool()
    image = (inputs["input_ids"] == session.adapter.image_token_id)
    best = None
    for dim in range(session.adapter.hidden_size):
        image_max = text_max = 0.0
        for l in (1, 2):
            plain = captured[l] / torch.sqrt(captured[l].pow(2).mean(-1, keepdim=True) + 1e-6)
            value = plain[..., dim].abs()
            image_max = max(image_max, float(value[image].max()))
            text_max = max(text_max, float(value[real & ~image].max()))
        if text_max - image_max > 0.1 and (best is None or text_max - image_max > best[1]):
            best = (dim, text_max - image_max, image_max)
    assert best is not None, "no hidden dim separates text from image tokens on the tiny model"
    dim, _, image_max = best
    handle = session.apply(f"var:start_layer=1,dims={dim},tau={image_max + 0.05}")
    out = forward_logits(session, inputs)
    assert sum(handle.impl.sink_tokens.values()) > 0                      # text sinks were found ...
    assert torch.allclose(out, base, atol=1e-5)                           # ... and nothing moved
    session.generate(images, prompts, max_new_tokens=3)
    flags = torch.cat(handle.impl._sinks[1].flags, 1)
    assert not flags[:, inputs["input_ids"].shape[1]:].any()


def test_official_dims_for_the_checkpoints_the_official_code_lists(session):
    from mmkit.hallucination.var import official_sink_dims

    assert official_sink_dims("llava-hf/llava-1.5-7b-hf", 4096) == (2533, 1415)
    assert official_sink_dims("/models/LLaVA-V1.5-13B", 5120) == (2100, 4743)
    assert official_sink_dims("llava-hf/llava-v1.6-vicuna-13b-hf", 5120) == (2100, 4743)
    assert official_sink_dims("llava-hf/llava-v1.6-mistral-7b-hf", 4096) == ()   # not in the official table
    assert official_sink_dims("my-llava-1.5-7b-distilled", 2048) == ()            # another backbone under the name
    # A model the table does not know detects its dims per call; an export saves the dims in use.
    handle = session.apply(ON)
    assert handle.impl.dims == () and handle.impl.export_config().dims == ()
    handle.remove()
    handle = session.apply(ON + ",dims=3/17")
    assert handle.impl.export_config().dims == (3, 17)
