"""The SAM backend interface on a tiny random transformers SamModel saved to disk."""

import numpy as np
import pytest
import torch

from mmkit.errors import MmkitError
from mmkit.grounding.sam_backend import load_sam
from mmkit.grounding.sam_train import SamTrainConfig, build_small_sam, save_sam


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
    cfg = SamTrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
                         channels=16, decoder_mlp=32)
    model, processor = build_small_sam(cfg)
    out = tmp_path_factory.mktemp("sam") / "tiny-sam"
    save_sam(model.eval(), processor, out)
    return out


def test_embed_and_predict_shapes(tiny_sam_dir):
    sam = load_sam(str(tiny_sam_dir), device="cpu")
    assert sam.multimask is False  # the training marker says single-mask decoding
    images = [np.zeros((40, 60, 3), dtype=np.uint8), np.full((50, 50, 3), 200, dtype=np.uint8)]
    emb = sam.embed(images)
    assert len(emb) == 2 and emb.original_sizes == [(40, 60), (50, 50)]
    pred = sam.predict(emb, [0, 1, 1], [[(10, 10)], [(5, 5), (40, 40)], [(25, 25)]], [[1], [1, 0], [1]])
    assert [m.shape for m in pred.masks] == [(40, 60), (50, 50), (50, 50)]
    assert all(m.dtype == bool for m in pred.masks)
    assert pred.scores.shape == (3,)
    assert pred.low_res_logits.shape == (3, 1, sam.mask_input_size, sam.mask_input_size)
    again = sam.predict(emb, [0, 1, 1], [[(10, 10)], [(5, 5), (40, 40)], [(25, 25)]], [[1], [1, 0], [1]],
                        mask_inputs=pred.low_res_logits)
    assert len(again.masks) == 3
    assert sam.stats.as_dict() == {"image_calls": 1, "images": 2, "decode_calls": 2, "prompts": 6}


def test_multimask_override_and_batch_rows_match_single(tiny_sam_dir):
    sam = load_sam(str(tiny_sam_dir), device="cpu", multimask=True)
    assert sam.multimask is True
    emb = sam.embed([np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)])
    both = sam.predict(emb, [0, 0], [[(3, 3)], [(20, 20)]], [[1], [1]])
    one = sam.predict(emb, [0], [[(20, 20)]], [[1]])
    assert torch.allclose(both.low_res_logits[1], one.low_res_logits[0], atol=1e-5)


def test_bad_inputs(tiny_sam_dir, tmp_path):
    with pytest.raises(MmkitError, match="not a directory"):
        load_sam(str(tmp_path / "missing"))
    with pytest.raises(MmkitError, match="cannot load"):
        load_sam(str(tmp_path))
    sam = load_sam(str(tiny_sam_dir), device="cpu")
    emb = sam.embed([np.zeros((16, 16, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="at least one point"):
        sam.predict(emb, [0], [[]], [[]])
    with pytest.raises(ValueError, match="mask_inputs"):
        sam.predict(emb, [0], [[(1, 1)]], [[1]], mask_inputs=torch.zeros(1, 1, 3, 3))
