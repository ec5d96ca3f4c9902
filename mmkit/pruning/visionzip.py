"""VisionZip (Yang et al., CVPR 2025): fewer, more informative visual tokens, chosen before the LLM.

At the CLIP layer LLaVA takes its image features from (`vision_feature_layer`, the penultimate one for
LLaVA-1.5):
- dominant tokens: the CLS token plus the patches the CLS query attends to most (attention summed over heads);
- contextual tokens: the remaining tokens' keys (averaged over heads, L2-normalised); every s-th remaining token
  is a target, every other one joins its most cosine-similar target, and each target becomes
  target + mean(the tokens that joined it) (the official code's merge).
The LLM then sees [CLS, dominant patches in image order, contextual tokens] in place of the image, numbered
contiguously as a shorter image would be. Text-agnostic, so multi-turn prompts reuse the same tokens.

The CLS row and the keys are read from that layer's q/k projections (one row of attention, no
`output_attentions`); merging is done on the features before the projector, as in the paper.

Qwen-VL (no CLS, 2 x 2 patches merged per visual token, 3-D rotary positions): a visual token is ranked by the
attention its patches receive in the tower's last full-attention block (`mmkit.patching.native`), merging uses that
block's pre-rotary keys, and selection and merging act on the merger's output tokens; kept tokens stay in image
order at their own 3-D positions (`native_visionzip_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mmkit.patching.anyres import ImageSizeCapture, anyres_layout, anyres_placement, visible_patches
from mmkit.patching.native import NativeScores, NativeVisionCapture, is_native, native_placement, native_scores
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
from mmkit.registry import register_method


@dataclass
class VisionZipConfig:
    """VisionZip: keep CLS-attended dominant tokens and merge the rest into a few contextual tokens."""

    dominant: int = field(default=54, metadata={"help": "dominant tokens per image, the CLS token included (54 of 64 "
                                                        "in the paper's 64-token setting)"})
    contextual: int = field(default=10, metadata={"help": "contextual (merged) tokens per image"})
    keep: float = field(default=0.0, metadata={"help": "if > 0: tokens per image as a fraction of the model's "
                                                       "visual tokens, split in the dominant:contextual proportion "
                                                       "(for models with other token counts); 1.0 keeps all"})
    cls: bool = field(default=True, metadata={"help": "feed the CLS token as a dominant token, as VisionZip does"})
    positions: Literal["contiguous", "original"] = field(
        default="contiguous", metadata={"help": "position ids: renumber the shorter sequence, or keep originals"})

    def __post_init__(self):
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.dominant < 1:
            raise ValueError("dominant must be >= 1")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 <= self.keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1] (0 = use the dominant/contextual counts), got {self.keep!r}")
        self.keep = float(self.keep)
        if self.positions not in ("contiguous", "original"):
            raise ValueError(f"positions must be contiguous or original, got {self.positions!r}")

    def counts(self, tokens_per_image: int) -> tuple[int, int]:
        """(dominant, contextual) for a model with `tokens_per_image` visual tokens per image."""
        if self.keep <= 0.0:
            dominant, contextual = self.dominant, self.contextual
        else:
            total = max(1, round(self.keep * tokens_per_image))
            contextual = round(total * self.contextual / (self.dominant + self.contextual))
            dominant = max(1, total - contextual)
            contextual = total - dominant
        if dominant + contextual > tokens_per_image:
            raise ValueError(
                f"visionzip keeps {dominant} + {contextual} tokens per image but this model has {tokens_per_image}; "
                f"use smaller counts or keep=<fraction>"
            )
        return dominant, contextual

    def image_counts(self, tokens: int) -> tuple[int, int]:
        """(dominant, contextual) for one Qwen-VL image of `tokens` visual tokens (token counts vary per image); an
        image with no more tokens than that keeps them all."""
        if self.keep <= 0.0:
            return self.dominant, self.contextual
        total = max(1, round(self.keep * tokens))
        contextual = round(total * self.contextual / (self.dominant + self.contextual))
        dominant = max(1, total - contextual)
        return dominant, total - dominant


def visionzip_plan(features: torch.Tensor, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, num_heads: int,
                   scale: float, dominant: int, contextual: int, cls_in_features: bool, feed_cls: bool
                   ) -> ReductionPlan:
    """The VisionZip selection and merge for a batch of images.

    features (I, N, C): what the projector would receive; q, k, out (I, T, C): the feature layer's query/key
    projections and output, T = patches + CLS (token 0). `cls_in_features`: the "full" strategy, where feature 0
    is the CLS token. Returns the plan: order [CLS, dominant patches, contextual targets] and edited features.
    """
    n_img, n_feat, _ = features.shape
    if dominant + contextual >= n_feat:
        # Every token kept: the no-op setting.
        return ReductionPlan(order=torch.arange(n_feat, device=features.device).expand(n_img, n_feat))
    scores, metric = cls_scores_and_metric(q, k, num_heads, scale, n_feat, cls_in_features)
    if cls_in_features and feed_cls:
        scores[:, 0] = float("inf")                                        # CLS is always dominant
    extra_cls = feed_cls and not cls_in_features
    order, edited, _ = select_and_merge(features, scores, metric, out[:, :1], dominant, contextual, extra_cls)
    return ReductionPlan(order=order, features=edited)


def cls_scores_and_metric(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float, n_feat: int,
                          cls_in_features: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature token: the CLS query's attention summed over heads (I, N), and the keys averaged over heads and
    L2-normalised (I, N, D), the merge metric."""
    n_img = q.shape[0]
    offset = 0 if cls_in_features else 1
    heads = q.shape[-1] // num_heads
    qh = q[:, :1].float().view(n_img, 1, num_heads, heads).transpose(1, 2)
    kh = k.float().view(n_img, -1, num_heads, heads).transpose(1, 2)
    cls_attn = query_attention(qh, kh, scale)[:, :, 0].sum(1)            # (I, T)
    metric = kh.mean(1)                                                   # (I, T, D): keys averaged over heads
    metric = metric / metric.norm(dim=-1, keepdim=True)
    return cls_attn[:, offset:offset + n_feat].clone(), metric[:, offset:offset + n_feat]


