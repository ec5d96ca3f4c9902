"""`Session`: one loaded LVLM plus the methods applied to it, with batched generation and answer scoring."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mmkit.contract import Branching, check_implementation
from mmkit.errors import MmkitError
from mmkit.images import load_image
from mmkit.models.adapters import adapter_for
from mmkit.models.families import refusal
from mmkit.models.family_inputs import decode_position_ids, fix_branch_inputs
from mmkit.patching.attention import TextAttentionSwitch
from mmkit.patching.context import ForwardContext, install_context_hooks
from mmkit.patching.probe import AttentionProbe
from mmkit.registry import MethodInfo, config_to_spec, get_method, method_for_config, parse_spec

logger = logging.getLogger(__name__)


@dataclass
class SampleStats:
    """Per-sample efficiency record of one call."""

    visual_tokens: int                   # image tokens in the prompt
    visual_tokens_kept: list[int]        # image tokens each decoder layer processed
    tokens_per_layer: list[int]          # all (non-padding) tokens each decoder layer processed
    prefill_ms: float                    # wall time of the batch's prefill forward
    new_tokens: int = 0
    # Visual tokens each decoder layer read through cross-attention (VISOR); empty or zeros for other methods.
    visual_tokens_cross: list[int] = field(default_factory=list)

    @property
    def mean_visual_tokens_kept(self) -> float:
        return sum(self.visual_tokens_kept) / max(len(self.visual_tokens_kept), 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "visual_tokens": self.visual_tokens,
            "visual_tokens_kept": self.visual_tokens_kept,
            "visual_tokens_kept_mean": self.mean_visual_tokens_kept,
            "tokens_per_layer": self.tokens_per_layer,
            "prefill_ms": self.prefill_ms,
            "new_tokens": self.new_tokens,
            "visual_tokens_cross": self.visual_tokens_cross,
        }


@dataclass
class GenerationResult:
    text: str
    stats: SampleStats


@dataclass
class ScoreResult:
    """Log-probabilities of fixed answers: `logprobs[i][j]` for prompt i and choice j."""

    choices: list[str]
    logprobs: list[list[float]]
    stats: list[SampleStats]

    def best(self) -> list[str]:
        return [self.choices[max(range(len(row)), key=row.__getitem__)] for row in self.logprobs]


@dataclass
class MethodHandle:
    """What `Session.apply` returns; `remove()` detaches the method and restores the model exactly."""

    session: "Session"
    info: MethodInfo
    config: Any
    impl: Any
    _removed: bool = field(default=False, repr=False)

    @property
    def spec(self) -> str:
        return config_to_spec(self.config)

    def remove(self) -> None:
        if self._removed:
            return
        self.impl.remove()
        self._removed = True
        self.session._handles.remove(self)


class Session:
    """A loaded LLaVA-family model, its processor, and the active methods."""

    def __init__(self, model, processor, source: str = ""):
        self.model = model
        self.processor = processor
        self.source = source
        self.adapter = adapter_for(model)
        self.context = ForwardContext(num_layers=self.adapter.num_layers, image_token_id=self.adapter.image_token_id,
                                      first_droppable_layer=self.adapter.first_droppable_layer)
        self.text_attention = TextAttentionSwitch(model, self.adapter.language_model,
                                                  [layer.self_attn for layer in self.adapter.decoder_layers])
        self.probe = AttentionProbe(self)
        self._hooks = install_context_hooks(model, self.context)
        self._handles: list[MethodHandle] = []

    # -- methods ---------------------------------------------------------------------------------------------
    @property
    def methods(self) -> list[MethodHandle]:
        return list(self._handles)

    def apply(self, spec) -> MethodHandle:
        """Apply a method given as a spec string (`"fastv:layer=2,keep=0.25"`) or a config object."""
        config = parse_spec(spec) if isinstance(spec, str) else spec
        info = method_for_config(config)
        refused = refusal(self.adapter.family, info.name)
        if refused:
            raise MmkitError(refused)
        for active in self._handles:
            conflict = info.conflict_with(active.info)
            if conflict:
                raise MmkitError(conflict)
        try:
            impl = info.apply_fn(self, config)
        except (ValueError, TypeError) as err:
            if isinstance(err, MmkitError):
                raise
            raise MmkitError(str(err)) from None
        try:
            check_implementation(info.name, info.capabilities, impl)
        except TypeError:
            impl.remove()
            raise
        handle = MethodHandle(self, info, config, impl)
        self._handles.append(handle)
        return handle

    def remove_all(self) -> None:
        for handle in reversed(list(self._handles)):
            handle.remove()

    def close(self) -> None:
        """Remove every method and the session's own hooks: the model is as it was loaded."""
        self.remove_all()
        for hook in self._hooks:
            hook.remove()
        self._hooks = ()

    # -- inputs ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def chat_prompt(self, prompt: str) -> str:
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in prompt:
            # The chat template already places the one image; a second marker would ask for an image not given.
            raise MmkitError(f"the prompt contains the image marker {image_token!r}; remove it (the image is placed "
                             "before the prompt automatically)")
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def prepare(self, images: Sequence, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch inputs: one image and one prompt per row, chat template applied, left padded."""
        images, prompts = _as_lists(images, prompts)
        pil_images = [load_image(img) for img in images]
        texts = [self.chat_prompt(p) for p in prompts]
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        inputs = self.processor(images=pil_images, text=texts, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return dict(inputs)

    def _stats(self, batch: int, new_tokens: list[int] | None = None) -> list[SampleStats]:
        ctx = self.context
        visual = ctx.image_mask.sum(1).tolist()
        kept = torch.stack([v.to("cpu") for v in ctx.visual_per_layer], 1).tolist()
        tokens = torch.stack([t.to("cpu") for t in ctx.tokens_per_layer], 1).tolist()
        cross = torch.stack([c.to("cpu") for c in ctx.cross_per_layer], 1).tolist() if ctx.cross_per_layer else None
        return [
            SampleStats(
                visual_tokens=int(visual[i]), visual_tokens_kept=[int(x) for x in kept[i]],
                tokens_per_layer=[int(x) for x in tokens[i]], prefill_ms=float(ctx.prefill_ms or 0.0),
                new_tokens=new_tokens[i] if new_tokens else 0,
                visual_tokens_cross=[int(x) for x in cross[i]] if cross else [],
            )
            for i in range(batch)
        ]

    # -- calls -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, images, prompts, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> list[GenerationResult]:
        """Generate an answer per (image, prompt) row. Sampling is reproducible given `seed`."""
        if max_new_tokens < 1:
            raise MmkitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        inputs = self.prepare(images, prompts)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        tokenizer = self.processor.tokenizer
        brancher = self._brancher()
        if brancher is not None:
            new = self._branched_generate(brancher, inputs, max_new_tokens, do_sample, temperature, top_p, seed)
        else:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                output = self.model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
            new = output[:, inputs["input_ids"].shape[1]:]
        eos = tokenizer.eos_token_id
        lengths = []
        for row in new.tolist():
            n = len(row)
            for j, tok in enumerate(row):
                if tok == eos or tok == tokenizer.pad_token_id:
                    n = j
                    break
            lengths.append(n)
        texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(new.tolist(), lengths)]
        stats = self._stats(len(texts), lengths)
        return [GenerationResult(text, s) for text, s in zip(texts, stats)]

    def choice_token_ids(self, choices: Sequence[str]) -> list[int]:
        """The token each answer starts with right after the assistant prompt; the tokens must differ.

        Tries the answer after a space (word-piece and word-level vocabularies) and then without it (byte-level
        vocabularies, where the space is its own token).
        """
        tokenizer = self.processor.tokenizer
        prompt = self.chat_prompt("")
        base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for joiner in (" ", ""):
            ids = []
            for choice in choices:
                full = tokenizer(prompt + joiner + choice, add_special_tokens=False)["input_ids"]
                i = 0
                while i < min(len(base), len(full)) and base[i] == full[i]:
                    i += 1
                ids.append(full[i] if i < len(full) else None)
            if None not in ids and len(set(ids)) == len(ids):
                return ids
        raise MmkitError(f"answers {list(choices)} do not start with distinct tokens; use answers that differ at once")

    @torch.inference_mode()
    def answer_logprobs(self, images, prompts, choices: Sequence[str] = ("yes", "no")) -> ScoreResult:
        """Score fixed answers (e.g. yes/no) in one forward pass: log-probability of each answer's first token."""
        choices = list(choices)
        if len(choices) < 2:
            raise MmkitError("answer_logprobs needs at least two choices")
        token_ids = self.choice_token_ids(choices)
        inputs = self.prepare(images, prompts)
        brancher = self._brancher()
        if brancher is not None:
            out = self.model(**self.expand_branches(brancher, inputs), logits_to_keep=1, use_cache=False)
            logits = brancher.combine_logits(out.logits[:, -1, :].float())
        else:
            logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits, dim=-1)[:, token_ids]
        return ScoreResult(choices, logprobs.tolist(), self._stats(logprobs.shape[0]))

    # -- multi-branch decoding (contrastive / view-ensemble methods) -------------------------------------------
    def _brancher(self) -> Branching | None:
        """The active method that decodes over several input branches (VCD, AGLA, ...), if any: see
        `mmkit.contract.Branching`. All branches receive the chosen token, so they run as one batch and the
        weights are read once per step."""
        branchers = [h.impl for h in self._handles if h.info.capabilities.branches_logits]
        return branchers[0] if branchers else None

    def expand_branches(self, brancher, inputs: dict) -> dict:
        """The brancher's k * B input rows, with the family's per-row inputs (Qwen-VL's `mm_token_type_ids`)
        re-derived from the rows' image tokens."""
        return fix_branch_inputs(self.adapter, brancher.expand_inputs(self, inputs))

    def _branched_generate(self, brancher, inputs, max_new_tokens, do_sample, temperature, top_p, seed):
        tokenizer = self.processor.tokenizer
        expanded = self.expand_branches(brancher, inputs)
        batch = inputs["input_ids"].shape[0]
        k = expanded["input_ids"].shape[0] // batch
        generator = None
        if do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(0 if seed is None else seed)
        attention_mask = expanded["attention_mask"]
        out = self.model(**expanded, use_cache=True, logits_to_keep=1)
        tokens = []
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            logits = brancher.combine_logits(out.logits[:, -1, :].float())
            if do_sample:
                probs = _top_p_probs(logits / max(temperature, 1e-5), top_p)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
            tokens.append(nxt)
            finished |= nxt == tokenizer.eos_token_id
            if bool(finished.all()):
                break
            step_ids = nxt.repeat(k)[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
            out = self.model(input_ids=step_ids, attention_mask=attention_mask, past_key_values=out.past_key_values,
                             position_ids=decode_position_ids(self.adapter, attention_mask), use_cache=True,
                             logits_to_keep=1)
        return torch.stack(tokens, dim=1)

    def ground(self, images, query: str | Sequence[str] | None = None, sam=None, config=None) -> list:
        """Find and segment objects with VL-SAM: the model's attention maps become Segment Anything prompts.

        `query` None grounds every object the model lists, a phrase grounds it in every image, a list gives one
        query per image. `sam` is a SAM checkpoint directory or hub id, a loaded backend, or None for the shipped
        small SAM; `config` a `mmkit.grounding.vlsam.VLSAMConfig` (None: the preset for this model). Returns one
        `GroundingResult` (detections with masks, boxes, labels, scores; the attention maps; call counts) per
        image. See docs/grounding.md.
        """
        from mmkit.grounding.vlsam import default_sam, ground
        from mmkit.models.families import check_grounding

        check_grounding(self.adapter.family)  # before the SAM checkpoint is loaded
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        return ground(self, default_sam(sam, self.device), list(images), query=query, config=config)

    # -- persistence -----------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir, overwrite: bool = False, remote_code: bool = False):
        """Export model, processor and methods (with learned/tuned state); `mmkit.load(out_dir)` reproduces it.
        `remote_code=True` also lets plain transformers load it with `trust_remote_code=True`, methods attached."""
        from mmkit.export import save_session

        return save_session(self, out_dir, overwrite=overwrite, remote_code=remote_code)

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        layer = self.adapter.vision_feature_layer
        image_size = getattr(cfg.vision_config, "image_size", None)
        patch = getattr(cfg.vision_config, "patch_size", None)
        return {
            "source": self.source,
            "family": self.adapter.family.name,
            "architecture": self.adapter.architecture,
            "image_token_id": self.adapter.image_token_id,
            "image_token": getattr(self.processor, "image_token", "<image>"),
            "visual_layout": self.adapter.family.visual_layout,
            "vision_cls_token": self.adapter.has_cls_token,
            "visual_tokens": _visual_tokens(cfg, image_size, patch, self.processor),
            "attn_implementation": _loaded_attention(self),
            "attn_per_layer": _attention_placement(self),
            "image_size": image_size,
            "patch_size": patch,
            "vision_feature_layer": layer,
            "vision_feature_select_strategy": self.adapter.vision_feature_select_strategy,
            "decoder_layers": self.adapter.num_layers,
            "hidden_size": self.adapter.hidden_size,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "device_map": _device_placement(self.model),
            "prompt_layout": self.chat_prompt("{prompt}"),
            "methods": [h.spec for h in self._handles],
        }


def _top_p_probs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Softmax restricted to the smallest set of tokens whose mass reaches `top_p` (nucleus sampling)."""
    probs = torch.softmax(logits, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


# Image sizes `mmkit info` reports visual-token counts for (the reference world draws 336 px squares).
_INFO_IMAGE_SIZES = ((336, 336), (336, 504), (672, 672))


def _visual_tokens(cfg, image_size, patch, processor=None):
    """Visual tokens per image: a number for fixed-grid models; for models whose count depends on the image size,
    the count the processor gives a few sizes (H x W px)."""
    if type(cfg).__name__ in ("LlavaNextConfig", "LlavaOnevisionConfig") or not image_size:
        counter = getattr(processor, "_get_num_multimodal_tokens", None)
        try:
            counts = counter(image_sizes=[list(s) for s in _INFO_IMAGE_SIZES])["num_image_tokens"]
        except (AttributeError, TypeError, KeyError, ValueError):  # no count API: say it varies rather than guess
            return "varies with image size"
        return "varies with image size: " + ", ".join(
            f"{int(n)} at {h}x{w}" for (h, w), n in zip(_INFO_IMAGE_SIZES, counts))
    if not patch:
        return None
    n = (image_size // patch) ** 2
    return n if cfg.vision_feature_select_strategy == "default" else n + 1


def _loaded_attention(session) -> str:
    """The implementation the decoder was loaded with (while methods hold the mmkit backend, the one it wraps)."""
    switch = session.text_attention
    return str(switch.original) if switch.count else session.adapter.attn_implementation


def _attention_placement(session) -> str:
    """Which attention implementation runs on which decoder layers: the loaded one on layers no method edits, the
    mmkit backend where methods observe or replace attention."""
    text = session.adapter.attn_implementation
    vision = getattr(getattr(session.model.config, "vision_config", None), "_attn_implementation", None)
    switch = session.text_attention
    if switch.count:
        text = f"mmkit backend around {switch.original} (methods observe or replace attention)"
    return f"decoder layers 0-{session.adapter.num_layers - 1}: {text}; vision tower: {vision}"


def _device_placement(model) -> str | None:
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    return ", ".join(f"{name or 'model'}={dev}" for name, dev in device_map.items())


def _as_lists(images, prompts):
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(images, (list, tuple)):
        images = [images]
    prompts = list(prompts)
    images = list(images)
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise MmkitError(f"got {len(images)} images for {len(prompts)} prompts; pass one image per prompt")
    if not prompts:
        raise MmkitError("no prompts given")
    return images, prompts


def load(model: str, methods: Sequence | None = None, device=None, dtype=None,
         attn_implementation: str | dict | None = None, device_map=None, quantization_config=None,
         offload_folder=None) -> Session:
    """Load a supported LVLM (hub id, local directory, or a built-in name such as `tiny-random`,
    `tiny-random-qwen2.5-vl` or `reference`) and apply `methods` (spec strings or config objects) in order.

    `attn_implementation` ("sdpa", "eager", "flex_attention", "flash_attention_2"), `device_map` (accelerate's
    placement, e.g. "auto" or a dict), `quantization_config` and `offload_folder` are passed to `from_pretrained`
    unchanged."""
    from mmkit.models.loading import load_model_and_processor

    from mmkit.export import apply_manifest, read_manifest

    hf_model, processor, source = load_model_and_processor(
        model, device=device, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map,
        quantization_config=quantization_config, offload_folder=offload_folder)
    session = Session(hf_model, processor, source)
    manifest = read_manifest(Path(model)) if isinstance(model, str) and Path(model).is_dir() else None
    if manifest is not None:
        apply_manifest(session, Path(model), manifest)
    for spec in methods or ():
        session.apply(spec)
    return session
