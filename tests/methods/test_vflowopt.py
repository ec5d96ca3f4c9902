import json

import pytest
import torch
from click.testing import CliRunner

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.registry import parse_spec
from mmkit.pruning.vflowopt import (
    SHIPPED_TUNED,
    VFlowOptConfig,
    importance_scores,
    patch_entropy,
    vflowopt_plan,
    visual_share,
)
from mmkit.tuning.vflowopt import save_config, tune_vflowopt

N = 64


def test_keeping_every_token_is_identical_to_baseline(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply("vflowopt:vision_keep=1.0,llm_keep=1.0/1.0")
    try:
        assert torch.equal(forward_logits(session, inputs), base)
    finally:
        handle.remove()


def test_pruning_changes_logits_and_remove_restores_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply("vflowopt:vision_keep=0.5,merge_cell=0.5,threshold=2,llm_keep=0.5/0.5")
    pruned = forward_logits(session, inputs)
    assert pruned.shape[1] == base.shape[1] - (N - 8)  # 64 -> 32 (vision) -> 16 -> 8 (layers 1 and 2)
    assert not torch.allclose(pruned[:, -1], base[:, -1])
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert session.model.config.text_config._attn_implementation == "sdpa"
    assert not any(layer._forward_pre_hooks for layer in session.adapter.decoder_layers)


def test_stats_follow_the_vision_and_llm_stages(session, images, prompts):
    session.apply("vflowopt:vision_keep=0.5,merge_cell=0,llm_keep=0.5/0.5,entropy_weight=0.5")
    for r in session.generate(images, prompts, max_new_tokens=4):
        assert r.stats.visual_tokens == N
        assert r.stats.visual_tokens_kept == [32, 16, 8, 8]  # stages at layers 1 and 2 of 4


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    session.apply("vflowopt:vision_keep=0.4,merge_cell=0.3,threshold=1.5,llm_keep=0.7/0.6,entropy_weight=0.3")
    batched = session.generate(images, prompts, max_new_tokens=8)
    batch_scores = session.answer_logprobs(images, prompts).logprobs
    for i in range(3):
        assert session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0].text == batched[i].text
        single = session.answer_logprobs([images[i]], [prompts[i]]).logprobs[0]
        assert torch.allclose(torch.tensor(single), torch.tensor(batch_scores[i]), atol=1e-4)


def test_prune_and_recycle_plan():
    torch.manual_seed(0)
    grid, n = 4, 16
    tokens = torch.randn(1, n, 3)
    scores = torch.rand(1, n)
    plan, recycling, slot_scores = vflowopt_plan(scores, grid, vision_keep=0.5, merge_cell=0.5,
                                                 cls_in_features=False)
    merged = recycling.apply(tokens)
    # Budget 8 = 4 top tokens + one merged token per 2 x 2 cell.
    top = set(torch.topk(scores[0], 4).indices.tolist())
    order = plan.order[0].tolist()
    assert order == sorted(order) and top <= set(order) and len(order) == 8
    assert plan.features is None  # nothing is merged before the projector
    for cell in range(4):
        members = [j for j in range(n) if (j // grid // 2) * 2 + (j % grid) // 2 == cell and j not in top]
        place = max(members, key=lambda j: float(scores[0, j]))
        assert place in order
        w = scores[0, members] + 1e-6
        expected = (w[:, None] * tokens[0, members]).sum(0) / w.sum()
        assert torch.allclose(merged[0, place], expected, atol=1e-6)
    untouched = [j for j in range(n) if j in top]
    assert torch.equal(merged[0, untouched], tokens[0, untouched])
    assert torch.equal(slot_scores[0], scores[0, order])


def test_recycling_merges_projected_tokens_and_renumbers_positions(session, images, prompts):
    """End to end against a sequence built by hand: project every patch with the plain projector, merge the
    projected tokens per the plan, feed [text, kept image tokens, text] numbered 0..m-1 and compare logits."""
    inputs = session.prepare(images[:1], prompts[:1])
    model = session.model
    projector = model.model.multi_modal_projector
    captured = {}
    hook = projector.register_forward_pre_hook(lambda m, args: captured.setdefault("features", args[0]))
    handle = session.apply("vflowopt:vision_keep=0.5,merge_cell=0.5,threshold=2,llm_keep=1.0/1.0")
    impl = handle.impl
    method_scores = impl._scores
    impl._scores = lambda features: captured.setdefault("scores", method_scores(features))
    try:
        got = forward_logits(session, inputs)[0, -1]
    finally:
        handle.remove()
        hook.remove()
    plan, recycling, _ = vflowopt_plan(captured["scores"], impl.grid, 0.5, 0.5, cls_in_features=False)
    assert recycling is not None and bool(recycling.used.any())
    ids = inputs["input_ids"][0]
    image_pos = (ids == session.adapter.image_token_id).nonzero().flatten()
    start, end = int(image_pos[0]), int(image_pos[-1]) + 1
    with torch.inference_mode():
        projected = projector(captured["features"])
        image_tokens = recycling.apply(projected)[0, plan.order[0]]
        embeds = model.get_input_embeddings()(ids[None])[0]
        seq = torch.cat([embeds[:start], image_tokens, embeds[end:]])[None]
        ref = model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]).logits[0, -1]
        # Merging before the projector (the earlier behaviour) gives a different answer on this model.
        early = projector(recycling.apply(captured["features"]))[0, plan.order[0]]
        seq_early = torch.cat([embeds[:start], early, embeds[end:]])[None]
        ref_early = model(inputs_embeds=seq_early, position_ids=torch.arange(seq.shape[1])[None]).logits[0, -1]
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(got, ref_early, atol=1e-5)


