"""PAINT: fixing imbalanced attention to mitigate in-context hallucination (arXiv 2501.12206), with head-specific
modulation.

Two sets of image tokens are chosen per image from the vision tower, in the same forward pass that encodes it:
- local tokens: the top `local_ratio` patches by attention at an early CLIP layer (`local_layer`, default 0): the
  CLS row summed over heads ("cls", as the official code) or the attention each patch receives averaged over all
  queries ("mean");
- summary tokens: IQR outliers (score > Q3 + 1.5 IQR) at a late CLIP layer (default: the layer LLaVA takes its
  features from): by hidden-state norm ("norm", the high-norm register-like tokens) or by CLS attention ("cls", as
  the official code). Local := local minus summary.
The scores come from the layers' own q/k projections and outputs, captured with scoped forward hooks
(`VisionLayerCapture`); the vision tower runs as usual (no `output_attentions`).

In decoder layers [start_layer, end_layer) the unnormalised attention of text and generated query rows to those
tokens is multiplied per head: the pre-softmax score gets + log(alpha_{l,h}) on local keys and + log(beta_{l,h})
on summary keys, with

    alpha_{l,h} = 1 + (alpha - 1) * s_{l,h},   beta_{l,h} = 1 + (beta - 1) * s_{l,h},

s_{l,h} in [0, 1] the head's visual sensitivity (`head_sensitivity.normalise` of the calibrated image attention
mass: the head's mass relative to the most visual head of its layer). `heads="uniform"` uses s = 1 for every head
(the official code's single edit for all heads). Differences from the official code, on purpose: the boost is a
multiplicative factor on the unnormalised attention (the official z + alpha |z| changes the factor with the score's
magnitude and sign), and `rows="text"` edits every text row after the image (prompt and generated tokens) where
`rows="last"` edits only the current token, as the official code does with its KV cache.

The edited layers' attention is replaced through the attention probe by the kernel op
`mmkit.kernels.scaled_attention` with the per-head bias (on CUDA FlexAttention with the bias as a score_mod;
elsewhere SDPA with the additive bias, query rows in chunks; both tested against the explicit reference). alpha = beta = 1 is a no-op:
nothing is installed and the logits are bit-identical to the baseline. Sensitivities: `sensitivity=<file>` loads a
safetensors file written by `head_sensitivity.save`; empty runs the built-in calibration (8 reference-world scenes
x 4 prompts).

Supported: LLaVA-1.5 layout (`LlavaForConditionalGeneration`, one vision feature layer). Combines with token
pruning: local and summary tokens are chosen on the prompt and the probe finds them (or their absence) in every
layer's sequence, so a dropped token is simply not boosted; rows are the text rows each layer still holds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmkit.hallucination.common import check_float
from mmkit.kernels import scaled_attention
from mmkit.registry import register_method

logger = logging.getLogger(__name__)


@dataclass
class PAINTConfig:
    """PAINT: boost attention to locally informative and summary image tokens, scaled per head."""

    alpha: float = field(default=2.0, metadata={"help": "factor on the unnormalised attention to local tokens "
                                                        "(most sensitive head); 1 = no boost"})
    beta: float = field(default=1.5, metadata={"help": "factor on the unnormalised attention to summary tokens; "
                                                       "1 = no boost"})
    local_ratio: float = field(default=0.25, metadata={"help": "fraction of each image's tokens taken as local"})
    local_layer: int = field(default=0, metadata={"help": "CLIP encoder layer ranking local tokens"})
    local_score: Literal["cls", "mean"] = field(
        default="cls", metadata={"help": "local ranking: CLS attention, or mean attention received"})
    summary_layer: int | None = field(
        default=None, metadata={"help": "CLIP encoder layer for summary tokens; None = LLaVA's feature layer"})
    summary_score: Literal["norm", "cls"] = field(
        default="norm", metadata={"help": "summary outliers by hidden-state norm or by CLS attention"})
    start_layer: int = field(default=2, metadata={"help": "first decoder layer whose attention is edited"})
    end_layer: int | None = field(default=None, metadata={"help": "decoder layer to stop before; None = all"})
    rows: Literal["text", "last"] = field(
        default="text", metadata={"help": "query rows edited: every text/generated row after the image, or only "
                                          "the current (last) token"})
    heads: Literal["calibrated", "uniform"] = field(
        default="calibrated", metadata={"help": "per-head factors from visual sensitivity, or one for all heads"})
    sensitivity: str = field(default="", metadata={"help": "safetensors file of head sensitivities; empty = run "
                                                           "the built-in calibration"})

    def __post_init__(self):
        self.alpha = check_float("alpha", self.alpha, low=0.0, low_open=True)
        self.beta = check_float("beta", self.beta, low=0.0, low_open=True)
        self.local_ratio = check_float("local_ratio", self.local_ratio, low=0.0, high=1.0)
        for name in ("local_layer", "start_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("summary_layer", "end_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None, got {value!r}")
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(f"end_layer ({self.end_layer}) must be greater than start_layer ({self.start_layer})")
        for name, allowed in (("local_score", ("cls", "mean")), ("summary_score", ("norm", "cls")),
                              ("rows", ("text", "last")), ("heads", ("calibrated", "uniform"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.sensitivity, str):
            raise ValueError(f"sensitivity must be a file path or empty, got {self.sensitivity!r}")

    @property
    def is_noop(self) -> bool:
        return self.alpha == 1.0 and self.beta == 1.0


# -- token selection ------------------------------------------------------------------------------------------------
def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Bool mask of scores above Q3 + 1.5 IQR along the last dimension (Tukey's upper fence)."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device), dim=-1, keepdim=True)
    return scores > q3 + 1.5 * (q3 - q1)


def top_fraction(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask of the ceil(ratio * N) highest scores along the last dimension (per image)."""
    n = scores.shape[-1]
    k = min(n, math.ceil(ratio * n))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(-1, torch.topk(scores, k, dim=-1).indices, True)
    return mask


