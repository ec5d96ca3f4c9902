"""Train the small Segment Anything model shipped with mmkit, on the reference world's exact masks.

The model is a stock transformers `SamModel` (ViT image encoder, prompt encoder, two-way mask decoder), only
small: 256 px input, 16 px patches, a 3-layer 96-wide encoder and a 64-wide decoder (under 1 M parameters). It
learns the SAM task on reference-world scenes: random positive points inside one object (and a few negative
points elsewhere) -> that object's visible mask. A second, refinement round per step feeds the first round's mask
logits back as a mask prompt, with a corrective point half of the time, so the model also learns the mask-prompt
path that VL-SAM's iterative refinement uses. Random zoomed crops teach it the multi-scale views.

Training runs on CPU within a wall-time budget and checkpoints atomically, so a killed run leaves a usable model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MMKIT_SAM_FILE = "mmkit_sam.json"


@dataclass
class SamTrainConfig:
    """Architecture and recipe of the small reference-world SAM."""

    image_size: int = field(default=256, metadata={"help": "Square model input size in pixels."})
    patch_size: int = field(default=16, metadata={"help": "Vision-encoder patch size."})
    vision_hidden: int = field(default=96, metadata={"help": "Vision-encoder width."})
    vision_layers: int = field(default=3, metadata={"help": "Vision-encoder layers (all global attention)."})
    vision_heads: int = field(default=4, metadata={"help": "Vision-encoder attention heads."})
    channels: int = field(default=64, metadata={"help": "Neck / prompt / decoder width."})
    decoder_mlp: int = field(default=256, metadata={"help": "Mask-decoder MLP width."})
    world_seed: int = field(default=0, metadata={"help": "World seed of the training scenes (1 is held out)."})
    scene_pool: int = field(default=600, metadata={"help": "Training scenes are drawn from indices [0, pool)."})
    batch_images: int = field(default=12, metadata={"help": "Scenes per step."})
    objects_per_image: int = field(default=6, metadata={"help": "Prompted objects per scene and step (at most)."})
    steps: int = field(default=4000, metadata={"help": "Planned optimiser steps (the cosine schedule's length)."})
    max_minutes: float = field(default=13.0, metadata={"help": "Wall-time budget; training stops when it is spent."})
    lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    crop_prob: float = field(default=0.3, metadata={"help": "Probability of a random zoomed crop of a scene."})
    checkpoint_every: int = field(default=200, metadata={"help": "Steps between checkpoints."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and sampling."})
    init_from: str = field(default="", metadata={"help": "Continue from this SamModel directory (empty: scratch)."})
    refine_fraction: float = field(default=0.35, metadata={
        "help": "Share of prompts that also get the refinement round (mask prompt) in a step."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default; 1 is fastest on a "
                                                                 "shared machine)."})

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or self.image_size < 4 * self.patch_size:
            raise ValueError(f"image_size must be a multiple of patch_size and >= 4 patches; got {self.image_size}, "
                             f"{self.patch_size}")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden {self.vision_hidden} must be divisible by vision_heads {self.vision_heads}")
        if self.channels % 8 or self.channels < 16:
            raise ValueError(f"channels must be a multiple of 8 and >= 16, got {self.channels}")
        for name in ("vision_layers", "batch_images", "objects_per_image", "steps", "scene_pool", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.crop_prob <= 1.0:
            raise ValueError(f"crop_prob must be in [0, 1], got {self.crop_prob}")
        if self.lr <= 0 or self.max_minutes <= 0:
            raise ValueError("lr and max_minutes must be > 0")


def build_small_sam(cfg: SamTrainConfig):
    """A randomly initialised small `SamModel` and a matching `SamProcessor` (PIL image processor)."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    config = SamConfig(
        vision_config={
            "hidden_size": cfg.vision_hidden, "output_channels": cfg.channels, "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "global_attn_indexes": list(range(cfg.vision_layers)), "window_size": 0,
            "num_pos_feats": cfg.channels // 2, "mlp_ratio": 4.0, "initializer_range": 0.02,
            # Absolute position embeddings suffice at 16 x 16 tokens; relative ones cost 40% of CPU encoder time.
            "use_rel_pos": False,
        },
        prompt_encoder_config={"hidden_size": cfg.channels, "image_size": cfg.image_size,
                               "patch_size": cfg.patch_size, "mask_input_channels": 16},
        mask_decoder_config={"hidden_size": cfg.channels, "mlp_dim": cfg.decoder_mlp, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "iou_head_hidden_dim": cfg.channels},
    )
    torch.manual_seed(cfg.seed)
    model = SamModel(config)
    with torch.no_grad():
        # transformers initialises the random Fourier features with scale hidden/2 (harmless when real weights are
        # loaded over it); from scratch that aliases every point to noise. SAM's own initial scale is 1.
        model.shared_image_embedding.positional_embedding.copy_(torch.randn(2, cfg.channels // 2))
    image_processor = SamImageProcessorPil(size={"longest_edge": cfg.image_size},
                                           pad_size={"height": cfg.image_size, "width": cfg.image_size})
    return model, SamProcessor(image_processor=image_processor)


# ---------------------------------------------------------------------------------------------------------------
# Data


def sample_points(mask: np.ndarray, rng: np.random.Generator, n_pos: int, n_neg: int,
                  others: np.ndarray | None = None) -> tuple[list[tuple[float, float]], list[int]]:
    """`n_pos` random (x, y) points inside `mask` and `n_neg` outside it (half of them on other objects, when
    `others` marks any), in pixel coordinates of the mask."""
    ys, xs = np.nonzero(mask)
    pick = rng.integers(0, len(xs), size=n_pos)
    points = [(float(xs[i]), float(ys[i])) for i in pick]
    labels = [1] * n_pos
    for _ in range(n_neg):
        pool = others if others is not None and others.any() and rng.random() < 0.5 else ~mask
        ny, nx = np.nonzero(pool)
        if len(nx) == 0:
            continue
        j = int(rng.integers(0, len(nx)))
        points.append((float(nx[j]), float(ny[j])))
        labels.append(0)
    return points, labels


class ScenePool:
    """Training scenes in the model's input frame, generated on first use and kept: the normalised pixels
    (3, S, S) and each object's mask area-resized to (S, S). Reusing scenes (with fresh crops and prompts) keeps
    scene drawing and image preprocessing out of most steps."""

    def __init__(self, cfg: SamTrainConfig, processor):
        self.cfg = cfg
        self.processor = processor
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.cache:
            from mmkit.world.scenes import generate_scene

            scene = generate_scene(self.cfg.world_seed, index)
            pixels = self.processor.image_processor([scene.image], return_tensors="pt")["pixel_values"][0]
            masks = torch.from_numpy(np.stack([o.mask for o in scene.objects]).astype(np.float32))[:, None]
            size = self.cfg.image_size
            self.cache[index] = (pixels, F.interpolate(masks, (size, size), mode="area")[:, 0])
        return self.cache[index]


def _view(pixels: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator, crop_prob: float):
    """The scene, or with probability `crop_prob` a random zoomed crop (50-90% of the side) resized back."""
    if rng.random() >= crop_prob:
        return pixels, masks
    size = pixels.shape[-1]
    side = int(size * rng.uniform(0.5, 0.9))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    pix = F.interpolate(pixels[None, :, y0:y0 + side, x0:x0 + side], (size, size), mode="bilinear",
                        align_corners=False)[0]
    msk = F.interpolate(masks[:, None, y0:y0 + side, x0:x0 + side], (size, size), mode="bilinear",
                        align_corners=False)[:, 0]
    return pix, msk


def _batch(cfg: SamTrainConfig, rng: np.random.Generator, pool: ScenePool):
    """Pixels (N, 3, S, S) and per prompt: image index, soft target (S, S), points and labels (input frame)."""
    images, prompts = [], []
    while len(images) < cfg.batch_images:
        pixels, masks = _view(*pool.get(int(rng.integers(0, cfg.scene_pool))), rng, cfg.crop_prob)
        hard = (masks > 0.5).numpy()
        keep = [k for k in range(len(hard)) if hard[k].sum() >= 6]
        if not keep:
            continue
        idx = len(images)
        images.append(pixels)
        union = np.any(hard[keep], 0)
        for k in rng.permutation(keep)[: cfg.objects_per_image]:
            m = hard[int(k)]
            n_pos = int(rng.choice([1, 1, 2, 3]))
            n_neg = int(rng.choice([0, 0, 1, 2]))
            pts, labs = sample_points(m, rng, n_pos, n_neg, others=union & ~m)
            prompts.append((idx, masks[int(k)], pts, labs))
    return torch.stack(images), prompts


# ---------------------------------------------------------------------------------------------------------------
# Losses


def _mask_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE + soft dice between (P, S, S) logits and (P, S, S) soft targets; also the hard IoU per prompt."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2))
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2))
    dice = 1 - (2 * inter + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
    with torch.no_grad():
        pred = logits > 0
        hard = target > 0.5
        union = (pred | hard).sum((1, 2)).clamp(min=1)
        iou = (pred & hard).sum((1, 2)) / union
    return bce + dice, iou.float()


def _decode(model, emb, index, points, labels, input_masks=None):
    out = model(image_embeddings=emb.index_select(0, index), input_points=points, input_labels=labels,
                input_masks=input_masks, multimask_output=False)
    return out.pred_masks[:, 0, 0], out.iou_scores[:, 0, 0]


def _prompt_tensors(prompts):
    width = max(len(p[2]) for p in prompts)
    coords = torch.zeros(len(prompts), 1, width + 1, 2)
    labs = torch.full((len(prompts), 1, width + 1), -10, dtype=torch.long)  # one spare slot for a corrective point
    for i, (_, _, pts, lab) in enumerate(prompts):
        for j, ((x, y), v) in enumerate(zip(pts, lab)):
            coords[i, 0, j] = torch.tensor([x, y])
            labs[i, 0, j] = v
    return coords, labs, [len(p[2]) for p in prompts]


def train_step(model, cfg: SamTrainConfig, rng: np.random.Generator, pool: ScenePool) -> dict[str, float]:
    """One step (two decode rounds) on a fresh batch; returns the losses. The caller steps the optimiser.

    Losses are computed on the decoder's low-res (4h x 4w) logits against area-pooled targets: the same signal
    as at full size for a fraction of the cost.
    """
    pixel_values, prompts = _batch(cfg, rng, pool)
    # `get_image_embeddings` runs without autograd; the encoder itself is called to train it.
    emb = model.vision_encoder(pixel_values).last_hidden_state
    index = torch.tensor([p[0] for p in prompts])
    low = 4 * emb.shape[-1]
    target = F.interpolate(torch.stack([p[1] for p in prompts])[:, None], (low, low), mode="area")[:, 0]
    coords, labs, counts = _prompt_tensors(prompts)
    scale = low / cfg.image_size

    logits1, iou_pred1 = _decode(model, emb, index, coords, labs)
    loss1, iou1 = _mask_loss(logits1, target)

    # Refinement round: previous logits as mask prompt; half of the prompts get a corrective point sampled from
    # the first round's error region (positive on a miss, negative on a false alarm), as in SAM's training.
    # Only a share of the prompts gets this round: the decoder costs as much as the encoder per step.
    sub = [i for i in range(len(prompts)) if rng.random() < cfg.refine_fraction] or [0]
    sel = torch.tensor(sub)
    coords2, labs2 = coords[sel].clone(), labs[sel].clone()
    with torch.no_grad():
        pred = logits1[sel] > 0
        hard = target[sel] > 0.5
        for j, i in enumerate(sub):
            if rng.random() < 0.5:
                continue
            err = (pred[j] ^ hard[j]).nonzero()
            if len(err) == 0:
                continue
            y, x = err[int(rng.integers(0, len(err)))].tolist()
            coords2[j, 0, counts[i]] = torch.tensor([(x + 0.5) / scale, (y + 0.5) / scale])
            labs2[j, 0, counts[i]] = int(hard[j, y, x])
    logits2, iou_pred2 = _decode(model, emb, index[sel], coords2, labs2, input_masks=logits1.detach()[sel][:, None])
    loss2, iou2 = _mask_loss(logits2, target[sel])
    iou_loss = F.mse_loss(iou_pred1, iou1) + F.mse_loss(iou_pred2, iou2)
    loss = loss1.mean() + loss2.mean() * len(sub) / len(prompts) + iou_loss
    loss.backward()
    return {"loss": float(loss.detach()), "iou_round1": float(iou1.mean()), "iou_round2": float(iou2.mean()),
            "prompts": len(prompts)}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and the training loop


def save_sam(model, processor, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save model (safetensors) + processor into `out_dir`, atomically: a half-written checkpoint never replaces
    a good one."""
    from mmkit.atomic import atomic_directory

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        # Trained on the single-mask output only; tells `load_sam` how to decode this checkpoint.
        (tmp / MMKIT_SAM_FILE).write_text(json.dumps({"multimask": False}) + "\n")
        if extra is not None:
            (tmp / "training_log.json").write_text(json.dumps(extra, indent=2) + "\n")


def train_sam(cfg: SamTrainConfig, out_dir: str | os.PathLike, log_every: int = 20) -> dict[str, Any]:
    """Train the small SAM within `cfg.max_minutes`, checkpointing to `out_dir`; returns the training log."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, processor = build_small_sam(cfg)
    if cfg.init_from:
        from transformers import SamModel

        model = SamModel.from_pretrained(cfg.init_from)
        logger.info("continuing from %s", cfg.init_from)
    model.train()
    rng = np.random.default_rng(cfg.seed)
    pool = ScenePool(cfg, processor)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    history: list[dict[str, float]] = []
    start = time.monotonic()
    params = sum(p.numel() for p in model.parameters())
    logger.info("training small SAM: %d parameters, budget %.1f min", params, cfg.max_minutes)
    log: dict[str, Any] = {"config": asdict(cfg), "parameters": params, "history": history}
    running: dict[str, float] = {}
    done = 0
    for step in range(cfg.steps):
        if time.monotonic() - start > cfg.max_minutes * 60:
            logger.info("time budget spent at step %d", step)
            break
        done = step + 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        metrics = train_step(model, cfg, rng, pool)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, v in metrics.items():
            running[k] = running.get(k, 0.0) + v
        if (step + 1) % log_every == 0:
            entry = {"step": step + 1, "minutes": (time.monotonic() - start) / 60, "lr": lr_at(step),
                     **{k: v / log_every for k, v in running.items()}}
            history.append(entry)
            running = {}
            logger.info("step %(step)d  %(minutes).1f min  loss %(loss).4f  IoU r1 %(iou_round1).3f  "
                        "r2 %(iou_round2).3f", entry)
        if (step + 1) % cfg.checkpoint_every == 0:
            log["steps_done"] = step + 1
            save_sam(model.eval(), processor, out_dir, log)
            model.train()
    log["steps_done"] = done
    log["minutes"] = (time.monotonic() - start) / 60
    save_sam(model.eval(), processor, out_dir, log)
    return log


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation


def evaluate_point_miou(backend, world_seed: int = 1, n_scenes: int = 100, seed: int = 0,
                        batch_images: int = 16) -> dict[str, float]:
    """Point-prompt mask IoU of a SAM backend on held-out scenes, per object (visible mask as truth).

    Three prompt settings per object: one random interior point ("1pt"); three interior points ("3pt"); one
    interior point plus one background point ("1pos1neg"). Also the 1pt IoU on small objects (< 900 px area) and the
    share of 1pt masks whose box reaches IoU 0.5 with the object's box (what box AP@0.5 needs).
    """
    from mmkit.evals.metrics import box_iou, mask_iou
    from mmkit.grounding.prompts import mask_to_box
    from mmkit.world.scenes import generate_scene

    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {"1pt": [], "3pt": [], "1pos1neg": [], "1pt_small": []}
    box_hits: list[bool] = []
    boxes: list[tuple[int, int, int, int]] = []
    for start in range(0, n_scenes, batch_images):
        scenes = [generate_scene(world_seed, i) for i in range(start, min(n_scenes, start + batch_images))]
        emb = backend.embed([s.image for s in scenes])
        for name, n_pos, n_neg in (("1pt", 1, 0), ("3pt", 3, 0), ("1pos1neg", 1, 1)):
            idx, pts, labs, truth = [], [], [], []
            for i, scene in enumerate(scenes):
                for obj in scene.objects:
                    p, lab = sample_points(obj.mask, rng, n_pos, 0)
                    if n_neg:
                        owner = scene.owner_map() >= 0
                        q, _ = sample_points(~owner, rng, n_neg, 0)
                        p, lab = p + q, lab + [0] * n_neg
                    idx.append(i)
                    pts.append(p)
                    labs.append(lab)
                    truth.append(obj.mask)
                    if name == "1pt":
                        boxes.append(obj.box)
            pred = backend.predict(emb, idx, pts, labs)
            ious = [mask_iou(m, t) for m, t in zip(pred.masks, truth)]
            scores[name].extend(ious)
            if name == "1pt":
                for m, b in zip(pred.masks, boxes[-len(pred.masks):]):
                    pb = mask_to_box(m)
                    box_hits.append(pb is not None and box_iou(pb, b) >= 0.5)
                scores["1pt_small"].extend(iou for iou, t in zip(ious, truth) if t.sum() < 900)
    out = {f"miou_{k}": float(np.mean(v)) if v else float("nan") for k, v in scores.items()}
    out["box_iou50_1pt"] = float(np.mean(box_hits)) if box_hits else float("nan")
    out["objects"] = len(scores["1pt"])
    out["small_objects"] = len(scores["1pt_small"])
    out["world_seed"] = world_seed
    out["scenes"] = n_scenes
    return out
