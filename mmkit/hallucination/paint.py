"""PAINT: fixing imbalanced attention to mitigate in-context hallucination (arXiv 2501.12206).

Two sets of image tokens are chosen per image from the vision tower, in the same forward pass that encodes it
(the official code's `update_modpai_alpha`):
- local tokens: the int(`local_ratio` * N) patches with the most CLS attention (summed over heads) at CLIP layer
  `local_layer` (default 0);
- summary tokens: the patches whose CLS attention at the vision tower's second-to-last layer is an IQR outlier
  (score > Q3 + 1.5 IQR). Local := local minus summary.
The scores come from the layers' own q/k projections, captured with scoped forward hooks (`VisionLayerCapture`);
the vision tower runs as usual (no `output_attentions`). `local_score="mean"` and `summary_score="norm"` are mmkit
variants (mean attention received; hidden-state norm).

In decoder layers [start_layer, end_layer) (default 2 to the last, as the official code), the pre-softmax score
z = q.k / sqrt(d) of the current token's row (the last prompt row in the prefill, the new token while decoding)
is edited on those keys:

    z <- z + alpha_{l,h} |z|   on local keys,     z <- z + beta_{l,h} |z|   on summary keys,

with alpha_{l,h} = alpha * s_{l,h} and beta_{l,h} = beta * s_{l,h}. `heads="uniform"` (default, the official
code: one edit for every head) has s = 1; `heads="calibrated"` (mmkit's reading of the paper's head-specific
modulation) uses s_{l,h} in [0, 1], the head's visual sensitivity (`head_sensitivity.normalise` of the
calibrated image attention mass: the head's mass relative to the most visual head of its layer), from
`sensitivity=<file>` (written by `head_sensitivity.save` / `mmkit tune paint-heads`) or, when empty, the built-in
calibration (8 reference-world scenes x 4 prompts).

`edit="log_bias"` is mmkit's older variant: the unnormalised attention exp(z) to local / summary keys is
multiplied by 1 + alpha_{l,h} / 1 + beta_{l,h} (z + log(1 + alpha_{l,h})), the same factor whatever z is;
`rows="text"` edits every text row after the image (prompt and generated tokens) instead of the current one.

The edited layers' attention is replaced through the attention probe by the kernel op
`mmkit.kernels.scaled_attention` (`key_gain` for the paper's edit, `key_bias` for log_bias): on CUDA a
FlexAttention score_mod; elsewhere SDPA for the rows left alone (with an additive mask on log_bias's rows) and the
paper's edited rows computed explicitly in float32. alpha = beta = 0 is a no-op: nothing is installed and the logits are bit-identical to the baseline.

Supported: LLaVA-1.5 layout (`LlavaForConditionalGeneration`, one vision feature layer). Combines with token
pruning: local and summary tokens are chosen on the prompt and the probe finds them (or their absence) in every
layer's sequence, so a dropped token is simply not boosted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmkit.hallucination.common import check_float
from mmkit.kernels import scaled_attention
from mmkit.registry import register_method

logger = logging.getLogger(__name__)


@dataclass
class PAINTConfig:
    """PAINT: edit the current token's attention scores to local and summary image tokens, z <- z + alpha |z|."""

    alpha: float = field(default=0.7, metadata={"help": "gain on local tokens' scores, z + alpha |z| (most sensitive "
                                                        "head with heads=calibrated); 0 = no edit"})
    beta: float = field(default=0.3, metadata={"help": "gain on summary tokens' scores, z + beta |z|; 0 = no edit"})
    edit: Literal["abs", "log_bias"] = field(
        default="abs", metadata={"help": "abs: z + alpha |z| (the paper's edit); log_bias: z + log(1 + alpha), the "
                                         "unnormalised attention times 1 + alpha"})
    local_ratio: float = field(default=0.25, metadata={"help": "fraction of each image's tokens taken as local"})
    local_layer: int = field(default=0, metadata={"help": "CLIP encoder layer ranking local tokens"})
    local_score: Literal["cls", "mean"] = field(
        default="cls", metadata={"help": "local ranking: CLS attention, or mean attention received"})
    summary_layer: int | None = field(
        default=None, metadata={"help": "CLIP encoder layer for summary tokens; None = the second-to-last"})
    summary_score: Literal["cls", "norm"] = field(
        default="cls", metadata={"help": "summary outliers by CLS attention or by hidden-state norm"})
    start_layer: int = field(default=2, metadata={"help": "first decoder layer whose attention is edited"})
    end_layer: int | None = field(default=None, metadata={"help": "decoder layer to stop before; None = all"})
    rows: Literal["last", "text"] = field(
        default="last", metadata={"help": "query rows edited: the current (last) token, or every text/generated row "
                                          "after the image"})
    heads: Literal["uniform", "calibrated"] = field(
        default="uniform", metadata={"help": "one gain for every head, or gains scaled by each head's calibrated "
                                             "visual sensitivity"})
    sensitivity: str = field(default="", metadata={"help": "with heads=calibrated: safetensors file of head "
                                                           "sensitivities; empty = run the built-in calibration"})

    def __post_init__(self):
        self.alpha = check_float("alpha", self.alpha, low=0.0)
        self.beta = check_float("beta", self.beta, low=0.0)
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
        for name, allowed in (("edit", ("abs", "log_bias")), ("local_score", ("cls", "mean")),
                              ("summary_score", ("cls", "norm")), ("rows", ("last", "text")),
                              ("heads", ("uniform", "calibrated"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.sensitivity, str):
            raise ValueError(f"sensitivity must be a file path or empty, got {self.sensitivity!r}")
        if self.sensitivity and self.heads != "calibrated":
            raise ValueError("sensitivity is only read with heads=calibrated; add heads=calibrated or drop it")

    @property
    def is_noop(self) -> bool:
        return self.alpha == 0.0 and self.beta == 0.0


# -- token selection ------------------------------------------------------------------------------------------------
def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Bool mask of scores above Q3 + 1.5 IQR along the last dimension (Tukey's upper fence)."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device), dim=-1, keepdim=True)
    return scores > q3 + 1.5 * (q3 - q1)


def top_fraction(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask of the int(ratio * N) highest scores along the last dimension (per image): the official code's
    count (144 of 576 at 0.25)."""
    n = scores.shape[-1]
    k = min(n, int(ratio * n))
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
        from mmkit.patching.pre_llm import VisionLayerCapture, vision_encoder_layers

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
        # The official code reads `attentions[-2]`: the tower's second-to-last layer (LLaVA-1.5's feature layer).
        summary_layer = max(0, vision_layers - 2) if config.summary_layer is None else config.summary_layer
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
            # alpha = beta = 0 adds 0 |z|: install nothing, so the logits stay bit-identical.
            logger.info("paint with alpha = beta = 0 is a no-op; the model is left unchanged")
            return
        self.mass = self._sensitivity(session)
        self._set_coefficients(session.device)
        vision = adapter.config.vision_config
        self._n_feat = (int(vision.image_size) // int(vision.patch_size)) ** 2
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
        """s (L, H): 1 for every head (uniform), or the calibrated visual sensitivity in [0, 1]."""
        from mmkit.hallucination import head_sensitivity

        layers = self._session.adapter.num_layers
        if self.mass is None:
            return torch.ones(layers, self.heads)
        return head_sensitivity.normalise(self.mass)

    def _set_coefficients(self, device) -> None:
        """Per (layer, head) edit coefficients of local and summary keys: the gains alpha * s and beta * s of
        z + gain |z|, or for log_bias the additive log(1 + gain)."""
        sens = self._head_scale()
        local, summary = self.config.alpha * sens, self.config.beta * sens
        if self.config.edit == "log_bias":
            local, summary = torch.log1p(local), torch.log1p(summary)
        self._local_coef = local.to(device)       # (L, H) float32
        self._summary_coef = summary.to(device)

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
            self._set_coefficients(self._local_coef.device)

    # -- per call -----------------------------------------------------------------------------------------------------
    def _reset(self, ctx) -> None:
        self._state = None

    def _prefill_state(self) -> _PrefillState | None:
        image_mask = self._ctx.prompt_image_mask
        if image_mask is None or not bool(image_mask.any()):
            return None
        local, summary = select_tokens(self._captures[0], self._captures[1], self.config, self._n_feat, self._offset)
        # Chosen on the prompt; the probe maps them onto whatever sequence each layer sees.
        image_mask = image_mask.to(self._local_coef.device)
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
        coef = (local[:, None, :] * self._local_coef[layer][None, :, None]
                + summary[:, None, :] * self._summary_coef[layer][None, :, None])         # (B, H, Lk) float32
        rows = self._rows(view)
        if self.config.edit == "abs":
            out = scaled_attention(query, key, value, scaling=view.scaling, attn_mask=view.attention_mask,
                                   row_mask=rows, key_gain=coef)
        else:
            out = scaled_attention(query, key, value, scaling=view.scaling, attn_mask=view.attention_mask,
                                   row_mask=rows, key_bias=coef)
        return out.transpose(1, 2).contiguous(), None

    def _rows(self, view) -> torch.Tensor | None:
        """(B, Lq) query rows to edit, None = every row."""
        if self.config.rows == "text":
            return view.text_rows if view.prefill else None  # every generated token is a text row after the image
        # The current token: the last row of each call (left padding keeps every batch row's last token there).
        rows = torch.zeros(view.batch, view.query.shape[2], dtype=torch.bool, device=view.query.device)
        rows[:, -1] = True
        return rows & view.text_rows if view.prefill else rows

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
    description="Edit the current token's attention scores to local and summary image tokens chosen from CLIP "
                "attention, z + alpha |z| (arXiv 2501.12206); optionally scaled per head by visual sensitivity.",
    slots=("attention_scores",), needs_calibration=True,
)
