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

The layers run the `mmkit` attention backend with an override: on CUDA (the kernel dispatcher's Triton pick)
`mmkit.kernels.scaled_attention`, FlexAttention with the per-head bias as a score_mod; elsewhere SDPA with the
additive per-head bias (exact softmax of the modified scores; query rows processed in chunks so one chunk's bias is
materialised at a time, rows before the first edited one go through plain SDPA). alpha = beta = 1 is a no-op:
nothing is installed and the logits are bit-identical to the baseline. Sensitivities: `sensitivity=<file>` loads a
safetensors file written by `head_sensitivity.save`; empty runs the built-in calibration (8 reference-world scenes
x 4 prompts).

Supported: LLaVA-1.5 layout (`LlavaForConditionalGeneration`, one vision feature layer). Not combinable with
methods that change the token sequence (LLM-side or vision-side token dropping): the chosen tokens are located by
position in the prompt.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmkit.hallucination.common import check_float
from mmkit.registry import register_method

logger = logging.getLogger(__name__)

# Largest bias chunk (elements) materialised per SDPA call: bounds prefill memory for long image prompts.
_CHUNK_ELEMENTS = 1 << 25


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
            f"paint: the prompt holds {total} image tokens but the vision tower encoded {n_images} images of {tokens}; "
            f"paint cannot be combined with methods that drop or merge visual tokens"
        )
    flat = image_mask.reshape(-1)
    rank = flat.long().cumsum(0) - 1
    image_id = torch.where(flat, rank // tokens, 0)
    within = torch.where(flat, rank % tokens, 0)
    return (per_image.to(image_mask.device)[image_id, within] & flat).view_as(image_mask)


# -- attention ------------------------------------------------------------------------------------------------------
def full_bool_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int,
                   device: torch.device) -> torch.Tensor:
    """The 4-D mask SDPA would apply, as (B, 1, Lq, Lk) bool or float; None becomes the causal mask with the
    queries at the end of the keys (so every row slice keeps its own causal window)."""
    if attention_mask is not None:
        return attention_mask
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return (torch.arange(k_len, device=device)[None, :] <= rows).expand(batch, 1, q_len, k_len)


