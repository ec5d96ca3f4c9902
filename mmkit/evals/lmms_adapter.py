"""lmms-eval plug-in: model `mmkit` (an mmkit session with methods) for `python -m lmms_eval --model mmkit`.

Registered through the `lmms_eval.models` entry point (`manifest`), so lmms-eval needs no fork or edit. The model
class is built on first use because importing lmms-eval reconfigures logging; nothing here imports it at module
import time.

    python -m lmms_eval --model mmkit --model_args pretrained=reference,methods="fastv:keep=0.25;agla" \
        --tasks mmkit_pope_random --include_path mmkit/evals/tasks --limit 8

`methods` separates method specs with `;` (lmms-eval splits model_args on commas, so a method's own fields are
separated with `+` or `|` there: `fastv:layer=2+keep=0.25`). Per-sample efficiency stats (visual tokens kept,
prefill TFLOPs, prefill ms) are kept in `STATS`, keyed by the doc's `qid`, for the mmkit tasks' `process_results`.
"""

from __future__ import annotations

import logging
from typing import Any

from mmkit.errors import MmkitError
from mmkit.models.family_inputs import fix_branch_inputs

logger = logging.getLogger(__name__)

MODEL_NAME = "mmkit"
# qid -> efficiency record of the last run on that doc; read by mmkit/evals/tasks/utils.py.
STATS: dict[str, dict[str, float]] = {}


