"""Self-labelled training of DyVTE exit gates (the LLM stays frozen).

For each training question (short answers from the reference world's training stream, world seed 0):

1. Greedy answer of the full model. Its prefill yields the gate inputs at every candidate layer (forward pre-hooks
   on the decoder layers, the same `gate_features` the method uses at inference) and the answer's NLL.
2. For every candidate layer l, one teacher-forced forward over prompt + answer with every visual token removed
   from layer l on. Exit at l is labelled correct when its argmax reproduces every answer token (which is the same
   as greedy decoding with that exit giving the same answer) and its answer NLL is below (1 + margin) x the full
   model's (margin 3%, as the official code).
3. The gates (one small MLP per layer) are fit with BCE on a seeded train split; metrics are on the held-out rest.

Collection is the slow part; `features_cache` stores gate inputs and labels so the MLPs can be re-fit without it.
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
from mmkit.patching.token_drop import TokenDropper, keep_top_visual, layer_hidden
from mmkit.pruning.dyvte import GATES_FILE, GATES_INFO, ExitGates, gate_features, model_fingerprint

logger = logging.getLogger(__name__)

DEFAULT_KINDS = ("pope", "color", "count", "spatial")  # captions are long answers and slow to label
THRESHOLDS = (0.5, 0.7, 0.9)  # reported on the held-out split


@dataclass
class GateTrainConfig:
    """Settings of `train_gates`; recorded next to the gates."""

    samples: int = field(default=512, metadata={"help": "training questions to label"})
    seed: int = field(default=0, metadata={"help": "question order, split and gate initialisation"})
    world_seed: int = field(default=0, metadata={"help": "world of the training questions (the model's own)"})
    kinds: tuple[str, ...] = field(default=DEFAULT_KINDS, metadata={"help": "question kinds used"})
    min_layer: int = field(default=1, metadata={"help": "first gated layer"})
    width: int = field(default=128, metadata={"help": "hidden width of each gate MLP"})
    max_new_tokens: int = field(default=6, metadata={"help": "greedy answer length cap"})
    loss_margin: float = field(default=0.03, metadata={"help": "an exit may raise the answer NLL by this fraction"})
    batch_size: int = field(default=16, metadata={"help": "questions per model forward"})
    # A few hundred samples of 2d-dim inputs are easy to memorise: short, strongly decayed fits generalise better.
    steps: int = field(default=100, metadata={"help": "full-batch optimiser steps of the gate fit"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1.0, metadata={"help": "AdamW weight decay"})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share for the reported metrics"})

    def __post_init__(self):
        for name in ("samples", "min_layer", "width", "max_new_tokens", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.loss_margin < 0:
            raise ValueError(f"loss_margin must be >= 0, got {self.loss_margin!r}")
        self.kinds = tuple(self.kinds)
        from mmkit.world.questions import KINDS

        bad = [k for k in self.kinds if k not in KINDS or k == "ground"]
        if not self.kinds or bad:
            raise ValueError(f"kinds must be among {', '.join(k for k in KINDS if k != 'ground')}, got {self.kinds}")


# ---------------------------------------------------------------------------------------------------------------
# Data


def training_questions(cfg: GateTrainConfig) -> list:
    """`cfg.samples` (scene, question) pairs of the training stream, seeded order, wanted kinds only."""
    from mmkit.world.questions import training_examples

    # Scenes ask about 10 questions each; read a few more scenes than needed, then take a seeded sample.
    pool: list = []
    start, chunk = 0, 64
    while len(pool) < 2 * cfg.samples:
        pool.extend((s, q) for s, q in training_examples(cfg.world_seed, chunk, start=start) if q.kind in cfg.kinds)
        start += chunk
        if start > 100 * cfg.samples + 10_000:
            raise MmkitError(f"the world yields too few {'/'.join(cfg.kinds)} questions")
    rng = random.Random(cfg.seed)
    picked = rng.sample(range(len(pool)), cfg.samples)
    return [pool[i] for i in sorted(picked)]


def candidate_layers(num_layers: int, min_layer: int) -> tuple[int, ...]:
    if min_layer >= num_layers:
        raise MmkitError(f"min_layer={min_layer} is past the last decoder layer; the model has {num_layers}")
    return tuple(range(min_layer, num_layers))


def _drop_all_visual(layer_idx, hidden, image_mask, valid):
    batch, n = image_mask.shape
    zeros = torch.zeros(batch, dtype=torch.long, device=image_mask.device)
    return keep_top_visual(torch.zeros(batch, n, device=hidden.device), image_mask, zeros, valid)


def _answer_tokens(new_tokens: torch.Tensor, eos: int, pad: int) -> list[list[int]]:
    """Greedy new tokens per row, up to and including the first end-of-sequence token."""
    out = []
    for row in new_tokens.tolist():
        kept = []
        for tok in row:
            kept.append(tok)
            if tok in (eos, pad):
                break
        out.append(kept)
    return out


def _teacher_forced_inputs(inputs: dict, answers: list[list[int]], pad: int) -> dict:
    """Prompt + answer ids per row, left padded again, with the same images."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows = [ids[b][mask[b].bool()].tolist() + answers[b] for b in range(ids.shape[0])]
    n = max(len(r) for r in rows)
    new_ids = torch.full((len(rows), n), pad, dtype=ids.dtype)
    new_mask = torch.zeros((len(rows), n), dtype=mask.dtype)
    for b, row in enumerate(rows):
        new_ids[b, n - len(row):] = torch.tensor(row, dtype=ids.dtype)
        new_mask[b, n - len(row):] = 1
    out = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out["input_ids"], out["attention_mask"] = new_ids.to(ids.device), new_mask.to(ids.device)
    if "mm_token_type_ids" in inputs:
        # Qwen-VL derives 3-D positions from per-token types: the answer tokens are text (type 0).
        types = inputs["mm_token_type_ids"]
        new_types = torch.zeros_like(new_ids)
        for b in range(ids.shape[0]):
            prompt = types[b][mask[b].bool()]
            new_types[b, n - len(rows[b]): n - len(rows[b]) + len(prompt)] = prompt.cpu()
        out["mm_token_type_ids"] = new_types.to(types.device, types.dtype)
    return out


