"""DivPrune, CDPruner, random and pooling on LLaVA-NeXT, LLaVA-OneVision and Qwen2/2.5/3-VL, against independent
references.

Images of three sizes in one left-padded batch, so rows hold different numbers of visual tokens (anyres: different
tile grids and row newlines; Qwen-VL: different native grids). The references never call the code under test:
image tokens are found from `input_ids`, anyres newlines as the rows equal to the model's `image_newline`, Qwen
grids from `image_grid_thw`; the greedy, the draw and the window means are written out here; positions are checked
against an eager run of the same weights in which the dropped tokens' keys are masked at every layer.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mmkit
from mmkit.errors import MmkitError
from mmkit.pruning.random_prune import random_subset

from families_lib import FAMILY_BUILTINS, family_images
from test_token_drop_oracle import _generate_scores, _mask_keys_hook

PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]
METHODS = ("divprune", "cdpruner", "random", "pooling")


@pytest.fixture(scope="module", params=["tiny-random-next", *FAMILY_BUILTINS])
def fam(request):
    session = mmkit.load(request.param, device="cpu")
    yield request.param, session
    session.close()


def _lm_call(session, inputs):
    """(kwargs the language model received, after every method's hook; last-position logits) of one forward."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    handle = session.adapter.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            logits = session.model(**inputs, use_cache=False).logits[:, -1]
    finally:
        handle.remove()
    return seen, logits


def _images_of(session, inputs):
    """Per row (one image each): its image-token positions, projected rows (as the LLM receives them) and
    newline flags; plus the raster grids (start, rows, cols, stride) inside its tokens."""
    ids = inputs["input_ids"]
    seen, _ = _lm_call(session, inputs)
    embeds = seen["inputs_embeds"]
    out = []
    for row in range(ids.shape[0]):
        pos = (ids[row] == session.adapter.image_token_id).nonzero().flatten()
        feats = embeds[row, pos]
        newline = getattr(session.model.model, "image_newline", None)
        is_newline = (feats == newline.to(feats.dtype)).all(-1) if newline is not None else \
            torch.zeros(len(pos), dtype=torch.bool)
        out.append({"pos": pos, "feats": feats, "newline": is_newline,
                    "grids": _grids(session, inputs, row, is_newline)})
    return out


def _grids(session, inputs, row, is_newline):
    if "image_grid_thw" in inputs:
        t, h, w = inputs["image_grid_thw"][row].tolist()
        m = session.model.config.vision_config.spatial_merge_size
        size = (h // m) * (w // m)
        return [(f * size, h // m, w // m, w // m) for f in range(t)]
    vc = session.model.config.vision_config
    side = vc.image_size // vc.patch_size
    grids = [(0, side, side, side)]
    rows = int(is_newline[side * side:].sum())
    rest = len(is_newline) - side * side
    if rest > 1:
        grids.append((side * side, rows, rest // rows - 1, rest // rows))
    return grids


def _kept_positions(session):
    """Per row, the prompt positions of the image tokens the decoder read in the last prefill."""
    ctx = session.context
    valid = ctx.llm_attention_mask.bool() if ctx.llm_attention_mask is not None else torch.ones_like(ctx.llm_image_mask)
    return [ctx.llm_positions[r][ctx.llm_image_mask[r] & valid[r]].tolist() for r in range(ctx.llm_positions.shape[0])]


def _kept_under(session, inputs, spec):
    """The kept positions (`_kept_positions`) of one prefill with method `spec` applied, then removed."""
    handle = session.apply(spec)
    try:
        _lm_call(session, inputs)
        return _kept_positions(session)
    finally:
        handle.remove()


def _expected_count(method, image, keep=None, tokens=0):
    n = len(image["pos"])
    patches = n - int(image["newline"].sum())
    if method == "pooling":
        share = tokens / n if tokens else keep
        if share >= 1:
            return n
        scale = math.sqrt(share)
        count = 0
        for _, rows, cols, stride in image["grids"]:
            h, w = min(rows, max(1, round(rows * scale))), min(cols, max(1, round(cols * scale)))
            count += h * w + (h if stride > cols else 0)
        return count + (1 if len(image["grids"]) == 1 and bool(image["newline"].any()) else 0)
    k = min(tokens, n) if tokens else max(1, round(keep * n))
    if k >= n:
        return n
    return k if method == "divprune" else min(k, patches)


@pytest.mark.parametrize("method", METHODS)
def test_keeping_everything_is_the_baseline_and_remove_restores(fam, method):
    name, session = fam
    inputs = session.prepare(family_images(), PROMPTS)
    _, base = _lm_call(session, inputs)
    for spec in (f"{method}:keep=1.0", f"{method}:tokens=100000"):
        handle = session.apply(spec)
        assert torch.equal(_lm_call(session, inputs)[1], base), spec
        handle.remove()
    handle = session.apply(f"{method}:keep=0.3")
    changed = _lm_call(session, inputs)[1]
    handle.remove()
    assert (changed - base).abs().max() > 1e-3, f"{method} changed nothing on {name}"
    assert torch.equal(_lm_call(session, inputs)[1], base)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [{"keep": 0.5}, {"keep": 0.25}, {"tokens": 5}])
def test_kept_counts_per_image_follow_the_budget(fam, method, budget):
    name, session = fam
    inputs = session.prepare(family_images(), PROMPTS)
    images = _images_of(session, inputs)
    assert len({len(i["pos"]) for i in images}) > 1, "images of different sizes must give different counts"
    spec = f"{method}:" + ",".join(f"{k}={v}" for k, v in budget.items())
    handle = session.apply(spec)
    try:
        _lm_call(session, inputs)
        kept = session.context.visual_per_layer[0].tolist()
    finally:
        handle.remove()
    assert kept == [_expected_count(method, i, **budget) for i in images], spec


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_different_prompts_equals_single_runs(fam, method):
    name, session = fam
    images = family_images()
    handle = session.apply(f"{method}:keep=0.4")
    try:
        batch_inputs = session.prepare(images, PROMPTS)
        _, batch = _lm_call(session, batch_inputs)
        texts = [r.text for r in session.generate(images, PROMPTS, max_new_tokens=3)]
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            _, single = _lm_call(session, session.prepare([image], [prompt]))
            torch.testing.assert_close(batch[i], single[0], atol=1e-4, rtol=1e-4)
            assert session.generate([image], [prompt], max_new_tokens=3)[0].text == texts[i]
    finally:
        handle.remove()


def _plain_maxmin(x: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min diversity, written out: D = 1 - cos; first the token whose nearest other token is farthest,
    then each step the token whose distance to its nearest picked token is largest (first index on ties)."""
    unit = [v / v.norm() for v in x.double()]
    n = len(unit)
    # One dot product per pair: identical tokens (anyres newlines) get bit-identical distances, so ties are ties.
    dist = [[1.0 - float(torch.dot(unit[i], unit[j])) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: (min(dist[i][p] for p in picks), -i)))
    return sorted(picks)


def test_divprune_keeps_the_plain_greedy_of_each_images_tokens(fam):
    name, session = fam
    inputs = session.prepare(family_images(), PROMPTS)
    images = _images_of(session, inputs)
    kept = _kept_under(session, inputs, "divprune:keep=0.3")
    for row, image in enumerate(images):
        # Every token of the packed image is a candidate, newlines included (the released LLaVA-1.6 path).
        k = max(1, round(0.3 * len(image["pos"])))
        assert kept[row] == image["pos"][_plain_maxmin(image["feats"], k)].tolist()


def test_random_draws_over_each_images_patch_tokens(fam):
    name, session = fam
    inputs = session.prepare(family_images(), PROMPTS)
    images = _images_of(session, inputs)
    kept = _kept_under(session, inputs, "random:keep=0.4,seed=3")
    for row, image in enumerate(images):
        patches = (~image["newline"]).nonzero().flatten()
        k = min(max(1, round(0.4 * len(image["pos"]))), len(patches))
        assert kept[row] == image["pos"][patches[random_subset(len(patches), k, 3)]].tolist()


def test_pooling_averages_windows_of_every_grid(fam):
    """Each grid is pooled by adaptive windows; the average sits in the window's central token's slot (its place
    and position), and a newline-ended grid keeps the newline of each pooled row's central row."""
    name, session = fam
    inputs = session.prepare(family_images(), PROMPTS)
    images = _images_of(session, inputs)
    handle = session.apply("pooling:keep=0.25")
    try:
        seen, _ = _lm_call(session, inputs)
        kept = _kept_positions(session)
        ctx = session.context
        reduced = [seen["inputs_embeds"][r][ctx.llm_image_mask[r] & (ctx.llm_attention_mask[r].bool()
                                                                    if ctx.llm_attention_mask is not None else True)]
                   for r in range(len(images))]
    finally:
        handle.remove()
    for row, image in enumerate(images):
        feats = image["feats"].double()
        expected = {}
        for start, rows, cols, stride in image["grids"]:
            h, w = max(1, round(rows * 0.5)), max(1, round(cols * 0.5))
            for i in range(h):
                r0, r1 = (i * rows) // h, -(-((i + 1) * rows) // h)
                centre_row = (r0 + r1 - 1) // 2
                for j in range(w):
                    c0, c1 = (j * cols) // w, -(-((j + 1) * cols) // w)
                    window = [start + r * stride + c for r in range(r0, r1) for c in range(c0, c1)]
                    expected[start + centre_row * stride + (c0 + c1 - 1) // 2] = feats[window].mean(0)
                if stride > cols:
                    expected[start + centre_row * stride + cols] = feats[start + centre_row * stride + cols]
        for slot in image["newline"].nonzero().flatten().tolist():
            if not any(s <= slot < s + r * st for s, r, _, st in image["grids"]):
                expected[slot] = feats[slot]                  # a base-only image's closing newline
        slots = sorted(expected)
        assert kept[row] == image["pos"][slots].tolist()
        torch.testing.assert_close(reduced[row].double(), torch.stack([expected[s] for s in slots]),
                                   atol=1e-5, rtol=1e-5)


def test_kept_tokens_keep_their_positions_like_eager_key_masking(fam):
    """With positions kept (Qwen-VL: always, 3-D), dropping tokens before the LLM equals an eager run of the same
    weights in which the dropped tokens' keys are masked at every layer: prefill and three greedy decode steps."""
    from mmkit.session import Session

    name, session = fam
    inputs = session.prepare(family_images(), PROMPTS)
    assert (inputs["attention_mask"] == 0).any(), "rows must be left padded"
    images = _images_of(session, inputs)
    dropped = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for row, image in enumerate(images):
        patches = (~image["newline"]).nonzero().flatten()
        k = min(max(1, round(0.5 * len(image["pos"]))), len(patches))
        dropped[row, image["pos"]] = True
        dropped[row, image["pos"][patches[random_subset(len(patches), k, 0)]]] = False

    reference = copy.deepcopy(session.model)
    reference.set_attn_implementation("eager")
    layers = reference.model.language_model.layers
    hooks = [layer.register_forward_pre_hook(_mask_keys_hook(dropped), with_kwargs=True) for layer in layers]
    with torch.inference_mode():
        ref_last = reference(**inputs).logits[:, -1]
        ref_scores, ref_tokens = _generate_scores(reference, inputs)
    for hook in hooks:
        hook.remove()

    model = copy.deepcopy(session.model)
    other = Session(model, session.processor, name)
    try:
        other.apply("random:keep=0.5,seed=0,positions=original")
        with torch.inference_mode():
            logits = model(**inputs).logits
            scores, tokens = _generate_scores(model, inputs)
    finally:
        other.close()
    assert logits.shape[1] < inputs["input_ids"].shape[1]
    assert (_lm_call(session, inputs)[1] - ref_last).abs().max() > 1e-3   # the masking really matters
    torch.testing.assert_close(logits[:, -1], ref_last, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(scores, ref_scores, atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_cdpruner_follows_the_instruction_and_refuses_clip_without_a_clip_tower(fam, tmp_path):
    name, session = fam
    image = family_images()[0]
    handle = session.apply("cdpruner:keep=0.25")
    try:
        kept = []
        for prompt in ("Is there a red cube?", "What color is the sky in the top left corner?"):
            _lm_call(session, session.prepare([image], [prompt]))
            kept.append(_kept_positions(session)[0])
    finally:
        handle.remove()
    assert len(kept[0]) == len(kept[1]) and kept[0] != kept[1]
    if session.adapter.has_cls_token:
        return  # LLaVA-NeXT's tower is CLIP: clip= runs there (next test)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MmkitError, match="leave clip empty"):
        session.apply(f"cdpruner:clip={tmp_path}")
    assert session.methods == []


def test_anyres_default_renumbers_like_a_shorter_image(fam):
    """On the 1-D position families the default renumbers: the logits equal the language model run by hand on the
    text and the plain greedy's rows, positions 0..m-1 (one row, no padding)."""
    name, session = fam
    if name.startswith("tiny-random-qwen"):
        pytest.skip("Qwen-VL keeps its 3-D positions (covered by the key-masking oracle)")
    inputs = session.prepare(family_images()[1:2], PROMPTS[1:2])
    image = _images_of(session, inputs)[0]
    k = max(1, round(0.3 * len(image["pos"])))
    picks = image["pos"][_plain_maxmin(image["feats"], k)]
    ids = inputs["input_ids"][0]
    with torch.inference_mode():
        embeds = session.model.model.get_input_embeddings()(ids)
        embeds[image["pos"]] = image["feats"]
        keep = torch.tensor([i for i in range(len(ids)) if i not in set(image["pos"].tolist())
                             or i in set(picks.tolist())])
        seq = embeds[keep][None]
        out = session.adapter.language_model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None],
                                             use_cache=False)
        expected = session.model.lm_head(out.last_hidden_state)[:, -1]
    handle = session.apply("divprune:keep=0.3")
    try:
        torch.testing.assert_close(_lm_call(session, inputs)[1], expected, atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()


def test_cdpruner_clip_relevance_on_llava_next_reads_each_tokens_own_patch(tmp_path):
    """LLaVA-NeXT's tower is CLIP, so clip= works there: each packed token's relevance comes from the CLIP patch it
    was projected from. Reference: every tile's patches through the tower and projector, each packed token matched
    to its nearest projected patch, CLIP relevance and the DPP on the image's patch tokens."""
    from transformers import CLIPConfig, CLIPModel

    from mmkit.pruning.cdpruner import dpp_kernel, greedy_dpp

    session = mmkit.load("tiny-random-next", device="cpu")
    vision_config = session.model.config.vision_config
    config = CLIPConfig(text_config=dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=vision_config.hidden_size, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=vision_config.image_size, patch_size=vision_config.patch_size),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path)
    tok = session.processor.tokenizer
    tok.save_pretrained(tmp_path)
    clip = CLIPModel.from_pretrained(str(tmp_path)).eval()
    inputs = session.prepare(family_images()[:2], PROMPTS[:2])
    images = _images_of(session, inputs)
    pixels = inputs["pixel_values"].flatten(0, 1)
    with torch.inference_mode():
        hidden = session.adapter.vision_tower(pixels, output_hidden_states=True).hidden_states
        patches = hidden[session.model.config.vision_feature_layer][:, 1:].reshape(-1, vision_config.hidden_size)
        projected = session.model.model.multi_modal_projector(patches)
        clip_patches = clip.visual_projection(clip.vision_model.post_layernorm(patches))
    handle = session.apply(f"cdpruner:keep=0.3,clip={tmp_path}")
    try:
        _lm_call(session, inputs)
        kept = _kept_positions(session)
    finally:
        handle.remove()
        session.close()
    for row, image in enumerate(images):
        idx = (~image["newline"]).nonzero().flatten()
        feats = image["feats"][idx]
        source = torch.cdist(feats.double(), projected.double()).argmin(1)
        with torch.inference_mode():
            text = clip.get_text_features(input_ids=torch.tensor(
                [[tok.bos_token_id] + tok(PROMPTS[row], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]))
            text = getattr(text, "pooler_output", text)[0]
            raw = -torch.nn.functional.cosine_similarity(clip_patches[source], text[None], dim=-1)
        relevance = (raw - raw.min()) / (raw.max() - raw.min())
        k = min(max(1, round(0.3 * len(image["pos"]))), len(idx))
        picks = greedy_dpp(dpp_kernel(feats[None], relevance[None]), k)[0]
        assert kept[row] == image["pos"][idx[picks].sort().values].tolist()


@pytest.mark.parametrize("name", ["tiny-random-next", "tiny-random-qwen2-vl", "tiny-random-qwen3-vl"])
def test_decoding_without_a_mask_continues_the_original_positions(name):
    """A manual prefill and decode step with no attention mask (the model numbers the new token from the cache
    length, which the reduction shortened) equals the eager key-masking reference."""
    from mmkit.session import Session

    session = mmkit.load(name, device="cpu")
    inputs = session.prepare(family_images()[:1], ["Describe the scene."])
    inputs.pop("attention_mask")

    def prefill_and_step(model):
        with torch.inference_mode():
            out = model(**inputs, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            extra = {}
            if "mm_token_type_ids" in inputs:
                extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token)], 1)
            return model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, **extra).logits[:, -1]

    image = _images_of(session, inputs)[0]
    patches = (~image["newline"]).nonzero().flatten()
    k = min(max(1, round(0.5 * len(image["pos"]))), len(patches))
    dropped = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    dropped[0, image["pos"]] = True
    dropped[0, image["pos"][patches[random_subset(len(patches), k, 0)]]] = False
    reference = copy.deepcopy(session.model)
    reference.set_attn_implementation("eager")
    for layer in reference.model.language_model.layers:
        layer.register_forward_pre_hook(_mask_keys_hook(dropped), with_kwargs=True)
    expected = prefill_and_step(reference)
    session.apply("random:keep=0.5,positions=original")
    try:
        torch.testing.assert_close(prefill_and_step(session.model), expected, atol=2e-4, rtol=1e-4)
    finally:
        session.close()


@pytest.mark.parametrize("method", METHODS)
def test_onevision_multi_image_prompt_selects_per_base_only_image(method):
    """OneVision encodes each image of a multi-image prompt as its base tile plus one closing newline; each image
    is still reduced on its own (pooling keeps each closing newline)."""
    session = mmkit.load("tiny-random-onevision", device="cpu")
    try:
        text = session.chat_prompt("{prompt}").replace("<image>", "<image><image>").format(prompt="Compare them.")
        inputs = session.processor(text=[text], images=[family_images()[:2]], return_tensors="pt")
        image = _images_of(session, inputs)[0]
        pos, newline = image["pos"], image["newline"]
        assert len(pos) == 10 and newline.nonzero().flatten().tolist() == [4, 9]   # two base tiles of 2 x 2
        handle = session.apply(f"{method}:keep=0.5" if method != "pooling" else "pooling:keep=0.25")
        _lm_call(session, inputs)
        kept = _kept_positions(session)[0]
        handle.remove()
        if method == "pooling":   # each 2 x 2 base grid pooled to its central token, and its newline
            assert kept == pos[[0, 4, 5, 9]].tolist()
        else:
            first = [p for p in kept if p <= int(pos[4])]
            assert len(first) == 2 and len(kept) == 4            # round(0.5 x 5) = 2 per image
            if method != "divprune":
                assert int(pos[4]) not in kept and int(pos[9]) not in kept
    finally:
        session.close()
