"""PAINT: fixing imbalanced attention to mitigate in-context hallucination (arXiv 2501.12206).

Two sets of image tokens are chosen per image from the vision tower, in the same forward pass that encodes it
(the official code's `update_modpai_alpha`):
- local tokens: the int(`local_ratio` * N) tokens with the most CLS attention (summed over heads) at CLIP layer
  `local_layer` (default 0);
- summary tokens: the tokens whose CLS attention at the vision tower's second-to-last layer is an IQR outlier
  (score > Q3 + 1.5 IQR). Local := local minus summary.
The scores come from the layers' own q/k projections, captured with scoped forward hooks (`VisionLayerCapture`;
`NativeVisionCapture` on the Qwen-VL towers); the vision tower runs as usual (no `output_attentions`).

Towers without a CLS token (SigLIP on LLaVA-OneVision, the Qwen-VL towers) rank by the attention each token
receives instead (`local_score` / `summary_score` "auto" pick "cls" where a CLS exists, else "mean"; "norm" ranks
summary tokens by hidden-state norm). Anyres images (LLaVA-NeXT, OneVision) are scored per tile and the scores are
laid out on the image's packed tokens by the model's own `pack_image_features` (row newlines get none); Qwen-VL
scores are averaged over each 2 x 2 merge group, in the language model's token order. Selection is per image over
the tokens the language model receives.

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
paper's edited rows computed explicitly in float32. alpha = beta = 0 is a no-op: nothing is installed and the logits
are bit-identical to the baseline.

Supported: every family (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Combines with
token pruning: local and summary tokens are chosen on the prompt and the probe finds them (or their absence) in every
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
    local_layer: int = field(default=0, metadata={"help": "vision-tower layer (CLIP / SigLIP layer, Qwen-VL block) "
                                                          "ranking local tokens"})
    local_score: Literal["auto", "cls", "mean"] = field(
        default="auto", metadata={"help": "local ranking: CLS attention, or mean attention received; auto = cls "
                                          "where the vision tower has a CLS token, else mean"})
    summary_layer: int | None = field(
        default=None, metadata={"help": "vision-tower layer for summary tokens; None = the second-to-last"})
    summary_score: Literal["auto", "cls", "mean", "norm"] = field(
        default="auto", metadata={"help": "summary outliers by CLS attention, mean attention received or "
                                          "hidden-state norm; auto = cls where the vision tower has a CLS token, "
                                          "else mean"})
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
        for name, allowed in (("edit", ("abs", "log_bias")), ("local_score", ("auto", "cls", "mean")),
                              ("summary_score", ("auto", "cls", "mean", "norm")), ("rows", ("last", "text")),
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


def layer_scores(capture, kind: str) -> torch.Tensor:
    """(tiles, T) per-token scores of one captured CLIP / SigLIP layer: the CLS row of its attention summed over
    heads (cls), the attention each token receives summed over heads and averaged over queries (mean), or the
    layer output's L2 norm (norm)."""
    from mmkit.patching.pre_llm import query_attention

    q, k, out = capture.take()
    if kind == "norm":
        return out.float().norm(dim=-1)
    qh, kh = capture.heads(q), capture.heads(k)
    if kind == "cls":
        return query_attention(qh[:, :, :1], kh, capture.scale)[:, :, 0].sum(1)
    # One tile at a time: a OneVision image has up to ten tiles of 729 tokens, (H, T, T) each.
    return torch.stack([query_attention(qh[i:i + 1], kh[i:i + 1], capture.scale)[0].sum(0).mean(0)
                        for i in range(qh.shape[0])])