def _answer_scores(logits: torch.Tensor, answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL (B,), all-argmax-agree (B,) bool) of the answers from end-aligned logits (B, K+1, V)."""
    keep = logits.shape[1]
    nll, agree = [], []
    for b, ans in enumerate(answers):
        k = len(ans)
        rows = logits[b, keep - 1 - k: keep - 1].float()
        target = torch.tensor(ans, device=rows.device)
        nll.append(torch.nn.functional.cross_entropy(rows, target))
        agree.append(bool((rows.argmax(-1) == target).all()))
    return torch.stack(nll), torch.tensor(agree)


@torch.inference_mode()
def label_batch(session, scenes_questions: list, layers: tuple[int, ...], cfg: GateTrainConfig) -> dict:
    """Gate inputs (B, G, 2d), exit labels (B, G), full and per-exit NLL for one batch of questions."""
    if session.methods:
        raise MmkitError("gate training needs a session without methods; remove them first")
    ctx = session.context
    tokenizer = session.processor.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    inputs = session.prepare([s.image for s, _ in scenes_questions], [q.prompt for _, q in scenes_questions])

    feats: dict[int, torch.Tensor] = {}

    def make_hook(layer_idx):
        def hook(module, args, kwargs):
            if ctx.prefill:
                hidden = layer_hidden(args, kwargs)
                real = ctx.attention_mask.bool() if ctx.attention_mask is not None else None
                feats[layer_idx] = gate_features(hidden, ctx.image_mask, real).cpu()
            return None

        return hook

    decoder = session.adapter.decoder_layers
    hooks = [decoder[l].register_forward_pre_hook(make_hook(l), with_kwargs=True) for l in layers]
    try:
        out = session.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                     pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
    finally:
        for h in hooks:
            h.remove()
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    answers = _answer_tokens(new, eos, pad)
    step_logits = torch.stack(out.logits, dim=1)  # (B, steps, V), step t predicts new token t
    full_nll = torch.stack([
        torch.nn.functional.cross_entropy(step_logits[b, : len(a)].float(), torch.tensor(a, device=step_logits.device))
        for b, a in enumerate(answers)
    ]).cpu()

    tf_inputs = _teacher_forced_inputs(inputs, answers, pad)
    keep = max(len(a) for a in answers) + 1
    labels, exit_nll = [], []
    for layer in layers:
        dropper = TokenDropper(ctx, decoder, {layer: _drop_all_visual})
        try:
            logits = session.model(**tf_inputs, use_cache=False, logits_to_keep=keep).logits
        finally:
            dropper.remove()
        nll, agree = _answer_scores(logits, answers)
        nll = nll.cpu()
        labels.append(agree & (nll < (1.0 + cfg.loss_margin) * full_nll))
        exit_nll.append(nll)
    return {
        "features": torch.stack([feats[l] for l in layers], dim=1),
        "labels": torch.stack(labels, dim=1).float(),
        "full_nll": full_nll,
        "exit_nll": torch.stack(exit_nll, dim=1),
    }


def collect(session, cfg: GateTrainConfig, progress: bool = True, data: list | None = None) -> dict[str, torch.Tensor]:
    """Label `cfg.samples` training questions (or the samples in `data`, items with `.image` and `.prompt`, e.g.
    from `mmkit.evals.calibration_data`); returns features (N, G, 2d), labels (N, G), NLLs and layers."""
    from tqdm import tqdm

    layers = candidate_layers(session.adapter.num_layers, cfg.min_layer)
    pairs = training_questions(cfg) if data is None else [(item, item) for item in data]
    parts: list[dict] = []
    bar = tqdm(total=len(pairs), desc="labelling exits", unit="q", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i:i + cfg.batch_size]
        parts.append(label_batch(session, chunk, layers, cfg))
        bar.update(len(chunk))
    bar.close()
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    data["layers"] = torch.tensor(layers, dtype=torch.int64)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Fit


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def fit_gates(data: dict[str, torch.Tensor], hidden_size: int, num_layers: int, cfg: GateTrainConfig,
              fingerprint: float = float("nan")) -> tuple[ExitGates, dict[str, Any]]:
    """Fit one MLP gate per layer (BCE, AdamW, full batch) on the train split; metrics on the held-out split."""
    x, y = data["features"].float(), data["labels"].float()
    layers = tuple(int(l) for l in data["layers"].tolist())
    train_idx, val_idx = _split(x.shape[0], cfg.val_fraction, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    gates = ExitGates(layers, hidden_size, num_layers, width=cfg.width, fingerprint=fingerprint, generator=gen)
    xt, yt = x[train_idx], y[train_idx]
    with torch.no_grad():
        gates.mu.copy_(xt.mean(0))
        gates.sigma.copy_(xt.std(0, unbiased=False).clamp(min=1e-4))
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(gates(xt), yt)
            loss.backward()
            opt.step()
            sched.step()
    gates.eval()
    with torch.no_grad():
        metrics = {"train": _metrics(gates(xt), yt, layers, num_layers), "train_bce": float(loss)}
        if len(val_idx):
            val_logits, yv = gates(x[val_idx]), y[val_idx]
            metrics["val"] = _metrics(val_logits, yv, layers, num_layers)
            # The threshold is a run-time setting: show what stricter ones trade.
            metrics["val_by_threshold"] = {
                str(t): {k: v for k, v in _metrics(val_logits, yv, layers, num_layers, t).items() if k != "per_layer"}
                for t in THRESHOLDS
            }
    metrics["label_positive_rate"] = {str(l): float(y[:, g].mean()) for g, l in enumerate(layers)}
    metrics["oracle_mean_exit_layer"] = _mean_exit(y.bool(), layers, num_layers)
    return gates, metrics


def _first_exit(fires: torch.Tensor, layers: tuple[int, ...], num_layers: int) -> torch.Tensor:
    """Exit layer per row: the first gated layer that fires, or num_layers (no exit)."""
    layer_t = torch.tensor(layers)
    candidates = torch.where(fires, layer_t[None, :], torch.full_like(fires, num_layers, dtype=torch.long))
    return candidates.min(1).values


def _mean_exit(fires: torch.Tensor, layers, num_layers) -> float:
    return float(_first_exit(fires, layers, num_layers).float().mean())


def _metrics(logits: torch.Tensor, y: torch.Tensor, layers: tuple[int, ...], num_layers: int,
             threshold: float = 0.5) -> dict[str, Any]:
    pred = torch.sigmoid(logits) > threshold
    truth = y.bool()
    per_layer = {}
    for g, l in enumerate(layers):
        p, t = pred[:, g], truth[:, g]
        tp = int((p & t).sum())
        per_layer[str(l)] = {
            "accuracy": float((p == t).float().mean()),
            "precision": tp / max(int(p.sum()), 1),
            "recall": tp / max(int(t.sum()), 1),
            "fire_rate": float(p.float().mean()),
        }
    first = _first_exit(pred, layers, num_layers)
    # An inference-time exit is right when the label at the chosen layer is positive (or the row never exits).
    layer_pos = {l: g for g, l in enumerate(layers)}
    right = [bool(e == num_layers) or bool(truth[i, layer_pos[int(e)]]) for i, e in enumerate(first.tolist())]
    return {"per_layer": per_layer, "mean_exit_layer": float(first.float().mean()),
            "exit_correct_rate": sum(right) / max(len(right), 1), "n": int(y.shape[0])}


# ---------------------------------------------------------------------------------------------------------------
# End to end


def _cache_key(model: str, cfg: GateTrainConfig, data_source: dict | None = None) -> str:
    keys = ("samples", "seed", "world_seed", "kinds", "min_layer", "max_new_tokens", "loss_margin")
    key = (model, tuple(getattr(cfg, k) for k in keys))
    # Labels from users' files are keyed by those files too; a world run keeps its earlier key.
    return repr(key if data_source is None else key + (tuple(sorted(data_source.items())),))


def _load_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("key") != key:
            logger.info("feature cache %s was made with other settings; labelling again", path)
            return None
        return {k: handle.get_tensor(k) for k in handle.keys()}


def train_gates(model: str = "reference", cfg: GateTrainConfig | None = None, out_dir: str | os.PathLike | None = None,
                device=None, features_cache: str | os.PathLike | None = None, session=None,
                progress: bool = True, data: list | None = None,
                data_source: dict | None = None) -> tuple[ExitGates, dict[str, Any]]:
    """Label exits, fit the gates and (with `out_dir`) write `gates.safetensors` and `gates.json` there.

    `data`: samples to label instead of the reference world's training questions (see `collect`), described by
    `data_source` (input paths) in the report and the feature-cache key.

    Returns the gates and the report (settings, label statistics, train and held-out metrics, timings).
    """
    cfg = cfg or GateTrainConfig()
    torch.manual_seed(cfg.seed)
    if session is None:
        import mmkit

        session = mmkit.load(model, device=device)
    key = _cache_key(session.source or model, cfg, data_source)
    t0 = time.perf_counter()
    samples = data
    data = _load_cache(Path(features_cache), key) if features_cache else None
    cached = data is not None
    if data is None:
        data = collect(session, cfg, progress=progress, data=samples)
        if features_cache:
            atomic_save_safetensors(data, Path(features_cache), metadata={"key": key})
    t_collect = time.perf_counter() - t0
    adapter = session.adapter
    t1 = time.perf_counter()
    gates, metrics = fit_gates(data, adapter.hidden_size, adapter.num_layers, cfg,
                               fingerprint=model_fingerprint(session.model))
    report = {
        "model": session.source or model,
        "hidden_size": adapter.hidden_size,
        "num_layers": adapter.num_layers,
        "layers": list(gates.layers),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "data": data_source or "reference world",
        "label_rule": f"greedy answer unchanged and answer NLL < {1 + cfg.loss_margin:g} x full",
        "full_nll_mean": float(data["full_nll"].mean()),
        "exit_nll_mean": {str(l): float(data["exit_nll"][:, g].mean()) for g, l in enumerate(gates.layers)},
        "metrics": metrics,
        "seconds": {"labelling": round(t_collect, 1), "fit": round(time.perf_counter() - t1, 1),
                    "from_cache": cached},
        "device": str(session.device),
    }
    if out_dir is not None:
        from mmkit.atomic import atomic_write_json

        out = Path(out_dir)
        atomic_save_safetensors(gates.state_tensors(), out / GATES_FILE)
        atomic_write_json(out / GATES_INFO, report)
    return gates, report
