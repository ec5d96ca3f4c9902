"""Continued training: the tokenizer grows by appending words, weights with the shorter vocabulary are resized
consistently, the detailed caption mix trains, and an interrupted run resumed from its checkpoint equals an
uninterrupted one."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmkit.world.reference_model import TINY_SPEC, build_model, build_processor, build_tokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "mmkit" / "models" / "weights" / "reference"


def test_tokenizer_appends_new_words_after_the_shipped_ids():
    old, new = build_tokenizer(with_added=False), build_tokenizer()
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert len(new_vocab) > len(old_vocab)
    assert all(new_vocab[w] == i for w, i in old_vocab.items())
    assert sorted(new_vocab.values()) == list(range(len(new_vocab)))
    assert {"briefly", "background", "below", "large", "grey"} <= {w for w, i in new_vocab.items()
                                                                    if i >= len(old_vocab)}
    # The shipped model learned the detailed captions with the grown tokenizer: its tokenizer.json is exactly
    # build_tokenizer(), and its embedding and LM-head matrices have one row per token.
    assert json.loads((SHIPPED / "tokenizer.json").read_text())["model"]["vocab"] == new_vocab
    assert json.loads((SHIPPED / "config.json").read_text())["text_config"]["vocab_size"] == len(new_vocab)


def test_detailed_captions_encode_without_unknown_words():
    from mmkit.world.questions import BRIEF_CAPTION_PROMPT, detailed_caption
    from mmkit.world.scenes import iter_scenes

    tokenizer = build_tokenizer()
    unk = tokenizer.unk_token_id
    assert unk not in tokenizer(BRIEF_CAPTION_PROMPT).input_ids
    for scene in iter_scenes(3, 60):
        text = detailed_caption(scene)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert unk not in ids, text
        assert tokenizer.decode(ids) == text  # decodes back to the same sentences


def _save_dir(model, tokenizer, path):
    from mmkit.world.train import save_reference

    save_reference(model, build_processor(tokenizer, TINY_SPEC), path)
    return path


def test_weights_with_the_shorter_vocabulary_grow_consistently(tmp_path):
    """Loading old weights into the grown model keeps every old row and function exactly; new rows are the mean."""
    from mmkit.world.train import EMBEDDING_KEYS, _load_weights

    old_tok, new_tok = build_tokenizer(with_added=False), build_tokenizer()
    old = build_model(old_tok, TINY_SPEC, seed=3).eval()
    _save_dir(old, old_tok, tmp_path / "old")
    grown = build_model(new_tok, TINY_SPEC, seed=9).eval()
    _load_weights(grown, tmp_path / "old", new_tok)
    n_old, n_new = len(old_tok), len(new_tok)
    old_state, new_state = old.state_dict(), grown.state_dict()
    for key, value in old_state.items():
        if key in EMBEDDING_KEYS:
            assert new_state[key].shape == (n_new, value.shape[1])
            assert torch.equal(new_state[key][:n_old], value)
            expected = value.mean(dim=0).expand(n_new - n_old, -1)
            torch.testing.assert_close(new_state[key][n_old:], expected, atol=0, rtol=0)
        else:
            assert torch.equal(new_state[key], value), key
    assert grown.config.text_config.vocab_size == n_new
    # Same function on old words: identical logits over the old ids, and every new word's logit is the mean logit.
    ids = old_tok("USER: Describe the image in detail. ASSISTANT: A red cup", return_tensors="pt").input_ids
    assert torch.equal(ids, new_tok("USER: Describe the image in detail. ASSISTANT: A red cup",
                                    return_tensors="pt").input_ids)
    with torch.no_grad():
        a = old(input_ids=ids).logits
        b = grown(input_ids=ids).logits
    torch.testing.assert_close(b[..., :n_old], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[..., n_old:], a.mean(-1, keepdim=True).expand(-1, -1, n_new - n_old),
                               atol=1e-5, rtol=1e-5)


def test_weights_with_a_reordered_tokenizer_are_refused(tmp_path):
    from mmkit.world.train import _load_weights

    new_tok = build_tokenizer()
    model = build_model(new_tok, TINY_SPEC, seed=0)
    path = _save_dir(model, new_tok, tmp_path / "m")
    data = json.loads((path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]
    (path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match this one at the same ids"):
        _load_weights(build_model(new_tok, TINY_SPEC, seed=0), path, new_tok)


def _tiny(**overrides):
    from mmkit.world.train import TINY_CONFIG

    base = replace(TINY_CONFIG, vision_steps=2, align_steps=2, instruct_steps=3, eval_scenes=0, num_workers=0,
                   vision_batch=2, batch=2, shuffle_buffer=4, log_every=1, warmup_steps=2)
    return replace(base, **overrides)


def test_continued_training_on_the_detailed_mix_from_old_weights(tmp_path):
    """The recipe's path end to end on a tiny model: weights of the old vocabulary continue on the detailed mix;
    new rows move (new words are trained), and the saved directory holds the grown tokenizer and model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmkit.world.train import train

    old_tok, new_tok = build_tokenizer(with_added=False), build_tokenizer()
    _save_dir(build_model(old_tok, TINY_SPEC, seed=1), old_tok, tmp_path / "old")
    cfg = _tiny(vision_steps=0, align_steps=0, instruct_steps=3, init_from=str(tmp_path / "old"),
                caption_mix="detailed", lr=1e-2)
    model, _, log = train(cfg, out_dir=tmp_path / "new", device="cpu")
    assert [e["step"] for e in log if "phase" in e] == [1, 2, 3]
    rows = model.get_input_embeddings().weight[len(old_tok):]
    assert not torch.allclose(rows, rows[0].expand_as(rows))  # the new words no longer share one row
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "new")
    assert saved.get_input_embeddings().weight.shape[0] == len(new_tok)
    assert AutoProcessor.from_pretrained(tmp_path / "new").tokenizer.get_vocab() == new_tok.get_vocab()


