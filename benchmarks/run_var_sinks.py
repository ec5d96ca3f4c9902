"""Why VAR leaves the reference model unchanged: its activation magnitudes and the sink tokens VAR finds.

    .venv/bin/python benchmarks/run_var_sinks.py

Prints, over the 32 POPE-adversarial prompts of the first 8 held-out scenes (world seed 1), the largest and the
median |RMSNorm(h)| (h / rms(h) of each decoder layer's input, without the learned weight, the measure VAR's sink
test uses), and the sink tokens VAR detects at its edited layer for
tau = 20 (the LLaMA-2-7B setting, VAR's default) and tau = 7.
"""

from __future__ import annotations

import mmkit
from mmkit.hallucination.var import sink_norm
from mmkit.world.questions import pope_questions
from mmkit.world.scenes import generate_scene


def main() -> None:
    session = mmkit.load("reference", device="cpu")
    questions = pope_questions(1, 8, "adversarial")
    images = [generate_scene(1, q.scene_index).image for q in questions]
    prompts = [q.prompt for q in questions]
    peaks: dict[int, tuple[float, float]] = {}

    def record(i):
        def hook(module, args):
            normed = sink_norm(args[0]).abs()
            peaks[i] = (float(normed.max()), float(normed.median()))
        return hook

    hooks = [layer.input_layernorm.register_forward_pre_hook(record(i))
             for i, layer in enumerate(session.adapter.decoder_layers)]
    session.generate(images, prompts, max_new_tokens=1)
    for h in hooks:
        h.remove()
    print(f"{len(prompts)} prompts; max / median |RMSNorm(h)| per decoder layer:",
          {i: (round(a, 2), round(b, 2)) for i, (a, b) in sorted(peaks.items())})
    for tau in (20, 7):
        handle = session.apply(f"var:tau={tau}")
        session.generate(images, prompts, max_new_tokens=1)
        impl = handle.impl
        per_row = {layer: state.flags[0].sum(1).tolist() for layer, state in impl._sinks.items()}
        for layer, counts in per_row.items():
            print(f"tau={tau}, layer {layer}: sink tokens per prompt min {min(counts)}, mean "
                  f"{sum(counts) / len(counts):.0f}, max {max(counts)}")
        handle.remove()


if __name__ == "__main__":
    main()
