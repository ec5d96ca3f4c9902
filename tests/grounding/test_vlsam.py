"""VL-SAM pipeline on tiny-random: captured rows equal eager attention, config validation, end-to-end ground,
the CLI and the bench."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mmkit.errors import MmkitError
from mmkit.grounding.attention_maps import build_inputs, capture_rows
from mmkit.grounding.sam_backend import load_sam
from mmkit.grounding.sam_train import SamTrainConfig, build_small_sam, save_sam
from mmkit.grounding.vlsam import VLSAMConfig, ground


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
    cfg = SamTrainConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
                         channels=16, decoder_mlp=32)
    model, processor = build_small_sam(cfg)
    out = tmp_path_factory.mktemp("sam") / "tiny-sam"
    save_sam(model.eval(), processor, out)
    return out


@pytest.fixture(scope="module")
def tiny_sam(tiny_sam_dir):
    return load_sam(str(tiny_sam_dir), device="cpu")


def test_captured_rows_equal_eager_attention(session, images):
    prompts = ["Where is the cup?", "Describe it."]
    inputs, starts = build_inputs(session, images[:2], prompts, ["", "A red cup."])
    assert inputs["attention_mask"][0, 0] == 0  # rows of different lengths: left padding is exercised
    rows = torch.tensor([[starts[0] - 3, starts[0] - 1], [starts[1] + 1, starts[1] + 2]])
    valid = torch.ones_like(rows, dtype=torch.bool)
    cap = capture_rows(session, inputs, rows, valid)
    model = session.model
    original = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            out = model(**inputs, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation({"text_config": original})
    assert len(cap.probs) == len(out.attentions)
    for got, ref in zip(cap.probs, out.attentions):
        expect = torch.stack([ref[b][:, rows[b]] for b in range(2)])  # (B, H, R, L)
        torch.testing.assert_close(got, expect.float(), atol=1e-5, rtol=1e-4)
    assert cap.image_mask.sum(1).tolist() == [64, 64]


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        VLSAMConfig(threshold=1.5)
    with pytest.raises(ValueError, match="category"):
        VLSAMConfig(query_prompt="Where is it?")
    with pytest.raises(ValueError, match="refine_steps"):
        VLSAMConfig(refine_steps=3)
    with pytest.raises(ValueError, match="token"):
        VLSAMConfig(token="first")
    with pytest.raises(ValueError, match="describe_prompts"):
        VLSAMConfig(describe_prompts=())
    assert VLSAMConfig(describe_prompts="List the objects.").describe_prompts == ("List the objects.",)
    with pytest.raises(ValueError, match="point_at"):
        VLSAMConfig(point_at="middle")


def test_presets():
    from mmkit.grounding.vlsam import preset_config

    paper = preset_config("paper")
    assert (paper.token, paper.layers, paper.point_at) == ("mention", (), "max")
    # The paper's ablation credits the five views and the ten-question ensemble: both are on.
    assert paper.multi_scale and len(set(paper.describe_prompts)) == 10
    assert paper.vocabulary == "open" and preset_config("reference").vocabulary == "world"
    ref = preset_config("reference", refine_steps=1)
    assert (ref.token, ref.layers, ref.point_at, ref.refine_steps) == ("previous", (0,), "centroid", 1)
    # The detailed and the brief answer as an ensemble, over overlapping crops (docs/grounding.md measures each).
    assert ref.describe_prompts == ("Describe the image in detail.", "Describe the image briefly.")
    assert ref.multi_scale and ref.crop_fraction == 0.65 and ref.max_new_tokens == 128
    assert paper.crop_fraction == 0.5
    with pytest.raises(MmkitError, match="preset"):
        preset_config("best")


def test_ground_query_end_to_end(session, images, tiny_sam):
    cfg = VLSAMConfig(multi_scale=True, refine_steps=2, num_positive=2, batch_size=10, query_route="prompt")
    results = ground(session, tiny_sam, images[:2], query="cup", config=cfg)
    assert len(results) == 2
    for r in results:
        assert r.size == (112, 112)
        assert r.detections, "every image grounds the query at least once"
        assert set(r.maps) == {"cup"} and r.maps["cup"].shape == (8, 8)
        for d in r.detections:
            assert d.label == "cup" and d.mask.shape == (112, 112) and d.mask.any()
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112
        # 2 images x 5 views, one query each, one batched forward.
        assert r.stats["lvlm_sequences"] == 5 and r.stats["lvlm_forward_calls"] == 0.5
        assert r.stats["lvlm_generate_calls"] == 0
        # SAM: one embedding call for all ten views; three decode rounds, three more when a crop's mask is cut by
        # its inner edge and decoded again on the full image.
        assert r.stats["sam_image_calls"] == 0.5 and r.stats["sam_decode_calls"] in (1.5, 3.0)
    with pytest.raises(MmkitError, match="one per image"):
        ground(session, tiny_sam, images[:2], query=["cup"])


def test_session_ground_matches_the_pipeline(session, images, tiny_sam_dir, tiny_sam):
    cfg = VLSAMConfig(refine_steps=0, query_route="prompt")
    direct = ground(session, tiny_sam, images[:2], query="cup", config=cfg)
    via_session = session.ground(images[:2], query="cup", sam=tiny_sam_dir, config=cfg)
    assert [[(d.label, d.box, d.score) for d in r.detections] for r in via_session] == \
        [[(d.label, d.box, d.score) for d in r.detections] for r in direct]
    (single,) = session.ground(images[0], query="cup", sam=tiny_sam, config=cfg)
    assert [d.box for d in single.detections] == [d.box for d in direct[0].detections]


def test_query_describe_first_falls_back_to_the_query_prompt(session, images, tiny_sam):
    # The random model's description does not mention a cup, so the query prompt is mapped after one generation.
    cfg = VLSAMConfig(max_new_tokens=4, refine_steps=0, query_route="describe_first")
    (r,) = ground(session, tiny_sam, images[:1], query="cup", config=cfg)
    assert r.stats["lvlm_generate_calls"] == 1 and r.stats["lvlm_forward_calls"] == 1
    assert r.stats["lvlm_sequences"] == 2 and set(r.maps) == {"cup"}


def test_ground_describe_runs_generation(session, images, tiny_sam):
    (r,) = ground(session, tiny_sam, images[:1], config=VLSAMConfig(max_new_tokens=4, refine_steps=0))
    assert len(r.answers) == 1 and r.stats["lvlm_generate_calls"] == 1


def test_free_text_query_uses_its_last_word(session, images, tiny_sam, monkeypatch):
    """A query naming no world category is labelled by its text, and the map is read at its last word."""
    import mmkit.grounding.attention_maps as attention_maps
    import mmkit.grounding.flow as flow

    seen = {}
    real_capture, real_maps = attention_maps.capture_rows, flow.object_maps

    def capture(session_, inputs, positions, valid):
        seen["ids"], seen["positions"] = inputs["input_ids"], positions
        return real_capture(session_, inputs, positions, valid)

    def maps(*args, **kwargs):
        seen["objects"] = args[5]  # per object, its offsets into the captured rows
        return real_maps(*args, **kwargs)

    monkeypatch.setattr(attention_maps, "capture_rows", capture)
    monkeypatch.setattr(flow, "object_maps", maps)
    (r,) = ground(session, tiny_sam, images[:1], query="red balloon",
                  config=VLSAMConfig(refine_steps=0, query_route="prompt"))
    assert set(r.maps) == {"red balloon"}
    (offsets,) = seen["objects"]
    position = int(seen["positions"][0, offsets[0]])
    tokenizer = session.processor.tokenizer
    ids = seen["ids"][0].tolist()
    assert tokenizer.decode(ids[:position + 1]).endswith("red balloon")
    assert not tokenizer.decode(ids[position + 1:]).lstrip()[:1].isalpha()  # the word ends at the mapped token


def test_cli_ground_on_tiny_random_with_shipped_sam(tmp_path, images):
    from mmkit.cli import main

    image_path = tmp_path / "scene.png"
    Image.fromarray(images[0]).save(image_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["ground", "--model", "tiny-random", "--image", str(image_path), "--query", "cup",
                                    "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    coco = json.loads((out / "scene_coco.json").read_text())
    assert coco["images"][0]["width"] == 112 and coco["images"][0]["height"] == 112
    for ann in coco["annotations"]:
        assert ann["segmentation"]["size"] == [112, 112] and sum(ann["segmentation"]["counts"]) == 112 * 112
        assert len(ann["bbox"]) == 4 and 0 <= ann["score"] <= 1
    for name in ("scene_overlay.png", "scene_attn_cup.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size == (112, 112)
    bad = CliRunner().invoke(main, ["ground", "--model", "tiny-random", "--image", str(tmp_path / "nope.png"),
                                    "--out", str(out)])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_ground_bench_scores_reference_world_questions(session, tiny_sam):
    from mmkit.grounding.bench import run_ground_bench
    from mmkit.world.questions import ground_questions

    questions = ground_questions(1, 2)
    records, metrics = run_ground_bench(session, questions, 1, sam=tiny_sam,
                                        config=VLSAMConfig(refine_steps=0, query_route="prompt"), mode="query")
    assert len(records) == len(questions) and metrics["n"] == len(questions) and metrics["images"] == 2
    assert 0.0 <= metrics["miou"] <= 1.0 and 0.0 <= metrics["box_ap50"] <= 1.0
    assert metrics["lvlm_sequences_per_image"] == pytest.approx(len(questions) / 2)
    assert all(0.0 <= r["iou"] <= 1.0 for r in records)
    json.dumps(records)
    with pytest.raises(MmkitError, match="mode"):
        run_ground_bench(session, questions, 1, sam=tiny_sam, mode="oracle")


def test_eval_ground_bench_writes_results_and_resumes_exactly(session, tiny_sam_dir, tmp_path):
    from mmkit.evals.report import load_run
    from mmkit.evals.runner import run_eval

    args = dict(session=session, bench="ground", limit=5, batch_size=2, sam=str(tiny_sam_dir), ground_mode="query",
                progress=False)
    full = run_eval(out=tmp_path / "full", **args)
    assert full["n"] == 5 and full["ground"] == {"mode": "query", "sam": str(tiny_sam_dir)}
    metrics = full["metrics"]
    assert 0.0 <= metrics["box_ap50"] <= 1.0 and 0.0 <= metrics["miou"] <= 1.0
    assert metrics["lvlm_calls_per_image"] > 0 and metrics["sam_calls_per_image"] > 0
    assert full["efficiency"]["visual_tokens"] == session.describe()["visual_tokens"]
    assert load_run(tmp_path / "full")["metrics"] == json.loads(json.dumps(metrics))
    # A run killed after its first batch of scenes resumes to the same samples and scores.
    lines = (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    first_scene = json.loads(lines[0])["scene_index"]
    kept = [line for line in lines if json.loads(line)["scene_index"] == first_scene]
    assert 0 < len(kept) < len(lines)
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "run.json").write_text((tmp_path / "full" / "run.json").read_text())
    (tmp_path / "part" / "samples.jsonl").write_text("\n".join(kept) + "\n")
    resumed = run_eval(out=tmp_path / "part", **args)
    assert resumed["n"] == 5 and resumed["metrics"]["box_ap50"] == metrics["box_ap50"]
    assert resumed["metrics"]["miou"] == metrics["miou"]
    with pytest.raises(MmkitError, match="greedily"):
        run_eval(decoding="sample", **args)


def test_count_words_before_a_mention(session):
    from mmkit.grounding.vlsam import _count_before, _find, _word_ids

    tok = session.processor.tokenizer
    ids = tok(" A red star, two blue cups and 3 keys.", add_special_tokens=False)["input_ids"]
    (cups,) = _find(ids, 0, len(ids), _word_ids(tok, ["cups"]))
    (star,) = _find(ids, 0, len(ids), _word_ids(tok, ["star"]))
    (keys,) = _find(ids, 0, len(ids), _word_ids(tok, ["keys"]))
    assert tok.decode(ids[cups[0]:cups[1] + 1]).strip() == "cups"
    assert _count_before(tok, ids, cups[0], 0) == 2
    assert _count_before(tok, ids, star[0], 0) == 1
    assert _count_before(tok, ids, keys[0], 0) == 3


def test_oracle_point_ap_runs(tiny_sam):
    from mmkit.grounding.bench import oracle_point_ap

    out = oracle_point_ap(tiny_sam, world_seed=1, n_scenes=2)
    assert out["objects"] > 0 and 0.0 <= out["oracle_box_ap50"] <= 1.0 and 0.0 <= out["oracle_instance_miou"] <= 1.0
    assert out["objects_on_crops"] == 0
    crops = oracle_point_ap(tiny_sam, world_seed=1, n_scenes=4, crop_fraction=0.5)
    assert 0 < crops["objects_on_crops"] < crops["objects"]   # objects inside a quadrant, others across its edges
