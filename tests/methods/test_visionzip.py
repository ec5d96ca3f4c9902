import numpy as np
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


def test_shares_the_pre_llm_slot(session):
    session.apply("visionzip:keep=0.5")
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("visionzip:keep=0.25")


# -- anyres tiles (tiny-random-next/-onevision: 28 px tiles of 2 x 2 patches, up to 2 x 2 high-resolution tiles) --

NEXT_PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]


@pytest.fixture(scope="module", params=["tiny-random-next", "tiny-random-onevision"])
def next_session(request):
    """LLaVA-NeXT (CLIP tiles with CLS) and LLaVA-OneVision (SigLIP tiles without CLS)."""
    import mmkit

    session = mmkit.load(request.param, device="cpu")
    yield session
    session.close()


@pytest.fixture(scope="module")
def next_images():
    rng = np.random.default_rng(0)
    # Square, tall and small-wide: different tile grids and different unpadding per row.
    return [(rng.random((h, w, 3)) * 255).astype("uint8") for h, w in ((336, 336), (504, 336), (120, 200))]


def _next_logits(session, inputs):
    with torch.inference_mode():
        return session.model(**inputs, use_cache=False).logits[:, -1]


def test_llava_next_keep_all_is_identical_and_remove_restores(next_session, next_images):
    inputs = next_session.prepare(next_images, NEXT_PROMPTS)
    base = _next_logits(next_session, inputs)
    for spec in ("visionzip:keep=1.0", "visionzip:dominant=3,contextual=1"):  # all 4 patches of each tile
        handle = next_session.apply(spec)
        assert torch.equal(_next_logits(next_session, inputs), base), spec
        handle.remove()
    handle = next_session.apply("visionzip:keep=0.5")
    reduced = _next_logits(next_session, inputs)
    assert not torch.allclose(reduced, base)
    handle.remove()
    assert torch.equal(_next_logits(next_session, inputs), base)
    assert "get_image_features" not in next_session.model.model.__dict__
    assert not next_session.adapter.language_model._forward_pre_hooks


def test_llava_next_batch_of_different_images_equals_single_runs(next_session, next_images):
    handle = next_session.apply("visionzip:dominant=2,contextual=1")
    try:
        batch = next_session.generate(next_images, NEXT_PROMPTS, max_new_tokens=4)
        scores = next_session.answer_logprobs(next_images, NEXT_PROMPTS).logprobs
        for i in range(3):
            assert batch[i].stats.visual_tokens_kept[0] < batch[i].stats.visual_tokens
            single = next_session.generate([next_images[i]], [NEXT_PROMPTS[i]], max_new_tokens=4)[0]
            assert single.text == batch[i].text
            one = next_session.answer_logprobs([next_images[i]], [NEXT_PROMPTS[i]]).logprobs[0]
            assert torch.allclose(torch.tensor(one), torch.tensor(scores[i]), atol=1e-4)
    finally:
        handle.remove()