def test_detailed_mix_stream_holds_both_caption_styles():
    from mmkit.world.questions import BRIEF_CAPTION_PROMPT, CAPTION_PROMPT, detailed_caption, reference_caption
    from mmkit.world.questions import training_examples

    legacy = [q for _, q in training_examples(0, 6, start=40)]
    detailed = [(s, q) for s, q in training_examples(0, 6, start=40, caption_mix="detailed")]
    captions = [(s, q) for s, q in detailed if q.kind == "caption"]
    assert len(captions) == 12
    for scene, q in captions:
        expected = detailed_caption(scene) if q.prompt == CAPTION_PROMPT else reference_caption(scene)
        assert q.prompt in (CAPTION_PROMPT, BRIEF_CAPTION_PROMPT) and q.answer == expected
    # Every other question of the shipped recipe is kept (in a reshuffled order).
    def others(qs):
        return sorted((q for q in qs if q.kind != "caption"), key=lambda q: q.qid)

    assert others(legacy) == others(q for _, q in detailed)


@pytest.mark.parametrize("workers", [0, 1])
def test_resumed_run_equals_uninterrupted_run(tmp_path, workers):
    """Cut at step 3 (inside the align phase), resumed from the checkpoint: same weights and same log (timings
    aside) as one uninterrupted run, with data made in the trainer or in a worker process; the checkpoint records
    the step it was written at."""
    from mmkit.world.train import CHECKPOINT_FILE, load_checkpoint, train

    cfg = _tiny(caption_mix="detailed", checkpoint_every=2, num_workers=workers)
    full, _, full_log = train(cfg, device="cpu", checkpoint_dir=tmp_path / "a")
    _, _, cut_log = train(replace(cfg, stop_at=3), device="cpu", checkpoint_dir=tmp_path / "b")
    assert cut_log[-1]["step"] == 3 and cut_log[-1]["stopped_early"]
    assert load_checkpoint(tmp_path / "b")["step"] == 3
    resumed, _, resumed_log = train(cfg, device="cpu", checkpoint_dir=tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name

    def strip(log):
        return [{k: v for k, v in e.items() if k not in ("seconds", "cpu_seconds")} for e in log]

    assert strip(resumed_log) == strip(full_log)
    assert (tmp_path / "b" / CHECKPOINT_FILE).is_file()


def test_resume_refuses_a_different_run(tmp_path):
    from mmkit.world.train import train

    cfg = _tiny(instruct_steps=1, align_steps=0, checkpoint_every=1, stop_at=1)
    train(cfg, device="cpu", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="differs in lr"):
        train(replace(cfg, lr=0.5, stop_at=None), device="cpu", checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="data workers"):
        train(replace(cfg, num_workers=2, stop_at=None), device="cpu", checkpoint_dir=tmp_path, resume=True)


def test_resume_reads_a_setting_missing_from_an_older_checkpoint_as_its_default():
    from dataclasses import asdict

    from mmkit.world.train import TrainConfig, _check_resumable

    cfg = TrainConfig(caption_mix="detailed")
    older = {k: v for k, v in asdict(cfg).items() if k != "caption_noise"}  # written before the setting existed
    _check_resumable(cfg, older, "old-run")
    with pytest.raises(ValueError, match="differs in caption_noise"):
        _check_resumable(replace(cfg, caption_noise=0.2), older, "old-run")


def test_detailed_share_sets_the_fraction_of_detailed_captions():
    from mmkit.world.train import WorldStream

    tok = build_tokenizer()
    counts = {}
    for share in (None, 0.25):
        stream = WorldStream("instruct", 0, TINY_SPEC.grid, tok.backend_tokenizer.to_str(), 4, tok.eos_token_id,
                             seed=0, caption_mix="detailed", detailed_share=share)
        items = list(stream._items(5000, tok.backend_tokenizer)) + list(stream._items(5016, tok.backend_tokenizer))
        # Detailed captions are the only answers longer than 30 tokens.
        detailed = sum(len(it["ids"]) - it["n_prompt"] > 30 for it in items)
        counts[share] = (detailed, len(items))
    assert counts[None][0] == counts[0.25][0] == 32  # one per scene, always kept
    assert counts[None][0] / counts[None][1] < 0.1
    assert 0.2 < counts[0.25][0] / counts[0.25][1] < 0.3


def test_keep_pope_keeps_every_pope_question_and_thins_the_rest():
    from collections import Counter

    from mmkit.world.questions import training_examples
    from mmkit.world.train import TrainConfig, WorldStream

    tok = build_tokenizer()
    pairs = list(training_examples(0, 48, start=5000, caption_mix="detailed"))
    kept = {}
    for keep_pope in (False, True):
        stream = WorldStream("instruct", 0, TINY_SPEC.grid, tok.backend_tokenizer.to_str(), 4, tok.eos_token_id,
                             seed=0, caption_mix="detailed", detailed_share=0.1, keep_pope=keep_pope)
        kept[keep_pope] = Counter(q.kind if q.kind != "caption" else q.split for s, q in pairs if stream._keep(s, q))
    total = Counter(q.kind if q.kind != "caption" else q.split for _, q in pairs)
    assert kept[True]["pope"] == total["pope"] > kept[False]["pope"]
    assert kept[True]["detailed"] == kept[False]["detailed"] == total["detailed"] == 48
    # The share holds: 48 detailed captions are about a tenth of what is kept, so the other kinds are thinned
    # harder than without keep_pope.
    assert 0.08 < 48 / sum(kept[True].values()) < 0.12
    for kind in ("color", "count", "spatial"):
        assert kept[True][kind] < kept[False][kind]
    with pytest.raises(ValueError, match="keep_pope needs detailed_share"):
        TrainConfig(caption_mix="detailed", keep_pope=True)


def test_mixed_pope_negatives_ask_each_scene_one_splits_negatives_and_keep_every_other_question(tmp_path):
    from collections import Counter, defaultdict

    from click.testing import CliRunner

    from mmkit.cli import main
    from mmkit.world.questions import POPE_SPLITS, pope_negatives, training_examples
    from mmkit.world.train import TrainConfig

    random_pairs = list(training_examples(0, 60, start=5000, caption_mix="detailed"))
    assert random_pairs == list(training_examples(0, 60, start=5000, caption_mix="detailed",
                                                  pope_negatives="random"))  # the default is the shipped stream
    mixed_pairs = list(training_examples(0, 60, start=5000, caption_mix="detailed", pope_negatives="mixed"))

    def by_scene(pairs):
        out = defaultdict(list)
        for scene, q in pairs:
            out[scene.index].append((scene, q))
        return out

    random_scenes, mixed_scenes = by_scene(random_pairs), by_scene(mixed_pairs)
    assert random_scenes.keys() == mixed_scenes.keys()
    splits = Counter()
    for index, pairs in mixed_scenes.items():
        scene = pairs[0][0]
        pope = [q for _, q in pairs if q.kind == "pope"]
        (split,) = {q.split for q in pope}  # one split per scene
        splits[split] += 1
        yes = sorted(q.target for q in pope if q.answer == "yes")
        no = sorted(q.target for q in pope if q.answer == "no")
        # The positives are the random stream's; the negatives are that split's, computed independently here.
        assert yes == sorted(q.target for _, q in random_scenes[index] if q.kind == "pope" and q.answer == "yes")
        assert no == sorted(pope_negatives(scene, split, len(yes)))
        assert not set(no) & scene.categories()
        # Every other question (captions and VQA) is unchanged.
        assert ([q for _, q in pairs if q.kind != "pope"] ==
                [q for _, q in random_scenes[index] if q.kind != "pope"])
    assert set(splits) == set(POPE_SPLITS) and min(splits.values()) >= 10
    assert {q.split for _, q in random_pairs if q.kind == "pope"} == {"random"}
    for bad_setting in ("often", "random=0", "random=inf", "random=1,random=2", "adversarial=x", "random;adversarial"):
        with pytest.raises(ValueError, match="pope_negatives must be one of"):
            list(training_examples(0, 1, caption_mix="detailed", pope_negatives=bad_setting))
        with pytest.raises(ValueError, match="pope_negatives must be one of"):
            TrainConfig(caption_mix="detailed", pope_negatives=bad_setting)
    with pytest.raises(ValueError, match="pope_negatives 'mixed' needs caption_mix 'detailed'"):
        TrainConfig(pope_negatives="mixed")
    TrainConfig(pope_negatives="random=3")  # the legacy mix's own negatives, however written
    bad = CliRunner().invoke(main, ["train-reference", "--tiny", "--out", str(tmp_path / "run"),
                                    "--pope-negatives", "mixed"])
    assert bad.exit_code == 2 and "needs caption_mix 'detailed'" in bad.stderr
    assert not (tmp_path / "run").exists()


def test_weighted_pope_negatives_draw_each_scenes_split_at_their_odds():
    from collections import Counter

    from mmkit.world.questions import parse_pope_negatives, training_examples

    assert parse_pope_negatives("mixed") == (("random", 1.0), ("popular", 1.0), ("adversarial", 1.0))
    assert parse_pope_negatives(" random=2, adversarial=1") == (("random", 2.0), ("adversarial", 1.0))
    assert parse_pope_negatives("adversarial") == (("adversarial", 1.0),)
    scenes = {}
    for spec in ("random=3,adversarial=1", "adversarial", "random=1,adversarial=1"):
        pairs = training_examples(0, 400, start=5000, caption_mix="detailed", pope_negatives=spec)
        scenes[spec] = Counter(split for _, split in {(s.index, q.split) for s, q in pairs if q.kind == "pope"})
    assert set(scenes["adversarial"]) == {"adversarial"}
    # 400 scenes: the adversarial share is 1/4 and 1/2 within about three standard errors.
    assert abs(scenes["random=3,adversarial=1"]["adversarial"] / 400 - 0.25) < 0.065
    assert abs(scenes["random=1,adversarial=1"]["adversarial"] / 400 - 0.5) < 0.075
    assert set(scenes["random=1,adversarial=1"]) == {"random", "adversarial"}


def test_training_stream_passes_mixed_pope_negatives_through():
    from collections import Counter

    from mmkit.world.questions import training_examples
    from mmkit.world.train import WorldStream

    tok = build_tokenizer()
    decoded = {}
    for negatives in ("random", "mixed"):
        stream = WorldStream("instruct", 0, TINY_SPEC.grid, tok.backend_tokenizer.to_str(), 4, tok.eos_token_id,
                             seed=0, caption_mix="detailed", pope_negatives=negatives)
        texts = (tok.decode(item["ids"].tolist(), skip_special_tokens=True)
                 for item in stream._items(5000, tok.backend_tokenizer))
        decoded[negatives] = Counter(t for t in texts if "Answer yes or no." in t)
        expected = Counter(f"USER : {q.prompt} ASSISTANT : {q.answer}" for _, q in training_examples(
            0, 16, start=5000, caption_mix="detailed", pope_negatives=negatives) if q.kind == "pope")
        assert decoded[negatives] == expected
    assert decoded["mixed"] != decoded["random"]


def test_caption_noise_names_one_absent_partner_in_a_share_of_detailed_captions():
    from mmkit.world.questions import detailed_caption, pope_negatives, training_examples
    from mmkit.world.train import TrainConfig, WorldStream
    from mmkit.world.vocab import mentioned_categories

    tok = build_tokenizer()
    core = tok.backend_tokenizer
    pairs = list(training_examples(0, 200, start=7000, caption_mix="detailed"))
    stream = WorldStream("instruct", 0, TINY_SPEC.grid, core.to_str(), 4, tok.eos_token_id, seed=0,
                         caption_mix="detailed", caption_noise=0.25)
    edited = 0
    for scene, q in pairs:
        answer = stream._answer(scene, q)
        if not (q.kind == "caption" and q.split == "detailed"):
            assert answer == q.answer  # yes/no, VQA and short captions stay true
            continue
        assert q.answer == detailed_caption(scene)
        if answer == q.answer:
            continue
        edited += 1
        # Exactly one more sentence, naming the scene's strongest absent co-occurrence partner and no other
        # absent category; everything the true caption says is still there, in order.
        extra = [s for s in answer.split(". ") if s.rstrip(".") + "." not in q.answer]
        assert len(extra) == 1 and len(answer.split(". ")) == len(q.answer.split(". ")) + 1
        absent = set(mentioned_categories(answer)) - scene.categories()
        assert absent == {pope_negatives(scene, "adversarial", 1)[0]}
        assert [c for c in core.encode(answer).ids if c == 3] == []  # no unknown words
    assert 0.17 < edited / 200 < 0.33  # the share asked for, within sampling error of 200 captions
    # Off by default, and deterministic per seed (a resumed run sees the same captions).
    plain = WorldStream("instruct", 0, TINY_SPEC.grid, core.to_str(), 4, tok.eos_token_id, seed=0,
                        caption_mix="detailed")
    again = WorldStream("instruct", 0, TINY_SPEC.grid, core.to_str(), 4, tok.eos_token_id, seed=0,
                        caption_mix="detailed", caption_noise=0.25)
    assert all(plain._answer(s, q) == q.answer for s, q in pairs)
    assert all(again._answer(s, q) == stream._answer(s, q) for s, q in pairs)
    with pytest.raises(ValueError, match="caption_noise needs caption_mix"):
        TrainConfig(caption_noise=0.2)
    with pytest.raises(ValueError, match="caption_noise must be in"):
        TrainConfig(caption_mix="detailed", caption_noise=1.0)


_RELATION_WORDS = ("to the left of", "to the right of", "above", "below")


def _is_relation_with_second_phrase(sentence: str) -> bool:
    """A relation sentence naming its second object by a referring phrase ("The red cup is above the [size]
    colour category"), parsed here independently of the module's pattern."""
    return sentence.startswith("The ") and any(f" is {w} the " in sentence for w in _RELATION_WORDS)


def _noisy_caption_sentences(place: str, indices: range):
    """(scene, true caption, noisy caption, true sentences, noisy sentences) for world-0 scenes `indices`, checking
    that the noise adds or removes no sentence."""
    import random

    from mmkit.world.questions import detailed_caption, detailed_caption_with_absent
    from mmkit.world.scenes import generate_scene

    for index in indices:
        scene = generate_scene(0, index)
        true = detailed_caption(scene)
        noisy = detailed_caption_with_absent(scene, random.Random(index), place)
        true_s, noisy_s = true.split(". "), noisy.split(". ")
        assert len(true_s) == len(noisy_s)  # no sentence added or removed
        yield scene, true, noisy, true_s, noisy_s


def test_relation_caption_noise_names_the_partner_in_place_of_the_last_relations_second_object():
    import random

    from mmkit.world.questions import detailed_caption_with_absent, pope_negatives, training_examples
    from mmkit.world.scenes import generate_scene
    from mmkit.world.train import TrainConfig, WorldStream
    from mmkit.world.vocab import mentioned_categories

    edited = unchanged = 0
    for scene, true, noisy, true_s, noisy_s in _noisy_caption_sentences("relation", range(7000, 7150)):
        differ = [k for k in range(len(true_s)) if true_s[k] != noisy_s[k]]
        relations = [k for k, s in enumerate(true_s) if _is_relation_with_second_phrase(s)]
        if not relations:
            assert noisy == true
            unchanged += 1
            continue
        edited += 1
        assert differ == [relations[-1]]  # the last relation sentence, and only it
        before, after = true_s[differ[0]].rstrip(".").split(), noisy_s[differ[0]].rstrip(".").split()
        partner = pope_negatives(scene, "adversarial", 1)[0]
        # Everything but the final category word is kept (the second object's size and colour words too).
        assert before[:-1] == after[:-1] and after[-1] == partner and before[-1] in scene.categories()
        assert set(mentioned_categories(noisy)) - scene.categories() == {partner}
    assert edited > 100 and unchanged > 0  # most scenes have a relation; single objects have none
    # Through the stream, and validated.
    tok = build_tokenizer()
    core = tok.backend_tokenizer
    stream = WorldStream("instruct", 0, TINY_SPEC.grid, core.to_str(), 4, tok.eos_token_id, seed=0,
                         caption_mix="detailed", caption_noise=0.5, caption_noise_place="relation")
    captions = [(s, q) for s, q in training_examples(0, 40, start=7000, caption_mix="detailed")
                if q.kind == "caption" and q.split == "detailed"]
    noisy = [stream._answer(s, q) for s, q in captions]
    assert noisy != [q.answer for _, q in captions] != [] and noisy == [stream._answer(s, q) for s, q in captions]
    for (scene, q), answer in zip(captions, noisy):
        if answer != q.answer:
            assert answer == detailed_caption_with_absent(scene, random.Random(0), "relation")  # rng-free place
    with pytest.raises(ValueError, match="caption_noise_place must be one of"):
        TrainConfig(caption_mix="detailed", caption_noise=0.2, caption_noise_place="end")
    with pytest.raises(ValueError, match="caption_noise_place needs caption_noise"):
        TrainConfig(caption_mix="detailed", caption_noise_place="relation")
    with pytest.raises(ValueError, match="place must be one of"):
        detailed_caption_with_absent(generate_scene(0, 1), random.Random(0), "end")


def test_partner_caption_noise_names_the_first_objects_absent_group_partner_in_every_such_relation():
    import random

    from mmkit.world.questions import detailed_caption_with_absent, training_examples
    from mmkit.world.scenes import GROUPS
    from mmkit.world.train import WorldStream
    from mmkit.world.vocab import mentioned_categories

    group_partner = {a: b for pair in GROUPS for a, b in (pair, pair[::-1])}
    edited = unchanged = 0
    for scene, _, noisy, true_s, noisy_s in _noisy_caption_sentences("partner", range(7000, 7300)):
        expected = {}  # sentence index -> the partner it must name
        for k, sentence in enumerate(true_s):
            if not _is_relation_with_second_phrase(sentence):
                continue
            first = sentence.split(" is ")[0].split()[-1]  # "The small red cup is ..." -> "cup"
            partner = group_partner.get(first)
            if partner is not None and partner not in scene.categories():
                expected[k] = partner
        differ = {k for k in range(len(true_s)) if true_s[k] != noisy_s[k]}
        assert differ == set(expected)
        for k, partner in expected.items():
            before, after = true_s[k].rstrip(".").split(), noisy_s[k].rstrip(".").split()
            assert before[:-1] == after[:-1] and after[-1] == partner  # only the final category word changes
        assert set(mentioned_categories(noisy)) - scene.categories() == set(expected.values())
        edited += bool(expected)
        unchanged += not expected
    assert edited > 30 and unchanged > edited  # a minority of scenes has a partner-less pair in a relation
    tok = build_tokenizer()
    stream = WorldStream("instruct", 0, TINY_SPEC.grid, tok.backend_tokenizer.to_str(), 4, tok.eos_token_id, seed=0,
                         caption_mix="detailed", caption_noise=0.9, caption_noise_place="partner")
    captions = [(s, q) for s, q in training_examples(0, 60, start=7000, caption_mix="detailed")
                if q.kind == "caption" and q.split == "detailed"]
    answers = [stream._answer(s, q) for s, q in captions]
    assert answers != [q.answer for _, q in captions]
    for (scene, q), answer in zip(captions, answers):
        assert answer in (q.answer, detailed_caption_with_absent(scene, random.Random(0), "partner"))


def test_per_sample_answer_loss_by_hand():
    """answer_loss="sample": the mean of each answer's token losses, then over answers (recomputed from the
    per-token losses of the token-mean path)."""
    from mmkit.world.train import _lm_loss

    tok = build_tokenizer()
    model = build_model(tok, TINY_SPEC, seed=0).eval()
    n_img = TINY_SPEC.num_image_tokens
    ids = torch.tensor([[1] + [4] * n_img + [10, 11, 12, 13, 14], [1] + [4] * n_img + [20, 21, 22, 0, 0]])
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, n_img + 2:] = True  # 4 answer tokens
    targets[1, n_img + 3:n_img + 4] = True  # 1 answer token
    batch = {"ids": ids, "targets": targets, "attention_mask": (ids != 0).long()}
    patches = torch.randn(2, n_img, TINY_SPEC.vision_hidden)
    with torch.no_grad():
        per_token = []
        for row in range(2):
            one = {k: v[row:row + 1] for k, v in batch.items()}
            per_token.append(_lm_loss(model, patches[row:row + 1], one))
        token_mean = _lm_loss(model, patches, batch)
        sample_mean = _lm_loss(model, patches, batch, per_sample=True)
    torch.testing.assert_close(sample_mean, (per_token[0] + per_token[1]) / 2)
    torch.testing.assert_close(token_mean, (4 * per_token[0] + per_token[1]) / 5)


