"""Training of VISOR's cross-attention blocks and budget policy (the base model stays frozen).

1. Universal network. Each step takes a batch of training questions (reference world, world seed 0, short-answer
   kinds), samples one budget k in 1 .. L-1 for it, and runs prompt + ground-truth answer teacher-forced with
   VISOR at budget k. Loss on the answer tokens: cross-entropy to the ground truth plus `distill_weight` x
   KL(full model || VISOR), the full model's logits coming from the same forward at budget L (the unmodified
   model). Only the blocks learn, so one set of blocks serves every budget.
2. Policy labels. On other training scenes: the full model's greedy answer, the policy input at layer 1, and for
   every k < L whether the teacher-forced argmax at budget k reproduces every token of that answer.
3. Policy fit: one small MLP, a sigmoid per k (BCE), on a seeded train split; metrics on the held-out rest.

Deterministic for a seed on CPU (data order, budget draws and initialisation all come from the seed).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmkit.atomic import atomic_save_safetensors
from mmkit.errors import MmkitError
from mmkit.patching.token_drop import layer_hidden
from mmkit.pruning.dyvte_train import _answer_scores, _answer_tokens, _teacher_forced_inputs
from mmkit.pruning.visor import (
    WEIGHTS_FILE, WEIGHTS_INFO, VISORConfig, VISORHandle, VISORWeights, new_weights, text_features,
)

logger = logging.getLogger(__name__)

DEFAULT_KINDS = ("pope", "color", "count", "spatial")  # captions are long answers: slow and dominate the loss
# Scene offsets: the blocks and the policy learn from different scenes of the training world.
POLICY_SCENE_OFFSET = 500_000
GATE_LR_SCALE = 10.0


@dataclass
class VisorTrainConfig:
    """Settings of `train_visor`; recorded next to the weights."""

    steps: int = field(default=500, metadata={"help": "optimiser steps of the cross-attention blocks"})
    batch_size: int = field(default=8, metadata={"help": "questions per step (and per labelling forward)"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the blocks (cosine decay)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the blocks"})
    distill_weight: float = field(default=1.0, metadata={"help": "weight of KL(full model || VISOR)"})
    policy_samples: int = field(default=320, metadata={"help": "questions labelled for the policy"})
    policy_steps: int = field(default=300, metadata={"help": "full-batch optimiser steps of the policy fit"})
    policy_width: int = field(default=64, metadata={"help": "hidden width of the policy MLP"})
    policy_lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the policy"})
    policy_weight_decay: float = field(default=0.5, metadata={"help": "AdamW weight decay of the policy"})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share of the policy labels"})
    max_new_tokens: int = field(default=6, metadata={"help": "greedy answer length cap when labelling"})
    seed: int = field(default=0, metadata={"help": "data order, budget draws, splits and initialisation"})
    world_seed: int = field(default=0, metadata={"help": "world of the training questions (the model's own)"})
    kinds: tuple[str, ...] = field(default=DEFAULT_KINDS, metadata={"help": "question kinds used"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "policy_samples", "policy_steps", "policy_width", "max_new_tokens"):
            value = getattr(self, name)
            low = 0 if name == "steps" else 1  # 0 steps: keep the blocks of `init` and fit only the policy
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "policy_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.distill_weight < 0 or self.weight_decay < 0 or self.policy_weight_decay < 0:
            raise ValueError("distill_weight and weight decays must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        self.kinds = tuple(self.kinds)
        from mmkit.world.questions import KINDS

        bad = [k for k in self.kinds if k not in KINDS or k in ("ground", "caption")]
        if not self.kinds or bad:
            raise ValueError(f"kinds must be among pope, color, count, spatial, got {self.kinds}")


# Seconds-scale settings for tests and smoke runs (`mmkit train-visor --tiny`).
TINY = dict(steps=4, batch_size=4, policy_samples=16, policy_steps=20, policy_width=16, max_new_tokens=3)


# ---------------------------------------------------------------------------------------------------------------
# Data


def questions(cfg: VisorTrainConfig, n: int, scene_start: int, seed: int) -> list:
    """`n` (scene, question) pairs of the wanted kinds from the training stream from `scene_start` on, in a
    seeded order."""
    from mmkit.world.questions import training_examples

    pool: list = []
    start, chunk = scene_start, 32
    while len(pool) < n:
        pool.extend((s, q) for s, q in training_examples(cfg.world_seed, chunk, start=start) if q.kind in cfg.kinds)
        start += chunk
    random.Random(seed).shuffle(pool)
    return pool[:n]


def user_pairs(items: list, cfg: VisorTrainConfig) -> tuple[list, list]:
    """(block pairs, policy pairs) from users' samples (items with `.image`, `.prompt`, `.answer`, `.kind`), as the
    world's questions are split: disjoint samples for the policy (up to `cfg.policy_samples`, at most half) and
    the rest, repeated as needed, for the `cfg.steps * cfg.batch_size` block-training questions."""
    from mmkit.evals.calibration_data import cycled

    if len(items) < 4:
        raise MmkitError(f"VISOR training needs at least 4 samples, got {len(items)}")
    n_policy = min(cfg.policy_samples, len(items) // 2)
    pairs = [(item, item) for item in items]
    return cycled(pairs[n_policy:], cfg.steps * cfg.batch_size), pairs[:n_policy]


def _answer_ids(tokenizer, answers: list[str]) -> list[list[int]]:
    return [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]


def _answer_logits(logits: torch.Tensor, answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicting rows (N, V), targets (N,)) of every answer token, from end-aligned logits (B, K+1, V)."""
    keep = logits.shape[1]
    rows, targets = [], []
    for b, ans in enumerate(answers):
        rows.append(logits[b, keep - 1 - len(ans): keep - 1])
        targets.extend(ans)
    return torch.cat(rows).float(), torch.tensor(targets, device=logits.device)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the universal network


