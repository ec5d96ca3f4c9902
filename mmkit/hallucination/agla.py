"""AGLA: Assembly of Global and Local Attention (An et al., arXiv 2406.12718).

Each prompt runs in two views, one batch: the original image (global view, logits z) and an augmented image in
which the regions irrelevant to the prompt are masked out (local view, logits z_a). The next token is chosen from

    z + alpha * z_a     on the tokens with p_global >= beta * max p_global, -inf elsewhere,

as in the official `eval/sample.py` (an ensemble: AGLA adds the local view, where VCD subtracts its contrast view).

Building the local view (official `eval/augmentation.py`): a prompt-relevance map over the image is upsampled to
pixels, Gaussian-blurred (sigma = 0.02 x side) and min-max normalised; the top `keep` fraction of pixels stays and
the rest is blacked out. The official keep fraction is 1 - ITC/2 (ITC = image-text cosine of the matcher), so a
better-matching prompt masks more. Matchers (docs/agla.md says when to use which):

* ``blip`` (the paper's): Grad-CAM of BLIP's image-text matching head at its text encoder's block-6
  cross-attention, for the user prompt; ITC = BLIP's image-text cosine. Needs a BLIP ITM checkpoint
  (`blip=DIR` or hub id, loaded with transformers' `BlipForImageTextRetrieval`); see `agla_blip.py`.
* ``attention`` (no extra model): the LVLM's own text-to-image attention. A scoring pass runs the model on
  the original inputs up to the last scoring layer (then stops); at each scoring layer the attention mass from the
  prompt's text tokens after the image to each image token is taken (exact softmax, `subset_attention_mass`),
  averaged over heads, text tokens and layers. This matcher has no ITC score, so `keep` defaults to 0.8 (the
  paper's typical masked share is 15-25 %).
* ``clip``: a local CLIP checkpoint (`clip_model=PATH`, loaded with transformers' `CLIPModel`/`CLIPProcessor`).
  The map is Grad-CAM of the image-text cosine w.r.t. the input of CLIP's last vision layer (channel weights =
  patch-averaged gradients); ITC = that cosine.
* ``auto`` (default): ``blip`` when `blip=` is given, otherwise ``attention`` with a logged warning that the
  paper's matcher is not in use.

Difference from the official code: the mask is applied to the processed pixel input (the image the vision tower
sees, after resize and normalisation) instead of a 384 px copy that is then re-processed; masked pixels get the
normalised value of black (or the image's mean colour with fill=mean). No re-processing is needed and the mask is
aligned with the model's own patch grid.

Every supported family (one image per prompt): the relevance map and the mask live on the image as the model sees
it at its finest resolution, and go back into the family's own pixel layout (LLaVA-1.5 crop, anyres tiles, Qwen-VL
patch rows) with shapes, image sizes and grids unchanged; see `agla_views.py`.

alpha = 0 is a no-op: the local view is not built or run and logits pass through unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from mmkit.hallucination.agla_blip import BlipMatcher, answer_header, images_from_pixels, user_prompts
from mmkit.hallucination.agla_views import image_views
from mmkit.hallucination.common import (
    check_float,
    image_normalisation,
    restrict_to_plausible,
    split_branches,
    stack_branches,
)
from mmkit.registry import register_method

logger = logging.getLogger(__name__)

DEFAULT_ATTENTION_KEEP = 0.8
MAX_KEEP = 1.0 - 1e-5  # official cap on 1 - ITC/2


@dataclass
class AGLAConfig:
    """AGLA: ensemble the logits of the image and of a prompt-masked local view of it."""

    alpha: float = field(default=2.0, metadata={"help": "weight of the local view: z + alpha * z_local; 0 = off"})
    beta: float = field(
        default=0.5,
        metadata={"help": "plausibility cutoff on the global view: keep tokens with p >= beta * max p; 0 = keep all"},
    )
    matcher: Literal["auto", "blip", "attention", "clip"] = field(
        default="auto",
        metadata={"help": "prompt-image matcher: blip (the paper's BLIP-ITM Grad-CAM), attention (the LVLM's own), "
                          "clip (a CLIP Grad-CAM), or auto = blip if blip is given, else attention"},
    )
    blip: str | None = field(
        default=None, metadata={"help": "BLIP image-text matching checkpoint (directory or hub id) for matcher=blip, "
                                        "e.g. a local copy of Salesforce/blip-itm-large-coco", "export": "copy"}
    )
    blip_layer: int = field(
        default=6, metadata={"help": "BLIP text-encoder block whose cross-attention the Grad-CAM reads (blip matcher)"}
    )
    clip_model: str | None = field(
        default=None, metadata={"help": "directory of a CLIP checkpoint (CLIPModel + CLIPProcessor) for matcher=clip",
                                "export": "copy"}
    )
    keep: float | None = field(
        default=None,
        metadata={"help": "fraction of pixels kept in the local view; None = 1 - ITC/2 with blip or clip, 0.8 with "
                          "attention"},
    )
    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "decoder layers whose attention scores the image (attention matcher); None = L/4 .. L/2"},
    )
    fill: Literal["black", "mean"] = field(
        default="black", metadata={"help": "value of masked pixels: black (official) or the image's mean colour"}
    )
    blur: float = field(
        default=0.02, metadata={"help": "Gaussian blur sigma of the relevance map, as a fraction of the image side"}
    )

    def __post_init__(self):
        self.alpha = check_float("alpha", self.alpha, low=0.0)
        self.beta = check_float("beta", self.beta, low=0.0, high=1.0)
        self.blur = check_float("blur", self.blur, low=0.0, high=1.0)
        if self.matcher not in ("auto", "blip", "attention", "clip"):
            raise ValueError(f"matcher must be 'auto', 'blip', 'attention' or 'clip', got {self.matcher!r}")
        if self.fill not in ("black", "mean"):
            raise ValueError(f"fill must be 'black' or 'mean', got {self.fill!r}")
        for name in ("blip", "clip_model"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a checkpoint directory or hub id, got {value!r}")
        if isinstance(self.blip_layer, bool) or not isinstance(self.blip_layer, int) or self.blip_layer < 0:
            raise ValueError(f"blip_layer must be an integer >= 0, got {self.blip_layer!r}")
        if self.matcher == "blip" and not self.blip:
            raise ValueError("matcher=blip needs blip=PATH (a BLIP image-text matching checkpoint, e.g. a local copy "
                             "of Salesforce/blip-itm-large-coco)")
        if self.blip and self.matcher not in ("auto", "blip"):
            raise ValueError(f"blip is only used with matcher=blip (or auto); drop blip or matcher={self.matcher}")
        if self.matcher == "clip" and not self.clip_model:
            raise ValueError("matcher=clip needs clip_model=PATH (a local CLIPModel/CLIPProcessor directory)")
        if self.matcher != "clip" and self.clip_model:
            raise ValueError("clip_model is only used with matcher=clip; add matcher=clip or drop clip_model")
        if self.keep is not None:
            self.keep = check_float("keep", self.keep, low=0.0, high=1.0, low_open=True)
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers:
                raise ValueError("layers must name at least one decoder layer (or be None for L/4 .. L/2)")
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise ValueError(f"layers must be integers >= 0, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat, got {self.layers!r}")
            self.layers = tuple(sorted(layers))
            if self.resolved_matcher != "attention":
                raise ValueError(f"layers are only used with the attention matcher, not {self.resolved_matcher}")

    @property
    def resolved_matcher(self) -> str:
        """The matcher in use: `auto` resolved to blip (a BLIP checkpoint is given) or attention."""
        if self.matcher == "auto":
            return "blip" if self.blip else "attention"
        return self.matcher


# -- relevance map -> masked image -------------------------------------------------------------------------------
def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps (reflect padding, kernel truncated at 4 sigma like scipy)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4.0 * sigma + 0.5))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps[:, None].float()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def pixel_saliency(grid_maps: torch.Tensor, size: tuple[int, int], blur: float) -> torch.Tensor:
    """(B, g, g') patch relevance -> (B, H, W) pixel saliency in [0, 1]: bicubic upsampling, Gaussian blur with
    sigma = blur * max(H, W), per-image min-max normalisation (official `getAttMap`)."""
    maps = F.interpolate(grid_maps[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]
    maps = gaussian_blur(maps, blur * max(size))
    low = maps.flatten(1).min(1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp_min(1e-12)


def keep_mask(saliency: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Bool (B, H, W): the int(keep * H * W) most salient pixels of each map (at least one).

    The official rule keeps the pixels at or above the value ranked int(N * ratio); ranking instead of
    thresholding gives the same set except on ties, where it still keeps exactly the asked share (flat regions of
    an upsampled map are otherwise kept or dropped wholesale)."""
    flat = saliency.flatten(1)
    n = flat.shape[1]
    order = flat.argsort(dim=1, descending=True, stable=True)
    counts = (keep.float() * n).long().clamp(1, n)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=flat.device).expand_as(order))
    return (ranks < counts[:, None]).view_as(saliency)