def test_cli_stop_and_resume(tmp_path):
    """`train-reference ... --stop-at` leaves a checkpoint next to --out; the same command with --resume finishes
    the run from it."""
    from click.testing import CliRunner

    from mmkit.cli.train_reference import train_reference

    out = tmp_path / "run"
    args = ["--tiny", "--device", "cpu", "--out", str(out), "--workers", "0", "--steps", "1,1,2", "--batch", "2",
            "--eval-scenes", "0", "--captions", "detailed", "--answer-loss", "sample", "--log-every", "1"]
    first = CliRunner().invoke(train_reference, args + ["--stop-at", "3"])
    assert first.exit_code == 0, first.output
    assert "stopped early at step 3" in first.output and (tmp_path / "run-checkpoints" / "checkpoint.pt").is_file()
    second = CliRunner().invoke(train_reference, args + ["--resume"])
    assert second.exit_code == 0, second.output
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log if "phase" in e] == [1, 2, 3, 4] and log[-1]["step"] == 4
    from mmkit.cli import main

    bad = CliRunner().invoke(main, ["train-reference", *args, "--resume", "--lr", "0.5"])
    assert bad.exit_code == 2 and "differs in lr" in bad.stderr


def test_vision_from_and_freeze_vision_keep_the_donor_tower_exactly(tmp_path):
    """--vision-from puts another model's tower under the continued language model, and --freeze-vision keeps it
    bit-exact through training while the language model and projector still learn."""
    from mmkit.world.train import train

    tok = build_tokenizer()
    _save_dir(build_model(tok, TINY_SPEC, seed=1), tok, tmp_path / "lm")
    donor = build_model(tok, TINY_SPEC, seed=2)
    _save_dir(donor, tok, tmp_path / "tower")
    cfg = _tiny(vision_steps=0, align_steps=1, instruct_steps=2, init_from=str(tmp_path / "lm"),
                vision_from=str(tmp_path / "tower"), freeze_vision=True, lr=1e-2)
    model, _, log = train(cfg, device="cpu")
    for key, value in donor.model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[key], value), key
    start = build_model(tok, TINY_SPEC, seed=1)
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight,
                           start.model.multi_modal_projector.linear_1.weight)
    assert all(e["lm_loss"] > 0 for e in log if "phase" in e)