def biased_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                key_bias: torch.Tensor, row_mask: torch.Tensor | None, first_row: int = 0, **kwargs) -> torch.Tensor:
    """SDPA with `key_bias` (B, H, Lk) added to the pre-softmax scores of the rows in `row_mask` (B, Lq) (all rows
    if None). Rows before `first_row` carry no bias and run plain SDPA. Returns (B, Lq, H, D).

    Where the kernel dispatcher picks Triton (CUDA), the biased rows run `mmkit.kernels.scaled_attention`
    (FlexAttention with the bias as a score_mod: no score matrix stored); elsewhere SDPA with the bias as an
    additive mask, a chunk of rows at a time."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mmkit.kernels.dispatch import choose_backend

    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    mask = full_bool_mask(attention_mask, batch, q_len, k_len, query.device)
    if query.is_cuda and choose_backend(query, "scaled_attention") == "triton":
        from mmkit.kernels import scaled_attention

        rows = row_mask if row_mask is not None else torch.ones(batch, q_len, dtype=torch.bool, device=query.device)
        rows = rows.clone()
        rows[:, :first_row] = False
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        out = scaled_attention(query, key, value, scaling=scaling, attn_mask=mask, row_mask=rows,
                               key_bias=key_bias.float())
        return out.transpose(1, 2).contiguous()
    key_bias = key_bias.to(query.dtype)
    outputs = []
    if first_row > 0:
        outputs.append(sdpa_attention_forward(module, query[:, :, :first_row], key, value,
                                              mask[:, :, :first_row], **kwargs)[0])
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * k_len))
    for start in range(first_row, q_len, chunk):
        stop = min(q_len, start + chunk)
        bias = key_bias[:, :, None, :].expand(batch, heads, stop - start, k_len)
        if row_mask is not None:
            bias = bias * row_mask[:, None, start:stop, None].to(bias.dtype)
        outputs.append(sdpa_attention_forward(module, query[:, :, start:stop], key, value, mask[:, :, start:stop],
                                              position_bias=bias, **kwargs)[0])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


@dataclass
class _PrefillState:
    local: torch.Tensor          # (B, n) bool: local image tokens in prompt coordinates
    summary: torch.Tensor        # (B, n) bool
    rows: torch.Tensor           # (B, n) bool: prompt rows whose attention is edited
    first_row: int               # no edited row before this position in any row of the batch


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
        session.text_attention.acquire()
        self._acquired = True
        from mmkit.patching.attention import override_attention

        try:
            for layer in self.layers:
                self._handles.append(override_attention(adapter.decoder_layers[layer].self_attn, self._attend))
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
        image_mask = self._ctx.image_mask
        if image_mask is None or not any(self._ctx.image_counts):
            return None
        local, summary = select_tokens(self._captures[0], self._captures[1], self.config, self._n_feat, self._offset)
        image_mask = image_mask.to(self._log_alpha.device)
        local = image_positions_to_sequence(image_mask, local)
        summary = image_positions_to_sequence(image_mask, summary)
        n = image_mask.shape[1]
        if self.config.rows == "text":
            rows = ~image_mask & (image_mask.long().cumsum(1) > 0)
        else:
            rows = torch.zeros_like(image_mask)
            rows[:, -1] = True
        # One host read per prefill: rows before this run plain SDPA in every layer.
        has = rows.any(1)
        first = torch.where(has, rows.long().argmax(1), torch.full_like(has, n, dtype=torch.long))
        return _PrefillState(local, summary, rows, int(first.min()))

    def _attend(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        ctx = self._ctx
        if ctx.prefill and self._state is None:
            self._state = self._prefill_state() or _PrefillState(*(None,) * 3, first_row=-1)
        state = self._state
        if state is None or state.local is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        n = state.local.shape[1]
        q_len, k_len = query.shape[2], key.shape[2]
        if ctx.prefill and q_len != n:
            raise RuntimeError(f"paint: the prefill reached layer {module.layer_idx} with {q_len} of its {n} tokens; "
                               f"paint cannot be combined with methods that drop tokens inside the LLM")
        if k_len < n:
            raise RuntimeError(f"paint: layer {module.layer_idx} sees {k_len} keys, fewer than the {n}-token prompt")
        layer = module.layer_idx
        local, summary = state.local, state.summary
        if k_len > n:  # decoded tokens (or empty static-cache slots) are never boosted
            pad = local.new_zeros(local.shape[0], k_len - n)
            local, summary = torch.cat([local, pad], 1), torch.cat([summary, pad], 1)
        key_bias = (local[:, None, :] * self._log_alpha[layer][None, :, None]
                    + summary[:, None, :] * self._log_beta[layer][None, :, None])          # (B, H, Lk) float32
        if ctx.prefill:
            if state.first_row >= q_len:
                return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            out = biased_sdpa(module, query, key, value, attention_mask, key_bias, state.rows,
                              first_row=state.first_row, **kwargs)
        else:
            out = biased_sdpa(module, query, key, value, attention_mask, key_bias, None, **kwargs)
        return out, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for capture in self._captures:
            capture.remove()
        self._captures = []
        self._ctx.drop_callback(id(self))
        if getattr(self, "_acquired", False):
            self._session.text_attention.release()
            self._acquired = False
        self._state = None


def apply_paint(session, config: PAINTConfig) -> PAINTHandle:
    """Attach PAINT to a session; `remove()` on the result restores the model exactly."""
    return PAINTHandle(session, config)


register_method(
    "paint", PAINTConfig, apply_paint, kind="hallucination",
    description="Boost attention to local and summary image tokens chosen from CLIP attention, scaled per head by "
                "visual sensitivity (arXiv 2501.12206).",
    slots=("attention_scores",),
)