def fill_value(canvas: torch.Tensor, fill: str, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(3,) normalised value of the masked pixels of one image (3, H, W): black, or the image's mean colour."""
    if fill == "black":
        return ((0.0 - mean) / std).flatten().to(canvas.device)
    return canvas.float().mean(dim=(1, 2))



# -- matchers ------------------------------------------------------------------------------------------------------
class _ScoringDone(Exception):
    """Raised after the last scoring layer to end the scoring pass early."""


class AttentionMatcher:
    """Prompt-image relevance from the LVLM's text-to-image attention at a few layers (one partial forward)."""

    def __init__(self, session, layers: tuple[int, ...]):
        self.session = session
        self.layers = layers
        self._ctx = session.context
        self._scoring = False
        self._mass: list[torch.Tensor] = []
        decoder = session.adapter.decoder_layers
        self._observer = session.probe.observe(layers, self._observe)
        self._stop = decoder[layers[-1]].register_forward_hook(self._stop_after)

    def _observe(self, view) -> None:
        if not self._scoring:
            return
        # The text rows after the image (prompt + answer header), wherever earlier methods left them.
        text = view.text_rows
        count = text.sum(1)
        rows, ok = pack_rows(text)
        mass = view.mass(rows, row_valid=ok, reduce="sum")
        mass = mass / (view.query.shape[1] * count.clamp(min=1)[:, None].float())
        # Back to prompt positions: image tokens another method removed before this layer count as unattended.
        self._mass.append(view.to_prompt(mass[:, : view.prefill_keys]))

    def _stop_after(self, module, args, output):
        if self._scoring:
            raise _ScoringDone

    def relevance(self, inputs: dict[str, torch.Tensor], views) -> tuple[list[torch.Tensor], None]:
        """Per row, the relevance of each image region to the prompt on the image's token grid (`views`); no ITC
        score."""
        self._mass = []
        self._scoring = True
        try:
            self.session.model(**inputs, use_cache=False, logits_to_keep=1)
        except _ScoringDone:
            pass
        finally:
            self._scoring = False
            # The aborted forward never reached the session's post-hook.
            self._ctx.prefill = False
        if len(self._mass) != len(self.layers):
            raise RuntimeError(f"agla: scored {len(self._mass)} of {len(self.layers)} layers")
        mass = torch.stack(self._mass).mean(0)  # (B, n) in prompt positions
        return views.token_grids(mass), None

    def remove(self) -> None:
        self._observer.remove()
        self._stop.remove()


def pack_rows(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, R) of the True entries of each row of `flags` (B, L), padded with the row's last index, and their
    validity (B, R)."""
    counts = flags.sum(1)
    width = max(int(counts.max()), 1)
    order = torch.sort((~flags).to(torch.int8), dim=1, stable=True).indices[:, :width]
    ok = torch.arange(width, device=flags.device)[None, :] < counts[:, None]
    return torch.where(ok, order, flags.shape[1] - 1), ok


class ClipMatcher:
    """Prompt-image relevance by Grad-CAM of a CLIP image-text cosine; the cosine is the ITC score."""

    def __init__(self, session, path: str):
        try:
            from transformers import CLIPModel, CLIPProcessor

            self.model = CLIPModel.from_pretrained(path).to(session.device).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        except Exception as err:  # any load failure: missing dir, wrong checkpoint type, missing tokenizer files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"agla: could not load a CLIP model and processor from clip_model={path!r}: {reason}") from None
        self.session = session
        self.model.requires_grad_(False)
        self._suffix = answer_header(session)

    def prompts(self, input_ids: torch.Tensor) -> list[str]:
        """The user prompt of each row: the text after the image, without the chat template's answer header."""
        return user_prompts(self.session, input_ids, self._suffix)

    def relevance(self, inputs: dict[str, torch.Tensor], views) -> tuple[torch.Tensor, torch.Tensor]:
        images = images_from_pixels(self.session, views.canvases)
        texts = self.prompts(inputs["input_ids"])
        device = self.session.device
        with torch.inference_mode(False), torch.enable_grad():
            enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            # The weights are frozen; gradients flow from the pixels so the activations get a graph.
            enc["pixel_values"] = enc["pixel_values"].float().requires_grad_(True)
            vision = self.model.vision_model(pixel_values=enc["pixel_values"], output_hidden_states=True)
            # The last layer's input: its patch tokens still feed the class token through that layer's attention.
            acts = vision.hidden_states[-2]
            image_emb = F.normalize(self.model.visual_projection(vision.pooler_output), dim=-1)
            text_out = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            text_emb = F.normalize(self.model.text_projection(text_out.pooler_output), dim=-1)
            itc = (image_emb * text_emb).sum(-1)  # (B,) cosine
            (grad,) = torch.autograd.grad(itc.sum(), acts)
        weights = grad[:, 1:].mean(1, keepdim=True)  # (B, 1, C): Grad-CAM channel weights
        cam = F.relu((weights * acts[:, 1:]).sum(-1)).detach()  # (B, P)
        side = int(math.isqrt(cam.shape[1]))
        if side * side != cam.shape[1]:
            raise ValueError(f"agla: CLIP's {cam.shape[1]} patches do not form a square grid")
        return cam.view(-1, side, side), itc.detach()

    def remove(self) -> None:
        self.model = None


# -- the method ----------------------------------------------------------------------------------------------------
class AGLAHandle:
    """Two-view decoder: branch 0 = the image, branch 1 = its prompt-masked local view."""

    def __init__(self, session, config: AGLAConfig):
        self.session = session
        self.config = config
        self._branches = 1
        self._mean, self._std = image_normalisation(session)
        # Last call's local-view masks (one (H, W) per row, on the image as the model sees it) and keep fractions.
        self.last_mask: list[torch.Tensor] | None = None
        self.last_keep: torch.Tensor | None = None
        num_layers = session.adapter.num_layers
        matcher = config.resolved_matcher
        if matcher == "blip":
            self.matcher = BlipMatcher(session, config.blip, config.blip_layer)
        elif matcher == "clip":
            self.matcher = ClipMatcher(session, config.clip_model)
        else:
            layers = config.layers or tuple(range(num_layers // 4, num_layers // 2 + 1))
            if layers[-1] >= num_layers:
                raise ValueError(f"agla layers={layers} go past the last decoder layer; this model has {num_layers}")
            self.matcher = AttentionMatcher(session, layers)
            if config.matcher == "auto":
                logger.warning("agla: no BLIP checkpoint given (blip=...), so the local view is masked by the LVLM's "
                               "own text-to-image attention with keep=%s instead of the paper's BLIP-ITM Grad-CAM; "
                               "see docs/agla.md", config.keep if config.keep is not None else DEFAULT_ATTENTION_KEEP)

    def local_view(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pixel inputs of the masked (local) view of each row's image, in the family's own layout."""
        views = image_views(self.session, inputs)
        grids, itc = self.matcher.relevance(inputs, views)
        device = inputs["pixel_values"].device
        batch = len(views.canvases)
        if self.config.keep is not None:
            keep = torch.full((batch,), self.config.keep, device=device)
        elif itc is not None:
            keep = (1.0 - itc.to(device).float() / 2.0).clamp(max=MAX_KEEP)
        else:
            keep = torch.full((batch,), DEFAULT_ATTENTION_KEEP, device=device)
        masks, fills = [], []
        for grid, canvas, share in zip(grids, views.canvases, keep):
            saliency = pixel_saliency(grid[None].to(device), tuple(canvas.shape[-2:]), self.config.blur)
            masks.append(keep_mask(saliency, share[None])[0])
            fills.append(fill_value(canvas, self.config.fill, self._mean, self._std))
        self.last_mask, self.last_keep = masks, keep
        return views.masked(masks, fills)

    def expand_inputs(self, session, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.config.alpha == 0.0:
            self._branches = 1
            return inputs
        if "pixel_values" not in inputs:
            raise ValueError("agla needs image inputs (pixel_values); got a text-only batch")
        local = self.local_view(inputs)
        self._branches = 2
        return stack_branches(inputs, **local)

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self._branches == 1:
            return logits
        global_view, local_view = split_branches(logits, 2)
        return restrict_to_plausible(global_view + self.config.alpha * local_view, global_view, self.config.beta)

    def remove(self) -> None:
        self.matcher.remove()
        self._branches = 1


def apply_agla(session, config: AGLAConfig) -> AGLAHandle:
    """Attach AGLA to `session`: generation and scoring ensemble each image with its prompt-masked local view."""
    return AGLAHandle(session, config)


register_method(
    "agla", AGLAConfig, apply_agla, kind="hallucination",
    description="Ensemble logits with a prompt-masked local view of the image, with a plausibility cutoff (arXiv'24).",
    slots=("logit_branches",),
)
