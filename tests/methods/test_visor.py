import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mmkit
from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.evals.flops import cross_attention_flops, prefill_tflops
from mmkit.pruning.visor import BudgetPolicy, VISORConfig, load_weights, new_weights

LAYERS = 4  # tiny-random


def random_weights(session, seed: int = 0, gate: float = 1.0, policy_bias=None):
    """VISOR weights with open gates (so the blocks visibly act) and, optionally, a constant policy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = new_weights(session, policy_width=8)
    with torch.no_grad():
        for block in weights.blocks.values():
            block.gate.fill_(gate)
        if policy_bias is not None:
            weights.policy.fc2.weight.zero_()
            weights.policy.fc2.bias.copy_(torch.tensor(policy_bias, dtype=torch.float32))
    return weights


def write(weights, path) -> str:
    save_file(weights.state_tensors(), str(path))
    return str(path)


def last_logits(session, inputs):
    return forward_logits(session, inputs)[:, -1].float()


def test_config_validation():
    assert VISORConfig().budget == "policy"
    assert VISORConfig(budget="2").budget == 2
    for bad in (dict(budget=0), dict(budget="fast"), dict(budget=True), dict(threshold=1.5),
                dict(threshold=-0.1), dict(weights="  ")):
        with pytest.raises(ValueError):
            VISORConfig(**bad)
    assert mmkit.registry.parse_spec("visor:budget=3,threshold=0.7").budget == 3
    with pytest.raises(MmkitError, match="budget"):
        mmkit.registry.parse_spec("visor:budget=-1")


def test_registered_with_description():
    info = mmkit.registry.get_method("visor")
    assert info.kind == "pruning" and "cross-attention" in info.description


def test_clear_error_without_weights(session):
    with pytest.raises(MmkitError, match="train-visor"):
        session.apply("visor:budget=1")
    with pytest.raises(MmkitError, match="train-visor"):
        session.apply("visor:weights=/no/such/dir")


def test_shape_mismatch_is_a_clear_error(session, tmp_path):
    weights = random_weights(session)
    tensors = weights.state_tensors()
    tensors["meta.num_layers"] = torch.tensor(6)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(MmkitError):
        session.apply(f"visor:weights={path}")


def test_budget_past_depth_is_rejected(session, tmp_path):
    path = write(random_weights(session), tmp_path / "w.safetensors")
    with pytest.raises(MmkitError, match="exceeds"):
        session.apply(f"visor:weights={path},budget=5")


def test_changes_outputs_and_remove_restores_bit_exact(session, images, prompts, tmp_path):
    path = write(random_weights(session), tmp_path / "w.safetensors")
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(f"visor:weights={path},budget=1")
    on = last_logits(session, inputs)
    assert not torch.allclose(on, base[:, -1].float())
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)


def test_full_budget_is_the_unmodified_model(session, images, prompts, tmp_path):
    path = write(random_weights(session), tmp_path / "w.safetensors")
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    session.apply(f"visor:weights={path},budget={LAYERS}")
    assert torch.equal(forward_logits(session, inputs), base)


def test_closed_gates_equal_dropping_the_image(session, images, prompts, tmp_path):
    """With zero gates the blocks add nothing: budget k is the model with every visual token gone from layer k."""
    from mmkit.patching.token_drop import TokenDropper
    from mmkit.pruning.dyvte_train import _drop_all_visual

    path = write(random_weights(session, gate=0.0), tmp_path / "w.safetensors")
    inputs = session.prepare(images, prompts)
    dropper = TokenDropper(session.context, session.adapter.decoder_layers, {2: _drop_all_visual})
    expected = last_logits(session, inputs)
    dropper.remove()
    session.apply(f"visor:weights={path},budget=2")
    assert torch.allclose(last_logits(session, inputs), expected, atol=1e-5)


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, cos, sin):
    """Rotate-half rotary embedding of x (H, n, hd) at angles cos/sin (n, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _reference_visor(session, weights, inputs, budget):
    """VISOR at a fixed budget, written out for one unpadded prompt with plain tensor code: decoder layers
    0..budget-1 on the whole sequence; then the text tokens only, each layer l preceded by its cross-attention
    block, where the text token at original position p attends (softmax over keys, per head) to the visual states
    that left layer budget-1 at original positions < p, with rotary angles of the original positions, and adds
    tanh(gate) * W_o(attention) to its state. Returns the last position's logits."""
    model, adapter = session.model, session.adapter
    lm = adapter.language_model
    captured = {}
    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.inference_mode():
        model(**inputs)
    hook.remove()
    h = captured["embeds"].float()
    n = h.shape[1]
    ids = inputs["input_ids"][0]
    is_image = ids == adapter.image_token_id
    text_pos = (~is_image).nonzero().flatten()
    image_pos = is_image.nonzero().flatten()
    layers = adapter.decoder_layers
    with torch.inference_mode():
        cos, sin = lm.rotary_emb(h, torch.arange(n)[None])
        for l in range(budget):
            h = layers[l](h, attention_mask=None, position_embeddings=(cos, sin),
                          position_ids=torch.arange(n)[None])
            h = h[0] if isinstance(h, tuple) else h
        visual = h[0, image_pos]
        t = h[:, text_pos]
        cos_t, sin_t = cos[:, text_pos], sin[:, text_pos]
        for l in range(budget, adapter.num_layers):
            block = weights.blocks[str(l)]
            heads, hd = block.num_heads, block.head_dim
            q = (block.wq.weight @ _rms(t[0], block.q_norm, block.eps).T).T.view(-1, heads, hd).transpose(0, 1)
            k = (block.wk.weight @ _rms(visual, block.k_norm, block.eps).T).T.view(-1, heads, hd).transpose(0, 1)
            v = (block.wv.weight @ _rms(visual, block.k_norm, block.eps).T).T.view(-1, heads, hd).transpose(0, 1)
            q = _rope(q, cos[0, text_pos], sin[0, text_pos])
            k = _rope(k, cos[0, image_pos], sin[0, image_pos])
            out = torch.zeros(len(text_pos), heads * hd)
            for i, p in enumerate(text_pos.tolist()):
                readable = image_pos < p
                if not bool(readable.any()):
                    continue  # a token before the image does not see it
                for hh in range(heads):
                    w = torch.softmax(k[hh, readable] @ q[hh, i] / hd ** 0.5, dim=0)
                    out[i, hh * hd:(hh + 1) * hd] = w @ v[hh, readable]
            t = t + torch.tanh(block.gate) * (block.wo.weight @ out.T).T[None]
            t = layers[l](t, attention_mask=None, position_embeddings=(cos_t, sin_t), position_ids=text_pos[None])
            t = t[0] if isinstance(t, tuple) else t
        return model.lm_head(lm.norm(t))[0, -1]


@pytest.mark.parametrize("budget", [1, 2])
def test_cross_attention_with_open_gates_equals_a_plain_reference(session, images, prompts, tmp_path, budget):
    weights = random_weights(session, seed=5, gate=1.5)
    inputs = session.prepare(images[:1], prompts[:1])
    ids = inputs["input_ids"][0]
    first_image = int((ids == session.adapter.image_token_id).nonzero()[0])
    assert first_image > 0  # text before the image: the causal rule is exercised
    expected = _reference_visor(session, weights, inputs, budget)
    session.apply(f"visor:weights={write(weights, tmp_path / 'w.safetensors')},budget={budget}")
    got = last_logits(session, inputs)[0]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_tokens_before_the_image_are_not_updated_by_cross_attention(session, images, prompts, tmp_path):
    """Causal order: changing the image must not change what a token before it computes."""
    path = write(random_weights(session, gate=1.5), tmp_path / "w.safetensors")
    session.apply(f"visor:weights={path},budget=1")
    inputs = session.prepare(images[:1], prompts[:1])
    first_image = int((inputs["input_ids"][0] == session.adapter.image_token_id).nonzero()[0])
    other = dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))
    with torch.inference_mode():
        a = session.model(**inputs, output_hidden_states=True).hidden_states[-1][0, :first_image]
        b = session.model(**other, output_hidden_states=True).hidden_states[-1][0, :first_image]
    assert torch.equal(a, b)