def received_attention_scores(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """For towers without a CLS token (SigLIP): each token's attention received, averaged over heads and queries
    (I, N), the CLS-free replacement the VisionZip ports for SigLIP models rank by; and the merge metric as in
    `cls_scores_and_metric`. Computed one image at a time to bound the (H, N, N) attention matrix."""
    n_img = q.shape[0]
    heads = q.shape[-1] // num_heads
    scores = []
    for i in range(n_img):
        qh = q[i:i + 1].float().view(1, -1, num_heads, heads).transpose(1, 2)
        kh = k[i:i + 1].float().view(1, -1, num_heads, heads).transpose(1, 2)
        scores.append(query_attention(qh, kh, scale).mean(dim=(1, 2)))    # (1, N)
    kh = k.float().view(n_img, -1, num_heads, heads).transpose(1, 2)
    metric = kh.mean(1)
    return torch.cat(scores), metric / metric.norm(dim=-1, keepdim=True)


def select_and_merge(features: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, cls_out: torch.Tensor,
                     dominant: int, contextual: int, extra_cls: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dominant selection and contextual merge over the I images' N feature tokens.

    scores (I, N) dominant ranking, metric (I, N, D) normalised merge keys, cls_out (I, 1, C) the CLS output fed in
    a freed slot when `extra_cls`. Returns (order (I, k): [CLS slot if fed, dominant in image order, contextual
    targets], edited features, number of dominant patches).
    """
    n_img, n_feat, _ = features.shape
    n_dom = dominant - 1 if extra_cls else dominant
    device = features.device
    dom = torch.topk(scores, n_dom, dim=1).indices.sort(dim=1).values      # image order, as VisionZip keeps it
    is_dom = torch.zeros(n_img, n_feat, dtype=torch.bool, device=device)
    is_dom.scatter_(1, dom, True)
    n_rest = n_feat - n_dom
    rest = torch.sort(is_dom.long(), dim=1, stable=True).indices[:, :n_rest]   # remaining tokens, image order
    edited = features.clone()
    order = [dom]
    if contextual > 0:
        step = max(1, n_rest // contextual)
        target_pos = torch.arange(0, n_rest, step, device=device)[:contextual]
        is_target = torch.zeros(n_rest, dtype=torch.bool, device=device)
        is_target[target_pos] = True
        targets, others = rest[:, is_target], rest[:, ~is_target]
        m_t = metric.gather(1, targets[..., None].expand(-1, -1, metric.shape[-1]))
        m_o = metric.gather(1, others[..., None].expand(-1, -1, metric.shape[-1]))
        assign = torch.bmm(m_o, m_t.transpose(1, 2)).argmax(-1)           # (I, others)
        one_hot = torch.nn.functional.one_hot(assign, targets.shape[1]).float()  # (I, others, targets)
        feats = features.float()
        f_t = feats.gather(1, targets[..., None].expand(-1, -1, feats.shape[-1]))
        f_o = feats.gather(1, others[..., None].expand(-1, -1, feats.shape[-1]))
        # As the official code does: the target plus the mean of the tokens assigned to it (a target nobody
        # joined stays as it is). Not the mean over the group with the target in it.
        counts = one_hot.sum(1).clamp_min(1.0)[..., None]
        merged = f_t + torch.bmm(one_hot.transpose(1, 2), f_o) / counts
        edited.scatter_(1, targets[..., None].expand_as(merged), merged.to(edited.dtype))
        order.append(targets)
        free = others
    else:
        free = rest
    if extra_cls:
        # LLaVA drops CLS from its features; give it the slot of a token that was merged away (or dropped).
        slot = free[:, :1]
        edited.scatter_(1, slot[..., None].expand(-1, -1, edited.shape[-1]), cls_out.to(edited.dtype))
        order.insert(0, slot)
    return torch.cat(order, dim=1), edited, n_dom


def anyres_visionzip_plan(features: torch.Tensor, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor,
                          layout: list[torch.Tensor], num_heads: int, scale: float, dominant: int, contextual: int,
                          feed_cls: bool, has_cls: bool = True) -> ReductionPlan:
    """VisionZip on LLaVA-NeXT's tiles: the selection and merge of `visionzip_plan` run on every tile (base and
    high resolution) with that tile's own CLS attention, as VisionZip's LLaVA-NeXT code does, over the tile's
    patches that reach the language model (unpadding crops the others).

    features (tiles, N, C); q, k, out (tiles, N + 1, C) (N, C without CLS); layout: per image, `anyres_layout`.
    The image's tokens in the LLM: the base tile as on LLaVA-1.5 ([CLS, dominant, contextual]); then the
    high-resolution dominant patches in grid order with the newline of every row that keeps one; then each tile's
    CLS; then each tile's contextual tokens (the official order). `has_cls=False` (SigLIP, OneVision): dominant
    patches are ranked by the attention they receive (`received_attention_scores`) and no CLS is fed.
    """
    n_tiles, n_feat, _ = features.shape
    device = features.device
    visible = visible_patches(layout, n_tiles, n_feat).to(device)
    if has_cls:
        scores, metric = cls_scores_and_metric(q, k, num_heads, scale, n_feat, cls_in_features=False)
    else:
        scores, metric = received_attention_scores(q, k, num_heads, scale)
        feed_cls = False
    edited = features.clone()
    changed = False
    # Per tile: plan rank of each patch (-1 dropped) and its group (0 CLS slot, 1 dominant, 2 contextual).
    rank = torch.full((n_tiles, n_feat), -1, dtype=torch.long)
    group = torch.full((n_tiles, n_feat), -1, dtype=torch.long)
    for t in range(n_tiles):
        idx = visible[t].nonzero().flatten()
        if dominant + contextual >= idx.numel():
            order, groups = idx.cpu(), torch.ones(idx.numel(), dtype=torch.long)
        else:
            sub_order, sub_feats, n_dom = select_and_merge(
                features[t:t + 1, idx], scores[t:t + 1, idx], metric[t:t + 1, idx], out[t:t + 1, :1], dominant,
                contextual, extra_cls=feed_cls)
            edited[t, idx] = sub_feats[0]
            changed = True
            order = idx[sub_order[0]].cpu()
            groups = torch.tensor([0] * int(feed_cls) + [1] * n_dom + [2] * contextual, dtype=torch.long)
        rank[t, order] = torch.arange(order.numel())
        group[t, order] = groups
    placement = anyres_placement(layout, rank, group, n_feat, device)
    order = torch.zeros(n_tiles, 1, dtype=torch.long, device=device)  # unused: `placement` places the tokens
    return ReductionPlan(order=order, features=edited if changed else None, placement=placement)


def native_visionzip_plan(tokens: torch.Tensor, scores: NativeScores, dominant_contextual) -> ReductionPlan:
    """VisionZip on a Qwen-VL batch: tokens (T, C) are the batch's visual tokens in prompt order (merger output,
    plus any channels to merge alongside). Per image: dominant tokens ranked by the attention their patches receive
    (`NativeScores.received`), contextual tokens merged with `select_and_merge` on the keys of `merge_metric`. The
    kept tokens stay in image order (each keeps its own 3-D position; a contextual token sits at its target's).
    `dominant_contextual(n)` gives an image of n tokens its (dominant, contextual) counts."""
    ranks, metric = scores.received(), scores.merge_metric()
    if sum(scores.counts) != tokens.shape[0]:
        raise RuntimeError(f"{tokens.shape[0]} visual tokens reached the language model but the vision tower encoded "
                           f"{sum(scores.counts)}")
    edited, changed, kept, offset = tokens.clone(), False, [], 0
    for i, n in enumerate(scores.counts):
        dominant, contextual = dominant_contextual(n)
        if dominant + contextual >= n:
            kept.append(torch.arange(n))
        else:
            order, merged, _ = select_and_merge(tokens[None, offset:offset + n], ranks[i][None].to(tokens.device),
                                                metric[i][None].to(tokens.device), None, dominant, contextual,
                                                extra_cls=False)
            edited[offset:offset + n] = merged[0]
            changed = True
            kept.append(order[0].sort().values)
        offset += n
    order, placement, valid = native_placement(kept, scores.counts, tokens.device)
    return ReductionPlan(order=order, valid=valid, features=edited if changed else None, placement=placement)


class VisionZipHandle:
    def __init__(self, session, config: VisionZipConfig):
        adapter = session.adapter
        self.config = config
        self.native = is_native(adapter)
        if self.native:
            self._sizes = None
            self._capture = NativeVisionCapture(adapter)
            try:
                self._reducer = PreLLMReducer(session, self._native_plan, positions="original")
            except Exception:
                self._capture.remove()
                raise
            return
        check_supported(adapter, anyres=True)
        self.anyres = adapter.architecture in ANYRES
        self.has_cls = adapter.has_cls_token
        if self.anyres and self.has_cls and adapter.vision_feature_select_strategy != "default":
            raise ValueError("visionzip on LLaVA-NeXT needs vision_feature_select_strategy='default' (patch "
                             "features without CLS, as the released checkpoints use)")
        self.tokens_per_image = visual_tokens_per_image(adapter)
        self.dominant, self.contextual = config.counts(self.tokens_per_image)
        self._cls_in_features = adapter.vision_feature_select_strategy != "default"
        self._inner = session.model.model
        self._sizes = ImageSizeCapture(self._inner) if self.anyres else None
        self._capture = VisionLayerCapture(adapter, feature_layer_index(adapter))
        try:
            self._reducer = PreLLMReducer(session, self._plan, positions=config.positions, anyres=self.anyres)
        except Exception:
            self._capture.remove()
            if self._sizes is not None:
                self._sizes.remove()
            raise

    def _native_plan(self, tokens: torch.Tensor) -> ReductionPlan:
        return native_visionzip_plan(tokens, native_scores(self._capture), self.config.image_counts)

    def _plan(self, features: torch.Tensor) -> ReductionPlan:
        q, k, out = self._capture.take()
        if self.anyres:
            layout = anyres_layout(self._inner, self._sizes, features.shape[0], features.shape[1])
            return anyres_visionzip_plan(features, q, k, out, layout, self._capture.num_heads, self._capture.scale,
                                         self.dominant, self.contextual, self.config.cls, self.has_cls)
        return visionzip_plan(features, q, k, out, self._capture.num_heads, self._capture.scale, self.dominant,
                              self.contextual, self._cls_in_features, self.config.cls)

    def remove(self) -> None:
        self._reducer.remove()
        self._capture.remove()
        if self._sizes is not None:
            self._sizes.remove()


def apply_visionzip(session, config: VisionZipConfig) -> VisionZipHandle:
    """Attach VisionZip to a session; `remove()` on the result restores the model exactly."""
    return VisionZipHandle(session, config)


register_method(
    "visionzip", VisionZipConfig, apply_visionzip, kind="pruning",
    description="Keep CLS-attended dominant tokens and merge the rest into contextual tokens before the LLM "
                "(CVPR'25).",
    slots=("pre_llm_token_drop",),
)