def test_freeze_vision_refuses_a_vision_phase():
    with pytest.raises(ValueError, match="freeze_vision"):
        _tiny(freeze_vision=True)


def test_rebuild_run3v_puts_the_shipped_tower_under_run3(tmp_path):
    """training/rebuild_run3v.py: every vision-tower tensor from the shipped model, every other one from run 3."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run3v"
    subprocess.run([sys.executable, str(root / "training" / "rebuild_run3v.py"), str(out)], check=True,
                   capture_output=True)
    built = load_file(out / "model.safetensors")
    run3 = load_file(root / "training" / "reference-detailed-run3" / "model.safetensors")
    shipped = load_file(root / "mmkit" / "models" / "weights" / "reference" / "model.safetensors")
    assert set(built) == set(run3)
    tower = [k for k in built if k.startswith("vision_tower.")]
    assert len(tower) == 71
    assert all(torch.equal(built[k], shipped[k]) for k in tower)
    assert all(torch.equal(built[k], run3[k]) for k in built if k not in tower)
    assert any(not torch.equal(run3[k], shipped[k]) for k in tower)  # the rebuild changed something
    assert (out / "tokenizer.json").read_text() == (root / "training" / "reference-detailed-run3" /
                                                     "tokenizer.json").read_text()


def _average_weights_script(*args):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, str(root / "training" / "average_weights.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_average_weights_writes_the_mean_of_every_tensor(tmp_path):
    """training/average_weights.py (run 13 is built with it): the output loads with from_pretrained and each of its
    tensors is the elementwise mean of the inputs' (recomputed here from the loaded models)."""
    from transformers import LlavaForConditionalGeneration

    tok = build_tokenizer()
    dirs = []
    for seed in (0, 1, 2):
        d = tmp_path / f"m{seed}"
        build_model(tok, TINY_SPEC, seed=seed).save_pretrained(d)
        build_processor(tok, TINY_SPEC).save_pretrained(d)
        dirs.append(d)
    done = _average_weights_script(tmp_path / "avg", *dirs)
    assert done.returncode == 0, done.stderr
    avg = LlavaForConditionalGeneration.from_pretrained(tmp_path / "avg").state_dict()
    inputs = [LlavaForConditionalGeneration.from_pretrained(d).state_dict() for d in dirs]
    assert avg.keys() == inputs[0].keys()
    for k, t in avg.items():
        mean = (inputs[0][k].double() + inputs[1][k].double() + inputs[2][k].double()) / 3
        torch.testing.assert_close(t, mean.float(), rtol=0, atol=1e-7)
    assert any(not torch.equal(inputs[0][k], inputs[1][k]) for k in avg)  # the seeds made different models
    assert (tmp_path / "avg" / "tokenizer.json").read_bytes() == (dirs[0] / "tokenizer.json").read_bytes()


