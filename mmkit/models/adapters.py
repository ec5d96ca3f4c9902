"""Architecture adapters: where an LVLM keeps its decoder layers, image token and vision settings.

Image spans are always found from `input_ids == image_token_id`, never from fixed positions, so left padding,
different prompt lengths and several images per prompt all work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmkit.errors import UnsupportedModelError
from mmkit.models.families import FAMILIES, Family

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


@dataclass
class LlavaAdapter:
    """Adapter for every supported family. All keep the decoder at `model.model.language_model`; the vision tower
    is `model.model.vision_tower` (LLaVA, LLaVA-NeXT, LLaVA-OneVision) or `model.model.visual` (Qwen-VL)."""

    model: torch.nn.Module

    @property
    def architecture(self) -> str:
        return supported_base(self.model)

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    @property
    def has_cls_token(self) -> bool:
        """Whether the vision tower has a CLS token (CLIP: yes; SigLIP and the Qwen-VL towers: no). Read this, not
        `vision_feature_select_strategy`: OneVision's "full" keeps every SigLIP patch, with no CLS among them."""
        return self.family.cls_token

    @property
    def attn_implementation(self) -> str:
        """The attention implementation the decoder was loaded with (what runs where no method intervenes)."""
        return str(self.text_config._attn_implementation)

    @property
    def first_droppable_layer(self) -> int:
        """The first decoder layer before which tokens may be dropped. Layer 0 always stays whole; Qwen3-VL adds
        DeepStack visual features to the outputs of its first layers at the original image positions, so the
        sequence must stay whole until those additions are done."""
        deepstack = getattr(getattr(self.config, "vision_config", None), "deepstack_visual_indexes", None)
        return max(1, len(deepstack or ()))

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return getattr(self.model.model, self.family.vision_attr)

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return int(self.text_config.intermediate_size)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.text_config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(
            getattr(self.text_config, "head_dim", None)
            or self.text_config.hidden_size // self.text_config.num_attention_heads
        )

    @property
    def vision_feature_layer(self):
        """The vision layer LLaVA-style models read features from; None for Qwen-VL (its merger reads the last)."""
        return getattr(self.model.config, "vision_feature_layer", None)

    @property
    def vision_feature_select_strategy(self) -> str | None:
        """LLaVA's CLS handling ("default" drops it, "full" keeps it); None for Qwen-VL, whose tower has no CLS."""
        return getattr(self.model.config, "vision_feature_select_strategy", None)

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool (B, L): True where a position holds an image token."""
        return input_ids == self.image_token_id

    def image_spans(self, input_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per row, the [start, end) runs of consecutive image tokens."""
        spans: list[list[tuple[int, int]]] = []
        mask = self.image_mask(input_ids).to(torch.int8)
        edges = torch.diff(mask, dim=1, prepend=mask.new_zeros(mask.shape[0], 1), append=mask.new_zeros(mask.shape[0], 1))
        for row in edges:
            starts = (row == 1).nonzero().flatten().tolist()
            ends = (row == -1).nonzero().flatten().tolist()
            spans.append(list(zip(starts, ends)))
        return spans


def supported_base(model: torch.nn.Module) -> str | None:
    """The supported architecture `model` is, by class or by base class (an export's remote-code class
    subclasses the stock one), or None."""
    return next((c.__name__ for c in type(model).__mro__ if c.__name__ in SUPPORTED_ARCHITECTURES), None)


def adapter_for(model: torch.nn.Module) -> LlavaAdapter:
    """The adapter for a loaded model, or a clear error naming the supported architectures."""
    if supported_base(model) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported; mmkit supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return LlavaAdapter(model)
