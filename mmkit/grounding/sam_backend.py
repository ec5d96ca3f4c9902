"""Segment Anything behind one small interface: embed images once, then decode batches of point/mask prompts.

Any transformers `SamModel` checkpoint works (SAM ViT-B/L/H, SlimSAM, a local directory or a hub id), as does the
small SAM shipped in `mmkit/models/weights/sam/` (trained on the reference world by `mmkit train-sam`), which is
the default when no checkpoint is named. Prompts are given in original-image pixels; masks come back at the
original image size. The backend counts its calls, so grounding can report SAM cost per image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmkit.errors import MmkitError

logger = logging.getLogger(__name__)

SHIPPED_NAME = "shipped"
# Point label used to pad prompts of different lengths in one batch: SAM embeds it as zeros (ignored point).
PAD_LABEL = -10


def shipped_sam_dir() -> Path:
    """Directory of the small SAM trained on the reference world."""
    from mmkit.models.shipped import shipped_dir

    return shipped_dir("sam")


@dataclass
class ImageEmbeddings:
    """SAM image embeddings of a batch of images plus the geometry needed to map prompts and masks."""

    embeddings: torch.Tensor                  # (N, C, h, w)
    original_sizes: list[tuple[int, int]]     # per image (H, W)
    reshaped_sizes: list[tuple[int, int]]     # per image (H', W') inside the padded model input

    def __len__(self) -> int:
        return self.embeddings.shape[0]


@dataclass
class SamPrediction:
    """Decoded prompts: boolean masks at the original image size, predicted IoU and the low-res logits (which
    can be fed back as a mask prompt)."""

    masks: list[np.ndarray]                   # per prompt, (H, W) bool
    scores: np.ndarray                        # (P,) predicted IoU
    low_res_logits: torch.Tensor              # (P, 1, 4h, 4w)


@dataclass
class SamCallStats:
    image_calls: int = 0      # vision-encoder forwards (one per batch of images)
    images: int = 0           # images embedded
    decode_calls: int = 0     # mask-decoder forwards (one per batch of prompts)
    prompts: int = 0          # prompts decoded

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SamBackend:
    """A loaded SAM model and its image processor.

    Args:
        model: a transformers `SamModel` in eval mode.
        processor: its `SamProcessor` (only the image processor is used).
        multimask: decode three candidate masks per prompt and keep the one with the best predicted IoU (real SAM
            with a single point); False uses the single-mask output (the shipped model is trained for it).
        source: where the model came from, for reports.
    """

    model: "torch.nn.Module"
    processor: object
    multimask: bool = False
    source: str = ""
    stats: SamCallStats = field(default_factory=SamCallStats)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def input_size(self) -> int:
        return int(self.model.config.prompt_encoder_config.image_size)

    @property
    def mask_input_size(self) -> int:
        return 4 * int(self.model.config.prompt_encoder_config.image_embedding_size)

    # -- images ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, images: Sequence) -> ImageEmbeddings:
        """Run the vision encoder once over a batch of images (PIL, arrays or paths)."""
        from mmkit.images import load_image

        pil = [load_image(img) for img in images]
        if not pil:
            raise MmkitError("embed needs at least one image")
        batch = self.processor.image_processor(pil, return_tensors="pt")
        pixel_values = batch["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        embeddings = self.model.get_image_embeddings(pixel_values)
        self.stats.image_calls += 1
        self.stats.images += len(pil)
        original = [tuple(int(v) for v in s) for s in batch["original_sizes"]]
        reshaped = [tuple(int(v) for v in s) for s in batch["reshaped_input_sizes"]]
        return ImageEmbeddings(embeddings, original, reshaped)

    # -- prompts ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, emb: ImageEmbeddings, image_index: Sequence[int],
                points: Sequence[Sequence[tuple[float, float]]], labels: Sequence[Sequence[int]],
                mask_inputs: torch.Tensor | None = None) -> SamPrediction:
        """Decode one mask per prompt, all prompts in one mask-decoder call.

        Args:
            emb: embeddings from `embed`.
            image_index: per prompt, which embedded image it refers to.
            points: per prompt, (x, y) points in original-image pixels (at least one per prompt).
            labels: per prompt, 1 (foreground) or 0 (background) per point.
            mask_inputs: optional (P, 1, 4h, 4w) low-res logits from an earlier prediction (iterative refinement).

        Returns:
            SamPrediction with masks at each image's original size.
        """
        n = len(image_index)
        if n == 0:
            return SamPrediction([], np.zeros(0, dtype=np.float32), torch.zeros(0, 1, self.mask_input_size,
                                                                                self.mask_input_size))
        if len(points) != n or len(labels) != n:
            raise ValueError(f"got {n} image indices, {len(points)} point lists and {len(labels)} label lists")
        width = max(len(p) for p in points)
        if width == 0 or any(len(p) != len(lab) for p, lab in zip(points, labels)):
            raise ValueError("every prompt needs at least one point and one label per point")
        coords = torch.zeros(n, 1, width, 2)
        labs = torch.full((n, 1, width), PAD_LABEL, dtype=torch.long)
        for i, (idx, pts, lab) in enumerate(zip(image_index, points, labels)):
            (h, w), (rh, rw) = emb.original_sizes[idx], emb.reshaped_sizes[idx]
            for j, ((x, y), v) in enumerate(zip(pts, lab)):
                coords[i, 0, j, 0] = float(x) * rw / w
                coords[i, 0, j, 1] = float(y) * rh / h
                labs[i, 0, j] = int(v)
        device = self.device
        index = torch.as_tensor(list(image_index), dtype=torch.long, device=device)
        kwargs = {}
        if mask_inputs is not None:
            if mask_inputs.shape != (n, 1, self.mask_input_size, self.mask_input_size):
                raise ValueError(f"mask_inputs must be ({n}, 1, {self.mask_input_size}, {self.mask_input_size}); "
                                 f"got {tuple(mask_inputs.shape)}")
            kwargs["input_masks"] = mask_inputs.to(device, emb.embeddings.dtype)
        out = self.model(image_embeddings=emb.embeddings.index_select(0, index), input_points=coords.to(device),
                         input_labels=labs.to(device), multimask_output=self.multimask, **kwargs)
        self.stats.decode_calls += 1
        self.stats.prompts += n
        logits = out.pred_masks[:, 0].float()      # (P, M, 4h, 4w)
        scores = out.iou_scores[:, 0].float()      # (P, M)
        best = scores.argmax(-1)
        rows = torch.arange(n, device=logits.device)
        low_res = logits[rows, best][:, None]      # (P, 1, 4h, 4w)
        masks = [self._to_original(low_res[i, 0], emb, image_index[i]) for i in range(n)]
        return SamPrediction(masks, scores[rows, best].cpu().numpy(), low_res.cpu())

    def _to_original(self, logits: torch.Tensor, emb: ImageEmbeddings, idx: int) -> np.ndarray:
        """Low-res logits -> padded input frame -> unpadded crop -> original size, thresholded at 0 (as SAM)."""
        size = self.input_size
        (h, w), (rh, rw) = emb.original_sizes[idx], emb.reshaped_sizes[idx]
        up = torch.nn.functional.interpolate(logits[None, None], (size, size), mode="bilinear", align_corners=False)
        up = up[..., :rh, :rw]
        up = torch.nn.functional.interpolate(up, (h, w), mode="bilinear", align_corners=False)
        return (up[0, 0] > 0).cpu().numpy()


def load_sam(source: str | None = None, device=None, multimask: bool | None = None) -> SamBackend:
    """Load a SAM backend.

    Args:
        source: None or "shipped" for the small reference-world SAM, else a local directory or hub id of a
            transformers SAM checkpoint (e.g. a SlimSAM or SAM ViT-B directory).
        device: torch device (default: cuda when available, else cpu).
        multimask: override the decoding mode; default: what the checkpoint's `mmkit_sam.json` says (False for
            models from `mmkit train-sam`), else True (real SAM checkpoints).
    """
    from transformers import SamModel, SamProcessor

    from mmkit.models.loading import resolve_device

    shipped = source in (None, "", SHIPPED_NAME)
    path = shipped_sam_dir() if shipped else Path(str(source)).expanduser()
    if shipped and not (path / "config.json").is_file():
        raise MmkitError(f"the shipped SAM is missing from {path}; train it with `mmkit train-sam` or pass --sam")
    name = str(path) if path.is_dir() else str(source)
    if not shipped and not path.is_dir() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise MmkitError(f"SAM checkpoint {source!r} is not a directory or a hub id (owner/name)")
    try:
        model = SamModel.from_pretrained(name)
        processor = SamProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise MmkitError(f"cannot load a SAM checkpoint from {name!r}: {str(err).splitlines()[0]}") from None
    model = model.to(resolve_device(device)).eval()
    mm = multimask
    marker = path / "mmkit_sam.json"
    if mm is None and marker.is_file():  # written by `mmkit train-sam`: how that model was trained to decode
        mm = bool(json.loads(marker.read_text()).get("multimask", False))
    mm = True if mm is None else bool(mm)
    logger.info("loaded SAM from %s (multimask=%s)", name, mm)
    return SamBackend(model, processor, multimask=mm, source=SHIPPED_NAME if shipped else str(source))
