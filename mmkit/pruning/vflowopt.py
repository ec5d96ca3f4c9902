"""VFlowOpt (ICCV 2025): importance-guided visual-token pruning and recycling, with hyper-parameters tuned by the
flow of visual information.

1. Importance, at the CLIP layer LLaVA takes its features from: average the layer's attention over heads; the
   "global" tokens are the CLS token plus every token whose received attention exceeds `threshold` times the mean
   (sink-like tokens); a patch's context relevance is how much the global tokens attend to it (mean over them).
   Plus `entropy_weight` x softmax(patch entropy), the entropy of the patch's 256-bin grey-level histogram.
2. Before the LLM: keep the highest-scoring `vision_keep` share of each image's tokens; the dropped tokens are
   recycled: per `merge_cell` x `merge_cell` cell of the patch grid, one importance-weighted mean placed at the
   cell's most important dropped token. The merge is taken over the projector's output (the LLM-space tokens),
   as the official code does. The shortened sequence is numbered contiguously, as an image with fewer tokens
   would be (the official code rebuilds the position ids of the shorter sequence); `positions=original` keeps
   the original position ids instead.
3. Inside the LLM, at `llm_layers`, drop the lowest-scoring image tokens again, keeping `llm_keep[i]` of the
   survivors, ranked by the same ViT scores (no LLM attention needed; `TokenDropper`). These drops keep the
   position ids the survivors had, as the official LLM-side stages do.
4. `mmkit.tuning.vflowopt.tune_vflowopt` searches (vision_keep, first-stage keep, threshold, merge_cell,
   entropy_weight) for a token budget with optuna's TPE sampler. `mmkit tune vflowopt` writes the result as
   JSON (with the model it was tuned for) and `vflowopt:config=PATH` loads it; the reference model's are shipped.

On Qwen-VL (`mmkit.patching.native`) the importance is computed in the tower's last full-attention block and
averaged over each visual token's 2 x 2 patches, pruning and recycling act per image on its grid of merged tokens
after the merger (`native_prune_recycle`), and kept tokens keep their 3-D rotary positions.

The defaults are the released LLaVA-OneVision-7B setting for a 25 % budget; `tuned_for` names the model a setting
was tuned for, and applying one to another model logs a warning. Deviations from the official code
(LLaVA-OneVision/SigLIP), with reasons, are listed in docs/vflowopt.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from mmkit.patching.anyres import GRID, ImageSizeCapture, anyres_layout, anyres_placement, visible_patches
from mmkit.patching.pre_llm import (
    ANYRES,
    PreLLMReducer,
    ReductionPlan,
    VisionLayerCapture,
    check_supported,
    feature_layer_index,
    query_attention,
    visual_tokens_per_image,
)
from mmkit.models.shipped import shipped_dir
from mmkit.patching.native import NativeVisionCapture, is_native, native_placement, native_scores
from mmkit.patching.token_drop import TokenDropper, keep_top_visual
from mmkit.registry import register_method

logger = logging.getLogger(__name__)

# Configurations tuned for the reference model (`mmkit tune vflowopt --samples 32 --trials 48 --seed 0`), by name.
SHIPPED_TUNED = shipped_dir("vflowopt")

# The model the default (paper) values were tuned for: the released 25 % setting of the official code.
PAPER_TUNED_FOR = "llava-onevision-qwen2-7b-ov"

# Fields a tuned configuration file sets.
_TUNED_FIELDS = ("vision_keep", "threshold", "merge_cell", "entropy_weight", "llm_layers", "llm_keep")


@dataclass
class VFlowOptConfig:
    """VFlowOpt: ViT-importance pruning with recycling before the LLM, then staged drops inside it.

    Defaults: the released LLaVA-OneVision-7B setting for a 25% budget (merge cell 15.58 of 27 patches), so
    `tuned_for` defaults to that model; a file from `mmkit tune vflowopt` sets the model it was tuned on.
    """

    vision_keep: float = field(default=0.265, metadata={"help": "share of each image's tokens entering the LLM "
                                                                "(merged tokens included)"})
    threshold: float = field(default=34.76, metadata={"help": "global tokens: received attention > threshold x mean"})
    merge_cell: float = field(default=0.58, metadata={"help": "recycling cell side as a share of the patch-grid "
                                                              "side (0: drop without recycling)"})
    entropy_weight: float = field(default=0.0, metadata={"help": "weight of softmax(patch entropy) in the score"})
    llm_layers: tuple[int, ...] = field(default=(), metadata={"help": "decoder layers of the LLM-side drops "
                                                                      "(empty: evenly spaced, 9 and 18 of 28)"})
    llm_keep: tuple[float, ...] = field(default=(0.983, 0.877), metadata={"help": "share of surviving image tokens "
                                                                                  "kept at each LLM stage"})
    positions: Literal["contiguous", "original"] = field(
        default="contiguous", metadata={"help": "position ids after the vision-side stage: renumber the shorter "
                                                "sequence (official code) or keep the originals"})
    config: str = field(default="", metadata={"help": "JSON file written by `mmkit tune vflowopt` (sets the tuned "
                                                      "fields), or a shipped one by name: reference-0.5, "
                                                      "reference-0.25, reference-0.1"})
    tuned_for: str = field(default=PAPER_TUNED_FOR, metadata={
        "help": "model the tuned fields were tuned for (set from a tuned file); another model gets a warning"})

    def __post_init__(self):
        if self.config:
            self._load(self.config)
        self._validate()

    def _validate(self) -> None:
        for name in ("vision_keep", "threshold", "merge_cell", "entropy_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if not 0.0 < self.vision_keep <= 1.0:
            raise ValueError(f"vision_keep must be in (0, 1], got {self.vision_keep}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.merge_cell <= 1.0:
            raise ValueError(f"merge_cell must be in [0, 1], got {self.merge_cell}")
        self.llm_layers = tuple(self.llm_layers)
        self.llm_keep = tuple(float(k) for k in self.llm_keep)
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in self.llm_layers):
            raise ValueError(f"llm_layers must be integers >= 1, got {self.llm_layers}")
        if list(self.llm_layers) != sorted(set(self.llm_layers)):
            raise ValueError(f"llm_layers must be strictly increasing, got {self.llm_layers}")
        if any(not 0.0 < k <= 1.0 for k in self.llm_keep):
            raise ValueError(f"llm_keep values must be in (0, 1], got {self.llm_keep}")
        if self.llm_layers and len(self.llm_layers) != len(self.llm_keep):
            raise ValueError(f"llm_layers {self.llm_layers} and llm_keep {self.llm_keep} must have the same length")
        if self.positions not in ("original", "contiguous"):
            raise ValueError(f"positions must be contiguous or original, got {self.positions!r}")
        if not isinstance(self.tuned_for, str) or not self.tuned_for.strip():
            raise ValueError(f"tuned_for must name a model, got {self.tuned_for!r}")

    def _load(self, path: str) -> None:
        file = Path(path)
        if not file.is_file() and (SHIPPED_TUNED / f"{path}.json").is_file():
            file = SHIPPED_TUNED / f"{path}.json"
        if not file.is_file():
            shipped = ", ".join(sorted(p.stem for p in SHIPPED_TUNED.glob("*.json"))) or "none"
            raise ValueError(f"vflowopt config file {path!r} does not exist; create it with `mmkit tune vflowopt` "
                             f"or name a shipped one ({shipped})")
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"vflowopt config file {path!r} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("method") != "vflowopt" or not isinstance(data.get("config"), dict):
            raise ValueError(f"{path!r} is not a vflowopt config (expected {{'method': 'vflowopt', 'config': {{...}}}})")
        values = data["config"]
        unknown = sorted(set(values) - set(_TUNED_FIELDS) - {"positions", "config"})
        if unknown:
            raise ValueError(f"{path!r} has unknown vflowopt fields: {', '.join(unknown)}")
        defaults = VFlowOptConfig()
        for name in _TUNED_FIELDS + ("positions",):
            if name not in values:
                continue
            value = tuple(values[name]) if isinstance(values[name], list) else values[name]
            mine = getattr(self, name)
            if mine != getattr(defaults, name) and mine != value:
                raise ValueError(f"{name}={mine} conflicts with {value} from {path!r}; set one or the other")
            setattr(self, name, value)
        tuned_for = data.get("model")
        if isinstance(tuned_for, str) and tuned_for and self.tuned_for == PAPER_TUNED_FOR:
            self.tuned_for = tuned_for

    def spec_baseline(self) -> "VFlowOptConfig":
        """What a spec string is written against: the values of the tuned file when one is named (with an empty
        `config`, so that the spec names the file)."""
        if not self.config:
            return VFlowOptConfig()
        baseline = VFlowOptConfig(config=self.config)
        baseline.config = ""
        return baseline

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """The decoder layers of the LLM-side drops for a decoder of `num_layers` layers."""
        if self.llm_layers:
            if self.llm_layers[-1] >= num_layers:
                raise ValueError(f"llm_layers {self.llm_layers} go past the last decoder layer ({num_layers - 1})")
            return self.llm_layers
        stages = len(self.llm_keep)
        layers = tuple(max(1, num_layers * (i + 1) // (stages + 1)) for i in range(stages))
        if len(set(layers)) != stages or (layers and layers[-1] >= num_layers):
            raise ValueError(f"{stages} LLM stages do not fit a {num_layers}-layer decoder; set llm_layers")
        return layers


# -- scores -----------------------------------------------------------------------------------------------------
def patch_entropy(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """Entropy (bits) of each patch's 256-bin grey-level histogram: (I, 3, H, W) -> (I, (H/p) * (W/p))."""
    grey = pixel_values.float().mean(1)
    lo = grey.flatten(1).min(1).values[:, None, None]
    hi = grey.flatten(1).max(1).values[:, None, None]
    levels = ((grey - lo) / (hi - lo).clamp_min(1e-12) * 255).round().long().clamp(0, 255)
    n_img, h, w = levels.shape
    tiles = levels.view(n_img, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).reshape(n_img, -1, patch * patch)
    counts = torch.zeros(n_img, tiles.shape[1], 256, device=levels.device)
    counts.scatter_add_(2, tiles, torch.ones_like(tiles, dtype=counts.dtype))
    p = counts / (patch * patch)
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(-1)