def select_tokens(capture_local, capture_summary, config: PAINTConfig, n_feat: int, offset: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(local, summary) bool masks (I, n_feat) over each image's feature tokens from the two captured CLIP layers.

    offset: index of feature token 0 among the CLIP tokens (1 when LLaVA drops CLS, 0 when it keeps it).
    """
    from mmkit.patching.pre_llm import query_attention

    q, k, _ = capture_local.take()
    qh, kh = capture_local.heads(q), capture_local.heads(k)
    if config.local_score == "cls":
        local_scores = query_attention(qh[:, :, :1], kh, capture_local.scale)[:, :, 0].sum(1)       # (I, T)
    else:
        local_scores = query_attention(qh, kh, capture_local.scale).sum(1).mean(1)                   # (I, T)
    q, k, out = capture_summary.take()
    if config.summary_score == "norm":
        summary_scores = out.float().norm(dim=-1)                                                     # (I, T)
    else:
        qh, kh = capture_summary.heads(q), capture_summary.heads(k)
        summary_scores = query_attention(qh[:, :, :1], kh, capture_summary.scale)[:, :, 0].sum(1)
    span = slice(offset, offset + n_feat)
    summary = iqr_outliers(summary_scores[:, span])
    local = top_fraction(local_scores[:, span], config.local_ratio) & ~summary
    return local, summary


def image_positions_to_sequence(image_mask: torch.Tensor, per_image: torch.Tensor) -> torch.Tensor:
    """Spread per-image token flags (I, N) onto the prompt's image positions: (B, n) bool (False off-image).

    Images appear as runs of N image tokens in row-major order (LLaVA-1.5 layout)."""
    n_images, tokens = per_image.shape
    total = int(image_mask.sum())
    if total != n_images * tokens:
        raise RuntimeError(
            f"paint: the prompt holds {total} image tokens but the vision tower encoded {n_images} images of {tokens}"
        )
    flat = image_mask.reshape(-1)
    rank = flat.long().cumsum(0) - 1
    image_id = torch.where(flat, rank // tokens, 0)
    within = torch.where(flat, rank % tokens, 0)
    return (per_image.to(image_mask.device)[image_id, within] & flat).view_as(image_mask)


@dataclass
class _PrefillState:
    local: torch.Tensor          # (B, n) bool: local image tokens in prompt coordinates
    summary: torch.Tensor        # (B, n) bool


class PAINTHandle:
    def __init__(self, session, config: PAINTConfig, force_override: bool = False):
        from mmkit.patching.pre_llm import VisionLayerCapture, feature_layer_index, vision_encoder_layers

        self.config = config
        adapter = session.adapter
        if adapter.architecture != "LlavaForConditionalGeneration" or not isinstance(adapter.vision_feature_layer, int):
            raise ValueError(f"paint supports the LLaVA-1.5 layout (one image = one run of patch tokens, one vision "
                             f"feature layer); {adapter.architecture} is not supported")
        num_layers = adapter.num_layers
        end = num_layers if config.end_layer is None else config.end_layer
        if config.start_layer >= num_layers or end > num_layers:
            raise ValueError(f"paint layers [{config.start_layer}, {end}) do not fit this model's {num_layers} "
                             f"decoder layers")
        vision_layers = len(vision_encoder_layers(adapter))
        summary_layer = feature_layer_index(adapter) if config.summary_layer is None else config.summary_layer
        if config.local_layer >= vision_layers or summary_layer >= vision_layers:
            raise ValueError(f"paint vision layers (local {config.local_layer}, summary {summary_layer}) must be "
                             f"below the vision tower's {vision_layers} encoder layers")
        self.layers = list(range(config.start_layer, end))
        self.heads = int(adapter.text_config.num_attention_heads)
        self.mass: torch.Tensor | None = None
        self._handles: list = []
        self._captures: list = []
        self._ctx = session.context
        self._state: _PrefillState | None = None
        self._session = session
        if config.is_noop and not force_override:
            # alpha = beta = 1 multiplies by one: install nothing, so the logits stay bit-identical.
            logger.info("paint with alpha = beta = 1 is a no-op; the model is left unchanged")
            return
        self.mass = self._sensitivity(session)
        sens = self._head_scale()
        device = session.device
        self._log_alpha = torch.log1p((config.alpha - 1.0) * sens).to(device)   # (L, H)
        self._log_beta = torch.log1p((config.beta - 1.0) * sens).to(device)
        self._n_feat = (int(adapter.config.vision_config.image_size) // int(adapter.config.vision_config.patch_size)) ** 2
        self._offset = 1
        if adapter.vision_feature_select_strategy != "default":
            self._n_feat += 1
            self._offset = 0
        self._captures = [VisionLayerCapture(adapter, config.local_layer), VisionLayerCapture(adapter, summary_layer)]
        try:
            self._handles.append(session.probe.override(self.layers, self._attend))
        except Exception:
            self.remove()
            raise
        self._ctx.on_prefill(id(self), self._reset)

    # -- calibration ------------------------------------------------------------------------------------------------
    def _sensitivity(self, session) -> torch.Tensor | None:
        from mmkit.hallucination import head_sensitivity

        if self.config.heads == "uniform":
            return None
        layers = session.adapter.num_layers
        if self.config.sensitivity:
            return head_sensitivity.load(self.config.sensitivity, layers=layers, heads=self.heads)
        return head_sensitivity.builtin_calibration(session)

    def _head_scale(self) -> torch.Tensor:
        from mmkit.hallucination import head_sensitivity

        layers = self._session.adapter.num_layers
        if self.mass is None:
            return torch.ones(layers, self.heads)
        return head_sensitivity.normalise(self.mass)

    def export_state(self) -> dict[str, torch.Tensor] | None:
        """The calibrated image-attention masses (saved with an exported session)."""
        return None if self.mass is None else {"mass": self.mass}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        mass = state["mass"].float().cpu()
        if mass.shape != (self._session.adapter.num_layers, self.heads):
            raise ValueError(f"saved paint sensitivities have shape {tuple(mass.shape)}, this model needs "
                             f"({self._session.adapter.num_layers}, {self.heads})")
        self.mass = mass
        if self._handles:
            sens = self._head_scale()
            device = self._log_alpha.device
            self._log_alpha = torch.log1p((self.config.alpha - 1.0) * sens).to(device)
            self._log_beta = torch.log1p((self.config.beta - 1.0) * sens).to(device)

    # -- per call -----------------------------------------------------------------------------------------------------
    def _reset(self, ctx) -> None:
        self._state = None

    def _prefill_state(self) -> _PrefillState | None:
        image_mask = self._ctx.prompt_image_mask
        if image_mask is None or not bool(image_mask.any()):
            return None
        local, summary = select_tokens(self._captures[0], self._captures[1], self.config, self._n_feat, self._offset)
        # Chosen on the prompt; the probe maps them onto whatever sequence each layer sees.
        image_mask = image_mask.to(self._log_alpha.device)
        return _PrefillState(image_positions_to_sequence(image_mask, local),
                             image_positions_to_sequence(image_mask, summary))

    def _attend(self, view, value, **kwargs):
        ctx = self._ctx
        query, key = view.query, view.key
        if ctx.prefill and self._state is None:
            self._state = self._prefill_state() or _PrefillState(None, None)
        state = self._state
        if state is None or state.local is None:
            return view.attend(query, key, value, view.attention_mask, **kwargs)
        layer = view.layer
        local, summary = view.from_prompt(state.local), view.from_prompt(state.summary)  # (B, Lk), False elsewhere
        key_bias = (local[:, None, :] * self._log_alpha[layer][None, :, None]
                    + summary[:, None, :] * self._log_beta[layer][None, :, None])          # (B, H, Lk) float32
        if view.prefill:
            if self.config.rows == "text":
                rows = view.text_rows
            else:
                rows = torch.zeros_like(view.text_rows)
                rows[:, -1] = True
        else:
            rows = None  # every generated token is a text row after the image
        out = scaled_attention(query, key, value, scaling=view.scaling, attn_mask=view.attention_mask,
                               row_mask=rows, key_bias=key_bias)
        return out.transpose(1, 2).contiguous(), None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for capture in self._captures:
            capture.remove()
        self._captures = []
        self._ctx.drop_callback(id(self))
        self._state = None


def apply_paint(session, config: PAINTConfig) -> PAINTHandle:
    """Attach PAINT to a session; `remove()` on the result restores the model exactly."""
    return PAINTHandle(session, config)


register_method(
    "paint", PAINTConfig, apply_paint, kind="hallucination",
    description="Boost attention to local and summary image tokens chosen from CLIP attention, scaled per head by "
                "visual sensitivity (arXiv 2501.12206).",
    slots=("attention_scores",), needs_calibration=True,
)
