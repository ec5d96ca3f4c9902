import math

import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.hallucination.vcd import VCDConfig, add_diffusion_noise, diffusion_coefficients


def _scores(session, images, prompts):
    return torch.tensor(session.answer_logprobs(images, prompts, ["a", "b", "c"]).logprobs)


def test_noise_schedule_and_determinism():
    keep, scale = diffusion_coefficients(500)
    assert abs(keep ** 2 + scale ** 2 - 1.0) < 1e-9
    # The official schedule, written out in float32 as in vcd_add_noise.py.
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    official = torch.cumprod(1 - betas, dim=0).sqrt()[500].item()
    assert abs(keep - official) < 1e-5
    assert diffusion_coefficients(999)[0] < keep < diffusion_coefficients(0)[0]
    x = torch.randn(2, 3, 8, 8)
    a = add_diffusion_noise(x, 500, seed=3)
    assert torch.equal(a, add_diffusion_noise(x, 500, seed=3))
    assert not torch.equal(a, add_diffusion_noise(x, 500, seed=4))
    # Each row gets the same noise, so a row does not depend on the batch it is in.
    assert torch.equal(add_diffusion_noise(x[1:], 500, seed=3)[0], a[1])


def test_alpha_zero_is_identical_to_baseline(session, images, prompts):
    base_scores = _scores(session, images, prompts)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    session.apply("vcd:alpha=0")
    assert torch.equal(_scores(session, images, prompts), base_scores)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=6)] == base_text


def test_combination_rule(session, images, prompts):
    """Scores equal (1+a) z(v) - a z(v') restricted to the plausible set, recomputed by hand."""
    handle = session.apply("vcd:alpha=1.5,beta=0.2,noise_step=400,seed=7")
    inputs = session.prepare(images, prompts)
    expanded = handle.impl.expand_inputs(session, inputs)
    assert expanded["input_ids"].shape[0] == 6
    assert torch.equal(expanded["pixel_values"][:3], inputs["pixel_values"])
    with torch.inference_mode():
        z = session.model(**expanded, logits_to_keep=1).logits[:, -1].float()
    clean, noised = z[:3], z[3:]
    expected = 2.5 * clean - 1.5 * noised
    expected[clean < math.log(0.2) + clean.max(-1, keepdim=True).values] = float("-inf")
    got = handle.impl.combine_logits(z)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(got[finite], expected[finite])
    # The most likely clean token always survives the cutoff.
    assert bool(torch.isfinite(got.gather(1, clean.argmax(-1, keepdim=True))).all())


def test_changes_outputs_and_remove_restores(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base_logits = forward_logits(session, inputs)
    base_scores = _scores(session, images, prompts)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=8)]
    handle = session.apply("vcd:alpha=3,beta=0")
    on_scores = _scores(session, images, prompts)
    on_text = [r.text for r in session.generate(images, prompts, max_new_tokens=8)]
    assert not torch.allclose(on_scores, base_scores, atol=1e-3)
    assert on_text != base_text
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base_logits)
    assert torch.equal(_scores(session, images, prompts), base_scores)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=8)] == base_text


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    session.apply("vcd")
    batched = [r.text for r in session.generate(images, prompts, max_new_tokens=8)]
    batch_scores = _scores(session, images, prompts)
    for i in range(3):
        assert session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0].text == batched[i]
        single = _scores(session, [images[i]], [prompts[i]])[0]
        finite = torch.isfinite(single)
        assert torch.equal(finite, torch.isfinite(batch_scores[i]))
        assert torch.allclose(single[finite], batch_scores[i][finite], atol=1e-4)


def test_sampling_is_seeded(session, images, prompts):
    session.apply("vcd")
    a = [r.text for r in session.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=5)]
    b = [r.text for r in session.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=5)]
    c = [r.text for r in session.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=6)]
    assert a == b
    assert a != c


def test_plausibility_cutoff_limits_sampled_tokens(session, images, prompts):
    """With beta = 1 only the clean argmax survives, so sampling must equal greedy decoding."""
    session.apply("vcd:beta=1.0")
    greedy = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    sampled = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=2)]
    assert sampled == greedy


@pytest.mark.parametrize("spec, message", [
    ("vcd:alpha=-1", "alpha"),
    ("vcd:beta=1.5", "beta"),
    ("vcd:noise_step=1000", "noise_step"),
    ("vcd:noise_step=-1", "noise_step"),
])
def test_config_validation(session, spec, message):
    with pytest.raises(MmkitError, match=message):
        session.apply(spec)
    with pytest.raises(ValueError, match="alpha"):
        VCDConfig(alpha=float("nan"))


def test_registered_as_branching_hallucination_method(session):
    from mmkit.registry import get_method

    info = get_method("vcd")
    assert info.kind == "hallucination"
    assert "logit_branches" in info.slots
    session.apply("vcd")
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("vcd:alpha=2")
