"""`mmkit bench` presets of the new families: the 7B shapes build (on the meta device: no memory, no GPU), and the
benchmark code runs end to end on the tiny presets of the same families on CPU."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from mmkit import speed
from mmkit.cli import main


@pytest.mark.parametrize("preset, cls, billions, layers, hidden", [
    ("llava-onevision-7b", "LlavaOnevisionForConditionalGeneration", 8.0, 28, 3584),
    ("qwen2.5-vl-7b", "Qwen2_5_VLForConditionalGeneration", 8.3, 28, 3584),
])
def test_7b_presets_build_the_published_shapes(preset, cls, billions, layers, hidden):
    model = speed.build_random_model(preset, "meta")
    assert type(model).__name__ == cls
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert total == pytest.approx(billions, abs=0.1)  # llava-onevision-qwen2-7b-ov: 8.0B; Qwen2.5-VL-7B: 8.3B
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads) == (layers, hidden, 4)


@pytest.mark.parametrize("preset", ["tiny-onevision", "tiny-qwen2.5-vl"])
def test_tiny_family_presets_run_prefill_and_generate_with_a_method(preset):
    torch.manual_seed(0)
    model = speed.build_random_model(preset, "cpu", torch.float32)
    inputs = speed.make_inputs(model, preset, 2)
    with torch.inference_mode():
        model(**inputs)  # image tokens in the prompt match the features the tower produces
    rows = speed.prefill_case(model, preset, 2, ["fastv:layer=2,keep=0.25"], reps=1)
    fastv = next(r for r in rows if r.note.startswith("fastv"))
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert fastv.extra["visual_tokens_kept_last_layer"] == round(n_image * 0.25)
    gen = speed.generate_case(model, preset, ["fastv:layer=2,keep=0.25"], new_tokens=2, reps=1)
    assert {r.setting.split(", ")[1] for r in gen} == {"dynamic cache", "static cache"}
    assert all(r.ms > 0 for r in gen)


def test_speed_cli_accepts_the_family_presets():
    result = CliRunner().invoke(main, ["bench", "--preset", "tiny-qwen2.5-vl", "--device", "cpu", "--dtype",
                                       "float32", "--batch", "2", "--reps", "1", "--cases", "prefill"])
    assert result.exit_code == 0, result.output
    assert "preset tiny-qwen2.5-vl" in result.output and "fastv:layer=2,keep=0.1" in result.output