def importance_scores(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float, threshold: float,
                      has_cls: bool = True) -> torch.Tensor:
    """Context relevance (I, T) of every token: mean attention it receives from the global tokens (CLS, token 0,
    when the tower has one, plus tokens whose received attention exceeds `threshold` x mean), attention averaged
    over heads."""
    n_img, t, c = q.shape
    d = c // num_heads
    qh = q.float().view(n_img, t, num_heads, d).transpose(1, 2)
    kh = k.float().view(n_img, t, num_heads, d).transpose(1, 2)
    attn = torch.zeros(n_img, t, t, device=q.device)
    for h in range(num_heads):  # one head at a time: T x T per image, not H x T x T
        attn += query_attention(qh[:, h:h + 1], kh[:, h:h + 1], scale)[:, 0]
    attn /= num_heads
    received = attn.mean(1)                                                    # (I, T)
    is_global = received > threshold * received.mean(1, keepdim=True)
    if has_cls:
        is_global[:, 0] = True
    else:  # without CLS, a tile whose attention has no sink-like token falls back to its most attended token
        is_global.scatter_(1, received.argmax(1, keepdim=True), True)
    weights = is_global.float() / is_global.sum(1, keepdim=True)
    return torch.bmm(weights[:, None, :], attn)[:, 0]                         # (I, T)


