import numpy as np
import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.pruning.sparsevlm import (
    SparseVLMConfig, density_peak_clusters, recycle_sizes, stage_keep_count, text_raters,
)

# tiny-random has 4 decoder layers: the default scoring layers 2/6/15 (of 32) scale to 0/1/2, so tokens are
# dropped before layers 1, 2 and 3.


def expected_counts(n: int, keep=(300 / 576, 200 / 576, 110 / 576), recycle: bool = True) -> list[int]:
    counts, current = [n], n
    for fraction in keep:
        k = min(int(stage_keep_count(torch.tensor([n]), fraction)), current)
        current = k + (recycle_sizes(current - k)[1] if recycle else 0)
        counts.append(current)
    return counts


def test_keep_everything_is_identical_to_baseline(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    session.apply("sparsevlm:keep=1/1/1")
    assert torch.equal(forward_logits(session, inputs), base)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=6)] == base_text


def test_pruning_changes_logits_and_remove_restores_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(SparseVLMConfig())
    pruned = forward_logits(session, inputs)
    assert pruned.shape[1] == base.shape[1] - (64 - expected_counts(64)[-1])
    assert not torch.allclose(pruned[:, -1], base[:, -1])
    handle.remove()
    restored = forward_logits(session, inputs)
    assert torch.equal(restored, base)
    assert session.model.config.text_config._attn_implementation == "sdpa"
    assert all(not layer._forward_pre_hooks for layer in session.adapter.decoder_layers)


@pytest.mark.parametrize("recycle", [True, False])
def test_stats_report_kept_tokens_per_layer(session, images, prompts, recycle):
    session.apply(SparseVLMConfig(recycle=recycle))
    expected = expected_counts(64, recycle=recycle)
    assert expected == ([64, 35, 23, 13] if recycle else [64, 33, 22, 12])
    for r in session.generate(images, prompts, max_new_tokens=3):
        assert r.stats.visual_tokens_kept == expected


def test_recycling_changes_the_output(session, images, prompts):
    inputs = session.prepare(images, prompts)
    session.apply("sparsevlm:recycle=true")
    with_merge = forward_logits(session, inputs)
    session.remove_all()
    session.apply("sparsevlm:recycle=false")
    without = forward_logits(session, inputs)
    # Carriers of earlier stages compete again later; after the last stage one merged token remains.
    assert with_merge.shape[1] == without.shape[1] + 1
    assert not torch.allclose(with_merge[:, -1], without[:, -1])


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    """Rows have their own raters (different prompts) and their own clusters."""
    session.apply("sparsevlm")
    batched = session.generate(images, prompts, max_new_tokens=8)
    batch_scores = session.answer_logprobs(images, prompts, ["yes", "no"]).logprobs
    for i in range(3):
        single = session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0]
        assert single.text == batched[i].text
        single_scores = session.answer_logprobs([images[i]], [prompts[i]], ["yes", "no"]).logprobs[0]
        assert torch.allclose(torch.tensor(single_scores), torch.tensor(batch_scores[i]), atol=1e-4)


def test_each_stage_caches_only_its_own_kept_tokens(session, images, prompts):
    session.apply("sparsevlm")
    inputs = session.prepare(images, prompts)
    with torch.inference_mode():
        out = session.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                     return_dict_in_generate=True,
                                     pad_token_id=session.processor.tokenizer.pad_token_id)
    n = inputs["input_ids"].shape[1]
    kept = expected_counts(64)
    assert [out.past_key_values.get_seq_length(l) for l in range(4)] == [n - 64 + k + 3 for k in kept]


def test_static_cache_generation_matches_dynamic(session, images, prompts):
    session.apply("sparsevlm")
    inputs = session.prepare(images, prompts)
    pad = session.processor.tokenizer.pad_token_id
    with torch.inference_mode():
        dynamic = session.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        static = session.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad,
                                        cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_text_raters_pick_text_relevant_to_the_image():
    # Row 0: [pad, img, img, t_a, t_b, t_c]; the image is aligned with t_b, so t_b alone is above the mean.
    # Row 1 has no image: every text token is a rater (relevance is uniform).
    d = 4
    e = torch.eye(d)
    hidden = torch.zeros(2, 6, d)
    hidden[0, 1] = hidden[0, 2] = 5 * e[1]
    hidden[0, 3], hidden[0, 4], hidden[0, 5] = e[0], e[1], e[2]
    hidden[1, :] = e[3]
    image = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    raters = text_raters(hidden, image, attention)
    assert raters[0].tolist() == [False, False, False, False, True, False]
    assert raters[1].all()