def test_stats_report_self_and_cross_attended_visual_tokens(session, images, prompts, tmp_path):
    path = write(random_weights(session), tmp_path / "w.safetensors")
    session.apply(f"visor:weights={path},budget=2")
    stats = session.answer_logprobs(images, prompts).stats
    n = stats[0].visual_tokens
    assert n > 0
    for s in stats:
        assert s.visual_tokens_kept == [n, n, 0, 0]
        assert s.visual_tokens_cross == [0, 0, n, n]
        assert s.tokens_per_layer[2] == s.tokens_per_layer[0] - n
    d, m = session.adapter.hidden_size, session.adapter.intermediate_size
    plain = prefill_tflops(stats[0].tokens_per_layer, d, m)
    with_cross = prefill_tflops(stats[0].tokens_per_layer, d, m, cross_visual=stats[0].visual_tokens_cross)
    q = stats[0].tokens_per_layer[2]
    assert with_cross == pytest.approx(plain + 2 * cross_attention_flops(q, n, d) / 1e12)


def test_batch_with_mixed_budgets_equals_single_runs(session, images, prompts, tmp_path):
    path = write(random_weights(session), tmp_path / "w.safetensors")
    handle = session.apply(f"visor:weights={path},budget=1")
    budgets = [1, 3, LAYERS]
    handle.impl.force_budgets = torch.tensor(budgets)
    batched = last_logits(session, session.prepare(images, prompts))
    assert handle.impl.last_budgets == budgets
    for i, k in enumerate(budgets):
        handle.impl.force_budgets = torch.tensor([k])
        single = last_logits(session, session.prepare(images[i], prompts[i]))
        assert torch.allclose(batched[i], single[0], atol=1e-4)


