"""Benchmark files without a model: the COCO object vocabulary, answer parsing, the world export, and bad data."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from realdata import COCO_IMAGES, POPE_ROWS, coco_name, write_coco, write_pope

from mmkit.cli import main
from mmkit.evals.datafiles import read_chair, read_pope, read_vqa, sample_image_ids
from mmkit.evals.filebench import parse_choice, parse_pope_answer, vqa_file_correct
from mmkit.evals.objects import COCO_CATEGORIES, COCO_SYNONYMS, ObjectVocabulary, coco_vocabulary, vocabulary_for


@pytest.mark.parametrize("text,expected", [
    ("Two men ride motorbikes past a fire hydrant.", ["person", "motorcycle", "fire hydrant"]),
    ("A hot dog next to a dog.", ["hot dog", "dog"]),
    ("Teddy bears and a polar bear.", ["teddy bear", "bear"]),
    ("Knives, forks and wine glasses on dining tables.", ["knife", "fork", "wine glass", "dining table"]),
    ("A woman in an orange shirt holds an orange.", ["person", "orange"]),
    ("Oranges in a bowl.", ["orange", "bowl"]),
    ("A baseball player swings a baseball bat.", ["person", "baseball bat"]),
    ("Buses and a TV, the mice and cell phones.", ["bus", "tv", "mouse", "cell phone"]),
    ("A carpet and a catalogue.", []),
])
def test_coco_vocabulary_mentions(text, expected):
    assert coco_vocabulary().mentions(text) == expected


def test_coco_table_covers_the_80_categories_once():
    assert len(COCO_CATEGORIES) == 80 == len(set(COCO_CATEGORIES)) and set(COCO_SYNONYMS) == set(COCO_CATEGORIES)
    with pytest.raises(ValueError, match="names both"):
        ObjectVocabulary({"cup": ("mug",), "bowl": ("mug",)})


def test_vocabulary_of_other_category_sets():
    assert vocabulary_for(COCO_CATEGORIES) is coco_vocabulary()
    assert vocabulary_for(["cup", "Desk Lamp"]).mentions("Two desk lamps, a mug and a dog.") == ["desk lamp", "cup"]
    # An exported world keeps the world's own words ("disc" is a circle there).
    assert vocabulary_for(["cup", "circle"], reference_world=True).mentions("a mug and a disc") == ["cup", "circle"]


def test_pope_answer_parsing_as_the_reference():
    assert parse_pope_answer("Yes, there is a cup.") == ("yes", False)
    assert parse_pope_answer("no") == ("no", False)
    assert parse_pope_answer("NO.") == ("no", False)
    assert parse_pope_answer("There is a cup.") == ("no", True)
    assert parse_pope_answer("") == ("no", True)


def test_vqa_scoring():
    assert vqa_file_correct("Two.", "2") and vqa_file_correct("The red one", "red one")
    assert not vqa_file_correct("2 cups", "2")  # exact match, not a prefix
    assert vqa_file_correct("Yes, it is.", "yes") and not vqa_file_correct("no", "yes")
    choices = ("cat", "dog", "bird")
    assert parse_choice("B", choices) == "B" and parse_choice("(C) bird", choices) == "C"
    assert parse_choice("dog", choices) == "B" and parse_choice("a fish", choices) is None
    assert vqa_file_correct("B.", "B", choices) and not vqa_file_correct("A", "B", choices)


def test_readers_on_official_formats(tmp_path):
    coco = write_coco(tmp_path / "coco")
    pope = read_pope(write_pope(tmp_path / "coco_pope_random.json", POPE_ROWS), coco / "val2014", prompt_suffix="")
    assert [(q.answer, q.image_name) for q in pope] == [(label, coco_name(i)) for i, _, label in POPE_ROWS]
    assert pope[0].prompt == "Is there a cup in the image?"
    questions, data = read_chair(coco, n=3, seed=1)
    assert [q.qid for q in questions] == [f"coco:{i}" for i in sample_image_ids(COCO_IMAGES, 3, 1)]
    assert len(read_chair(coco, n=3, seed=2)[0]) == 3 and len(read_chair(coco, n=99)[0]) == len(COCO_IMAGES)
    truth = {int(q.qid.split(":")[1]): set(q.truth) for q in read_chair(coco, n=99)[0]}
    # Instances and reference captions together: the mug and the people, the potted plant of the caption.
    assert truth[139] == {"person", "dining table", "cup"}
    assert truth[632] == {"bed", "book", "potted plant"}
    assert truth[776] == {"teddy bear"}
    rows = [{"image": coco_name(139), "question": "What is on the table?", "answer": "a mug", "type": "object"},
            {"image": coco_name(285), "question": "Which animal?", "answer": "bear", "choices": ["cat", "bear"]}]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vqa = read_vqa(tmp_path / "vqa.jsonl", coco / "val2014")
    assert vqa[1].answer == "B" and "A. cat\nB. bear" in vqa[1].prompt and vqa[0].kind == "object"


def test_world_export_matches_the_generated_world(tmp_path):
    from mmkit.world.coco_export import rle_decode
    from mmkit.world.questions import pope_questions, reference_caption
    from mmkit.world.scenes import generate_scene

    out = tmp_path / "world"
    result = CliRunner().invoke(main, ["world", "export", "--world-seed", "3", "--out", str(out), "--images", "2"])
    assert result.exit_code == 0, result.output
    instances = json.loads((out / "annotations" / "instances_val.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    captions = json.loads((out / "annotations" / "captions_val.json").read_text())["annotations"]
    for index in range(2):
        scene = generate_scene(3, index)
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(out / "val" / f"world3_{index:06d}.png")), np.asarray(scene.image))
        anns = [a for a in instances["annotations"] if a["image_id"] == index + 1]
        assert len(anns) == len(scene.objects)
        for ann, obj in zip(anns, scene.objects):
            x0, y0, x1, y1 = obj.box
            assert names[ann["category_id"]] == obj.category and ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert np.array_equal(rle_decode(ann["segmentation"]), obj.mask) and ann["area"] == obj.mask.sum()
        assert [c["caption"] for c in captions if c["image_id"] == index + 1] == [reference_caption(scene)]
    for split in ("random", "popular", "adversarial"):
        rows = [json.loads(line) for line in (out / "pope" / f"world_pope_{split}.json").read_text().splitlines()]
        expected = pope_questions(3, 2, split)
        assert [(r["text"], r["label"], r["image"]) for r in rows] == \
            [(q.prompt, q.answer, f"world3_{q.scene_index:06d}.png") for q in expected]
    again = CliRunner().invoke(main, ["world", "export", "--out", str(out), "--images", "1"])
    assert again.exit_code == 2 and "not empty" in again.stderr


def _bad_pope_cases(tmp_path):
    coco = write_coco(tmp_path / "coco")
    images = str(coco / "val2014")
    good = json.dumps({"question_id": 1, "image": coco_name(139), "text": "Is there a cup?", "label": "yes"})
    cases = {}

    def case(name, text, expect):
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        cases[name] = (["--bench", "pope", "--data", str(path), "--images", images], [f"{path}", *expect])

    case("missing_image", good + "\n" + good.replace("139", "999").replace('"question_id": 1', '"question_id": 2'),
         [":2", "not found"])
    case("malformed", good + "\n{\"question_id\": 2, \"image\"\n", [":2", "malformed JSON"])
    case("label", good + "\n" + good.replace('"yes"', '"maybe"').replace('"question_id": 1', '"question_id": 2'),
         [":2", "'maybe' is not yes or no"])
    case("empty", "", ["is empty"])
    (tmp_path / "nococo").mkdir()
    cases["coco_without_annotations"] = (["--bench", "chair", "--coco", str(tmp_path / "nococo")],
                                         [str(tmp_path / "nococo"), "instances_val2014.json"])
    return cases


@pytest.mark.parametrize("name", ["missing_image", "malformed", "label", "empty", "coco_without_annotations"])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, name):
    args, expect = _bad_pope_cases(tmp_path)[name]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", *args, "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in expect:
        assert part in lines[0]
    assert not out.exists()


def test_bad_parquet_names_file_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "pope.parquet"
    pq.write_table(pa.table({"question_id": ["1", "2"], "question": ["Is there a cup?"] * 2, "answer": ["yes", "Maybe"],
                             "image": [{"bytes": b"x", "path": None}] * 2}), path)
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", "--bench", "pope", "--data", str(path)])
    assert result.exit_code == 2 and f"{path} row 1" in result.stderr and "not yes or no" in result.stderr
    pq.write_table(pa.table({"question_id": ["1", "2"], "question": ["Is there a cup?"] * 2, "answer": ["yes", "no"],
                             "image": [{"bytes": b"x", "path": None}, {"bytes": None, "path": "a.jpg"}]}), path)
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", "--bench", "pope", "--data", str(path)])
    assert result.exit_code == 2 and f"{path} row 1: has no image bytes" in result.stderr
    pq.write_table(pa.table({"question_id": ["1"], "question": ["q"]}), path)
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", "--bench", "pope", "--data", str(path)])
    assert result.exit_code == 2 and "no column answer, image" in result.stderr


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from mmkit.world import coco_export

    def fail(root, *args):
        (root / "val").mkdir(parents=True)
        (root / "val" / "partial.png").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(coco_export, "_write_world", fail)
    with pytest.raises(RuntimeError):
        coco_export.export_world(tmp_path / "world", n_images=1)
    assert list(tmp_path.iterdir()) == []
