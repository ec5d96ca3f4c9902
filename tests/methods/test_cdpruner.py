"""CDPruner against independent references: greedy MAP by brute-force log-determinants, the kernel written out
entry by entry, relevance recomputed from the model's embeddings or a CLIP model, and the reduced sequence built by
hand."""

import pytest
import torch

import mmkit

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.pruning.cdpruner import CDPrunerConfig, dpp_kernel, greedy_dpp, instruction_texts, minmax
from mmkit.pruning.selection import ImageBatch

N = 64


def _greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by definition: add the item maximising log det(L_S) (float64 determinants)."""
    kernel = kernel.double()
    picks: list[int] = []
    for _ in range(k):
        best, best_val = None, -float("inf")
        for j in range(kernel.shape[0]):
            if j in picks:
                continue
            idx = torch.tensor(picks + [j])
            sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
            value = float(logdet) if sign > 0 else -float("inf")
            if value > best_val + 1e-9:
                best, best_val = j, value
        picks.append(best)
    return picks


@pytest.mark.parametrize("seed", range(4))
def test_fast_greedy_equals_log_det_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 15, 24, generator=g, dtype=torch.float64)
    relevance = torch.rand(2, 15, generator=g, dtype=torch.float64) + 0.05
    kernel = dpp_kernel(feats, relevance).double()
    got = greedy_dpp(kernel, 6)
    for i in range(2):
        assert got[i].tolist() == _greedy_logdet(kernel[i], 6)


def test_kernel_is_relevance_weighted_cosine():
    g = torch.Generator().manual_seed(0)
    feats, rel = torch.randn(1, 5, 7, generator=g), torch.rand(1, 5, generator=g)
    kernel = dpp_kernel(feats, rel)[0]
    for i in range(5):
        for j in range(5):
            cos = torch.nn.functional.cosine_similarity(feats[0, i], feats[0, j], dim=0)
            assert torch.isclose(kernel[i, j], rel[0, i] * cos * rel[0, j], atol=1e-6)


def test_exhausted_rank_falls_back_to_relevance_order():
    # Rank-6 kernel over 30 tokens, 20 picks: the first 6 are the log-det greedy's, then the kernel has no gain left
    # and the rest are the unpicked tokens by decreasing relevance (L_jj = r_j^2); all distinct, no NaN.
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 30, 6, generator=g, dtype=torch.float64)
    relevance = torch.rand(1, 30, generator=g, dtype=torch.float64) + 0.05
    kernel = dpp_kernel(feats, relevance).double()
    picks = greedy_dpp(kernel, 20)[0].tolist()
    assert picks[:6] == _greedy_logdet(kernel[0], 6)
    rest = [j for j in torch.argsort(relevance[0], descending=True).tolist() if j not in picks[:6]]
    assert picks[6:] == rest[:14]


def test_large_budgets_keep_exactly_k_tokens(session, images, prompts):
    # Near the projected features' rank (64 on tiny-random), the picks stay distinct: every row keeps k tokens.
    session.apply("cdpruner:tokens=60")
    results = session.generate(images, prompts, max_new_tokens=2)
    assert all(r.stats.visual_tokens_kept == [60] * 4 for r in results)


def test_instruction_is_the_users_prompt(session, images, prompts):
    inputs = session.prepare(images, [p + " Answer the question using a single word or phrase." for p in prompts])
    ids = inputs["input_ids"]
    texts = instruction_texts(ids, ids == session.adapter.image_token_id, inputs["attention_mask"],
                              session.processor.tokenizer, session.chat_prompt("{prompt}"), "<image>")
    assert texts == prompts


def _projected(session, inputs):
    with torch.inference_mode():
        feats = session.model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                                       vision_feature_select_strategy="default").pooler_output
    return torch.stack(list(feats)).reshape(inputs["pixel_values"].shape[0], N, -1)


def _hand_logits(session, inputs, feats, picks):
    ids = inputs["input_ids"]
    with torch.inference_mode():
        embeds = session.model.model.get_input_embeddings()(ids)
        pos = (ids[0] == session.adapter.image_token_id).nonzero().flatten()
        embeds[0, pos] = feats[0].to(embeds.dtype)
        start = int(pos[0])
        keep = list(range(start)) + [start + j for j in sorted(picks)] + list(range(start + N, ids.shape[1]))
        out = session.adapter.language_model(inputs_embeds=embeds[:, keep],
                                             position_ids=torch.arange(len(keep))[None], use_cache=False)
        return session.model.lm_head(out.last_hidden_state)


@pytest.mark.parametrize("invert", [False, True])
def test_embedding_route_matches_a_hand_built_reduction(session, images, prompts, invert):
    inputs = session.prepare(images[:1], prompts[1:2])
    feats = _projected(session, inputs)
    tok = session.processor.tokenizer
    with torch.inference_mode():
        words = session.model.get_input_embeddings()(torch.tensor(tok(prompts[1], add_special_tokens=False)
                                                                  ["input_ids"]))
    cos = torch.nn.functional.cosine_similarity(feats[0][:, None].float(), words[None].float(), dim=-1).mean(1)
    cos = -cos if invert else cos
    relevance = (cos - cos.min()) / (cos.max() - cos.min())
    kernel = relevance[:, None] * torch.nn.functional.cosine_similarity(
        feats[0][:, None].float(), feats[0][None].float(), dim=-1) * relevance[None]
    expected = _hand_logits(session, inputs, feats, _greedy_logdet(kernel, 9))
    handle = session.apply(f"cdpruner:tokens=9,invert={str(invert).lower()}")
    try:
        got = forward_logits(session, inputs)
    finally:
        handle.remove()
    assert torch.allclose(got, expected, atol=1e-5)


def test_selection_depends_on_the_instruction(session, images):
    # The same image under two instructions: different relevance, different kept tokens (DivPrune would keep the
    # same ones).
    prompts = ["Is there a red circle?", "Count the blue squares in the picture please."]
    inputs = session.prepare([images[0]] * 2, prompts)
    ids = inputs["input_ids"]
    handle = session.apply("cdpruner:tokens=6")
    try:
        batch = ImageBatch(features=_projected(session, inputs), vision_features=None, rows=torch.arange(2),
                           input_ids=ids, image_mask=ids == session.adapter.image_token_id,
                           attention_mask=inputs["attention_mask"])
        relevance = handle.impl.relevance_scores(batch)
        order = handle.impl._select(batch).order
    finally:
        handle.remove()
    assert not torch.allclose(relevance[0], relevance[1])
    assert order[0].tolist() != order[1].tolist()


# -- CLIP relevance ---------------------------------------------------------------------------------------------
def _tiny_clip(session, path, width=None, max_positions=77):
    from transformers import CLIPConfig, CLIPModel

    vision = session.model.config.vision_config
    config = CLIPConfig(
        text_config=dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_positions),
        vision_config=dict(hidden_size=width or vision.hidden_size, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=vision.image_size, patch_size=vision.patch_size),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    session.processor.tokenizer.save_pretrained(path)  # any tokenizer whose ids fit the text model
    return path


@pytest.mark.parametrize("max_positions", [77, 5])
def test_clip_relevance_matches_an_independent_computation(session, images, prompts, tmp_path, max_positions):
    from transformers import CLIPModel

    path = _tiny_clip(session, tmp_path / "clip", max_positions=max_positions)
    inputs = session.prepare(images[:2], prompts[:2])
    with torch.inference_mode():
        hidden = session.adapter.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
    vision = hidden[:, 1:]                                          # LLaVA's features: CLS dropped
    clip = CLIPModel.from_pretrained(str(path)).eval()
    tok = session.processor.tokenizer
    expected = []
    for i in range(2):
        ids = tok(prompts[i], add_special_tokens=False)["input_ids"]
        width = max_positions - 2
        chunks = [[tok.bos_token_id] + ids[s:s + width] + [tok.eos_token_id] for s in range(0, len(ids), width)]
        with torch.inference_mode():
            patches = clip.visual_projection(clip.vision_model.post_layernorm(vision[i]))
            sims = []
            for chunk in chunks:
                text = clip.get_text_features(input_ids=torch.tensor([chunk])).pooler_output[0]
                sims.append(-torch.nn.functional.cosine_similarity(patches, text[None], dim=-1))
        raw = torch.stack(sims).mean(0)
        expected.append((raw - raw.min()) / (raw.max() - raw.min()))
    handle = session.apply(f"cdpruner:tokens=9,clip={path}")
    try:
        ids = inputs["input_ids"]
        batch = ImageBatch(features=_projected(session, inputs), vision_features=vision, rows=torch.arange(2),
                           input_ids=ids, image_mask=ids == session.adapter.image_token_id,
                           attention_mask=inputs["attention_mask"])
        got = handle.impl.relevance_scores(batch)
        assert torch.allclose(got, torch.stack(expected), atol=1e-5)
        # And end to end: a batch equals its single calls with CLIP relevance too.
        batched = session.generate(images[:2], prompts[:2], max_new_tokens=5)
        for i in range(2):
            assert session.generate([images[i]], [prompts[i]], max_new_tokens=5)[0].text == batched[i].text
    finally:
        handle.remove()


def test_clip_checks(session, tmp_path):
    with pytest.raises(MmkitError, match="not a local CLIP checkpoint"):
        session.apply(f"cdpruner:clip={tmp_path / 'missing'}")
    path = _tiny_clip(session, tmp_path / "wide", width=48)
    with pytest.raises(MmkitError, match="vision width 48"):
        session.apply(f"cdpruner:clip={path}")
    assert CDPrunerConfig(clip=str(path)).invert is None


def test_minmax_constant_row_is_uniform():
    assert torch.equal(minmax(torch.full((1, 4), 3.0)), torch.ones(1, 4))


def test_clip_export_is_self_contained(session, images, prompts, tmp_path):
    """The CLIP checkpoint travels with the export: it reloads to the same scores after the original is gone."""
    import json
    import shutil

    clip = _tiny_clip(session, tmp_path / "clip")
    spec = f"cdpruner:keep=0.25,clip={clip}"
    with_clip = mmkit.load("tiny-random", methods=[spec])
    scores = with_clip.answer_logprobs(images, prompts).logprobs
    with_clip.save_pretrained(tmp_path / "export")
    with_clip.close()
    shutil.rmtree(clip)
    assert str(clip) not in (tmp_path / "export" / "mmkit_config.json").read_text()
    (tmp_path / "export").rename(tmp_path / "moved")
    reloaded = mmkit.load(str(tmp_path / "moved"))
    try:
        assert reloaded.answer_logprobs(images, prompts).logprobs == scores
        assert json.loads((tmp_path / "moved" / "mmkit_config.json").read_text())["methods"][0]["files"]
    finally:
        reloaded.close()