def select_per_image(local_scores: list[torch.Tensor], summary_scores: list[torch.Tensor], ratio: float
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image, (local, summary) bool masks over its image tokens from its two score vectors (n_i,): summary =
    IQR outliers, local = top int(ratio n) minus summary, over the tokens with a score (NaN marks a row newline,
    never chosen)."""
    locals_, summaries = [], []
    for local_score, summary_score in zip(local_scores, summary_scores):
        real = ~torch.isnan(local_score)
        summary = torch.zeros(local_score.shape, dtype=torch.bool, device=local_score.device)
        local = torch.zeros_like(summary)
        if bool(real.any()):
            summary[real] = iqr_outliers(summary_score[real])
            local[real] = top_fraction(local_score[real], ratio) & ~summary[real]
        locals_.append(local)
        summaries.append(summary)
    return locals_, summaries


def image_positions_to_sequence(image_mask: torch.Tensor, per_image) -> torch.Tensor:
    """Spread per-image token flags onto the prompt's image positions: (B, n) bool (False off-image).

    per_image: a list of (n_i,) flags (or an (I, N) tensor), one per image in prompt order; the images' tokens
    appear in the prompt in that order, row by row."""
    flags = [row for row in per_image]
    total = int(image_mask.sum())
    counted = sum(int(f.numel()) for f in flags)
    if total != counted:
        raise RuntimeError(f"paint: the prompt holds {total} image tokens but the vision tower encoded {len(flags)} "
                           f"images of {counted} tokens in all")
    out = torch.zeros_like(image_mask, dtype=torch.bool)
    if flags:
        out.view(-1)[image_mask.reshape(-1).nonzero().flatten()] = torch.cat(flags).to(image_mask.device).bool()
    return out


class _TowerScores:
    """Per-image token scores from a CLIP / SigLIP tower (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision): each tile's
    scores at the two chosen layers, mapped to the image's packed tokens on the anyres layouts."""

    def __init__(self, session, local_layer: int, summary_layer: int, local: str, summary: str):
        from mmkit.patching.anyres import ImageSizeCapture
        from mmkit.patching.pre_llm import ANYRES, VisionLayerCapture

        adapter = session.adapter
        self.kinds = (local, summary)
        self.anyres = adapter.architecture in ANYRES
        # Index of feature token 0 among the tower's tokens: 1 when the model drops CLS, 0 when it keeps it (or
        # the tower has none).
        self.offset = 1 if adapter.has_cls_token and adapter.vision_feature_select_strategy == "default" else 0
        self._inner = session.model.model
        self._captures = [VisionLayerCapture(adapter, local_layer), VisionLayerCapture(adapter, summary_layer)]
        self._sizes = ImageSizeCapture(self._inner) if self.anyres else None

    def per_image(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from mmkit.patching.anyres import pack_tile_values

        local, summary = (layer_scores(c, kind)[:, self.offset:] for c, kind in zip(self._captures, self.kinds))
        if not self.anyres:
            return list(local), list(summary)
        packed = pack_tile_values(self._inner, self._sizes, torch.stack([local, summary], -1))
        return [p[:, 0].float() for p in packed], [p[:, 1].float() for p in packed]

    def remove(self) -> None:
        for capture in self._captures:
            capture.remove()
        self._captures = []
        if self._sizes is not None:
            self._sizes.remove()
            self._sizes = None


class _NativeScores:
    """Per-image token scores from a Qwen-VL tower (no CLS): per patch at the two chosen blocks, averaged over each
    2 x 2 merge group, in the language model's token order."""

    def __init__(self, session, local_layer: int, summary_layer: int, local: str, summary: str):
        from mmkit.patching.native import NativeVisionCapture

        self.kinds = (local, summary)
        self._captures = [NativeVisionCapture(session.adapter, layer=local_layer),
                          NativeVisionCapture(session.adapter, layer=summary_layer, output=summary == "norm")]

    def per_image(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from mmkit.patching.native import native_scores

        out = []
        for capture, kind in zip(self._captures, self.kinds):
            scores = native_scores(capture)
            # relative: a windowed Qwen2.5-VL block's windows differ in size; scale each to mean 1.
            out.append(scores.output_norm() if kind == "norm" else scores.received(relative=True))
        return out[0], out[1]

    def remove(self) -> None:
        for capture in self._captures:
            capture.remove()
        self._captures = []


@dataclass
class _PrefillState:
    local: torch.Tensor          # (B, n) bool: local image tokens in prompt coordinates
    summary: torch.Tensor        # (B, n) bool


class PAINTHandle:
    def __init__(self, session, config: PAINTConfig, force_override: bool = False):
        from mmkit.patching.native import is_native
        from mmkit.patching.pre_llm import ANYRES, vision_encoder_layers

        self.config = config
        adapter = session.adapter
        native = is_native(adapter)
        if not native and not isinstance(adapter.vision_feature_layer, int):
            raise ValueError(f"paint needs one vision feature layer; {adapter.architecture} is set to "
                             f"{adapter.vision_feature_layer!r}")
        if adapter.architecture in ANYRES and adapter.has_cls_token and \
                adapter.vision_feature_select_strategy != "default":
            raise ValueError("paint on LLaVA-NeXT needs vision_feature_select_strategy='default' (patch features "
                             "without CLS, as the released checkpoints use)")
        num_layers = adapter.num_layers
        end = num_layers if config.end_layer is None else config.end_layer
        if config.start_layer >= num_layers or end > num_layers:
            raise ValueError(f"paint layers [{config.start_layer}, {end}) do not fit this model's {num_layers} "
                             f"decoder layers")
        vision_layers = len(adapter.vision_tower.blocks) if native else len(vision_encoder_layers(adapter))
        # The official code reads `attentions[-2]`: the tower's second-to-last layer (LLaVA-1.5's feature layer).
        summary_layer = max(0, vision_layers - 2) if config.summary_layer is None else config.summary_layer
        if config.local_layer >= vision_layers or summary_layer >= vision_layers:
            raise ValueError(f"paint vision layers (local {config.local_layer}, summary {summary_layer}) must be "
                             f"below the vision tower's {vision_layers} encoder layers")
        self.local_score, self.summary_score = self._scores_for(adapter, native)
        self.layers = list(range(config.start_layer, end))
        self.heads = int(adapter.text_config.num_attention_heads)
        self.mass: torch.Tensor | None = None
        self._handles: list = []
        self._scorer = None
        self._ctx = session.context
        self._state: _PrefillState | None = None
        self._session = session
        if config.is_noop and not force_override:
            # alpha = beta = 0 adds 0 |z|: install nothing, so the logits stay bit-identical.
            logger.info("paint with alpha = beta = 0 is a no-op; the model is left unchanged")
            return
        self.mass = self._sensitivity(session)
        self._set_coefficients(session.device)
        logger.info("paint on %s: local tokens by %s at vision layer %d, summary tokens by %s at vision layer %d",
                    adapter.family.name, self.local_score, config.local_layer, self.summary_score, summary_layer)
        scorer = _NativeScores if native else _TowerScores
        self._scorer = scorer(session, config.local_layer, summary_layer, self.local_score, self.summary_score)
        try:
            self._handles.append(session.probe.override(self.layers, self._attend))
        except Exception:
            self.remove()
            raise
        self._ctx.on_prefill(id(self), self._reset)

    def _scores_for(self, adapter, native: bool) -> tuple[str, str]:
        """The (local, summary) scores this tower gets: `auto` is CLS attention where the tower has a CLS token
        (the paper), else the attention each token receives (the CLS-free score VisionZip's SigLIP and Qwen-VL
        ports use)."""
        has_cls = adapter.has_cls_token and not native
        chosen = []
        for name in ("local_score", "summary_score"):
            value = getattr(self.config, name)
            if value == "auto":
                value = "cls" if has_cls else "mean"
            if value == "cls" and not has_cls:
                raise ValueError(f"paint {name}=cls needs a vision tower with a CLS token and {adapter.family.name}'s "
                                 f"has none; use {name}=auto or mean")
            chosen.append(value)
        return chosen[0], chosen[1]

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
        local_scores, summary_scores = self._scorer.per_image()
        local, summary = select_per_image(local_scores, summary_scores, self.config.local_ratio)
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
        if self._scorer is not None:
            self._scorer.remove()
            self._scorer = None
        self._ctx.drop_callback(id(self))
        self._state = None


def apply_paint(session, config: PAINTConfig) -> PAINTHandle:
    """Attach PAINT to a session; `remove()` on the result restores the model exactly."""
    return PAINTHandle(session, config)


register_method(
    "paint", PAINTConfig, apply_paint, kind="hallucination",
    description="Edit the current token's attention scores to local and summary image tokens chosen from the vision "
                "tower's attention, z + alpha |z| (arXiv 2501.12206); optionally scaled per head by visual "
                "sensitivity.",
    slots=("attention_scores",), needs_calibration=True,
)