def test_density_peak_clusters_separate_well_apart_groups():
    torch.manual_seed(0)
    a = torch.randn(6, 8) * 0.01 + 5.0
    b = torch.randn(4, 8) * 0.01 - 5.0
    centres, assign = density_peak_clusters(torch.cat([a, b]), 2)
    assert len(set(assign[:6].tolist())) == 1 and len(set(assign[6:].tolist())) == 1
    assert assign[0] != assign[6]
    assert sorted(assign[centres].tolist()) == [0, 1]  # each centre belongs to its own group
    again = density_peak_clusters(torch.cat([a, b]), 2)
    assert torch.equal(again[0], centres) and torch.equal(again[1], assign)


def test_ranking_and_recycling_follow_the_rater_attention(session, images, prompts):
    """Single row: the kept tokens after the first stage are the top visual tokens of the raters' eager attention
    at the scoring layer, and the merged carriers hold the cluster means of the best dropped tokens."""
    layers = session.adapter.decoder_layers
    captured = {}

    def grab(name):
        def hook(module, args, kwargs):
            captured[name] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    probes = [layers[0].register_forward_pre_hook(grab("embeds"), with_kwargs=True),
              layers[1].register_forward_pre_hook(grab("x1"), with_kwargs=True)]
    try:
        handle = session.apply("sparsevlm:layers=1/2,keep=0.5/0.25")
        # Registered after the method, so it sees layer 2's input once the drop and the merge are done.
        probes.append(layers[2].register_forward_pre_hook(grab("x2"), with_kwargs=True))
        inputs = session.prepare(images[:1], prompts[:1])
        forward_logits(session, inputs)
        kept, valid = handle.impl.dropper.index_at(2)
    finally:
        for p in probes:
            p.remove()
    assert valid is None
    kept = kept[0]
    image = inputs["input_ids"][0] == session.adapter.image_token_id
    raters = text_raters(captured["embeds"], image[None], None)[0].nonzero().squeeze(1)
    assert 0 < raters.numel() < (~image).sum()

    # Eager attention of layer 1 on its full input (no drop happened before layer 2).
    x = captured["x1"]
    n = x.shape[1]
    cos_sin = session.adapter.language_model.rotary_emb(x, torch.arange(n)[None])
    session.model.set_attn_implementation({"text_config": "eager"})
    try:
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        with torch.inference_mode():
            _, weights = layers[1].self_attn(layers[1].input_layernorm(x), position_embeddings=cos_sin,
                                             attention_mask=torch.zeros(1, 1, n, n).masked_fill(~causal, -1e9))
    finally:
        session.model.set_attn_implementation({"text_config": "sdpa"})
    score = weights[0][:, raters].mean((0, 1))
    image_pos = image.nonzero().squeeze(1)
    order = image_pos[torch.sort(score[image_pos], descending=True, stable=True).indices]
    top, dropped = order[:32].sort().values, order[32:]
    pool, groups = recycle_sizes(dropped.numel())
    members = dropped[:pool]
    kept_image = kept[image[kept]]
    assert kept_image.numel() == 32 + groups
    assert set(top.tolist()) <= set(kept_image.tolist())

    # The layer-1 output is layer 2's input before the drop; recompute it to get the dropped tokens' states.
    out1 = {}
    hook = layers[1].register_forward_hook(lambda m, a, o: out1.setdefault("h", (o[0] if isinstance(o, tuple) else o).clone()))
    try:
        session.remove_all()
        forward_logits(session, inputs)
    finally:
        hook.remove()
    h1 = out1["h"][0]
    centres, assign = density_peak_clusters(h1[members].float(), groups)
    x2 = captured["x2"][0]
    for c in range(groups):
        carrier = members[centres[c]]
        slot = (kept == carrier).nonzero().item()
        expected = h1[members[assign == c]].float().mean(0)
        assert torch.allclose(x2[slot].float(), expected, atol=1e-5)
    # Tokens that are neither carriers nor dropped pass through unchanged.
    untouched = [i for i, p in enumerate(kept.tolist()) if p not in set(members[centres].tolist())]
    assert torch.equal(x2[untouched], h1[kept[untouched]])


def test_config_validation():
    for bad in [dict(keep=()), dict(keep=(0.0, 0.1, 0.1)), dict(keep=(0.5, 1.5, 0.1)), dict(keep=(0.2, 0.5, 0.1)),
                dict(keep=(0.5, 0.25)), dict(layers=(1, 2), keep=(0.5, 0.3, 0.1)), dict(layers=(2, 2, 3)),
                dict(layers=(-1, 2, 3)), dict(recycle="yes")]:
        with pytest.raises(ValueError):
            SparseVLMConfig(**bad)
    assert SparseVLMConfig().scoring_layers(32) == (2, 6, 15)
    assert SparseVLMConfig().scoring_layers(4) == (0, 1, 2)
    with pytest.raises(ValueError, match="too shallow"):
        SparseVLMConfig().scoring_layers(2)
    assert [int(stage_keep_count(torch.tensor([576]), k)) for k in SparseVLMConfig().keep] == [300, 200, 110]
    assert recycle_sizes(276) == (83, 9) and recycle_sizes(0) == (0, 0)


