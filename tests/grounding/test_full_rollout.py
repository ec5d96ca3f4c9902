"""The paper's full attention rollout equals one computed from eager full attention matrices."""

import numpy as np
import torch

from mmkit.grounding.attention_maps import build_inputs
from mmkit.grounding.vlsam import VLSAMConfig, _Counter, _map_rows, _Row, _View, preset_config


def _eager_attentions(session, inputs):
    model = session.model
    original = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            out = model(**inputs, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation({"text_config": original})
    return [a.double().numpy() for a in out.attentions]   # per layer (B, H, L, L)


def _reference_map(attentions, b, real, image_pos, obj_pos, head_weighting=True, column_reg=True):
    """The paper's formula on full matrices, written out with NumPy over the non-padding tokens."""
    n = len(real)
    flow = np.zeros((n, n))
    for att in attentions:
        s = att[b][:, real][:, :, real]                                   # (H, n, n)
        w = np.array([s[h].max(axis=1).mean() for h in range(s.shape[0])]) if head_weighting else \
            np.ones(s.shape[0])
        agg = sum(w[h] * s[h] for h in range(s.shape[0])) / s.shape[0]
        if column_reg:
            unmasked = np.array([n - j for j in range(n)])                # causal: queries j..n-1 see key j
            agg = agg * (1 - (unmasked - 1) / n)[None, :]
        flow = (np.eye(n) + agg) @ (np.eye(n) + flow)
    row = flow[list(real).index(obj_pos)]
    cols = [list(real).index(p) for p in image_pos]
    side = int(np.sqrt(len(cols)))
    return row[cols].reshape(side, side)


def test_full_rollout_equals_the_eager_full_matrix_rollout(session, images):
    from PIL import Image

    pics = [Image.fromarray(images[0]), Image.fromarray(images[1])]
    prompts = ["Describe the image in detail.", "List the objects."]
    answers = ["A red balloon and a dog.", "Two cups."]
    views = [_View(0, (0, 0, 112, 112), pics[0]), _View(1, (0, 0, 112, 112), pics[1])]
    rows = [_Row(0, prompts[0], answers[0], ["balloon", "dog"], {"balloon": ["balloon"], "dog": ["dog"]}, False),
            _Row(1, prompts[1], answers[1], ["cup"], {"cup": ["cups"]}, False)]
    for head_weighting, column_reg in ((True, True), (False, False)):
        cfg = VLSAMConfig(rollout="full", head_weighting=head_weighting, column_reg=column_reg)
        got = _map_rows(session, views, rows, cfg, _Counter())
        inputs, _ = build_inputs(session, pics, prompts, answers)
        assert inputs["attention_mask"][1, 0] == 0  # rows of different lengths: left padding is exercised
        attentions = _eager_attentions(session, inputs)
        tok = session.processor.tokenizer
        for b, expected_labels in ((0, ["balloon", "dog"]), (1, ["cup"])):
            ids = inputs["input_ids"][b].tolist()
            real = [p for p in range(len(ids)) if inputs["attention_mask"][b, p]]
            image_pos = [p for p in real if ids[p] == session.model.config.image_token_id]
            assert [entry[0] for entry in got[b]] == expected_labels
            for label, attn, _ in got[b]:
                word = rows[b].surface[label][0]
                obj = max(p for p in real if tok.decode(ids[p:p + 1]).strip() == word
                          or tok.decode(ids[:p + 1]).endswith(word))
                ref = _reference_map(attentions, b, real, image_pos, obj, head_weighting, column_reg)
                np.testing.assert_allclose(attn, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_paper_preset_uses_the_full_rollout():
    assert preset_config("paper").rollout == "full" and preset_config("reference").rollout == "text"
