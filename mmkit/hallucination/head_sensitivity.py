"""Per-head visual sensitivity of a model's decoder: how much attention each head gives the image.

`calibrate(session, images, prompts)` runs the prompts through the model once (no method changes the forward) and
records, for every decoder layer l and query head h, the attention mass the answer position (the last prompt
token, the one that predicts the first answer token) puts on the image tokens, averaged over the prompts:

    m[l, h] = mean_prompts sum_{k in image} softmax(q_last . K / sqrt(d))[k]

The row is computed exactly from the layer's q/k (through the attention probe, per head) while the layer itself
runs its own attention. Methods already active on the session stay active: with a token-dropping method, each
layer's mass is over the image tokens that layer still holds. `normalise(m)` turns the masses into sensitivities in [0, 1] per layer (see its docstring).
Sensitivities are saved and loaded as safetensors (`save` / `load`), with the model shape as metadata so a file
made for another model is refused.

`builtin_calibration(session)` calibrates on a fixed, small set of reference-world scenes (world seed
`CALIBRATION_WORLD_SEED`, which no bench uses) and generic prompts; results are cached per model object, so
applying a method twice does not calibrate twice (the cache key includes the methods active during calibration).
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

# World seed of the built-in calibration scenes: the reference model trains on seed 0 and the benches default to
# seed 1, so calibration images are never test images.
CALIBRATION_WORLD_SEED = 7
CALIBRATION_IMAGES = 8
CALIBRATION_PROMPTS = (
    "Describe the image.",
    "What objects are in the image?",
    "Is there a car in the image?",
    "What colour is the largest object?",
)
_META_KEY = "mmkit_head_sensitivity"
# model -> {specs of the methods active during calibration: masses}
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def calibrate(session, images: Sequence, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """Mean image attention mass (L, H) float32 of each decoder layer's query heads at the answer position.

    Args:
        session: an `mmkit.Session`; the forward runs as it is (apply calibration before methods that change it).
        images, prompts: one image per prompt (a single image is reused for every prompt).
        batch_size: prompts per forward.
    """
    from mmkit.session import _as_lists

    images, prompts = _as_lists(images, prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    adapter = session.adapter
    layers = adapter.decoder_layers
    heads = int(adapter.text_config.num_attention_heads)
    total = torch.zeros(len(layers), heads, dtype=torch.float64)
    count = 0
    batch_mass: dict[int, torch.Tensor] = {}

    def observe(view) -> None:
        if view.prefill:
            mass = view.mass(reduce="sum", per_head=True)                             # (B, H, Lk)
            batch_mass[view.layer] = (mass * view.image_keys[:, None, :]).sum(-1).double().cpu()  # (B, H)

    probe = session.probe.observe(range(len(layers)), observe)
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = session.prepare(images[start:start + batch_size], prompts[start:start + batch_size])
            batch_mass.clear()
            session.model(**inputs, logits_to_keep=1, use_cache=False)
            if len(batch_mass) != len(layers):
                raise RuntimeError(f"calibration saw {len(batch_mass)} of {len(layers)} decoder layers")
            for i in range(len(layers)):
                total[i] += batch_mass[i].sum(0)
            count += inputs["input_ids"].shape[0]
    finally:
        probe.remove()
    return (total / count).float()


def normalise(mass: torch.Tensor) -> torch.Tensor:
    """Sensitivity s[l, h] = m[l, h] / max_h' m[l, h'] in [0, 1]: each head relative to the most visual head of
    its layer (1 = that head). Ratios, not min-max, so a layer whose heads all look at the image alike gets
    sensitivities near 1 everywhere instead of an arbitrary spread. A layer with no image attention gets 0."""
    if mass.dim() != 2:
        raise ValueError(f"head sensitivities must be (layers, heads), got shape {tuple(mass.shape)}")
    mass = mass.float().clamp(min=0.0)
    top = mass.max(dim=1, keepdim=True).values
    return torch.where(top > 0, mass / top.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(mass))


def save(mass: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write (L, H) sensitivities to `path` as safetensors (temporary file, then rename)."""
    from mmkit.atomic import atomic_save_safetensors

    if mass.dim() != 2:
        raise ValueError(f"head sensitivities must be (layers, heads), got shape {tuple(mass.shape)}")
    path = Path(path)
    atomic_save_safetensors({_META_KEY: mass.float()}, path,
                            metadata={"layers": str(mass.shape[0]), "heads": str(mass.shape[1])})
    return path


def load(path: str | os.PathLike, layers: int | None = None, heads: int | None = None) -> torch.Tensor:
    """Read sensitivities written by `save`; with `layers`/`heads`, check they fit the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"head sensitivity file {path} does not exist; run calibration first or omit the path")
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err})") from None
    if _META_KEY not in tensors:
        raise ValueError(f"{path} holds no head sensitivities (tensor {_META_KEY!r} missing)")
    mass = tensors[_META_KEY].float()
    if mass.dim() != 2:
        raise ValueError(f"{path}: head sensitivities must be (layers, heads), got shape {tuple(mass.shape)}")
    if (layers is not None and mass.shape[0] != layers) or (heads is not None and mass.shape[1] != heads):
        raise ValueError(f"{path} was calibrated for {mass.shape[0]} layers x {mass.shape[1]} heads; this model has "
                         f"{layers} x {heads}; calibrate it for this model")
    return mass


def builtin_calibration(session) -> torch.Tensor:
    """`calibrate` on `CALIBRATION_IMAGES` reference-world scenes x `CALIBRATION_PROMPTS` (cached per model)."""
    active = tuple(h.spec for h in session.methods)
    cached = _CACHE.get(session.model, {}).get(active)
    if cached is not None:
        return cached.clone()
    from mmkit.world.scenes import generate_scene

    scenes = [generate_scene(CALIBRATION_WORLD_SEED, i).image for i in range(CALIBRATION_IMAGES)]
    images = [img for img in scenes for _ in CALIBRATION_PROMPTS]
    prompts = [p for _ in scenes for p in CALIBRATION_PROMPTS]
    logger.info("calibrating head visual sensitivity on %d built-in prompts", len(prompts))
    mass = calibrate(session, images, prompts)
    _CACHE.setdefault(session.model, {})[active] = mass
    return mass.clone()