def test_spec_parsing_and_refusals(session):
    from mmkit.registry import parse_spec

    cfg = parse_spec("sparsevlm:layers=0/2,keep=0.5/0.25,recycle=false")
    assert cfg.layers == (0, 2) and cfg.keep == (0.5, 0.25) and cfg.recycle is False
    with pytest.raises(MmkitError, match="keep"):
        parse_spec("sparsevlm:keep=0.5/0.75/0.1")
    with pytest.raises(MmkitError, match="last scoring layer"):
        session.apply("sparsevlm:layers=1/2/3")
    session.apply("sparsevlm")
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("pyramiddrop")


def test_llava_next_rows_with_different_visual_token_counts():
    import mmkit

    session = mmkit.load("tiny-random-next", device="cpu")
    rng = np.random.default_rng(2)
    imgs = [(rng.random(shape) * 255).astype("uint8") for shape in [(28, 56, 3), (56, 56, 3), (28, 28, 3)]]
    prompts = ["hi", "describe this image", "what?"]
    base = session.generate(imgs, prompts, max_new_tokens=5)
    counts = [r.stats.visual_tokens for r in base]
    assert len(set(counts)) > 1
    session.apply("sparsevlm")
    batched = session.generate(imgs, prompts, max_new_tokens=5)
    for r, n in zip(batched, counts):
        assert r.stats.visual_tokens_kept == expected_counts(n)
    singles = [session.generate([imgs[i]], [prompts[i]], max_new_tokens=5)[0].text for i in range(3)]
    assert [r.text for r in batched] == singles
    batch_scores = torch.tensor(session.answer_logprobs(imgs, prompts).logprobs)
    single_scores = torch.tensor([session.answer_logprobs([imgs[i]], [prompts[i]]).logprobs[0] for i in range(3)])
    assert torch.allclose(batch_scores, single_scores, atol=1e-4)
    session.close()


# -- budget=rank: the keep count of each stage comes from the rank of the raters' attention --------------------------

