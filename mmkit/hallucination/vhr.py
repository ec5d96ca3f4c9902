"""VHR: Vision-aware Head Reinforcement (He et al., ACL 2025).

Vision-aware head divergence VHD_{l,h} = || o_{l,h}(x, v) - o_{l,h}(x) ||_2: how much head h of layer l changes
its output for the token being generated when the image is removed from the prompt. Heads with a high VHD are
the ones that actually look at the image; VHR multiplies their outputs by alpha so the prediction leans on them.

Per decoding step and per row, at every reinforced layer l:
  1. VHD of each head from the current token's head outputs with and without the image;
  2. heads with VHD > mean + std of the layer are outliers and left alone;
  3. among the rest, heads with VHD above their median are multiplied by alpha (default 2).
Layers are handled in order inside one forward pass, so layer l's VHD already reflects the boosts of layers < l
("layer by layer").

The text-only branch is a second set of rows in the same batch (branch-major, see `mmkit.contract.Branching`): the same
prompt with its image tokens removed, left padded to the same length so that both branches' last positions line
up. Both branches receive every generated token. Head outputs are the input of `self_attn.o_proj`, (B, L, H*D)
viewed as (B, L, H, D); a forward pre-hook there reads both branches and rescales branch 0's heads at the current
(last) position only: the prompt's cached states are left as the model computed them, as a token-by-token
reinforcement implies. The next token comes from branch 0's logits; the text-only branch only serves as the
reference.

Choices the paper leaves open (documented here): the median is taken over the non-outlier heads, the std is the
population std, and every decoder layer is reinforced unless `layers` names a subset.

alpha = 1 is a no-op: no text-only branch is run and logits pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmkit.hallucination.common import check_float, split_branches
from mmkit.registry import register_method


@dataclass
class VHRConfig:
    """VHR: scale the outputs of the heads whose output changes most without the image."""

    alpha: float = field(default=2.0, metadata={"help": "factor on the selected heads' outputs; 1 = off"})
    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "decoder layers to reinforce; None = every layer"}
    )

    def __post_init__(self):
        self.alpha = check_float("alpha", self.alpha, low=0.0, low_open=True)
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers:
                raise ValueError("layers must name at least one decoder layer (or be None for every layer)")
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise ValueError(f"layers must be integers >= 0, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat, got {self.layers!r}")
            self.layers = tuple(sorted(layers))


def vision_head_divergence(with_image: torch.Tensor, without_image: torch.Tensor) -> torch.Tensor:
    """VHD (B, H): L2 distance between per-head outputs (B, H, D) with and without the image, in float32."""
    return (with_image.float() - without_image.float()).norm(dim=-1)


def select_vision_heads(vhd: torch.Tensor) -> torch.Tensor:
    """Bool (B, H): heads to reinforce. Outliers (VHD > mean + std over the layer's heads) are excluded; of the rest,
    the heads above their median are chosen."""
    mean = vhd.mean(dim=1, keepdim=True)
    std = vhd.std(dim=1, keepdim=True, correction=0)
    inlier = vhd <= mean + std
    median = torch.nanmedian(vhd.masked_fill(~inlier, float("nan")), dim=1, keepdim=True).values
    return inlier & (vhd > median)


def text_only_inputs(inputs: dict[str, torch.Tensor], image_token_id: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask of the same prompts without their image tokens, left padded to the original
    length (so every row still ends at the last column)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    keep = real & (ids != image_token_id)
    batch, length = ids.shape
    out_ids = torch.full_like(ids, pad_token_id)
    out_mask = torch.zeros_like(ids) if mask is None else torch.zeros_like(mask)
    for row in range(batch):
        tokens = ids[row][keep[row]]
        if tokens.numel():
            out_ids[row, length - tokens.numel():] = tokens
            out_mask[row, length - tokens.numel():] = 1
    return {"input_ids": out_ids, "attention_mask": out_mask}


class VHRHandle:
    """Two-branch decoder (image / text only) with pre-hooks on `o_proj` that reinforce vision-aware heads."""

    def __init__(self, session, config: VHRConfig):
        adapter = session.adapter
        num_layers = adapter.num_layers
        layers = config.layers if config.layers is not None else tuple(range(num_layers))
        if layers[-1] >= num_layers:
            raise ValueError(f"vhr layers={layers} go past the last decoder layer; this model has {num_layers}")
        self.config = config
        self.num_heads = int(adapter.text_config.num_attention_heads)
        self.head_dim = adapter.head_dim
        self._image_token_id = adapter.image_token_id
        self._pad_token_id = session.processor.tokenizer.pad_token_id
        self._ctx = session.context
        self._branches = 1
        self._batch = 0
        self._pending = False
        self._active = False
        # Last step's VHD and selection per reinforced layer: (B, H) each, for inspection.
        self.last_vhd: dict[int, torch.Tensor] = {}
        self.last_selected: dict[int, torch.Tensor] = {}
        self._hooks = [
            adapter.decoder_layers[l].self_attn.o_proj.register_forward_pre_hook(self._make_hook(l)) for l in layers
        ]
        self._ctx.on_prefill(id(self), self._on_prefill)

    # -- branching protocol ---------------------------------------------------------------------------------
    def expand_inputs(self, session, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.config.alpha == 1.0:
            self._branches = 1
            self._pending = False
            return inputs
        if "pixel_values" not in inputs:
            raise ValueError("vhr needs image inputs (pixel_values); got a text-only batch")
        self._branches = 2
        self._batch = int(inputs["input_ids"].shape[0])
        text = text_only_inputs(inputs, self._image_token_id, self._pad_token_id)
        expanded = dict(inputs)
        expanded["input_ids"] = torch.cat([inputs["input_ids"], text["input_ids"]])
        if "attention_mask" in inputs:
            expanded["attention_mask"] = torch.cat([inputs["attention_mask"], text["attention_mask"]])
        # pixel_values (and image_sizes) stay B rows: only branch 0 holds image tokens to scatter them into.
        self._pending = True
        return expanded

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self._branches == 1:
            return logits
        return split_branches(logits, 2)[0]

    # -- head reinforcement ---------------------------------------------------------------------------------
    def _on_prefill(self, ctx) -> None:
        # Reinforce only in the forward that follows our own expand_inputs (and its decode steps); any other
        # call through the model (plain forwards, other sessions' code) runs untouched.
        self._active = self._pending and ctx.image_mask is not None and ctx.image_mask.shape[0] == 2 * self._batch
        self._pending = False

    def _make_hook(self, layer: int):
        def hook(module, args):
            if not self._active:
                return None
            (heads, *rest) = args
            batch = self._batch
            if heads.shape[0] != 2 * batch:
                return None
            last = heads[:, -1].view(2 * batch, self.num_heads, self.head_dim)
            vhd = vision_head_divergence(last[:batch], last[batch:])
            selected = select_vision_heads(vhd)
            self.last_vhd[layer] = vhd
            self.last_selected[layer] = selected
            scale = torch.where(selected, self.config.alpha, 1.0).to(heads.dtype)
            heads = heads.clone()
            heads[:batch, -1] = (last[:batch] * scale[..., None]).flatten(1)
            return (heads, *rest)

        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._ctx.drop_callback(id(self))
        self._active = False
        self._branches = 1


def apply_vhr(session, config: VHRConfig) -> VHRHandle:
    """Attach VHR to `session`: every generated token reinforces the heads that react most to the image."""
    return VHRHandle(session, config)


register_method(
    "vhr", VHRConfig, apply_vhr, kind="hallucination",
    description="Scale the heads whose output diverges most from a text-only branch, step by step (ACL'25).",
    slots=("logit_branches",),
)