def test_original_positions_stay_available(session, images, prompts):
    inputs = session.prepare(images[:1], prompts[:1])
    spec = "vflowopt:vision_keep=0.5,merge_cell=0,threshold=2,llm_keep=1.0/1.0"
    handle = session.apply(spec)
    contiguous = forward_logits(session, inputs)[0, -1]
    handle.remove()
    handle = session.apply(spec + ",positions=original")
    original = forward_logits(session, inputs)[0, -1]
    handle.remove()
    assert not torch.allclose(contiguous, original)


def test_untuned_model_gets_a_warning(session, caplog, tmp_path):
    with caplog.at_level("WARNING", logger="mmkit.pruning.vflowopt"):
        session.apply("vflowopt").remove()
    assert "tuned for llava-onevision-qwen2-7b-ov, not tiny-random" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmkit.pruning.vflowopt"):
        session.apply("vflowopt:tuned_for=tiny-random").remove()
        session.apply("vflowopt:config=reference-0.25,llm_layers=1/2").remove()
    assert caplog.text.count("tuned for") == 1 and "tuned for reference, not tiny-random" in caplog.text


def test_importance_matches_eager_attention(session, images, prompts):
    from mmkit.patching.pre_llm import VisionLayerCapture, feature_layer_index

    inputs = session.prepare(images, prompts)
    layer = feature_layer_index(session.adapter)
    capture = VisionLayerCapture(session.adapter, layer)
    tower = session.adapter.vision_tower
    original = tower.config._attn_implementation
    try:
        tower.set_attn_implementation("eager")  # reference only
        with torch.inference_mode():
            attn = tower(inputs["pixel_values"], output_attentions=True).attentions[layer].mean(1)
        q, k, _ = capture.take()
    finally:
        tower.set_attn_implementation(original)
        capture.remove()
    got = importance_scores(q, k, capture.num_heads, capture.scale, threshold=1.5)
    for i in range(3):
        received = attn[i].mean(0)
        glob = (received > 1.5 * received.mean()).nonzero().flatten().tolist()
        glob = sorted(set(glob) | {0})
        assert torch.allclose(got[i], attn[i][glob].mean(0), atol=1e-5)