def _hand_raters(embeds: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Rater positions of one unpadded row, straight from the paper: text tokens after the image whose relevance
    (softmax over text of <h_v, h_t>, mean over visual tokens v) is above the mean relevance."""
    last_image = int(image.nonzero().max())
    text = torch.arange(last_image + 1, embeds.shape[0])
    sim = embeds[image].float() @ embeds[text].float().T
    relevance = sim.softmax(-1).mean(0)
    return text[relevance > relevance.mean()]


def _eager_head_mean_attention(session, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(n, n) attention probabilities of decoder layer `layer` on its input x (1, n, d), mean over heads, recomputed
    with the eager implementation; tokens sit at rotary `positions` (n,) and attend causally in sequence order."""
    decoder = session.adapter.decoder_layers[layer]
    n = x.shape[1]
    cos_sin = session.adapter.language_model.rotary_emb(x, positions[None])
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    session.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            _, weights = decoder.self_attn(decoder.input_layernorm(x), position_embeddings=cos_sin,
                                           attention_mask=torch.zeros(1, 1, n, n).masked_fill(~causal, -1e9))
    finally:
        session.model.set_attn_implementation({"text_config": "sdpa"})
    return weights[0].float().mean(0)


def test_rank_budget_keep_counts_equal_an_eager_rank_recomputation(session, images, prompts):
    """Both stages keep min(int(scale * rank(P)), L_v - 1) visual tokens, P = the hand-picked raters' eager
    head-mean attention over the current visual tokens of the scoring layer (recomputed here, not read from the
    method)."""
    layers = session.adapter.decoder_layers
    captured = {}

    def grab(name):
        def hook(module, args, kwargs):
            captured[name] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    scale = 2.0
    probes = [layers[0].register_forward_pre_hook(grab("embeds"), with_kwargs=True),
              layers[1].register_forward_pre_hook(grab("x1"), with_kwargs=True)]
    try:
        handle = session.apply(f"sparsevlm:budget=rank,rank_scale={scale},layers=1/2,recycle=false")
        probes.append(layers[2].register_forward_pre_hook(grab("x2"), with_kwargs=True))  # after the drop
        inputs = session.prepare(images[:1], prompts[:1])
        forward_logits(session, inputs)
        kept1, valid1 = handle.impl.dropper.index_at(2)
        kept2, valid2 = handle.impl.dropper.index_at(3)
    finally:
        for p in probes:
            p.remove()
    assert valid1 is None and valid2 is None
    image = inputs["input_ids"][0] == session.adapter.image_token_id
    raters = _hand_raters(captured["embeds"][0], image)
    assert 0 < raters.numel() < 64

    # Stage 1, scoring layer 1: the full sequence.
    n = image.numel()
    attn = _eager_head_mean_attention(session, 1, captured["x1"], torch.arange(n))
    image_pos = image.nonzero().squeeze(1)
    rank1 = int(torch.linalg.matrix_rank(attn[raters][:, image_pos]))
    expected1 = min(int(scale * rank1), 63)
    kept1 = kept1[0]
    assert int(image[kept1].sum()) == expected1
    # The kept ones are the raters' top visual tokens.
    score = attn[raters][:, image_pos].mean(0)
    top = image_pos[torch.sort(score, descending=True, stable=True).indices[:expected1]]
    assert set(top.tolist()) == set(kept1[image[kept1]].tolist())

    # Stage 2, scoring layer 2: the kept tokens at their original positions.
    attn2 = _eager_head_mean_attention(session, 2, captured["x2"], kept1)
    is_image = image[kept1]
    rater_rows = torch.tensor([int((kept1 == r).nonzero()) for r in raters.tolist()])
    rank2 = int(torch.linalg.matrix_rank(attn2[rater_rows][:, is_image]))
    expected2 = expected1 if rank2 >= expected1 else min(int(scale * rank2), expected1 - 1)
    assert int(image[kept2[0]].sum()) == expected2
    assert handle.impl.last_ranks[1].tolist() == [rank1] and handle.impl.last_ranks[2].tolist() == [rank2]


def test_rank_budget_changes_output_batches_like_single_runs_and_removes_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    schedule = session.apply("sparsevlm")
    scheduled = forward_logits(session, inputs)
    schedule.remove()
    handle = session.apply("sparsevlm:budget=rank,rank_scale=2")
    pruned = forward_logits(session, inputs)
    assert not torch.allclose(pruned[:, -1], base[:, -1])
    assert pruned.shape != scheduled.shape or not torch.allclose(pruned[:, -1], scheduled[:, -1])

    batched = session.generate(images, prompts, max_new_tokens=6)
    batch_scores = torch.tensor(session.answer_logprobs(images, prompts, ["yes", "no"]).logprobs)
    ranks = {layer: r.tolist() for layer, r in handle.impl.last_ranks.items()}
    for i in range(3):
        single = session.generate([images[i]], [prompts[i]], max_new_tokens=6)[0]
        assert single.text == batched[i].text
        assert single.stats.visual_tokens_kept == batched[i].stats.visual_tokens_kept
        single_scores = torch.tensor(session.answer_logprobs([images[i]], [prompts[i]], ["yes", "no"]).logprobs[0])
        assert torch.allclose(single_scores, batch_scores[i], atol=1e-4)
        assert {layer: r.tolist() for layer, r in handle.impl.last_ranks.items()} == {
            layer: [r[i]] for layer, r in ranks.items()}
    # Different prompts get different ranks, hence different budgets.
    assert len({tuple(r.stats.visual_tokens_kept) for r in batched}) > 1

    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert all(not layer._forward_pre_hooks for layer in session.adapter.decoder_layers)


def test_rank_keep_count_rule_and_budget_validation():
    from mmkit.pruning.sparsevlm import rank_keep_count

    assert rank_keep_count(16, 64, 2.0, 0.0) == 32
    assert rank_keep_count(16, 64, 13.5, 0.0) == 63      # never more than L_v - 1 while rank < L_v
    assert rank_keep_count(20, 576, 9.0, 6.0) == 186
    assert rank_keep_count(20, 576, 0.8, 0.0) == 16
    assert rank_keep_count(10, 10, 0.8, 0.0) == 10       # full column rank: the stage keeps everything
    cfg = SparseVLMConfig(budget="rank")
    assert (cfg.rank_scale, cfg.rank_bias) == (13.5, 0.0)
    assert SparseVLMConfig(budget="rank", layers=(1, 2)).layers == (1, 2)
    for bad in [dict(budget="adaptive"), dict(budget="rank", rank_scale=0.0), dict(budget="rank", rank_bias=-1.0),
                dict(budget="rank", rank_scale=float("nan")), dict(rank_scale=9.0),
                dict(budget="rank", keep=(0.5, 0.3, 0.1))]:
        with pytest.raises(ValueError):
            SparseVLMConfig(**bad)
