"""Built-in small random models of the LLaVA-OneVision and Qwen-VL families, each with its own offline processor.

Like `tiny-random`, they are built from configs in code with the byte-level tokenizer, so tests and CLI runs need no
download. Sizes are chosen so that every structural feature of the family is exercised on a CPU in milliseconds:
  - `tiny-random-onevision`: a SigLIP tower (no CLS token) on 28 px tiles, anyres with up to 2 x 2 high-resolution
    tiles, unpadding and row newlines, a Qwen2 decoder.
  - `tiny-random-qwen2-vl` / `-qwen2.5-vl` / `-qwen3-vl`: 8 px patches merged 2 x 2, images resized to at most
    64 x 64 px (so a square world image gives 16 visual tokens and other aspect ratios give other counts), 3-D
    rotary positions (mRoPE) in the decoder; the Qwen2.5 tower uses windowed attention in its first block, the
    Qwen3 tower adds DeepStack features to the output of decoder layer 0.
"""

from __future__ import annotations

from mmkit.models.processors import image_only_processor

# A Qwen-VL conversation, simplified to the byte-level vocabulary: the image sits between the vision markers.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><image><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)
# LLaVA-OneVision's layout (a Qwen2 conversation with the image placeholder and a newline before the question).
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)
VISION_MARKERS = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}

QWEN_PATCH = 8
QWEN_MERGE = 2
QWEN_MAX_PIXELS = 64 * 64
QWEN_MIN_PIXELS = 16 * 16
ONEVISION_TILE = 28
ONEVISION_PATCH = 14
ONEVISION_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
TINY_QWEN_NAMES = {"tiny-random-qwen2-vl": "qwen2_vl", "tiny-random-qwen2.5-vl": "qwen2_5_vl",
                   "tiny-random-qwen3-vl": "qwen3_vl"}


def _text_kwargs(tokenizer) -> dict:
    # head_dim 16: mRoPE splits its 8 frequency pairs 2/3/3 over time, height and width.
    return dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _finish(model, tokenizer, seed_model):
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Generation defaults some checkpoints ship (sampling, top-k) must not leak into greedy tests.
    model.generation_config.do_sample = False
    return model


def _seeded(build, seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_random_qwen(kind: str, seed: int = 0):
    """A small random-weight Qwen2-VL (`kind="qwen2_vl"`), Qwen2.5-VL (`"qwen2_5_vl"`) or Qwen3-VL (`"qwen3_vl"`)
    model and its image-only processor; deterministic for a seed."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmkit.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer(VISION_MARKERS)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.unk_token_id,  # no video placeholder in this vocabulary
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_MARKERS["vision_start_token"]),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_MARKERS["vision_end_token"]),
    )
    text = _text_kwargs(tokenizer)
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    common_vision = dict(patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2)
    if kind == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config=dict(text, rope_parameters=mrope),
            vision_config=dict(common_vision, depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
            **ids,
        )
        cls = transformers.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        # window_size 32 px = 2 x 2 merged units: the 64 px images span several windows, so block 0's windowed
        # attention differs from block 1's full attention.
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=mrope),
            vision_config=dict(common_vision, depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=64, window_size=32, fullatt_block_indexes=[1]),
            **ids,
        )
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif kind == "qwen3_vl":
        config = transformers.Qwen3VLConfig(
            text_config=dict(text, head_dim=16,
                             rope_parameters={**mrope, "mrope_interleaved": True}),
            vision_config=dict(common_vision, depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0]),
            **ids,
        )
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"unknown Qwen-VL kind {kind!r}")
    model = _finish(_seeded(lambda: cls(config), seed), tokenizer, seed)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2,
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
    )
    processor = image_only_processor(cls.__name__, image_processor, tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor


def build_tiny_random_onevision(seed: int = 0):
    """A small random-weight LLaVA-OneVision model (SigLIP tiles, anyres, Qwen2 decoder) and its image-only
    processor; the number of visual tokens depends on each image's size."""
    import transformers
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from mmkit.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=ONEVISION_TILE, patch_size=ONEVISION_PATCH)
    text = dict(_text_kwargs(tokenizer), model_type="qwen2")
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.unk_token_id, image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    cls = transformers.LlavaOnevisionForConditionalGeneration
    model = _finish(_seeded(lambda: cls(config), seed), tokenizer, seed)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": ONEVISION_TILE, "width": ONEVISION_TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS,
    )
    processor = image_only_processor(
        cls.__name__, image_processor, tokenizer, chat_template=ONEVISION_CHAT_TEMPLATE,
        num_image_tokens=(ONEVISION_TILE // ONEVISION_PATCH) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return model, processor


def build_family_builtin(name: str, seed: int = 0):
    """(model, processor) for one of the family built-in names."""
    if name == "tiny-random-onevision":
        return build_tiny_random_onevision(seed)
    return build_tiny_random_qwen(TINY_QWEN_NAMES[name], seed)


FAMILY_BUILTIN_NAMES = ("tiny-random-onevision", *TINY_QWEN_NAMES)