def _reference_anyres_images(model, inputs, dominant, contextual, has_cls):
    """The image tokens VisionZip should give each image, written out per tile with loops from the tower's hidden
    states (attention and keys recomputed from the feature layer's input with the eager formula). Unpadding comes
    from transformers' own `unpad_image` on a grid of patch coordinates. Nothing shared with mmkit's code.

    Per tile, over its patches that survive unpadding: if more than dominant + contextual survive, the CLS token,
    the dominant - 1 patches with the most CLS attention (without CLS: the dominant patches with the most attention
    received, averaged over heads and queries) and `contextual` merged tokens (every step-th remaining
    patch a target, each other joined to its most key-similar target, target + mean(joined)); else all of them.
    Image = base tile [CLS, dominant, contextual]; high-resolution dominant patches in grid order with the newline
    of each row that has one; the high-resolution tiles' CLS tokens; their contextual tokens.
    """
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    inner = model.model
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    tower = inner.vision_tower
    sizes = inputs["image_sizes"]
    counts = [image_size_to_num_patches(s.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
              for s in sizes]
    pixels = torch.cat([inputs["pixel_values"][i, :c] for i, c in enumerate(counts)])
    with torch.inference_mode():
        out = tower(pixels, output_hidden_states=True)
        encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
        li = len(encoder_layers) + cfg.vision_feature_layer   # the layer producing hidden_states[vision_feature_layer]
        layer = encoder_layers[li]
        x = layer.layer_norm1(out.hidden_states[li])
        q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
        hidden = out.hidden_states[cfg.vision_feature_layer]
        off = 1 if has_cls else 0                      # where the patches start among the tower's tokens
        heads = layer.self_attn.num_heads
        proj = inner.multi_modal_projector
        newline = inner.image_newline

        def project(v):
            return proj(v[None, None])[0, 0]

        def tile_plan(t, visible):
            """(kept patches in image order with their features, cls feature or None, contextual features)."""
            feats = {j: hidden[t, off + j] for j in visible}
            if len(visible) <= dominant + contextual:
                return feats, None, []
            d = q.shape[-1] // heads
            n_tok = k.shape[1]

            def attention_row(h, row):
                return torch.softmax(torch.stack([q[t, row, h * d:(h + 1) * d] @ k[t, c, h * d:(h + 1) * d]
                                                  for c in range(n_tok)]) * layer.self_attn.scale, 0)

            if has_cls:
                score = {j: sum(float(attention_row(h, 0)[1 + j]) for h in range(heads)) for j in visible}
            else:
                rows = [attention_row(h, r) for h in range(heads) for r in range(n_tok)]
                score = {j: sum(float(row[j]) for row in rows) / len(rows) for j in visible}
            dom = sorted(sorted(visible, key=lambda j: -score[j])[:dominant - (1 if has_cls else 0)])
            rest = [j for j in visible if j not in dom]
            step = max(1, len(rest) // contextual)
            targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
            others = [j for j in rest if j not in targets]
            unit = {j: k[t, off + j].view(heads, -1).mean(0) / k[t, off + j].view(heads, -1).mean(0).norm() for j in rest}
            joined = {tg: [] for tg in targets}
            for o in others:
                sims = [float(unit[o] @ unit[tg]) for tg in targets]
                joined[targets[sims.index(max(sims))]].append(o)
            ctx = [hidden[t, off + tg] + (sum(hidden[t, off + m] for m in joined[tg]) / len(joined[tg])
                                        if joined[tg] else 0) for tg in targets]
            return {j: feats[j] for j in dom}, (hidden[t, 0] if has_cls else None), ctx

        images, first = [], 0
        for i, size in enumerate(sizes.tolist()):
            rows_t, cols_t = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            grid = torch.stack(torch.meshgrid(torch.arange(rows_t * side), torch.arange(cols_t * side),
                                              indexing="ij")).float()
            grid = unpad_image(grid, size).long()               # (2, rows, cols): surviving patch coordinates
            visible = {}
            for r, c in zip(grid[0].flatten().tolist(), grid[1].flatten().tolist()):
                tile = first + 1 + (r // side) * cols_t + (c // side)
                visible.setdefault(tile, []).append((r % side) * side + (c % side))
            base_dom, base_cls, base_ctx = tile_plan(first, list(range(side * side)))
            seq = ([project(base_cls)] if base_cls is not None else []) + [project(v) for v in base_dom.values()]
            seq += [project(v) for v in base_ctx]
            plans = {t: tile_plan(t, sorted(v)) for t, v in visible.items()}
            for r in range(grid.shape[1]):
                row = []
                for c in range(grid.shape[2]):
                    gr, gc = int(grid[0, r, c]), int(grid[1, r, c])
                    tile = first + 1 + (gr // side) * cols_t + (gc // side)
                    j = (gr % side) * side + (gc % side)
                    if j in plans[tile][0]:
                        row.append(project(plans[tile][0][j]))
                seq += row + ([newline] if row else [])
            seq += [project(plans[t][1]) for t in sorted(plans) if plans[t][1] is not None]
            seq += [project(v) for t in sorted(plans) for v in plans[t][2]]
            images.append(torch.stack(seq))
            first += counts[i]
    return images


@pytest.mark.parametrize("name,has_cls", [("tiny-random-next", True), ("tiny-random-onevision", False)])
def test_anyres_tokens_match_a_direct_per_tile_implementation(name, has_cls, next_images):
    import mmkit

    session = mmkit.load(name, device="cpu")
    inputs = session.prepare(next_images, NEXT_PROMPTS)
    expected = _reference_anyres_images(session.model, inputs, dominant=2, contextual=1, has_cls=has_cls)
    seen = {}

    def grab(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], mask=kwargs["attention_mask"])

    session.apply("visionzip:dominant=2,contextual=1")
    hook = session.adapter.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _next_logits(session, inputs)
    finally:
        hook.remove()
    embed = session.model.get_input_embeddings()
    image_id = session.adapter.image_token_id
    with torch.inference_mode():
        for row in range(3):
            ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
            is_image = (ids == image_id).nonzero().flatten()
            start, end = int(is_image[0]), int(is_image[-1]) + 1
            assert expected[row].shape[0] < end - start     # something was dropped
            want = torch.cat([embed(ids[:start]), expected[row], embed(ids[end:])])
            got = seen["embeds"][row][seen["mask"][row].bool()]
            assert got.shape == want.shape, row
            assert torch.allclose(got, want, atol=1e-5), row
    session.close()


def test_onevision_grid_resized_after_projection_is_a_clear_error(next_images):
    """OneVision blends the patches of a grid larger than `anyres_max_N` tiles; such an image is refused in one
    line instead of keeping arbitrary blends."""
    import mmkit

    session = mmkit.load("tiny-random-onevision", device="cpu")
    session.model.config.vision_aspect_ratio = "anyres_max_1"   # the 2 x 2 grids of the tiny model get resized
    inputs = session.prepare(next_images[:1], NEXT_PROMPTS[:1])
    session.apply("visionzip:dominant=2,contextual=1")
    with pytest.raises(RuntimeError, match="resizes after projection"):
        _next_logits(session, inputs)
    session.close()