def train_blocks(session, weights: VISORWeights, cfg: VisorTrainConfig, progress: bool = True,
                 data: list | None = None) -> dict[str, Any]:
    """Fit the cross-attention blocks over budgets sampled per step; returns loss curves. `data`: (image, question)
    pairs to train on instead of the world's (see `user_pairs`)."""
    from tqdm import tqdm

    tokenizer = session.processor.tokenizer
    num_layers = session.adapter.num_layers
    pairs = questions(cfg, cfg.steps * cfg.batch_size, 0, cfg.seed) if data is None else data
    rng = random.Random(f"{cfg.seed}-budgets")
    handle = VISORHandle(session, VISORConfig(budget=num_layers), weights=weights)
    gates = [b.gate for b in weights.blocks.values()]
    others = [p for n, p in weights.blocks.named_parameters() if not n.endswith(".gate") and n != "gate"]
    # The tanh gates start at zero and scale every other gradient: a faster gate lets the blocks open in a
    # few hundred steps, with no decay pulling them shut.
    opt = torch.optim.AdamW([{"params": others, "weight_decay": cfg.weight_decay},
                             {"params": gates, "lr": GATE_LR_SCALE * cfg.lr, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    log: list[dict[str, float]] = []
    bar = tqdm(range(cfg.steps), desc="visor blocks", unit="step", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for step in bar:
            chunk = pairs[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            inputs = session.prepare([s.image for s, _ in chunk], [q.prompt for _, q in chunk])
            answers = _answer_ids(tokenizer, [q.answer for _, q in chunk])
            tf = _teacher_forced_inputs(inputs, answers, tokenizer.pad_token_id)
            keep = max(len(a) for a in answers) + 1
            batch = len(chunk)
            with torch.no_grad():
                handle.force_budgets = torch.full((batch,), num_layers)
                teacher, targets = _answer_logits(session.model(**tf, use_cache=False, logits_to_keep=keep).logits,
                                                  answers)
            k = rng.randint(1, num_layers - 1)
            handle.force_budgets = torch.full((batch,), k)
            with torch.enable_grad():
                student, _ = _answer_logits(session.model(**tf, use_cache=False, logits_to_keep=keep).logits,
                                            answers)
                ce = torch.nn.functional.cross_entropy(student, targets)
                kl = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                                log_target=True, reduction="batchmean")
                loss = ce + cfg.distill_weight * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            log.append({"step": step, "budget": k, "ce": ce.item(), "kl": kl.item()})
            bar.set_postfix(k=k, ce=f"{log[-1]['ce']:.3f}", kl=f"{log[-1]['kl']:.3f}")
    finally:
        bar.close()
        handle.remove()
    return {"log": log, "gates": {l: torch.tanh(b.gate.detach()).item() for l, b in weights.blocks.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Stage 2 and 3: the policy


@torch.no_grad()
def label_policy(session, weights: VISORWeights, cfg: VisorTrainConfig, progress: bool = True,
                 data: list | None = None) -> dict:
    """Policy inputs (N, 2d), sufficiency labels (N, L-1) and the kinds of `cfg.policy_samples` questions (or of the
    pairs in `data`)."""
    from tqdm import tqdm

    ctx = session.context
    tokenizer = session.processor.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    num_layers = session.adapter.num_layers
    pairs = questions(cfg, cfg.policy_samples, POLICY_SCENE_OFFSET, cfg.seed + 1) if data is None else data
    handle = VISORHandle(session, VISORConfig(budget=num_layers), weights=weights)
    feats: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        if ctx.prefill:
            hidden = layer_hidden(args, kwargs)
            real = ctx.attention_mask.bool() if ctx.attention_mask is not None else None
            feats.append(text_features(hidden, ctx.image_mask, real).cpu())
        return None

    hook = session.adapter.decoder_layers[1].register_forward_pre_hook(capture, with_kwargs=True)
    labels, kinds = [], []
    bar = tqdm(total=len(pairs), desc="policy labels", unit="q", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for i in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[i:i + cfg.batch_size]
            inputs = session.prepare([s.image for s, _ in chunk], [q.prompt for _, q in chunk])
            handle.force_budgets = torch.full((len(chunk),), num_layers)
            out = session.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                         pad_token_id=pad)
            hook.remove()  # features come from the first prefill only
            answers = _answer_tokens(out[:, inputs["input_ids"].shape[1]:], eos, pad)
            tf = _teacher_forced_inputs(inputs, answers, pad)
            keep = max(len(a) for a in answers) + 1
            row = []
            for k in range(1, num_layers):
                handle.force_budgets = torch.full((len(chunk),), k)
                logits = session.model(**tf, use_cache=False, logits_to_keep=keep).logits
                row.append(_answer_scores(logits, answers)[1])
            labels.append(torch.stack(row, 1).float())
            kinds.extend(q.kind for _, q in chunk)
            bar.update(len(chunk))
            hook = session.adapter.decoder_layers[1].register_forward_pre_hook(capture, with_kwargs=True)
    finally:
        bar.close()
        hook.remove()
        handle.remove()
    return {"features": torch.cat(feats), "labels": torch.cat(labels), "kinds": kinds}


def fit_policy(weights: VISORWeights, data: dict, cfg: VisorTrainConfig) -> dict[str, Any]:
    """Fit the policy MLP (BCE per budget, AdamW, full batch); metrics on the held-out split."""
    x, y = data["features"].float(), data["labels"].float()
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    n_val = int(round(x.shape[0] * cfg.val_fraction))
    train_idx, val_idx = order[n_val:], order[:n_val]
    policy = weights.policy.float()
    with torch.no_grad():
        policy.mu.copy_(x[train_idx].mean(0))
        policy.sigma.copy_(x[train_idx].std(0, unbiased=False).clamp(min=1e-4))
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.policy_lr, weight_decay=cfg.policy_weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    with torch.enable_grad():
        for _ in range(cfg.policy_steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(policy(x[train_idx]), y[train_idx])
            loss.backward()
            opt.step()
    num_layers = y.shape[1] + 1
    metrics = {"label_sufficient_rate": {str(k): float(y[:, k - 1].mean()) for k in range(1, num_layers)},
               "oracle_mean_budget": _mean_budget(_oracle(y))}
    with torch.no_grad():
        for name, idx in (("train", train_idx), ("val", val_idx)):
            if len(idx):
                metrics[name] = _policy_metrics(policy, x[idx], y[idx])
    return metrics


def _oracle(y: torch.Tensor) -> torch.Tensor:
    num_layers = y.shape[1] + 1
    ks = torch.arange(1, num_layers)
    return torch.where(y.bool(), ks, torch.full_like(ks, num_layers)).min(1).values


def _mean_budget(budgets: torch.Tensor) -> float:
    return float(budgets.float().mean())


def _policy_metrics(policy, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.5) -> dict[str, Any]:
    picked = policy.pick(x, threshold)
    num_layers = y.shape[1] + 1
    # A pick is right when its budget reproduces the full answer (budget L always does).
    right = [k == num_layers or bool(y[i, k - 1]) for i, k in enumerate(picked.tolist())]
    hist = {str(k): int((picked == k).sum()) for k in range(1, num_layers + 1)}
    return {"n": int(y.shape[0]), "mean_budget": _mean_budget(picked), "answer_kept_rate": sum(right) / len(right),
            "budget_histogram": hist}


# ---------------------------------------------------------------------------------------------------------------
# End to end


def train_visor(model: str = "reference", cfg: VisorTrainConfig | None = None, out_dir: str | os.PathLike | None = None,
                device=None, session=None, progress: bool = True,
                init: str | os.PathLike | None = None, data: list | None = None,
                data_source: dict | None = None) -> tuple[VISORWeights, dict[str, Any]]:
    """Train the blocks and the policy; with `out_dir`, write `visor.safetensors` and `visor.json` there.

    `data`: users' samples to train on instead of the reference world (split by `user_pairs`), described by
    `data_source` in the report.

    `init`: VISOR weights to start from (their blocks, a fresh policy); with `cfg.steps == 0` the blocks are kept as
    they are and only the policy is labelled and fit.
    """
    cfg = cfg or VisorTrainConfig()
    if cfg.steps == 0 and init is None:
        raise MmkitError("steps=0 keeps existing blocks: pass the weights to start from (--init)")
    own_session = session is None
    if own_session:
        import mmkit

        session = mmkit.load(model, device=device)
    if session.methods:
        raise MmkitError("VISOR training needs a session without methods; remove them first")
    if session.adapter.num_layers < 2:
        raise MmkitError("VISOR needs a decoder of at least 2 layers")
    torch.manual_seed(cfg.seed)
    grads = [p.requires_grad for p in session.model.parameters()]
    session.model.requires_grad_(False)
    try:
        weights = new_weights(session, cfg.policy_width).to(session.device)
        if init is not None:
            from mmkit.pruning.visor import check_weights_match, load_weights

            start = load_weights(init, session.source or model)
            check_weights_match(start, session, f"from {init}")
            weights.blocks.load_state_dict(start.blocks.state_dict())
            weights.blocks.requires_grad_(True)
        if session.dtype != torch.float32:
            raise MmkitError("train VISOR in float32 (load the model without --dtype)")
        block_pairs, policy_pairs = (None, None) if data is None else user_pairs(data, cfg)
        t0 = time.perf_counter()
        blocks = train_blocks(session, weights, cfg, progress, data=block_pairs) if cfg.steps else \
            {"log": [], "gates": {l: torch.tanh(b.gate.detach()).item() for l, b in weights.blocks.items()}}
        t1 = time.perf_counter()
        labels = label_policy(session, weights, cfg, progress, data=policy_pairs)
        t2 = time.perf_counter()
        metrics = fit_policy(weights, labels, cfg)
        t3 = time.perf_counter()
    finally:
        for p, g in zip(session.model.parameters(), grads):
            p.requires_grad_(g)
        if own_session:
            session.close()
    weights = weights.cpu().eval()
    log = blocks["log"]
    tail = log[-max(len(log) // 5, 1):]
    report = {
        "model": session.source or model,
        "hidden_size": weights.hidden_size,
        "num_layers": weights.num_layers,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "init": None if init is None else str(init),
        "data": data_source or "reference world",
        "blocks": {
            "gates_tanh": blocks["gates"],
            "final_ce_by_budget": {str(k): _mean([r["ce"] for r in tail if r["budget"] == k])
                                   for k in range(1, weights.num_layers)},
            "final_kl_by_budget": {str(k): _mean([r["kl"] for r in tail if r["budget"] == k])
                                   for k in range(1, weights.num_layers)},
            "log": log,
        },
        "policy": metrics,
        "seconds": {"blocks": round(t1 - t0, 1), "policy_labels": round(t2 - t1, 1),
                    "policy_fit": round(t3 - t2, 1)},
        "device": str(session.device),
        "threads": torch.get_num_threads(),
    }
    if out_dir is not None:
        from mmkit.atomic import atomic_write_json

        out = Path(out_dir)
        atomic_save_safetensors(weights.state_tensors(), out / WEIGHTS_FILE)
        atomic_write_json(out / WEIGHTS_INFO, report)
    return weights, report


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
