"""The method standards for the pre-LLM selection methods (divprune, cdpruner, random, pooling): no-op equivalence,
a visible effect, bit-exact removal, batch = single calls, export round trip, composition with mitigation."""

import pytest
import torch

import mmkit
from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.registry import parse_spec

N = 64  # tiny-random: 8 x 8 patches per image
METHODS = ("divprune", "cdpruner", "random", "pooling")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", ["tokens=64", "keep=1.0"])
def test_keeping_every_token_is_identical_to_baseline(session, images, prompts, method, budget):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    texts = [r.text for r in session.generate(images, prompts, max_new_tokens=5)]
    handle = session.apply(f"{method}:{budget}")
    try:
        assert torch.equal(forward_logits(session, inputs), base)
        assert [r.text for r in session.generate(images, prompts, max_new_tokens=5)] == texts
    finally:
        handle.remove()


@pytest.mark.parametrize("method", METHODS)
def test_pruning_changes_logits_and_remove_restores_exactly(session, images, prompts, method):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    hooks = len(session.model._forward_pre_hooks)
    handle = session.apply(f"{method}:tokens=16")
    reduced = forward_logits(session, inputs)
    assert reduced.shape[1] == base.shape[1] - (N - 16)
    assert not torch.allclose(reduced[:, -1], base[:, -1])
    stats = session.generate(images, prompts, max_new_tokens=3)
    assert all(r.stats.visual_tokens == N and r.stats.visual_tokens_kept == [16] * 4 for r in stats)
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert not session.adapter.language_model._forward_pre_hooks
    assert len(session.model._forward_pre_hooks) == hooks


@pytest.mark.parametrize("spec", ["divprune:tokens=9", "cdpruner:tokens=9", "random:tokens=9,seed=3",
                                  "pooling:tokens=16", "divprune:tokens=9,positions=original"])
def test_batch_of_different_prompts_equals_single_runs(session, images, prompts, spec):
    session.apply(spec)
    batched = session.generate(images, prompts, max_new_tokens=8)
    scores = session.answer_logprobs(images, prompts).logprobs
    for i in range(3):
        assert session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0].text == batched[i].text
        single = session.answer_logprobs([images[i]], [prompts[i]]).logprobs[0]
        assert torch.allclose(torch.tensor(single), torch.tensor(scores[i]), atol=1e-4)


@pytest.mark.parametrize("spec", ["divprune:tokens=12", "cdpruner:tokens=12,invert=true", "random:tokens=12,seed=5",
                                  "pooling:tokens=16"])
def test_export_round_trip(images, prompts, tmp_path, spec):
    session = mmkit.load("tiny-random", methods=[spec])
    inputs = session.prepare(images, prompts)
    expected = forward_logits(session, inputs)
    texts = [r.text for r in session.generate(images, prompts, max_new_tokens=4)]
    session.save_pretrained(tmp_path / "export")
    session.close()
    reloaded = mmkit.load(str(tmp_path / "export"))
    try:
        assert [h.config for h in reloaded.methods] == [parse_spec(spec)]
        assert torch.equal(forward_logits(reloaded, reloaded.prepare(images, prompts)), expected)
        assert [r.text for r in reloaded.generate(images, prompts, max_new_tokens=4)] == texts
    finally:
        reloaded.close()


MITIGATION = ["vcd:alpha=1", "agla:layers=1", "paint:start_layer=1", "var:start_layer=1,tau=2", "vhr"]


@pytest.mark.parametrize("mitigation", MITIGATION)
@pytest.mark.parametrize("pruning", ["divprune:tokens=16", "cdpruner:tokens=16", "random:tokens=16",
                                     "pooling:tokens=16"])
def test_composes_with_mitigation_in_either_order(session, images, prompts, pruning, mitigation):
    session.apply(mitigation)
    alone = [r.text for r in session.generate(images[:2], prompts[:2], max_new_tokens=4)]
    for order in ((pruning, mitigation), (mitigation, pruning)):
        session.remove_all()
        for spec in order:
            session.apply(spec)
        results = session.generate(images[:2], prompts[:2], max_new_tokens=4)
        assert [r.stats.visual_tokens_kept[0] for r in results] == [16, 16]
        # Same pair, other order: the same answers (each method sees the same thing whatever the order).
        if order[0] == pruning:
            first = [r.text for r in results]
        else:
            assert [r.text for r in results] == first
    assert len(alone) == 2


@pytest.mark.parametrize("method", METHODS)
def test_config_validation(session, method):
    with pytest.raises(MmkitError, match="keep must be"):
        session.apply(f"{method}:keep=0")
    with pytest.raises(MmkitError, match="tokens must be"):
        session.apply(f"{method}:tokens=-1")
    with pytest.raises(MmkitError, match="this model has 64"):
        session.apply(f"{method}:tokens=65")


@pytest.mark.parametrize("method", METHODS)
def test_shares_the_pre_llm_slot_on_every_layout(session, method):
    session.apply(f"{method}:tokens=16")
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("visionzip:keep=0.25")
    nxt = mmkit.load("tiny-random-next", device="cpu")
    try:
        nxt.apply(f"{method}:keep=0.5")  # images differ in size there: a share, or tokens capped per image
        with pytest.raises(MmkitError, match="cannot combine"):
            nxt.apply("visionzip:keep=0.25")
    finally:
        nxt.close()


@pytest.mark.parametrize("spec", ["divprune:tokens=12", "cdpruner:tokens=12", "random:tokens=12", "pooling:tokens=16"])
def test_remote_code_export_runs_with_plain_transformers(tmp_path, images, prompts, spec):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    session = mmkit.load("tiny-random", methods=[spec])
    inputs = session.prepare(images, prompts)
    expected = forward_logits(session, inputs)
    texts = [r.text for r in session.generate(images, prompts, max_new_tokens=4)]
    session.save_pretrained(tmp_path / "export", remote_code=True)
    session.close()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", trust_remote_code=True)
    tokenizer = AutoProcessor.from_pretrained(tmp_path / "export").tokenizer
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, expected)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    assert [tokenizer.decode(r[:r.index(eos)] if eos in r else r, skip_special_tokens=True).strip()
            for r in new] == texts
