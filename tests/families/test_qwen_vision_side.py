"""VisionZip and VFlowOpt on the Qwen-VL families (tiny Qwen2-VL, Qwen2.5-VL with a windowed block, Qwen3-VL with
DeepStack): the CLS-free scores against an eager recompute of the tower's attention, the kept tokens against a
direct per-image implementation and against an eager run that masks the dropped tokens' keys (so kept tokens keep
their 3-D rotary positions row by row), kept counts, batch = single runs, the no-op setting and `remove()`.

The batch is three rows of different prompts, left padded, with images of three sizes (16, 12 and 15 visual
tokens on the tiny models).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mmkit
from mmkit.patching.native import NativeVisionCapture, native_scores
from mmkit.pruning.vflowopt import VFlowOptConfig

from families_lib import assert_batch_equals_single, family_images
from test_token_drop_oracle import _generate_scores, _mask_keys_hook

QWEN = ["tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl", "tiny-random-qwen3-vl"]
PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]
SPECS = ["visionzip:dominant=3,contextual=2", "visionzip:keep=0.4",
         "vflowopt:vision_keep=0.5,merge_cell=0.5,llm_keep=0.7/0.6",
         "vflowopt:vision_keep=0.4,merge_cell=0.4,entropy_weight=0.5,llm_keep=0.8"]
NO_OP = ["visionzip:keep=1.0", "vflowopt:vision_keep=1.0,llm_keep=1.0/1.0"]


@pytest.fixture(scope="module", params=QWEN)
def qwen(request):
    session = mmkit.load(request.param, device="cpu")
    yield request.param, session
    session.close()


def _logits(session, inputs):
    with torch.inference_mode():
        return session.model(**inputs, use_cache=False).logits[:, -1]


def _expected_kept(spec: str, counts: list[int]) -> list[int]:
    """Visual tokens each image keeps before the LLM, from the setting (merged tokens included)."""
    if spec.startswith("visionzip"):
        if "keep=" in spec:
            return [min(n, max(1, round(0.4 * n))) for n in counts]
        return [min(n, 5) for n in counts]
    return None  # VFlowOpt: up to the budget, fewer when a recycling cell has no dropped token


@pytest.mark.parametrize("spec", SPECS)
def test_qwen_visionzip_vflowopt_change_outputs_keep_counts_and_remove_restores(qwen, spec):
    name, session = qwen
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    counts = (inputs["input_ids"] == session.adapter.image_token_id).sum(1).tolist()
    assert len(set(counts)) == 3
    base = _logits(session, inputs)
    handle = session.apply(spec)
    try:
        logits = _logits(session, inputs)
        kept = session.context.visual_per_layer[0].tolist()
        expected = _expected_kept(spec, counts)
        if expected is not None:
            assert kept == expected
        else:
            # The top (budget - cells) plus one recycled token per cell that lost a token (the paper's rule: a
            # grid with more cells than the budget keeps one token per cell).
            keep = float(spec.split("vision_keep=")[1].split(",")[0])
            cell = float(spec.split("merge_cell=")[1].split(",")[0])
            grids = [(h // 2, w // 2) for _, h, w in inputs["image_grid_thw"].tolist()]
            for k, n, (rows, cols) in zip(kept, counts, grids):
                budget = min(n, max(1, round(keep * n)))
                cells = math.ceil(rows / max(1, round(cell * rows))) * math.ceil(cols / max(1, round(cell * cols)))
                assert 1 <= k <= max(budget, cells) and k < n
        assert (logits - base).abs().max() > 1e-4, f"{spec} changed nothing on {name}"
    finally:
        handle.remove()
    assert torch.equal(_logits(session, inputs), base)


@pytest.mark.parametrize("spec", SPECS[::2] + SPECS[1:2])
def test_qwen_visionzip_vflowopt_batch_equals_single_runs(qwen, spec):
    name, session = qwen
    images = family_images()
    handle = session.apply(spec)
    try:
        inputs = session.prepare(images, PROMPTS)
        assert (inputs["attention_mask"] == 0).any(), "rows must be left padded"
        batch_logits = _logits(session, inputs)
        batch = session.generate(images, PROMPTS, max_new_tokens=3)
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            single = _logits(session, session.prepare([image], [prompt]))
            torch.testing.assert_close(batch_logits[i:i + 1], single, atol=1e-4, rtol=1e-4)
            assert session.generate([image], [prompt], max_new_tokens=3)[0].text == batch[i].text
    finally:
        handle.remove()


@pytest.mark.parametrize("spec", NO_OP)
def test_qwen_visionzip_vflowopt_keeping_everything_is_the_baseline(qwen, spec):
    name, session = qwen
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    base = _logits(session, inputs)
    base_text = [r.text for r in session.generate(images, PROMPTS, max_new_tokens=3)]
    handle = session.apply(spec)
    try:
        assert torch.equal(_logits(session, inputs), base)
        assert [r.text for r in session.generate(images, PROMPTS, max_new_tokens=3)] == base_text
    finally:
        handle.remove()


# -- independent references ----------------------------------------------------------------------------------------
def _tower_attention(session, inputs):
    """Eager recompute of the scoring block's attention with transformers' own rotary: per image (H, N, N) in the
    block's patch order, the block's pre-rotary keys (L, H, D), and the map from block groups to image order, read
    off the tower itself (which merged row of the last block's output becomes which visual token)."""
    module = __import__(type(session.model).__module__, fromlist=["apply_rotary_pos_emb_vision"])
    tower = session.adapter.vision_tower
    full = getattr(tower, "fullatt_block_indexes", None)
    block = tower.blocks[max(full) if full else len(tower.blocks) - 1]
    seen = {}

    def grab(mod, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], cu=kwargs["cu_seqlens"],
                    rope=kwargs["position_embeddings"])

    def grab_last(mod, args, output):
        seen["last"] = output

    def grab_tokens(mod, args, kwargs, output):
        seen["tokens"] = output.pooler_output

    hooks = [block.attn.register_forward_pre_hook(grab, with_kwargs=True),
             tower.blocks[-1].register_forward_hook(grab_last),
             tower.register_forward_hook(grab_tokens, with_kwargs=True)]
    try:
        _logits(session, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    attn = block.attn
    with torch.inference_mode():
        n = seen["hidden"].shape[0]
        q, k, _ = attn.qkv(seen["hidden"]).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = seen["rope"]
        q_rot, k_rot = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
    maps = []
    cu = seen["cu"].tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        qh, kh = q_rot[start:end].transpose(0, 1).float(), k_rot[start:end].transpose(0, 1).float()
        maps.append(torch.softmax(qh @ kh.transpose(-1, -2) * attn.scaling, dim=-1))
    with torch.inference_mode():
        merged = tower.merger(seen["last"])                 # block order
    tokens = seen["tokens"]                                 # the order the language model sees
    distance = torch.cdist(merged.float(), tokens.float())
    group_to_image = distance.argmin(1)
    assert torch.equal(group_to_image.sort().values, torch.arange(n // 4))   # a permutation, matched exactly
    assert float(distance.min(1).values.max()) < 1e-3   # the same rows (up to the merger run in another batch)
    if full:
        assert not torch.equal(group_to_image, torch.arange(n // 4))        # the windows really reorder groups
    return maps, k.float(), group_to_image


def _to_images(per_patch: torch.Tensor, group_to_image: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Block-order per-patch values -> per image per visual token (sum over its 4 patches, as a ranking)."""
    groups = per_patch.reshape(-1, 4, *per_patch.shape[1:]).sum(1)
    natural = torch.empty_like(groups)
    for g in range(groups.shape[0]):
        natural[int(group_to_image[g])] = groups[g]
    return list(torch.split(natural, counts))


@pytest.mark.parametrize("threshold", [None, 1.5])
def test_qwen_visionzip_vflowopt_scores_match_an_eager_recompute(qwen, threshold):
    """VisionZip's received attention (threshold None) and VFlowOpt's relevance from global tokens, per visual
    token, against the tower's attention recomputed eagerly per image."""
    name, session = qwen
    inputs = session.prepare(family_images(), PROMPTS)
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    maps, _, group_to_image = _tower_attention(session, inputs)
    per_patch = []
    for a in maps:
        avg = a.mean(0)                                   # over heads: (N, N)
        received = avg.mean(0)
        if threshold is None:
            per_patch.append(received)
        else:
            rows = [i for i in range(avg.shape[0]) if received[i] > threshold * received.mean()] or \
                [int(received.argmax())]
            per_patch.append(avg[rows].mean(0))
    expected = _to_images(torch.cat(per_patch), group_to_image, counts)
    capture = NativeVisionCapture(session.adapter)
    try:
        _logits(session, inputs)
        scores = native_scores(capture)
    finally:
        capture.remove()
    got = scores.received() if threshold is None else scores.global_relevance(threshold)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g * 4, e, atol=1e-6, rtol=1e-5)   # mean over the group vs sum


def _visual_tokens_seen(session, inputs, spec):
    """The image-slot embeddings (per row, in sequence order) the decoder receives with `spec`, and without it."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], mask=kwargs["attention_mask"])

    lm = session.adapter.language_model
    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _logits(session, inputs)
        image = inputs["input_ids"] == session.adapter.image_token_id
        base = [seen["embeds"][r][image[r]] for r in range(image.shape[0])]
        hook.remove()
        handle = session.apply(spec)
        hook = lm.register_forward_pre_hook(grab, with_kwargs=True)   # after the method's: sees the reduced input
        _logits(session, inputs)
        ctx = session.context
        slots = ctx.llm_image_mask
        got = [seen["embeds"][r][slots[r].to(seen["embeds"].device)] for r in range(slots.shape[0])]
        handle.remove()
    finally:
        hook.remove()
    return base, got


def test_qwen_visionzip_tokens_match_a_direct_per_image_implementation(qwen):
    """Dominant tokens by received attention, contextual targets every step-th remaining token, each other token
    joining its most cosine-similar target (keys before the rotary, averaged over heads and the 4 patches), target
    + mean of its joiners; kept tokens in image order."""
    name, session = qwen
    dominant, contextual = 3, 2
    inputs = session.prepare(family_images(), PROMPTS)
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    maps, keys, group_to_image = _tower_attention(session, inputs)
    scores = _to_images(torch.cat([a.mean(dim=(0, 1)) for a in maps]), group_to_image, counts)
    metric = _to_images(keys.mean(1), group_to_image, counts)
    base, got = _visual_tokens_seen(session, inputs, f"visionzip:dominant={dominant},contextual={contextual}")
    for i, (feats, score, m) in enumerate(zip(base, scores, metric)):
        n = feats.shape[0]
        dom = sorted(torch.topk(score, dominant).indices.tolist())
        rest = [j for j in range(n) if j not in dom]
        step = len(rest) // contextual
        targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
        others = [j for j in rest if j not in targets]
        m = m / m.norm(dim=-1, keepdim=True)
        joined = {t: [] for t in targets}
        for j in others:
            sims = [float(m[j] @ m[t]) for t in targets]
            joined[targets[sims.index(max(sims))]].append(j)
        out = {j: feats[j].float() for j in dom}
        for t in targets:
            extra = torch.stack([feats[j].float() for j in joined[t]]).mean(0) if joined[t] else 0.0
            out[t] = feats[t].float() + extra
        want = torch.stack([out[j] for j in sorted(out)]).to(feats.dtype)
        assert got[i].shape == want.shape, (name, i)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_qwen_vflowopt_tokens_match_a_direct_per_image_implementation(qwen):
    """Top (budget - cells) by relevance; per cell of the visual-token grid, the dropped tokens' relevance-weighted
    mean at the cell's most relevant dropped token."""
    name, session = qwen
    threshold, vision_keep, merge_cell = 1.5, 0.5, 0.5
    inputs = session.prepare(family_images(), PROMPTS)
    grids = [(h // 2, w // 2) for _, h, w in inputs["image_grid_thw"].tolist()]
    counts = [h * w for h, w in grids]
    maps, _, group_to_image = _tower_attention(session, inputs)
    per_patch = []
    for a in maps:
        avg = a.mean(0)
        received = avg.mean(0)
        rows = (received > threshold * received.mean()).nonzero().flatten()
        per_patch.append(avg[rows if rows.numel() else received.argmax().view(1)].mean(0))
    relevance = _to_images(torch.cat(per_patch), group_to_image, counts)
    config = VFlowOptConfig(vision_keep=vision_keep, threshold=threshold, merge_cell=merge_cell, llm_keep=())
    base, got = _visual_tokens_seen(session, inputs, config)
    for i, (feats, rel, (rows, cols)) in enumerate(zip(base, relevance, grids)):
        n = feats.shape[0]
        budget = round(vision_keep * n)
        ch, cw = max(1, round(merge_cell * rows)), max(1, round(merge_cell * cols))
        cells = math.ceil(rows / ch) * math.ceil(cols / cw)
        top = set(torch.topk(rel, budget - cells).indices.tolist())
        out = {j: feats[j].float() for j in top}
        for r0 in range(0, rows, ch):
            for c0 in range(0, cols, cw):
                members = [r * cols + c for r in range(r0, min(rows, r0 + ch)) for c in range(c0, min(cols, c0 + cw))]
                dropped = [j for j in members if j not in top]
                if not dropped:
                    continue
                weights = torch.stack([rel[j].clamp_min(0) + 1e-6 for j in dropped])
                place = max(dropped, key=lambda j: float(rel[j]))
                stacked = torch.stack([feats[j].float() for j in dropped])
                out[place] = (weights[:, None] * stacked).sum(0) / weights.sum()
        want = torch.stack([out[j] for j in sorted(out)]).to(feats.dtype)
        assert got[i].shape == want.shape, (name, i)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["visionzip:dominant=4,contextual=0", "vflowopt:vision_keep=0.4,merge_cell=0"])
def test_qwen_visionzip_vflowopt_drop_equals_eager_key_masking(spec):
    """Without merging, a vision-side drop equals an eager run of the same weights in which the dropped visual
    tokens' keys are masked in every decoder layer, every position unchanged: kept tokens keep their 3-D rotary
    positions, row by row (left padding, three image sizes), in the prefill and while decoding."""
    from mmkit.pruning.vflowopt import VFlowOptConfig as Cfg

    for name in QWEN:
        session = mmkit.load(name, device="cpu")
        model = session.model
        inputs = session.prepare(family_images(), PROMPTS)
        image = inputs["input_ids"] == session.adapter.image_token_id
        config = spec if spec.startswith("visionzip") else Cfg(vision_keep=0.4, merge_cell=0.0, llm_keep=())
        handle = session.apply(config)
        try:
            with torch.inference_mode():
                logits = model(**inputs).logits[:, -1]
            ctx = session.context
            kept = torch.zeros_like(image)
            for row in range(image.shape[0]):
                slots = ctx.llm_positions[row][ctx.llm_image_mask[row]]
                kept[row, slots] = True
            dropped = image & ~kept
            assert dropped.sum(1).min() > 0
            with torch.inference_mode():
                scores, tokens = _generate_scores(model, inputs)
        finally:
            handle.remove()
        reference = copy.deepcopy(model)
        reference.set_attn_implementation("eager")
        hooks = [layer.register_forward_pre_hook(_mask_keys_hook(dropped), with_kwargs=True)
                 for layer in reference.model.language_model.layers]
        with torch.inference_mode():
            ref_last = reference(**inputs).logits[:, -1]
            ref_scores, ref_tokens = _generate_scores(reference, inputs)
        for h in hooks:
            h.remove()
        torch.testing.assert_close(logits, ref_last, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(scores, ref_scores, atol=2e-4, rtol=1e-4)
        assert torch.equal(tokens, ref_tokens)
        with torch.inference_mode():
            plain = model(**inputs).logits[:, -1]
        assert (plain - ref_last).abs().max() > 1e-3, name   # the oracle is not vacuous
        session.close()


@pytest.mark.parametrize("pair", [("visionzip:keep=0.4", "vcd"), ("var:start_layer=1,tau=1.0", "vflowopt"),
                                  ("vflowopt:vision_keep=0.5,merge_cell=0.5,llm_keep=0.7", "vhr")])
def test_qwen_visionzip_vflowopt_compose_with_mitigation(qwen, pair):
    """With a mitigation method in the same session (either order): batched rows equal single rows, and removing
    both restores the model exactly (the composition suite runs every pair on Qwen2-VL; this covers the windowed
    Qwen2.5-VL tower and Qwen3-VL's DeepStack too)."""
    name, session = qwen
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    base = _logits(session, inputs)
    handles = [session.apply(spec) for spec in pair]
    try:
        assert_batch_equals_single(session, images, PROMPTS)
        assert min(session.context.visual_per_layer[-1].tolist()) < min(
            (inputs["input_ids"] == session.adapter.image_token_id).sum(1).tolist())
    finally:
        for handle in reversed(handles):
            handle.remove()
    assert torch.equal(_logits(session, inputs), base)


def test_qwen_visionzip_two_images_in_one_row_equal_eager_key_masking(qwen):
    """A row with two images of different sizes next to a row with one: each image keeps its own `dominant`
    tokens at their own 3-D positions (checked against eager key masking, as above)."""
    from PIL import Image

    name, session = qwen
    images = [Image.fromarray(x) for x in family_images()]
    one = session.chat_prompt("Compare them.")
    placeholder = next(t for t in ("<image>", "<|image_pad|>") if t in one)
    start = one.index(placeholder)
    span = one[one.rindex("<", 0, start):one.index(">", start + len(placeholder)) + 1]   # start + pad + end
    two = one.replace(span, span + span, 1)
    session.processor.tokenizer.padding_side = "left"
    inputs = dict(session.processor(images=images, text=[two, one], padding=True, return_tensors="pt"))
    image = inputs["input_ids"] == session.adapter.image_token_id
    assert image.sum(1).tolist() == [28, 15]
    handle = session.apply("visionzip:dominant=4,contextual=0")
    try:
        with torch.inference_mode():
            logits = session.model(**inputs).logits[:, -1]
        ctx = session.context
        kept = torch.zeros_like(image)
        for row in range(image.shape[0]):
            kept[row, ctx.llm_positions[row][ctx.llm_image_mask[row]]] = True
    finally:
        handle.remove()
    assert kept.sum(1).tolist() == [8, 4]
    reference = copy.deepcopy(session.model)
    reference.set_attn_implementation("eager")
    for layer in reference.model.language_model.layers:
        layer.register_forward_pre_hook(_mask_keys_hook(image & ~kept), with_kwargs=True)
    with torch.inference_mode():
        torch.testing.assert_close(logits, reference(**inputs).logits[:, -1], atol=2e-4, rtol=1e-4)
