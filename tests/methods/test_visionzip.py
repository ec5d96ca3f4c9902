import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.pruning.visionzip import VisionZipConfig, visionzip_plan

N = 64  # tiny-random visual tokens per image


@pytest.mark.parametrize("spec", ["visionzip", "visionzip:keep=1.0", "visionzip:dominant=60,contextual=4"])
def test_keeping_every_token_is_identical_to_baseline(session, images, prompts, spec):
    # On a 64-token model the paper's 54 + 10 setting keeps everything.
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(spec)
    try:
        assert torch.equal(forward_logits(session, inputs), base)
    finally:
        handle.remove()


def test_reduction_changes_logits_and_remove_restores_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply("visionzip:dominant=12,contextual=4")
    reduced = forward_logits(session, inputs)
    assert reduced.shape[1] == base.shape[1] - (N - 16)
    assert not torch.allclose(reduced[:, -1], base[:, -1])
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert not session.adapter.language_model._forward_pre_hooks


def test_stats_report_kept_tokens(session, images, prompts):
    session.apply("visionzip:keep=0.25")  # 16 of 64: 14 dominant + 2 contextual (54:10 proportion)
    results = session.generate(images, prompts, max_new_tokens=3)
    for r in results:
        assert r.stats.visual_tokens == N
        assert r.stats.visual_tokens_kept == [16] * 4
        assert r.stats.tokens_per_layer[0] == r.stats.tokens_per_layer[-1]


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    session.apply("visionzip:dominant=10,contextual=3")
    batched = session.generate(images, prompts, max_new_tokens=8)
    batch_scores = session.answer_logprobs(images, prompts).logprobs
    for i in range(3):
        assert session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0].text == batched[i].text
        single = session.answer_logprobs([images[i]], [prompts[i]]).logprobs[0]
        assert torch.allclose(torch.tensor(single), torch.tensor(batch_scores[i]), atol=1e-4)


def _reference_plan(hidden, attn, keys, heads, dominant, contextual):
    """VisionZip written out per image from the paper's algorithm and the official code's merge, on the vision
    tower's own eager outputs: hidden (I, T, C) the feature layer's output, attn (I, H, T, T) its attention
    weights, keys (I, T, C) its key projection. Loops and lists on purpose; nothing shared with mmkit's code.

    Dominant: CLS plus the `dominant - 1` patches with the most CLS attention (summed over heads), image order.
    Contextual: the other patches' keys averaged over heads and L2-normalised; every `step`-th of them (step =
    remaining // contextual) is a target, each other patch joins its most cosine-similar target, and the
    contextual token is target + mean(joined patches).
    """
    n_img, t, c = hidden.shape
    orders, feats = [], []
    for i in range(n_img):
        feat = hidden[i, 1:].clone()                       # "default": features are the patches
        cls_row = [float(sum(attn[i, h, 0, 1 + j] for h in range(heads))) for j in range(N)]
        ranked = sorted(range(N), key=lambda j: -cls_row[j])
        dom = sorted(ranked[:dominant - 1])
        rest = [j for j in range(N) if j not in dom]
        step = max(1, len(rest) // contextual)
        targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
        others = [j for j in rest if j not in targets]
        key = keys[i, 1:].view(N, heads, c // heads).mean(1)
        unit = [key[j] / key[j].norm() for j in range(N)]
        joined = {tg: [] for tg in targets}
        for o in others:
            sims = [float(unit[o] @ unit[tg]) for tg in targets]
            joined[targets[sims.index(max(sims))]].append(o)
        new = feat.clone()
        for tg, members in joined.items():
            if members:
                new[tg] = feat[tg] + sum(feat[m] for m in members) / len(members)
        new[others[0]] = hidden[i, 0]                      # CLS enters in the first merged-away slot
        orders.append([others[0]] + dom + targets)
        feats.append(new)
    return torch.tensor(orders), torch.stack(feats)


def test_selection_and_merge_match_a_direct_implementation(session, images, prompts):
    from mmkit.patching.pre_llm import VisionLayerCapture, feature_layer_index, vision_encoder_layers

    inputs = session.prepare(images, prompts)
    layer = feature_layer_index(session.adapter)
    capture = VisionLayerCapture(session.adapter, layer)
    tower = session.adapter.vision_tower
    original = tower.config._attn_implementation
    try:
        tower.set_attn_implementation("eager")  # the test's reference only: full attention weights
        with torch.inference_mode():
            out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        q, k, layer_out = capture.take()
    finally:
        tower.set_attn_implementation(original)
        capture.remove()
    hidden = out.hidden_states[layer + 1]
    attn = out.attentions[layer]
    encoder_layer = vision_encoder_layers(session.adapter)[layer]
    with torch.inference_mode():  # the layer's keys, recomputed from its input rather than taken from the hooks
        keys = encoder_layer.self_attn.k_proj(encoder_layer.layer_norm1(out.hidden_states[layer]))
    heads = capture.num_heads
    plan = visionzip_plan(hidden[:, 1:], q, k, layer_out, heads, capture.scale, 12, 4,
                          cls_in_features=False, feed_cls=True)
    ref_order, ref_feats = _reference_plan(hidden, attn, keys, heads, 12, 4)
    assert torch.equal(plan.order, ref_order)
    assert torch.allclose(plan.features, ref_feats, atol=1e-5)
    # Targets were really merged into (not just kept): each contextual slot differs from its raw feature.
    targets = ref_order[:, -4:]
    assert not torch.allclose(plan.features.gather(1, targets[..., None].expand(-1, -1, hidden.shape[-1])),
                              hidden[:, 1:].gather(1, targets[..., None].expand(-1, -1, hidden.shape[-1])))


def test_config_validation(session):
    with pytest.raises(MmkitError, match="dominant must be"):
        session.apply("visionzip:dominant=0")
    with pytest.raises(MmkitError, match="contextual must be"):
        session.apply("visionzip:contextual=-1")
    with pytest.raises(MmkitError, match="keep must be"):
        session.apply("visionzip:keep=1.5")
    with pytest.raises(MmkitError, match="this model has 64"):
        session.apply("visionzip:dominant=60,contextual=10")
    with pytest.raises(ValueError, match="positions"):
        VisionZipConfig(positions="shifted")
    assert VisionZipConfig(keep=0.25).counts(576) == (122, 22)  # 144 tokens, 54:10


def test_shares_the_pre_llm_slot_and_refuses_llava_next(session):
    import mmkit

    session.apply("visionzip:keep=0.5")
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("visionzip:keep=0.25")
    nxt = mmkit.load("tiny-random-next", device="cpu")
    with pytest.raises(MmkitError, match="LLaVA-1.5 layout"):
        nxt.apply("visionzip:keep=0.5")
    nxt.close()
