"""The lmms-eval plug-in on the new families: continuation log-likelihoods (continuations appended to left-padded
prompts, so Qwen-VL's per-token types must follow the longer rows), batched equal to single rows and to
`answer_logprobs`, with and without a multi-branch method; generation through the plug-in."""

from __future__ import annotations

import importlib.util

import pytest

from families_lib import family_images

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.skipif(not HAS_LMMS, reason="lmms_eval is not installed; run scripts/install_lmms.sh")
@pytest.mark.parametrize("name", ["tiny-random-qwen2.5-vl", "tiny-random-onevision"])
@pytest.mark.parametrize("method", [None, "vcd"])
def test_loglikelihood_on_families(name, method):
    from mmkit.evals import lmms_adapter

    model = lmms_adapter.MmkitLMM(pretrained=name, batch_size=3, **({"methods": method} if method else {}))
    images = family_images()
    model.task_dict = {"t": {"test": {i: {"image": img} for i, img in enumerate(images)}}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    requests = [_Request(p, c, visual, i, "t", "test") for i, (p, c) in enumerate(zip(PROMPTS, ["yes", "no", "y"]))]
    batched = model.loglikelihood(requests)
    model.batch_size = 1
    single = [model.loglikelihood([r])[0] for r in requests]
    for (lp_b, g_b), (lp_s, g_s) in zip(batched, single):
        assert lp_b == pytest.approx(lp_s, abs=1e-4) and g_b == g_s
    session = model.session
    token = session.choice_token_ids(["y", "n"])[0]
    text = session.processor.tokenizer.decode([token])
    lp = model.loglikelihood([_Request(PROMPTS[0], text, visual, 0, "t", "test")])[0][0]
    assert lp == pytest.approx(session.answer_logprobs(images[:1], PROMPTS[:1], ["y", "n"]).logprobs[0][0], abs=1e-4)
    session.close()
