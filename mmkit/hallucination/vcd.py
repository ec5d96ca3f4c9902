"""VCD: Visual Contrastive Decoding (Leng et al., CVPR 2024).

Each prompt runs twice in one batch: with its image (logits z) and with a distorted copy v' of the image (logits
z'). The distortion is the forward diffusion of the processed image tensor to step t of a 1000-step sigmoid beta
schedule (official `vcd_add_noise.py`): v' = sqrt(abar_t) v + sqrt(1 - abar_t) eps. The next token is chosen from

    (1 + alpha) z - alpha z'     on the tokens with p(v) >= beta * max p(v), -inf elsewhere,

the adaptive plausibility constraint of the official `vcd_sample.py` (applied to the raw logits, before
temperature / top-p).

Noise is drawn from a CPU generator seeded with `seed` for every row, so a row's distorted image does not depend
on the rest of the batch (batched == single runs) and runs are reproducible across devices.

alpha = 0 is a no-op: the contrast branch is not run at all and the model's own logits pass through unchanged
(running it and multiplying by 0 would give the same tokens but not bit-identical logits, because a doubled batch
changes float reduction order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmkit.models.family_inputs import patch_pixel_noise
from mmkit.hallucination.common import check_float, restrict_to_plausible, split_branches, stack_branches
from mmkit.registry import register_method

DIFFUSION_STEPS = 1000


@dataclass
class VCDConfig:
    """VCD: contrast the logits with those of a diffusion-noised copy of the image."""

    alpha: float = field(default=1.0, metadata={"help": "contrast strength: (1+alpha) z(v) - alpha z(v'); 0 = off"})
    beta: float = field(
        default=0.1,
        metadata={"help": "plausibility cutoff: keep tokens with p(v) >= beta * max p(v); 0 keeps every token"},
    )
    noise_step: int = field(
        default=500, metadata={"help": "forward-diffusion step t of 1000 used to distort the image (0..999)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the diffusion noise (the same noise for every row)"})

    def __post_init__(self):
        self.alpha = check_float("alpha", self.alpha, low=0.0)
        self.beta = check_float("beta", self.beta, low=0.0, high=1.0)
        if isinstance(self.noise_step, bool) or not isinstance(self.noise_step, int) or not 0 <= self.noise_step < DIFFUSION_STEPS:
            raise ValueError(f"noise_step must be an integer in [0, {DIFFUSION_STEPS - 1}], got {self.noise_step!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def diffusion_coefficients(step: int, num_steps: int = DIFFUSION_STEPS) -> tuple[float, float]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) of VCD's sigmoid schedule: beta_t = sigmoid(linspace(-6, 6)) scaled to
    [1e-5, 5e-3], abar_t = prod_{s <= t} (1 - beta_s)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)[step]
    return float(alpha_bar.sqrt()), float((1.0 - alpha_bar).sqrt())


def add_diffusion_noise(pixel_values: torch.Tensor, step: int, seed: int, noise: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Forward-diffuse each row of `pixel_values` (the processed, normalised image tensor, as the official code
    does) to `step`. Every row gets the noise drawn from `seed`, so a row's result is independent of the batch.
    `noise`, if given, is used instead (families whose rows are flattened patches draw it per image)."""
    keep, noise_scale = diffusion_coefficients(step)
    if noise is None:
        row_shape = pixel_values.shape[1:]
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(row_shape, generator=generator, dtype=torch.float32).to(pixel_values.device)
    noised = keep * pixel_values.float() + noise_scale * noise
    return noised.to(pixel_values.dtype)


class VCDHandle:
    """Two-branch decoder: branch 0 = the image, branch 1 = its diffusion-noised copy."""

    def __init__(self, session, config: VCDConfig):
        self.config = config
        self._branches = 1

    def expand_inputs(self, session, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.config.alpha == 0.0:
            self._branches = 1
            return inputs
        if "pixel_values" not in inputs:
            raise ValueError("vcd needs image inputs (pixel_values); got a text-only batch")
        self._branches = 2
        noise = patch_pixel_noise(session.adapter, inputs, self.config.seed)  # Qwen-VL: per image, not per patch
        noised = add_diffusion_noise(inputs["pixel_values"], self.config.noise_step, self.config.seed, noise)
        return stack_branches(inputs, pixel_values=noised)

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self._branches == 1:
            return logits
        clean, noised = split_branches(logits, 2)
        alpha = self.config.alpha
        contrast = (1.0 + alpha) * clean - alpha * noised
        return restrict_to_plausible(contrast, clean, self.config.beta)

    def remove(self) -> None:
        # Nothing in the model was changed: the session stops routing generation through this handle.
        self._branches = 1


def apply_vcd(session, config: VCDConfig) -> VCDHandle:
    """Attach VCD to `session`: generation and answer scoring contrast each image with its noised copy."""
    return VCDHandle(session, config)


register_method(
    "vcd", VCDConfig, apply_vcd, kind="hallucination",
    description="Contrast logits with a diffusion-noised image, with an adaptive plausibility cutoff (CVPR'24).",
    slots=("logit_branches",),
)
