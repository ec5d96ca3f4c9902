"""Every method runs on a bfloat16 and a float16 session on CPU without dtype errors, and answers as in float32
wherever float32's margin is wide enough for half precision to keep the decision."""

import pytest
import torch

import mmkit

# Every registered method, set up for the reference model (its shipped gates, weights and tuned configuration).
SPECS = ["fastv", "pyramiddrop", "sparsevlm", "sparsevlm:budget=rank", "visionzip", "vflowopt:config=reference-0.25",
         "dyvte", "visor", "divprune", "cdpruner", "random", "pooling", "agla", "agla:blip={blip},blip_layer=1", "paint",
         "vcd", "var:tau=2", "vhr"]
HALF = ["bfloat16", "float16"]
# A yes/no decision counts when float32 prefers one answer by this much log-probability (bf16 keeps 8 bits of
# mantissa: its logits move by up to about 0.4 here).
MARGIN = 0.5

pytestmark = pytest.mark.slow


def test_every_method_is_covered():
    from mmkit.registry import list_methods

    assert {s.split(":")[0] for s in SPECS} == {m.name for m in list_methods()}


@pytest.fixture(scope="module")
def pope():
    from mmkit.evals.benches import select_questions
    from mmkit.world.scenes import generate_scene

    # Ten questions, so that every method keeps at least three with a clear float32 answer on the shipped model
    # (with the first six, DivPrune left too few away from a tie).
    questions = select_questions("pope", "adversarial", 1, 10)
    return [generate_scene(1, q.scene_index).image for q in questions], [q.prompt for q in questions]


@pytest.fixture(scope="module")
def sessions():
    loaded = {dtype: mmkit.load("reference", device="cpu", dtype=dtype) for dtype in ["float32", *HALF]}
    yield loaded
    for s in loaded.values():
        s.close()


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from conftest import tiny_blip

    path = tmp_path_factory.mktemp("blip")
    tiny_blip(path)  # AGLA's BLIP matcher: an auxiliary model that stays float32 beside a half-precision LVLM
    return path


@pytest.fixture(scope="module")
def float32_scores(sessions, pope):
    cache = {}

    def scores(spec):
        if spec not in cache:
            session = sessions["float32"]
            handle = session.apply(spec)
            try:
                cache[spec] = torch.tensor(session.answer_logprobs(*pope).logprobs)
            finally:
                handle.remove()
        return cache[spec]

    return scores


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("spec", SPECS)
def test_method_in_half_precision_answers_as_in_float32(sessions, float32_scores, pope, spec, dtype, blip_dir):
    images, prompts = pope
    spec = spec.format(blip=blip_dir)
    reference = float32_scores(spec)
    session = sessions[dtype]
    assert session.dtype == getattr(torch, dtype) and session.model.dtype == getattr(torch, dtype)
    handle = session.apply(spec)
    if "blip=" in spec:
        assert handle.impl.matcher.model.dtype == torch.float32
    try:
        scores = torch.tensor(session.answer_logprobs(images, prompts).logprobs)
        results = session.generate(images[:2], prompts[:2], max_new_tokens=3)
    finally:
        handle.remove()
    assert all(r.text.strip() for r in results)
    assert not torch.isnan(scores).any()
    # -inf marks an answer a plausibility cutoff removed (AGLA, VCD): a decision with an infinite margin.
    gap = torch.nan_to_num(reference[:, 0] - reference[:, 1], posinf=1e9, neginf=-1e9)
    confident = gap.abs() > MARGIN
    assert confident.sum() >= 3, f"too few rows with a clear float32 answer: {gap.tolist()}"
    assert torch.equal(scores.argmax(1)[confident], reference.argmax(1)[confident]), \
        f"{spec} in {dtype}: {scores.tolist()} against float32 {reference.tolist()}"