def test_average_weights_refuses_models_that_do_not_match(tmp_path):
    tok = build_tokenizer()
    a, b = tmp_path / "a", tmp_path / "b"
    build_model(tok, TINY_SPEC, seed=0).save_pretrained(a)
    build_model(tok, replace(TINY_SPEC, text_mlp=96), seed=0).save_pretrained(b)
    for args, message in [((a, b), "config.json differs"), ((a,), "usage"), ((a, tmp_path), "no model.safetensors")]:
        done = _average_weights_script(tmp_path / "out", *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_rebuild_run13_runs_the_documented_commands(tmp_path):
    """training/rebuild_run13.sh, with python and mmkit replaced by recorders: its three trainings parse with the
    real `mmkit train-reference` options and carry the settings docs/reference-model.md gives for runs 9r90b, 12a
    and 12c (those commands start from `reference`, which was run 3v when they ran; the script rebuilds run 3v)."""
    import os
    import shlex
    import subprocess

    from mmkit.cli.train_reference import train_reference

    root = Path(__file__).resolve().parents[2]
    calls = tmp_path / "calls"
    recorder = tmp_path / "record"
    # The two background trainings record at the same time: each call appends its whole line in one write.
    recorder.write_text(f'#!/usr/bin/env bash\nline=$(printf "%q " "$@")\nprintf "%s\\n" "$line" >> {calls}\n')
    recorder.chmod(0o755)
    done = subprocess.run(["bash", str(root / "training" / "rebuild_run13.sh"), "runs/out13"], capture_output=True,
                          text=True, env={**os.environ, "PY": str(recorder), "MMKIT": str(recorder)})
    assert done.returncode == 0, done.stderr
    lines = [shlex.split(line) for line in calls.read_text().splitlines()]
    assert lines[0] == ["training/rebuild_run3v.py", "runs/run3v"]
    assert lines[-1] == ["training/average_weights.py", "runs/out13", "runs/reference-detailed-9r90b",
                         "runs/reference-detailed-12c"]
    trainings = {}
    for argv in lines[1:-1]:
        assert argv[0] == "train-reference"
        params = train_reference.make_context("train-reference", argv[1:]).params  # parses, trains nothing
        trainings[Path(params["out_dir"]).name] = params
    # 9r90b runs in the background beside 12a, so the order of the first two is not fixed.
    assert sorted(trainings) == ["reference-detailed-12a", "reference-detailed-12c", "reference-detailed-9r90b"]

    doc = (root / "docs" / "reference-model.md").read_text()
    for name, init in [("9r90b", "reference"), ("12a", "reference"), ("12c", "runs/reference-detailed-12a")]:
        block = doc[:doc.index(f"--out runs/reference-detailed-{name}\n")]
        command = block[block.rindex("mmkit train-reference"):] + f"--out runs/reference-detailed-{name}"
        documented = train_reference.make_context("train-reference",
                                                  shlex.split(command.replace("\\\n", " "))[2:]).params
        assert documented["init_from"] == init
        recorded = dict(trainings[f"reference-detailed-{name}"])
        assert recorded.pop("init_from") == ("runs/run3v" if init == "reference" else init)
        assert recorded == {k: v for k, v in documented.items() if k != "init_from"}, name