def test_batch_equals_single_runs_at_fixed_budget(session, images, prompts, tmp_path):
    path = write(random_weights(session), tmp_path / "w.safetensors")
    session.apply(f"visor:weights={path},budget=2")
    batched = session.generate(images, prompts, max_new_tokens=5)
    singles = [session.generate(img, p, max_new_tokens=5)[0] for img, p in zip(images, prompts)]
    assert [r.text for r in batched] == [r.text for r in singles]


def cached_and_recomputed(session, inputs, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate` with the KV cache, and the same greedy tokens recomputed without a cache each step."""
    with torch.inference_mode():
        cached = session.model.generate(**inputs, max_new_tokens=steps, do_sample=False,
                                        pad_token_id=session.processor.tokenizer.pad_token_id)
        seq, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):
            logits = session.model(input_ids=seq, attention_mask=mask, pixel_values=inputs["pixel_values"],
                                   use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return cached, seq


def test_cached_generation_equals_no_cache_recompute(session, images, prompts, tmp_path):
    path = write(random_weights(session, seed=3, gate=2.0), tmp_path / "w.safetensors")
    handle = session.apply(f"visor:weights={path},budget=1")
    inputs = session.prepare(images, prompts)
    cached, seq = cached_and_recomputed(session, inputs, steps=5)
    assert torch.equal(cached, seq)
    assert handle.impl.last_budgets == [1, 1, 1]


def test_policy_pick_rule():
    policy = BudgetPolicy(hidden_size=2, num_layers=4, width=3)
    with torch.no_grad():
        policy.fc1.weight.zero_()
        policy.fc1.bias.zero_()
        policy.fc2.weight.zero_()
        policy.fc2.bias.copy_(torch.tensor([-5.0, 5.0, 5.0]))
    x = torch.zeros(2, 4)
    assert policy.pick(x, 0.5).tolist() == [2, 2]
    with torch.no_grad():
        policy.fc2.bias.fill_(-5.0)
    assert policy.pick(x, 0.5).tolist() == [4, 4]  # nothing suffices: the full model
    with torch.no_grad():
        policy.fc2.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # p = 0.5 is not above the threshold
    assert policy.pick(x, 0.5).tolist() == [3, 3]
    assert policy.pick(x, 0.4).tolist() == [1, 1]


def test_policy_picks_budgets_in_the_handle(session, images, prompts, tmp_path):
    path = write(random_weights(session, policy_bias=[-9.0, 9.0, 9.0]), tmp_path / "w.safetensors")
    handle = session.apply(f"visor:weights={path}")
    stats = session.answer_logprobs(images, prompts).stats
    assert handle.impl.last_budgets == [2, 2, 2]
    assert all(s.visual_tokens_kept[2] == 0 and s.visual_tokens_kept[1] > 0 for s in stats)
    handle.remove()
    path = write(random_weights(session, policy_bias=[-9.0, -9.0, -9.0]), tmp_path / "w2.safetensors")
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(f"visor:weights={path}")
    assert torch.equal(forward_logits(session, inputs), base)  # nothing suffices: every row runs the full model
    assert handle.impl.last_budgets == [LAYERS] * 3


def test_reference_model_uses_shipped_weights():
    from mmkit.pruning.visor import SHIPPED_DIR, WEIGHTS_FILE

    assert (SHIPPED_DIR / "reference" / WEIGHTS_FILE).is_file(), "the shipped VISOR weights are missing"
    weights = load_weights(SHIPPED_DIR / "reference")
    assert weights.num_layers == 4 and weights.hidden_size == 256
    assert all(abs(float(b.gate)) > 0 for b in weights.blocks.values())  # the blocks were trained open


@pytest.mark.slow
def test_tiny_training_is_deterministic_and_loads(session, images, prompts, tmp_path):
    from mmkit.cli import main

    runner = CliRunner()
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = runner.invoke(main, ["train-visor", "--model", "tiny-random", "--tiny", "--seed", "3",
                                      "--out", str(out)])
        assert result.exit_code == 0, result.output
        outs.append(out)
    a, b = (load_weights(o).state_tensors() for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((outs[0] / "visor.json").read_text())
    assert set(report["policy"]["label_sufficient_rate"]) == {"1", "2", "3"}
    handle = session.apply(f"visor:weights={outs[0]}")
    session.generate(images, prompts, max_new_tokens=3)
    assert all(1 <= k <= LAYERS for k in handle.impl.last_budgets)


@pytest.mark.slow
def test_reference_policy_batch_and_cache_consistency():
    """Shipped weights on the reference model: policy budgets differ per row, a batch equals single calls and
    cached greedy decoding equals a no-cache recompute."""
    from mmkit.pruning.visor import SHIPPED_DIR, WEIGHTS_FILE
    from mmkit.world.scenes import generate_scene

    assert (SHIPPED_DIR / "reference" / WEIGHTS_FILE).is_file(), "the shipped VISOR weights are missing"
    session = mmkit.load("reference", methods=["visor"], device="cpu")
    try:
        impl = session.methods[0].impl
        scenes = [generate_scene(1, i) for i in range(3)]
        prompts = ["Is there a cup in the image? Answer yes or no.", "How many objects are there?",
                   "What color is the star?"]
        images = [s.image for s in scenes]
        inputs = session.prepare(images, prompts)
        batched = last_logits(session, inputs)
        budgets = impl.last_budgets
        assert len(set(budgets)) > 1, f"the policy gave every row the same budget: {budgets}"
        for i in range(3):
            single = last_logits(session, session.prepare(images[i], prompts[i]))
            assert impl.last_budgets == [budgets[i]]
            assert torch.allclose(batched[i], single[0], atol=1e-4)
        cached, seq = cached_and_recomputed(session, inputs, steps=4)
        # generate pads rows after their end-of-sequence token and stops once every row has ended.
        eos, start = session.processor.tokenizer.eos_token_id, inputs["input_ids"].shape[1]
        for row_cached, row_seq in zip(cached[:, start:].tolist(), seq[:, start:].tolist()):
            n = row_seq.index(eos) + 1 if eos in row_seq else len(row_seq)
            assert row_cached[:n] == row_seq[:n]
    finally:
        session.close()


@pytest.mark.slow
def test_policy_only_training_keeps_the_blocks(tmp_path):
    from mmkit.cli import main

    runner = CliRunner()
    first, second = tmp_path / "a", tmp_path / "b"
    assert runner.invoke(main, ["train-visor", "--model", "tiny-random", "--tiny", "--out", str(first)]).exit_code == 0
    result = runner.invoke(main, ["train-visor", "--model", "tiny-random", "--steps", "0", "--policy-samples", "8",
                                  "--batch-size", "4", "--init", str(first), "--out", str(second)])
    assert result.exit_code == 0, result.output
    a, b = load_weights(first).state_tensors(), load_weights(second).state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("blocks."))
    result = runner.invoke(main, ["train-visor", "--model", "tiny-random", "--steps", "0", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--init" in result.output
