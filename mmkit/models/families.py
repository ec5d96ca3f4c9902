"""The model families mmkit supports: what each looks like to a method, and which methods it refuses and why.

A refusal is raised at `Session.apply`, before any hook is installed or any forward runs, as one line naming the
family and the reason. `docs_support_matrix()` renders the method x family table in the README from this table and
the method registry, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str                  # short name used in messages and the support matrix
    architecture: str          # the transformers class
    vision_attr: str           # attribute of `model.model` holding the vision tower
    cls_token: bool            # whether the vision tower has a CLS token
    visual_layout: str         # how image tokens are laid out (for `mmkit info`)
    builtin: str               # the built-in tiny model of this family
    refuses: dict[str, str] = field(default_factory=dict)  # method name -> why it cannot run on this family
    # Why VL-SAM grounding (`Session.ground`, not a registered method) cannot run on this family; None = it can.
    grounding_refused: str | None = None


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("llava-1.5", "LlavaForConditionalGeneration", "vision_tower", True,
               "one fixed grid of patch tokens per image", "tiny-random"),
        Family("llava-next", "LlavaNextForConditionalGeneration", "vision_tower", True,
               "anyres: base tile plus high-resolution tiles, unpadded, with row newlines", "tiny-random-next"),
        Family("llava-onevision", "LlavaOnevisionForConditionalGeneration", "vision_tower", False,
               "anyres: base tile plus high-resolution tiles, unpadded, with row newlines", "tiny-random-onevision"),
        Family("qwen2-vl", "Qwen2VLForConditionalGeneration", "visual", False,
               "native resolution, 2 x 2 patches merged per token, 3-D rotary positions", "tiny-random-qwen2-vl"),
        Family("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "visual", False,
               "native resolution, 2 x 2 patches merged per token, 3-D rotary positions", "tiny-random-qwen2.5-vl"),
        Family("qwen3-vl", "Qwen3VLForConditionalGeneration", "visual", False,
               "native resolution, 2 x 2 patches merged per token, 3-D rotary positions, DeepStack",
               "tiny-random-qwen3-vl"),
    )
}
MODEL_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
               "llava_onevision": "LlavaOnevisionForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration"}


GROUND = "ground"  # the support matrix's row for VL-SAM grounding


def refusal(family: Family, method: str) -> str | None:
    """The one-line reason `method` (a registered method, or `GROUND`) cannot run on `family`, or None."""
    reason = family.grounding_refused if method == GROUND else family.refuses.get(method)
    return None if reason is None else f"{method} does not support {family.name} ({family.architecture}): {reason}"


def check_grounding(family: Family) -> None:
    """Raise the one-line reason VL-SAM grounding cannot run on `family` (before any model or SAM work)."""
    from mmkit.errors import MmkitError

    reason = refusal(family, GROUND)
    if reason:
        raise MmkitError(reason.replace(f"{GROUND} does", "VL-SAM grounding does", 1))
