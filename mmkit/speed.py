"""Speed benchmarks at real model sizes with random weights (speed does not depend on weight values).

Every ratio compares runs made in the same process on the same device: the baseline (HF SDPA with no method, and
HF eager attention) and the methods, with CUDA-event timing, warm-up and the median of repeats.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmkit.errors import MmkitError

logger = logging.getLogger(__name__)

_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)
_LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
# LLaVA-1.5: "<s> system prompt USER:" is 35 tokens before the image; a typical question adds ~40 after it.
_PREFIX, _SUFFIX = 35, 40
# llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m (384 px tiles, no CLS, features of its last layer) and
# Qwen2-7B; anyres over 384 px multiples up to 6 x 6 tiles.
_SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                          image_size=384, patch_size=14)
_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0)
_OV_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
# Qwen/Qwen2.5-VL-7B-Instruct: a 32-block windowed ViT (full attention in blocks 7/15/23/31), 14 px patches merged
# 2 x 2, and a Qwen2-7B-shaped decoder with 3-D rotary positions.
_QWEN25_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2)
_QWEN25_7B_TEXT = dict(_QWEN2_7B, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                   "mrope_section": [16, 24, 24]})


@dataclass(frozen=True)
class Preset:
    arch: str
    vision: dict
    text: dict
    image_size: int
    pinpoints: tuple = ()


PRESETS = {
    "llava-1.5-7b": Preset("llava", _CLIP_L_336, _LLAMA_7B, 336),
    "llava-next-7b": Preset("llava_next", _CLIP_L_336, _LLAMA_7B, 672,
                            ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))),
    # 768 px images: the base tile and 2 x 2 high-resolution tiles (3,699 visual tokens with unpadding and newlines).
    "llava-onevision-7b": Preset("llava_onevision", _SIGLIP_SO400M_384, _QWEN2_7B, 768, _OV_PINPOINTS),
    # 672 px images: 48 x 48 patches merged to 24 x 24 = 576 visual tokens, LLaVA-1.5's count.
    "qwen2.5-vl-7b": Preset("qwen2_5_vl", _QWEN25_VIT, _QWEN25_7B_TEXT, 672),
    # For CPU tests of the benchmark code itself.
    "tiny": Preset("llava", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=56, patch_size=14, projection_dim=32),
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=512, max_position_embeddings=2048), 56),
    "tiny-next": Preset("llava_next", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32),
                        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512, max_position_embeddings=2048), 56,
                        ((28, 56), (56, 28), (56, 56))),
    "tiny-onevision": Preset("llava_onevision", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=28, patch_size=14),
                             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048), 56,
                             ((28, 28), (28, 56), (56, 28), (56, 56))),
    "tiny-qwen2.5-vl": Preset("qwen2_5_vl", dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 out_hidden_size=64, window_size=32, fullatt_block_indexes=[1],
                                                 patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
                              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
                                   bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]}), 64),
}
IMAGE_TOKEN_ID = 32000 - 1  # any id inside the vocabulary; the random model has no real tokenizer


def _family_config(p: Preset, image_token: int):
    """Config and class of the LLaVA-OneVision and Qwen2.5-VL presets."""
    import transformers

    if p.arch == "llava_onevision":
        text = dict(p.text)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta", 10000.0)}
        config = transformers.LlavaOnevisionConfig(
            vision_config=dict(p.vision, model_type="siglip_vision_model"), text_config=dict(text, model_type="qwen2"),
            image_token_index=image_token, video_token_index=image_token - 1, vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=[list(x) for x in p.pinpoints])
        return config, transformers.LlavaOnevisionForConditionalGeneration
    text = {k: v for k, v in p.text.items() if k != "rope_theta"}
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(p.vision), image_token_id=image_token,
                                           video_token_id=image_token - 1, vision_start_token_id=image_token - 2,
                                           vision_end_token_id=image_token - 3)
    return config, transformers.Qwen2_5_VLForConditionalGeneration


def build_random_model(preset: str, device, dtype=torch.bfloat16):
    """A model of the preset's size (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision or Qwen2.5-VL) with random weights, built
    directly on `device` (`"meta"` builds the shapes without memory)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    if preset not in PRESETS:
        raise MmkitError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    image_token = min(IMAGE_TOKEN_ID, p.text["vocab_size"] - 1)
    if p.arch in ("llava_onevision", "qwen2_5_vl"):
        config, cls = _family_config(p, image_token)
    elif p.arch == "llava":
        vision, text = CLIPVisionConfig(**p.vision), LlamaConfig(**p.text)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
        cls = LlavaForConditionalGeneration
    else:
        vision, text = CLIPVisionConfig(**p.vision), LlamaConfig(**p.text)
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                                 vision_feature_layer=-2, vision_feature_select_strategy="default",
                                 image_grid_pinpoints=[list(x) for x in p.pinpoints])
        cls = LlavaNextForConditionalGeneration
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def make_inputs(model, preset: str, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixels and a LLaVA-1.5-shaped prompt: 35 text tokens, the image tokens, 40 text tokens."""
    p = PRESETS[preset]
    device, dtype = model.device, model.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    vision = p.vision
    if p.arch == "llava":
        pixel_values = torch.randn(batch, 3, p.image_size, p.image_size, generator=g)
        n_image = (vision["image_size"] // vision["patch_size"]) ** 2
        extra = {}
    elif p.arch == "qwen2_5_vl":
        # Native resolution: (patches, C * T * P * P) rows per image and its (t, h, w) patch grid.
        side = p.image_size // vision["patch_size"]
        per_patch = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2
        pixel_values = torch.randn(batch * side * side, per_patch, generator=g)
        extra = {"image_grid_thw": torch.tensor([[1, side, side]] * batch, device=device)}
        n_image = side * side // vision["spatial_merge_size"] ** 2
    else:
        tiles = 1 + (p.image_size // vision["image_size"]) ** 2
        pixel_values = torch.randn(batch, tiles, 3, vision["image_size"], vision["image_size"], generator=g)
        image_sizes = torch.tensor([[p.image_size, p.image_size]] * batch)
        extra = {"image_sizes": image_sizes.to(device)}
        with torch.inference_mode():
            feats = model.model.get_image_features(pixel_values[:1].to(device, dtype), image_sizes=image_sizes[:1].to(device))
        feats = getattr(feats, "pooler_output", feats)
        n_image = sum(f.shape[0] for f in feats)
    vocab = model.config.text_config.vocab_size
    image_token = model.config.image_token_id
    text = torch.randint(2, image_token, (batch, _PREFIX + _SUFFIX), generator=g)
    image = torch.full((batch, n_image), image_token)
    input_ids = torch.cat([text[:, :_PREFIX], image, text[:, _PREFIX:]], dim=1)
    input_ids[:, 0] = 1
    assert int(input_ids.max()) < vocab
    if p.arch == "qwen2_5_vl":
        extra["mm_token_type_ids"] = (input_ids == image_token).int().to(device)  # mRoPE: which tokens are image
    return {"input_ids": input_ids.to(device), "pixel_values": pixel_values.to(device, dtype),
            "attention_mask": torch.ones_like(input_ids, device=device), **extra}


def time_ms(fn: Callable[[], Any], warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of `fn` in ms (CUDA-synchronised on GPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@dataclass
class BenchRow:
    case: str
    setting: str
    ms: float
    baseline_ms: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return None if self.baseline_ms is None else self.baseline_ms / self.ms


def _session(model):
    from mmkit.session import Session

    return Session(model, processor=None, source="random")


def prefill_case(model, preset: str, batch: int, methods: list[str], reps: int = 5) -> list[BenchRow]:
    """Prefill time (vision tower + projector + LLM, logits of the last token) with and without methods."""
    inputs = make_inputs(model, preset, batch)
    n = inputs["input_ids"].shape[1]

    def run():
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)

    def vision():
        with torch.inference_mode():
            kwargs = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
            model.model.get_image_features(inputs["pixel_values"], **kwargs)

    session = _session(model)
    rows = []
    base = time_ms(run, reps=reps)
    setting = f"b{batch} n={n} {str(model.dtype).replace('torch.', '')}"
    rows.append(BenchRow("prefill", setting, base, None, "HF SDPA, no method"))
    # The vision tower and projector run unpruned in every setting; timing them alone lets the decoder-side
    # speed-up be read off the same run: (total - vision) / (total_method - vision).
    rows.append(BenchRow("vision", setting, time_ms(vision, reps=reps), None, "vision tower + projector only"))
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        eager = time_ms(run, reps=max(2, reps // 2))
    except torch.cuda.OutOfMemoryError:
        eager = float("nan")
    finally:
        model.set_attn_implementation({"text_config": previous})
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    rows.append(BenchRow("prefill", setting, eager, base, "HF eager, no method"))
    for spec in methods:
        handle = session.apply(spec)
        try:
            ms = time_ms(run, reps=reps)
            kept = int(session.context.visual_per_layer[-1][0])
            rows.append(BenchRow("prefill", setting, ms, base, spec, {"visual_tokens_kept_last_layer": kept}))
        finally:
            handle.remove()
    session.close()
    return rows


def generate_case(model, preset: str, methods: list[str], new_tokens: int = 64, reps: int = 3) -> list[BenchRow]:
    """End-to-end generate at batch 1 with a dynamic and a static cache, with and without methods."""
    inputs = make_inputs(model, preset, 1)
    rows = []
    session = _session(model)
    for spec in [None, *methods]:
        handle = session.apply(spec) if spec else None
        try:
            for cache in ("dynamic", "static"):
                kwargs = {"cache_implementation": "static"} if cache == "static" else {}

                def run():
                    with torch.inference_mode():
                        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False, disable_compile=True, **kwargs)

                ms = time_ms(run, warmup=1, reps=reps)
                rows.append(BenchRow("generate", f"b1 {new_tokens} new tokens, {cache} cache", ms, None,
                                     spec or "no method"))
        finally:
            if handle is not None:
                handle.remove()
    session.close()
    base = {r.setting: r.ms for r in rows if r.note == "no method"}
    for r in rows:
        r.baseline_ms = base.get(r.setting)
    return rows


def max_batch_case(model, preset: str, methods: list[str], limit: int = 512) -> list[BenchRow]:
    """Largest batch whose prefill plus one decode step fits in device memory, with and without methods."""
    session = _session(model)
    rows = []
    for spec in [None, *methods]:
        handle = session.apply(spec) if spec else None
        try:
            def fits(b: int) -> bool:
                try:
                    inputs = make_inputs(model, preset, b)
                    with torch.inference_mode():
                        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                       disable_compile=True)
                    return True
                except torch.cuda.OutOfMemoryError:
                    return False
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()

            lo, hi = 0, 1
            while hi <= limit and fits(hi):
                lo, hi = hi, hi * 2
            hi = min(hi, limit + 1)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            rows.append(BenchRow("max batch", f"{preset}", float(lo), None, spec or "no method"))
        finally:
            if handle is not None:
                handle.remove()
    session.close()
    return rows


def flop_bound(model, preset: str, layer: int, keep: float) -> float:
    """The prefill speed-up bound of dropping (1 - keep) of the image tokens after `layer` (FastV's FLOP ratio)."""
    from mmkit.evals.flops import prefill_tflops

    inputs = make_inputs(model, preset, 1)
    n = inputs["input_ids"].shape[1]
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    layers = model.config.text_config.num_hidden_layers
    d, m = model.config.text_config.hidden_size, model.config.text_config.intermediate_size
    kept = n - n_img + int(round(n_img * keep))
    full = prefill_tflops([n] * layers, d, m)
    pruned = prefill_tflops([n] * layer + [kept] * (layers - layer), d, m)
    return full / pruned


def decoder_speedups(rows: list[BenchRow]) -> dict[str, float]:
    """Decoder-side prefill speed-up per method: the same-run vision time subtracted from both totals."""
    vision = next((r.ms for r in rows if r.case == "vision"), None)
    if vision is None:
        return {}
    return {r.note: (r.baseline_ms - vision) / (r.ms - vision)
            for r in rows if r.case == "prefill" and r.baseline_ms is not None and min(r.ms, r.baseline_ms) > vision}


def format_rows(rows: list[BenchRow]) -> str:
    lines = [f"{'case':<10} {'setting':<36} {'method':<30} {'ms':>10} {'speed-up':>9}"]
    for r in rows:
        speed = "" if r.speedup is None else f"{r.speedup:.2f}x"
        value = f"{r.ms:.0f}" if r.case == "max batch" else f"{r.ms:.2f}"
        lines.append(f"{r.case:<10} {r.setting:<36} {r.note:<30} {value:>10} {speed:>9}")
    for note, ratio in decoder_speedups(rows).items():
        lines.append(f"decoder-side prefill speed-up, {note}: {ratio:.2f}x (vision time subtracted, same run)")
    return "\n".join(lines)