def test_patch_entropy():
    pixels = torch.zeros(1, 3, 4, 4)
    pixels[0, :, :2, 2:] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # top-right patch: half dark, half bright
    pixels[0, :, 2:, :2] = 1.0                                       # bottom-left patch: flat
    entropy = patch_entropy(pixels, 2)
    assert torch.allclose(entropy, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_budget_accounting():
    assert visual_share(0.265, (9, 18), (0.983, 0.877), 28) == pytest.approx(0.25, abs=0.002)
    assert visual_share(0.5, (1, 2), (0.5, 0.5), 4) == pytest.approx((0.5 + 0.25 + 2 * 0.125) / 4)


def test_config_validation(session):
    with pytest.raises(MmkitError, match="vision_keep"):
        session.apply("vflowopt:vision_keep=0")
    with pytest.raises(MmkitError, match="same length"):
        session.apply("vflowopt:llm_layers=1/2,llm_keep=0.5")
    with pytest.raises(MmkitError, match="strictly increasing"):
        session.apply("vflowopt:llm_layers=2/1")
    with pytest.raises(MmkitError, match="past the last decoder layer"):
        session.apply("vflowopt:llm_layers=1/4")
    with pytest.raises(MmkitError, match="do not fit"):
        session.apply("vflowopt:llm_keep=0.9/0.9/0.9/0.9")
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("vflowopt")
        session.apply("fastv")


def test_config_file_errors(session, tmp_path):
    with pytest.raises(MmkitError, match="does not exist"):
        session.apply(f"vflowopt:config={tmp_path / 'missing.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MmkitError, match="not valid JSON"):
        session.apply(f"vflowopt:config={bad}")
    bad.write_text(json.dumps({"method": "visionzip", "config": {}}))
    with pytest.raises(MmkitError, match="not a vflowopt config"):
        session.apply(f"vflowopt:config={bad}")
    bad.write_text(json.dumps({"method": "vflowopt", "config": {"ratio": 1}}))
    with pytest.raises(MmkitError, match="unknown vflowopt fields: ratio"):
        session.apply(f"vflowopt:config={bad}")
    bad.write_text(json.dumps({"method": "vflowopt", "config": {"vision_keep": 2.0}}))
    with pytest.raises(MmkitError, match="vision_keep must be in"):
        session.apply(f"vflowopt:config={bad}")


def _last_prompt_hidden(session, images, prompts) -> torch.Tensor:
    """Final hidden state of each row's last prompt token, float32, from one batched forward."""
    captured = []
    hook = session.adapter.language_model.register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state[:, -1].float()))
    try:
        with torch.inference_mode():
            session.model(**session.prepare(images, prompts), use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[0]


def test_tuning_is_reproducible_meets_the_budget_and_round_trips(session, images, prompts, tmp_path):
    calibration = (images, prompts)
    config, record = tune_vflowopt(session, 0.3, trials=6, startup_trials=3, seed=3, calibration=calibration)
    again, _ = tune_vflowopt(session, 0.3, trials=6, startup_trials=3, seed=3, calibration=calibration)
    assert config == again
    assert config.tuned_for == "tiny-random"
    assert record["achieved_share"] == pytest.approx(0.3, abs=1e-6)
    assert record["sampler"].startswith("optuna") and record["startup_trials"] == 3
    assert len(record["history"]) == 6 and record["distance"] == min(h["distance"] for h in record["history"])
    assert not session.methods
    path = tmp_path / "vflowopt.json"
    save_config(path, config, record, "tiny-random")
    reference = _last_prompt_hidden(session, images, prompts)
    handle = session.apply(f"vflowopt:config={path}")
    loaded = handle.config
    for name in ("vision_keep", "threshold", "merge_cell", "entropy_weight", "llm_layers", "positions",
                 "tuned_for"):
        assert getattr(loaded, name) == getattr(config, name)
    assert loaded.llm_keep == pytest.approx(config.llm_keep)
    # The tuned setting reaches the recorded distance again (the tuner's objective, recomputed here).
    pruned = _last_prompt_hidden(session, images, prompts)
    distance = float((1.0 - torch.nn.functional.cosine_similarity(pruned, reference, dim=-1)).mean())
    assert distance == pytest.approx(record["distance"], rel=1e-4, abs=1e-6)
    assert distance > 0
    handle.remove()
    with pytest.raises(MmkitError, match="conflicts"):
        session.apply(f"vflowopt:config={path},vision_keep=0.99")


@pytest.mark.slow  # loads a model and renders calibration scenes
def test_tune_cli_writes_a_loadable_config(tmp_path):
    from mmkit.cli import main

    out = tmp_path / "cfg.json"
    result = CliRunner().invoke(main, ["tune", "vflowopt", "--model", "tiny-random", "--budget", "0.25", "--out",
                                       str(out), "--samples", "2", "--trials", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["method"] == "vflowopt" and data["tuning"]["budget"] == 0.25
    assert VFlowOptConfig(config=str(out)).vision_keep == data["config"]["vision_keep"]
    bad = CliRunner().invoke(main, ["tune", "vflowopt", "--model", "tiny-random", "--budget", "1.5", "--out",
                                    str(out), "--samples", "2", "--trials", "1", "--device", "cpu"])
    assert bad.exit_code == 2 and "budget must be in (0, 1]" in bad.output


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1])
def test_shipped_tuned_configs_meet_their_budget(budget):
    config = parse_spec(f"vflowopt:config=reference-{budget}")
    document = json.loads((SHIPPED_TUNED / f"reference-{budget}.json").read_text())
    assert document["model"] == "reference" and document["tuning"]["budget"] == budget
    assert visual_share(config.vision_keep, config.llm_layers, config.llm_keep, 4) == pytest.approx(budget, abs=1e-6)


def test_spec_of_a_tuned_config_names_the_file():
    from mmkit.registry import config_to_spec

    config = parse_spec("vflowopt:config=reference-0.25")
    assert config_to_spec(config) == "vflowopt:config=reference-0.25"
    assert parse_spec(config_to_spec(config)) == config
    assert config_to_spec(parse_spec("vflowopt:vision_keep=0.5")) == "vflowopt:vision_keep=0.5"


def test_tuning_without_optuna_says_how_to_install_it(session, images, prompts, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(ValueError, match=r"needs optuna: pip install 'mmkit-vlm\[tune\]'"):
        tune_vflowopt(session, 0.3, trials=1, calibration=(images, prompts))


# -- anyres tiles (tiny-random-next / -onevision: 28 px tiles of 2 x 2 patches, up to 2 x 2 high-resolution tiles) ----

ANYRES_PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]


@pytest.fixture(scope="module", params=["tiny-random-next", "tiny-random-onevision"])
def anyres_session(request):
    """LLaVA-NeXT (CLIP tiles with CLS) and LLaVA-OneVision (SigLIP tiles without CLS)."""
    import mmkit

    session = mmkit.load(request.param, device="cpu")
    yield session
    session.close()


@pytest.fixture(scope="module")
def anyres_images():
    import numpy as np

    rng = np.random.default_rng(0)
    # Square, tall and small-wide: different tile grids and different unpadding per row.
    return [(rng.random((h, w, 3)) * 255).astype("uint8") for h, w in ((336, 336), (504, 336), (120, 200))]


def _last_logits(session, inputs):
    with torch.inference_mode():
        return session.model(**inputs, use_cache=False).logits[:, -1]


def test_anyres_keep_all_is_identical_and_pruning_changes_and_remove_restores(anyres_session, anyres_images):
    session = anyres_session
    inputs = session.prepare(anyres_images, ANYRES_PROMPTS)
    base = _last_logits(session, inputs)
    handle = session.apply("vflowopt:vision_keep=1.0,llm_keep=1.0/1.0")
    assert torch.equal(_last_logits(session, inputs), base)
    handle.remove()
    for spec in ("vflowopt:vision_keep=0.5,merge_cell=0,llm_keep=1.0/1.0",       # vision stage alone
                 "vflowopt:vision_keep=0.5,merge_cell=1.0,llm_keep=0.7/0.6"):     # with recycling and LLM stages
        handle = session.apply(spec)
        results = session.generate(anyres_images, ANYRES_PROMPTS, max_new_tokens=2)
        assert not torch.allclose(_last_logits(session, inputs), base), spec
        handle.remove()
        for r in results:
            assert r.stats.visual_tokens_kept[0] < r.stats.visual_tokens, spec
    assert torch.equal(_last_logits(session, inputs), base)
    assert "get_image_features" not in session.model.model.__dict__
    assert not session.adapter.language_model._forward_pre_hooks


def _reference_vision_stage(session, inputs, vision_keep, threshold):
    """The image tokens VFlowOpt's vision stage (no recycling, no entropy term) should give each image, written out
    per tile with loops: attention recomputed from the feature layer's input with the eager formula, averaged over
    heads; global tokens = CLS (when the tower has one) plus tokens receiving more than `threshold` x the mean
    (without CLS and without such a token: the most attended one); a patch's score = mean attention the global
    tokens give it. Each tile keeps its round(vision_keep x visible) best patches among those surviving
    unpadding (transformers' `unpad_image` on a grid of patch coordinates); image order, newline after every
    high-resolution row that keeps a patch."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    model = session.model
    cfg = model.config
    has_cls = session.adapter.has_cls_token
    off = 1 if has_cls else 0
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    tower = model.model.vision_tower
    sizes = inputs["image_sizes"]
    counts = [image_size_to_num_patches(s.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
              for s in sizes]
    pixels = torch.cat([inputs["pixel_values"][i, :c] for i, c in enumerate(counts)])
    with torch.inference_mode():
        out = tower(pixels, output_hidden_states=True)
        layers = getattr(tower, "vision_model", tower).encoder.layers
        layer = layers[len(layers) + cfg.vision_feature_layer]
        x = layer.layer_norm1(out.hidden_states[len(layers) + cfg.vision_feature_layer])
        q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
        hidden = out.hidden_states[cfg.vision_feature_layer]
        heads, scale = layer.self_attn.num_heads, layer.self_attn.scale
        d = q.shape[-1] // heads
        n_tok = q.shape[1]

        def scores_of(t):
            attn = [[0.0] * n_tok for _ in range(n_tok)]
            for h in range(heads):
                for i in range(n_tok):
                    row = torch.softmax(torch.stack([q[t, i, h * d:(h + 1) * d] @ k[t, j, h * d:(h + 1) * d]
                                                     for j in range(n_tok)]) * scale, 0)
                    for j in range(n_tok):
                        attn[i][j] += float(row[j]) / heads
            received = [sum(attn[i][j] for i in range(n_tok)) / n_tok for j in range(n_tok)]
            mean = sum(received) / n_tok
            glob = [j for j in range(n_tok) if received[j] > threshold * mean]
            if has_cls and 0 not in glob:
                glob = [0] + glob
            if not glob:
                glob = [max(range(n_tok), key=lambda j: received[j])]
            return [sum(attn[g][off + j] for g in glob) / len(glob) for j in range(side * side)]

        def project(v):
            return model.model.multi_modal_projector(v[None, None])[0, 0]

        def kept(t, visible):
            budget = min(len(visible), max(1, round(vision_keep * len(visible))))
            score = scores_of(t)
            return set(sorted(visible, key=lambda j: -score[j])[:budget])

        images, first = [], 0
        for i, size in enumerate(sizes.tolist()):
            rows_t, cols_t = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            grid = torch.stack(torch.meshgrid(torch.arange(rows_t * side), torch.arange(cols_t * side),
                                              indexing="ij")).float()
            grid = unpad_image(grid, size).long()
            visible = {}
            for r, c in zip(grid[0].flatten().tolist(), grid[1].flatten().tolist()):
                visible.setdefault(first + 1 + (r // side) * cols_t + c // side, []).append((r % side) * side + c % side)
            base = kept(first, list(range(side * side)))
            seq = [project(hidden[first, off + j]) for j in sorted(base)]
            keeps = {t: kept(t, v) for t, v in visible.items()}
            for r in range(grid.shape[1]):
                row = []
                for c in range(grid.shape[2]):
                    gr, gc = int(grid[0, r, c]), int(grid[1, r, c])
                    tile = first + 1 + (gr // side) * cols_t + gc // side
                    j = (gr % side) * side + gc % side
                    if j in keeps[tile]:
                        row.append(project(hidden[tile, off + j]))
                seq += row + ([model.model.image_newline] if row else [])
            images.append(torch.stack(seq))
            first += counts[i]
    return images


def test_anyres_vision_stage_keeps_the_top_visible_patches_of_every_tile(anyres_session, anyres_images):
    """Every embedding the language model receives equals a per-tile written-out vision stage, for three images
    of different sizes in one left-padded batch."""
    session = anyres_session
    inputs = session.prepare(anyres_images, ANYRES_PROMPTS)
    threshold = 1.5
    expected = _reference_vision_stage(session, inputs, 0.5, threshold)
    seen = {}

    def grab(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], mask=kwargs["attention_mask"])

    handle = session.apply(f"vflowopt:vision_keep=0.5,merge_cell=0,threshold={threshold},llm_keep=1.0/1.0,"
                           "entropy_weight=0")
    hook = session.adapter.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _last_logits(session, inputs)
    finally:
        hook.remove()
        handle.remove()
    embed = session.model.get_input_embeddings()
    image_id = session.adapter.image_token_id
    with torch.inference_mode():
        for row in range(3):
            ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
            is_image = (ids == image_id).nonzero().flatten()
            start, end = int(is_image[0]), int(is_image[-1]) + 1
            assert expected[row].shape[0] < end - start
            want = torch.cat([embed(ids[:start]), expected[row], embed(ids[end:])])
            got = seen["embeds"][row][seen["mask"][row].bool()]
            assert got.shape == want.shape, row
            assert torch.allclose(got, want, atol=1e-5), row


def test_anyres_batch_of_different_images_equals_single_runs(anyres_session, anyres_images):
    session = anyres_session
    session.apply("vflowopt:vision_keep=0.5,merge_cell=1.0,threshold=1.5,llm_keep=0.7/0.6,entropy_weight=0.3")
    try:
        batch = session.generate(anyres_images, ANYRES_PROMPTS, max_new_tokens=4)
        scores = session.answer_logprobs(anyres_images, ANYRES_PROMPTS).logprobs
        for i in range(3):
            single = session.generate([anyres_images[i]], [ANYRES_PROMPTS[i]], max_new_tokens=4)[0]
            assert single.text == batch[i].text
            one = session.answer_logprobs([anyres_images[i]], [ANYRES_PROMPTS[i]]).logprobs[0]
            assert torch.allclose(torch.tensor(one), torch.tensor(scores[i]), atol=1e-4)
    finally:
        session.remove_all()