@dataclass
class Recycling:
    """Where the dropped tokens of each image go: cell c of image i is merged into token `place[i, c]` with
    weights `weights[i, c]` over the image's N tokens (zero outside the cell's dropped tokens); `used[i, c]` is
    False for cells with no dropped token."""

    place: torch.Tensor      # (I, cells) long
    weights: torch.Tensor    # (I, cells, N) float32
    used: torch.Tensor       # (I, cells) bool

    def apply(self, tokens: torch.Tensor) -> torch.Tensor:
        """Write each cell's weighted mean of `tokens` (I, N, D) into its place (returns a new tensor)."""
        merged = torch.bmm(self.weights.to(tokens.device), tokens.float())
        merged = merged / self.weights.sum(-1, keepdim=True).to(tokens.device).clamp_min(1e-12)
        out = tokens.clone()
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(self.place)
        used = self.used.to(tokens.device)
        place = self.place.to(tokens.device)
        out[rows[used], place[used]] = merged[used].to(out.dtype)
        return out


def vflowopt_plan(scores: torch.Tensor, grid: int, vision_keep: float, merge_cell: float, cls_in_features: bool,
                  visible: torch.Tensor | None = None) -> tuple[ReductionPlan, Recycling | None, torch.Tensor]:
    """Prune + recycle one batch of images, from each feature token's score, scores (I, N).

    Returns the plan (kept tokens, merged ones included, in image order), the recycling to apply to the
    projected tokens (None without merging), and the score of each plan slot (I, k) for the LLM-side stages.
    `visible` (I, N): for anyres tiles, the patches that reach the language model (unpadding crops the others);
    the budget is a share of those, and only those are kept or recycled.
    """
    if visible is not None:
        return _visible_plan(scores, grid, vision_keep, merge_cell, visible)
    n_img, n_feat = scores.shape
    device = scores.device
    budget = min(n_feat, max(1, round(vision_keep * n_feat)))
    order_all = torch.arange(n_feat, device=device).expand(n_img, n_feat)
    if budget >= n_feat:
        return ReductionPlan(order=order_all), None, scores
    offset = 1 if cls_in_features else 0
    cell = max(1, round(merge_cell * grid)) if merge_cell > 0 else 0
    per_side = math.ceil(grid / cell) if cell else 0
    n_cells = per_side * per_side
    n_top = max(0, budget - n_cells)
    rank_scores = scores.clone()
    if cls_in_features:
        rank_scores[:, 0] = float("inf")
        n_top = max(n_top, 1)
    keep = torch.zeros(n_img, n_feat, dtype=torch.bool, device=device)
    keep.scatter_(1, torch.topk(rank_scores, n_top, dim=1).indices, True)
    recycling = None
    if cell:
        dropped = ~keep
        if cls_in_features:
            dropped[:, 0] = False
        patch = torch.arange(n_feat - offset, device=device)
        cell_id = (patch // grid // cell) * per_side + (patch % grid) // cell
        member = torch.zeros(n_cells, n_feat, dtype=torch.bool, device=device)
        member[cell_id, patch + offset] = True
        in_cell = member[None] & dropped[:, None, :]                             # (I, cells, N)
        used = in_cell.any(-1)
        masked = torch.where(in_cell, scores[:, None, :].float(), torch.tensor(float("-inf"), device=device))
        place = masked.argmax(-1)                                                # most important dropped token
        # Importance-weighted, as the official code; the small floor keeps a cell of zero-score tokens a mean.
        weights = torch.where(in_cell, scores[:, None, :].float().clamp_min(0) + 1e-6, torch.zeros((), device=device))
        rows = torch.arange(n_img, device=device)[:, None].expand_as(place)
        keep[rows[used], place[used]] = True
        recycling = Recycling(place=place, weights=weights, used=used)
    counts = keep.sum(1)
    k_max = int(counts.max())
    order = torch.sort(torch.where(keep, order_all, order_all + n_feat), dim=1).values[:, :k_max]
    valid = torch.arange(k_max, device=device)[None] < counts[:, None]
    order = torch.where(valid, order, 0)
    plan = ReductionPlan(order=order, valid=None if bool(valid.all()) else valid)
    return plan, recycling, scores.gather(1, order)


def _visible_plan(scores: torch.Tensor, grid: int, vision_keep: float, merge_cell: float, visible: torch.Tensor
                  ) -> tuple[ReductionPlan, Recycling | None, torch.Tensor]:
    """`vflowopt_plan` for tiles of which only the `visible` patches count (no CLS among the features)."""
    n_img, n_feat = scores.shape
    device = scores.device
    n_visible = visible.sum(1)
    budget = torch.clamp(torch.round(vision_keep * n_visible.float()).long(), min=1)
    budget = torch.minimum(budget, n_visible)
    order_all = torch.arange(n_feat, device=device).expand(n_img, n_feat)
    cell = max(1, round(merge_cell * grid)) if merge_cell > 0 else 0
    per_side = math.ceil(grid / cell) if cell else 0
    n_cells = per_side * per_side
    # Tiles keeping all their visible patches recycle nothing; the others keep their top (budget - cells).
    full = budget >= n_visible
    n_top = torch.where(full, n_visible, (budget - n_cells).clamp_min(0))
    ranked = torch.where(visible, scores.float(), torch.tensor(float("-inf"), device=device))
    position = torch.argsort(torch.argsort(ranked, dim=1, descending=True, stable=True), dim=1)
    keep = (position < n_top[:, None]) & visible
    recycling = None
    if cell and not bool(full.all()):
        dropped = ~keep & visible & ~full[:, None]
        patch = torch.arange(n_feat, device=device)
        cell_id = (patch // grid // cell) * per_side + (patch % grid) // cell
        member = torch.zeros(n_cells, n_feat, dtype=torch.bool, device=device)
        member[cell_id, patch] = True
        in_cell = member[None] & dropped[:, None, :]
        used = in_cell.any(-1)
        masked = torch.where(in_cell, scores[:, None, :].float(), torch.tensor(float("-inf"), device=device))
        place = masked.argmax(-1)
        weights = torch.where(in_cell, scores[:, None, :].float().clamp_min(0) + 1e-6, torch.zeros((), device=device))
        rows = torch.arange(n_img, device=device)[:, None].expand_as(place)
        keep[rows[used], place[used]] = True
        recycling = Recycling(place=place, weights=weights, used=used)
    counts = keep.sum(1)
    k_max = max(1, int(counts.max()))
    order = torch.sort(torch.where(keep, order_all, order_all + n_feat), dim=1).values[:, :k_max]
    valid = torch.arange(k_max, device=device)[None] < counts[:, None]
    order = torch.where(valid, order, 0)
    plan = ReductionPlan(order=order, valid=None if bool(valid.all()) else valid)
    return plan, recycling, scores.gather(1, order)


def native_prune_recycle(tokens: torch.Tensor, scores: torch.Tensor, rows: int, cols: int, vision_keep: float,
                         merge_cell: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """VFlowOpt's prune + recycle for one Qwen-VL image on its grid of rows x cols visual tokens (merged 2 x 2
    patches): keep the top (budget - cells) tokens by score; each cell of `merge_cell` x the grid's height by
    `merge_cell` x its width merges its dropped tokens into one score-weighted mean placed at its highest-scoring
    dropped token. tokens (n, C). Returns the kept indices (image order) and the edited tokens (None if
    unchanged)."""
    n = scores.numel()
    budget = min(n, max(1, round(vision_keep * n)))
    if budget >= n:
        return torch.arange(n, device=scores.device), None
    cell_h = max(1, round(merge_cell * rows)) if merge_cell > 0 else 0
    cell_w = max(1, round(merge_cell * cols)) if merge_cell > 0 else 0
    per_w = math.ceil(cols / cell_w) if cell_w else 0
    n_cells = math.ceil(rows / cell_h) * per_w if cell_h else 0
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep[torch.topk(scores, max(0, budget - n_cells)).indices] = True
    if not n_cells:
        return keep.nonzero().flatten(), None
    index = torch.arange(n, device=scores.device)
    cell_id = (index // cols // cell_h) * per_w + (index % cols) // cell_w
    member = torch.zeros(n_cells, n, dtype=torch.bool, device=scores.device)
    member[cell_id, index] = True
    in_cell = member & ~keep[None]
    used = in_cell.any(-1)
    ranked = torch.where(in_cell, scores[None].float(), torch.tensor(float("-inf"), device=scores.device))
    place = ranked.argmax(-1)[used]
    # Importance-weighted, as the official code; the small floor keeps a cell of zero-score tokens a mean.
    weights = torch.where(in_cell, scores[None].float().clamp_min(0) + 1e-6,
                          torch.zeros((), device=scores.device))[used]
    merged = weights.to(tokens.device) @ tokens.float() / weights.sum(-1, keepdim=True).to(tokens.device)
    edited = tokens.clone()
    edited[place.to(tokens.device)] = merged.to(tokens.dtype)
    keep[place] = True
    return keep.nonzero().flatten(), edited


def visual_share(vision_keep: float, stage_layers: Sequence[int], llm_keep: Sequence[float], num_layers: int) -> float:
    """Mean share of the visual tokens each decoder layer processes (the token budget)."""
    share, total, last = vision_keep, 0.0, 0
    for layer, keep in zip(stage_layers, llm_keep):
        total += (layer - last) * share
        share *= keep
        last = layer
    return (total + (num_layers - last) * share) / num_layers


# -- method ---------------------------------------------------------------------------------------------------
class VFlowOptHandle:
    def __init__(self, session, config: VFlowOptConfig):
        adapter = session.adapter
        self.native = is_native(adapter)
        if not self.native:
            check_supported(adapter, anyres=True)
        self.config = config
        self.anyres = adapter.architecture in ANYRES
        self.has_cls = adapter.has_cls_token
        if self.anyres and self.has_cls and adapter.vision_feature_select_strategy != "default":
            raise ValueError("vflowopt on LLaVA-NeXT needs vision_feature_select_strategy='default' (patch features "
                             "without CLS, as the released checkpoints use)")
        vc = adapter.config.vision_config
        self.patch = int(vc.patch_size)
        if not self.native:
            self.tokens_per_image = visual_tokens_per_image(adapter)
            self.grid = int(vc.image_size) // self.patch
        self._cls_in_features = self.has_cls and adapter.vision_feature_select_strategy != "default"
        self.stage_layers = config.stage_layers(adapter.num_layers)
        self._stage_keep = dict(zip(self.stage_layers, config.llm_keep))
        if config.tuned_for != (session.source or ""):
            logger.warning(
                "vflowopt: this setting was tuned for %s, not %s; VFlowOpt's hyper-parameters are per model and "
                "budget: tune them with `mmkit tune vflowopt --model %s --budget B --out FILE` and pass "
                "vflowopt:config=FILE%s", config.tuned_for, session.source or "this model", session.source or "MODEL",
                " (or config=reference-0.25 etc., tuned for this model)" if session.source == "reference" else "")
        self._slot_scores: torch.Tensor | None = None
        self._seq_scores: torch.Tensor | None = None
        self._recycling: Recycling | None = None
        pixels = config.entropy_weight != 0
        self._capture = (NativeVisionCapture(adapter, pixels=pixels) if self.native
                         else VisionLayerCapture(adapter, feature_layer_index(adapter), pixels=pixels))
        self._inner = session.model.model
        self._sizes = ImageSizeCapture(self._inner) if self.anyres else None
        self._dropper = None
        self._reducer = None
        self._merge_hook = None
        try:
            if self.native:
                # Qwen-VL: the plan prunes and recycles the merger's output tokens itself; kept tokens keep their
                # 3-D rotary positions.
                self._reducer = PreLLMReducer(session, self._native_plan, positions="original")
            else:
                self._reducer = PreLLMReducer(session, self._plan, positions=config.positions, anyres=self.anyres)
                # Recycling merges projected tokens: a forward hook on the projector, after the reducer's pre-hook
                # has planned this batch.
                self._merge_hook = session.model.model.multi_modal_projector.register_forward_hook(self._merge)
            self._reducer.after_reduce.append(self._on_reduce)
            if self.stage_layers:
                self._dropper = TokenDropper(session.context, adapter.decoder_layers,
                                             {layer: self._select for layer in self.stage_layers})
        except Exception:
            self.remove()
            raise

    def _scores(self, features: torch.Tensor) -> torch.Tensor:
        q, k, _ = self._capture.take()
        cfg = self.config
        relevance = importance_scores(q, k, self._capture.num_heads, self._capture.scale, cfg.threshold,
                                      has_cls=self.has_cls)
        offset = 1 if self.has_cls and not self._cls_in_features else 0
        scores = relevance[:, offset:offset + features.shape[1]]
        if cfg.entropy_weight:
            pixels = self._capture.pixel_values
            if pixels is None:
                raise RuntimeError("vflowopt: no pixel values were captured for the entropy term")
            entropy = torch.softmax(patch_entropy(pixels, self.patch).to(scores.device), dim=-1)
            if self._cls_in_features:
                entropy = torch.cat([entropy.new_zeros(entropy.shape[0], 1), entropy], 1)
            scores = scores + cfg.entropy_weight * entropy
        return scores

    def _plan(self, features: torch.Tensor) -> ReductionPlan:
        scores = self._scores(features)
        if not self.anyres:
            plan, self._recycling, self._slot_scores = vflowopt_plan(
                scores, self.grid, self.config.vision_keep, self.config.merge_cell, self._cls_in_features)
            return plan
        # Anyres: every tile (base and high resolution) is pruned and recycled on its own, over the patches that
        # reach the language model; kept tokens stay in image order (grid order for the high-resolution tiles).
        n_tiles, n_feat = features.shape[:2]
        layout = anyres_layout(self._inner, self._sizes, n_tiles, n_feat)
        visible = visible_patches(layout, n_tiles, n_feat).to(scores.device)
        plan, self._recycling, self._slot_scores = vflowopt_plan(
            scores, self.grid, self.config.vision_keep, self.config.merge_cell, False, visible=visible)
        valid = torch.ones_like(plan.order, dtype=torch.bool) if plan.valid is None else plan.valid
        rank = torch.full((n_tiles, n_feat + 1), -1, dtype=torch.long, device=plan.order.device)
        ranks = torch.arange(plan.order.shape[1], device=plan.order.device).expand_as(plan.order)
        rank.scatter_(1, torch.where(valid, plan.order, n_feat), ranks)
        rank = rank[:, :n_feat]
        plan.placement = anyres_placement(layout, rank, torch.full_like(rank, GRID), n_feat, features.device)
        return plan

    def _native_plan(self, tokens: torch.Tensor) -> ReductionPlan:
        """Qwen-VL: importance per visual token (`NativeScores.global_relevance`, plus the entropy term of its
        2 x 2 patches), then prune + recycle per image on its grid of visual tokens; tokens (T, C) in prompt
        order."""
        cfg = self.config
        scores = native_scores(self._capture)
        relevance = scores.global_relevance(cfg.threshold)
        if sum(scores.counts) != tokens.shape[0]:
            raise RuntimeError(f"{tokens.shape[0]} visual tokens reached the language model but the vision tower "
                               f"encoded {sum(scores.counts)}")
        if cfg.entropy_weight:
            vc = self._capture.tower.config
            entropy = scores.entropy(self.patch, int(vc.in_channels), int(vc.temporal_patch_size))
            relevance = [r + cfg.entropy_weight * torch.softmax(e.to(r.device), dim=-1)
                         for r, e in zip(relevance, entropy)]
        edited, changed, kept, offset = tokens.clone(), False, [], 0
        for (t, h, w), rel, n in zip(scores.grids, relevance, scores.counts):
            idx, merged = native_prune_recycle(tokens[offset:offset + n], rel.to(tokens.device), t * h, w,
                                               cfg.vision_keep, cfg.merge_cell)
            if merged is not None:
                edited[offset:offset + n] = merged
                changed = True
            kept.append(idx)
            offset += n
        order, placement, valid = native_placement(kept, scores.counts, tokens.device)
        slot = torch.zeros(order.shape, dtype=torch.float32, device=tokens.device)
        for i, (idx, rel) in enumerate(zip(kept, relevance)):
            slot[i, :idx.numel()] = rel.to(tokens.device)[idx.to(tokens.device)]
        self._slot_scores = slot
        return ReductionPlan(order=order, valid=valid, features=edited if changed else None, placement=placement)

    def _merge(self, module, args, output):
        recycling, self._recycling = self._recycling, None
        if recycling is None:
            return None
        return recycling.apply(output)

    def _on_reduce(self, reducer: PreLLMReducer) -> None:
        self._seq_scores = reducer.gather_image_values(self._slot_scores)

    def _select(self, layer_idx, hidden, image_mask, valid):
        if self._seq_scores is None:
            raise RuntimeError("vflowopt: no ViT scores for this prefill")
        scores = self._seq_scores.to(hidden.device)
        if self._dropper.index is not None:
            scores = scores.gather(1, self._dropper.index)
        current = (image_mask if valid is None else image_mask & valid).sum(1)
        keep = torch.round(current.float() * self._stage_keep[layer_idx]).long().clamp_min(1)
        return keep_top_visual(torch.nan_to_num(scores, nan=float("-inf")), image_mask, keep, valid)

    def export_config(self) -> VFlowOptConfig:
        # The tuned values are already in the config's fields; the export carries them, not the path of the file
        # they came from, so it reloads after that file is gone.
        return dataclasses.replace(self.config, config="")

    def remove(self) -> None:
        if self._merge_hook is not None:
            self._merge_hook.remove()
            self._merge_hook = None
        if self._dropper is not None:
            self._dropper.remove()
            self._dropper = None
        if self._reducer is not None:
            self._reducer.remove()
            self._reducer = None
        self._capture.remove()
        if self._sizes is not None:
            self._sizes.remove()
            self._sizes = None


def apply_vflowopt(session, config: VFlowOptConfig) -> VFlowOptHandle:
    """Attach VFlowOpt to a session; `remove()` on the result restores the model exactly."""
    return VFlowOptHandle(session, config)


register_method(
    "vflowopt", VFlowOptConfig, apply_vflowopt, kind="pruning",
    description="ViT-importance pruning with recycling before the LLM, staged drops inside it, tuned by visual "
                "information flow (ICCV'25).",
    slots=("pre_llm_token_drop", "llm_token_drop"),
)


__all__ = ["VFlowOptConfig", "VFlowOptHandle", "Recycling", "apply_vflowopt", "patch_entropy", "importance_scores",
           "vflowopt_plan", "visual_share", "SHIPPED_TUNED", "PAPER_TUNED_FOR"]