def manifest():
    """Entry-point payload for lmms-eval's `lmms_eval.models` group."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="mmkit.evals.lmms_adapter.MmkitLMM")


def parse_methods(spec: str | None) -> list[str]:
    """`"fastv:layer=2+keep=0.25;agla"` -> `["fastv:layer=2,keep=0.25", "agla"]`."""
    if not spec:
        return []
    out = []
    for part in str(spec).split(";"):
        part = part.strip().strip("'\"")
        if part:
            out.append(part.replace("+", ",").replace("|", ","))
    return out


def _record_stats(session, qid: str, stats) -> None:
    from mmkit.evals.flops import prefill_tflops

    adapter = session.adapter
    kept = stats.visual_tokens_kept
    STATS[qid] = {
        "visual_tokens": float(stats.visual_tokens),
        "visual_tokens_kept": sum(kept) / max(len(kept), 1),
        "tflops_prefill": prefill_tflops(stats.tokens_per_layer, adapter.hidden_size, adapter.intermediate_size,
                                         cross_visual=stats.visual_tokens_cross),
        "prefill_ms": float(stats.prefill_ms),
    }


def _build_class():
    import torch
    from lmms_eval.api.model import lmms
    from tqdm import tqdm

    class MmkitLMM(lmms):
        """An mmkit session as an lmms-eval model: one image per doc, batched in doc order."""

        def __init__(self, pretrained: str = "reference", methods: str | None = None, batch_size: int | str = 8,
                     device: str | None = None, dtype: str | None = None, seed: int = 0, **kwargs: Any) -> None:
            super().__init__()
            import mmkit

            if kwargs:
                logger.warning("mmkit model ignores model_args %s", sorted(kwargs))
            self.batch_size = int(batch_size)
            if self.batch_size < 1:
                raise MmkitError(f"batch_size must be >= 1, got {batch_size}")
            self.seed = int(seed)
            self.session = mmkit.load(str(pretrained), methods=parse_methods(methods), device=device, dtype=dtype)
            self.task_dict: dict = {}

        # lmms-eval hands requests over in its own order; mmkit runs them in doc order, batch by batch, so a
        # batch holds the same docs as `mmkit eval` with the same batch size (and so gives the same answers).
        def _ordered(self, requests):
            order = sorted(range(len(requests)), key=lambda i: (requests[i].args[4], requests[i].args[5],
                                                                requests[i].args[3]))
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

        def _doc(self, task, split, doc_id):
            return self.task_dict[task][split][doc_id]

        def _visual(self, doc_to_visual, doc) -> Any:
            visuals = doc_to_visual(doc)
            if len(visuals) != 1:
                raise MmkitError(f"mmkit model takes one image per doc, got {len(visuals)}")
            return visuals[0]

        def generate_until(self, requests) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            bar = tqdm(total=len(requests), desc="mmkit generate", disable=self.rank != 0)
            for batch_idx, batch in enumerate(self._ordered(requests)):
                args = [requests[i].args for i in batch]
                gen_kwargs = dict(args[0][1])
                if any(dict(a[1]) != gen_kwargs for a in args):
                    raise MmkitError("requests in one batch have different generation kwargs")
                docs = [self._doc(a[4], a[5], a[3]) for a in args]
                images = [self._visual(a[2], d) for a, d in zip(args, docs)]
                do_sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 0)) > 0
                results = self.session.generate(
                    images, [a[0] for a in args], max_new_tokens=int(gen_kwargs.get("max_new_tokens", 32)),
                    do_sample=do_sample, temperature=float(gen_kwargs.get("temperature", 1.0) or 1.0),
                    top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0), seed=self.seed * 1_000_003 + batch_idx,
                )
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                for i, doc, res in zip(batch, docs, results):
                    text = res.text
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                    if isinstance(doc, dict) and "qid" in doc:
                        _record_stats(self.session, doc["qid"], res.stats)
                bar.update(len(batch))
            bar.close()
            return out  # type: ignore[return-value]

        @torch.inference_mode()
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            """Log-probability of each continuation given (image, context), and whether greedy decoding gives it."""
            session = self.session
            tokenizer = session.processor.tokenizer
            out: list[tuple[float, bool] | None] = [None] * len(requests)
            for batch in self._ordered(requests):
                args = [requests[i].args for i in batch]
                images = [self._visual(a[2], self._doc(a[4], a[5], a[3])) for a in args]
                conts = [a[1] if isinstance(a[1], str) else a[1](self._doc(a[4], a[5], a[3])) for a in args]
                inputs = session.prepare(images, [a[0] for a in args])
                prompts = [session.chat_prompt(a[0]) for a in args]
                cont_ids = []
                for prompt, cont in zip(prompts, conts):
                    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                    full = tokenizer(prompt + cont, add_special_tokens=False)["input_ids"]
                    if full[:len(ctx)] != ctx or len(full) == len(ctx):
                        raise MmkitError(f"continuation {cont!r} does not tokenize apart from its context")
                    cont_ids.append(full[len(ctx):])
                width = max(len(c) for c in cont_ids)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                # Continuations are appended on the right of the left-padded prompts, padded on the right.
                extra = torch.full((len(batch), width), pad, dtype=inputs["input_ids"].dtype, device=session.device)
                mask = torch.zeros_like(extra)
                for r, c in enumerate(cont_ids):
                    extra[r, :len(c)] = torch.tensor(c, device=session.device)
                    mask[r, :len(c)] = 1
                n_ctx = inputs["input_ids"].shape[1]
                attention = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"])], 1)
                inputs = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1), attention_mask=attention)
                inputs = fix_branch_inputs(session.adapter, inputs)  # Qwen-VL: token types follow the longer rows
                brancher = session._brancher()
                if brancher is not None:
                    logits = session.model(**session.expand_branches(brancher, inputs), use_cache=False).logits
                    steps = [brancher.combine_logits(logits[:, n_ctx - 1 + t, :].float()) for t in range(width)]
                    logits = torch.stack(steps, 1)
                else:
                    logits = session.model(**inputs, use_cache=False).logits[:, n_ctx - 1:n_ctx - 1 + width].float()
                logprobs = torch.log_softmax(logits, -1)
                for r, (i, c) in enumerate(zip(batch, cont_ids)):
                    target = torch.tensor(c, device=logprobs.device)
                    lp = logprobs[r, :len(c)].gather(1, target[:, None]).sum().item()
                    greedy = bool((logprobs[r, :len(c)].argmax(-1) == target).all())
                    out[i] = (float(lp), greedy)
            return out  # type: ignore[return-value]

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("mmkit model does not support multi-round generation")

    MmkitLMM.__module__ = __name__
    return MmkitLMM


def __getattr__(name: str):
    # lmms-eval resolves "mmkit.evals.lmms_adapter.MmkitLMM"; the class is built on that first access.
    if name == "MmkitLMM":
        cls = _build_class()
        globals()["MmkitLMM"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
