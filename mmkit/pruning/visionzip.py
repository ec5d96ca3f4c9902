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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mmkit.patching.pre_llm import (
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
    offset = 0 if cls_in_features else 1
    heads = q.shape[-1] // num_heads
    qh = q[:, :1].float().view(n_img, 1, num_heads, heads).transpose(1, 2)
    kh = k.float().view(n_img, -1, num_heads, heads).transpose(1, 2)
    cls_attn = query_attention(qh, kh, scale)[:, :, 0].sum(1)            # (I, T)
    scores = cls_attn[:, offset:offset + n_feat].clone()                   # per feature token
    extra_cls = feed_cls and not cls_in_features
    if cls_in_features and feed_cls:
        scores[:, 0] = float("inf")                                        # CLS is always dominant
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
        metric = kh.mean(1)                                               # (I, T, D): keys averaged over heads
        metric = metric / metric.norm(dim=-1, keepdim=True)
        m_t = metric.gather(1, (targets + offset)[..., None].expand(-1, -1, metric.shape[-1]))
        m_o = metric.gather(1, (others + offset)[..., None].expand(-1, -1, metric.shape[-1]))
        assign = torch.bmm(m_o, m_t.transpose(1, 2)).argmax(-1)           # (I, others)
        one_hot = torch.nn.functional.one_hot(assign, contextual).float()  # (I, others, targets)
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
        edited.scatter_(1, slot[..., None].expand(-1, -1, edited.shape[-1]), out[:, :1].to(edited.dtype))
        order.insert(0, slot)
    return ReductionPlan(order=torch.cat(order, dim=1), features=edited)


class VisionZipHandle:
    def __init__(self, session, config: VisionZipConfig):
        adapter = session.adapter
        check_supported(adapter)
        self.config = config
        self.tokens_per_image = visual_tokens_per_image(adapter)
        self.dominant, self.contextual = config.counts(self.tokens_per_image)
        self._cls_in_features = adapter.vision_feature_select_strategy != "default"
        self._capture = VisionLayerCapture(adapter, feature_layer_index(adapter))
        try:
            self._reducer = PreLLMReducer(session, self._plan, positions=config.positions)
        except Exception:
            self._capture.remove()
            raise

    def _plan(self, features: torch.Tensor) -> ReductionPlan:
        q, k, out = self._capture.take()
        return visionzip_plan(features, q, k, out, self._capture.num_heads, self._capture.scale, self.dominant,
                              self.contextual, self._cls_in_features, self.config.cls)

    def remove(self) -> None:
        self._reducer.remove()
        self._capture.remove()


def apply_visionzip(session, config: VisionZipConfig) -> VisionZipHandle:
    """Attach VisionZip to a session; `remove()` on the result restores the model exactly."""
    return VisionZipHandle(session, config)


register_method(
    "visionzip", VisionZipConfig, apply_visionzip, kind="pruning",
    description="Keep CLS-attended dominant tokens and merge the rest into contextual tokens before the LLM "
                "(CVPR'25).",
    slots=("pre_llm_token_drop",),
)
