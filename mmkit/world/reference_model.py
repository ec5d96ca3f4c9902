"""Builders for mmkit's reference model: a small LLaVA-1.5-layout model over the reference world.

The model is a stock HF `LlavaForConditionalGeneration` (CLIP vision tower, two-layer GELU projector, Llama
decoder); the tokenizer is a word-level `PreTrainedTokenizerFast` over the world's vocabulary, and the processor a
stock `LlavaProcessor`, so the saved directory loads with `from_pretrained` / `AutoProcessor` and nothing from mmkit.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

# Special tokens, in id order: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
# Words of the LLaVA-1.5 conversation frame that the world's own vocabulary does not contain.
TEMPLATE_WORDS = ("USER", "ASSISTANT")
# Every punctuation character is its own token (the pre-tokenizer isolates them), and digits are words.
EXTRA_SYMBOLS = tuple(string.punctuation) + tuple(string.digits)

IMAGE_SIZE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ReferenceSpec:
    """Sizes of a reference-model variant. `patch_size` fixes the visual-token grid: (336 / patch_size) ** 2."""

    patch_size: int = 14
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 8
    text_kv_heads: int = 4
    text_mlp: int = 768
    max_positions: int = 1024

    def __post_init__(self) -> None:
        if IMAGE_SIZE % self.patch_size:
            raise ValueError(f"patch_size must divide the image size {IMAGE_SIZE}, got {self.patch_size}")
        if self.vision_hidden % self.vision_heads or self.text_hidden % self.text_heads:
            raise ValueError("hidden sizes must be divisible by their head counts")
        if self.text_heads % self.text_kv_heads:
            raise ValueError("text_heads must be a multiple of text_kv_heads")

    @property
    def grid(self) -> int:
        """Patches per image side (the visual-token grid is grid x grid)."""
        return IMAGE_SIZE // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid


# The shipped model: 24 x 24 = 576 visual tokens as in LLaVA-1.5; sized so that a batch of 8 full prompts runs a
# forward pass in about 0.4 s on 2 CPU cores.
REFERENCE_SPEC = ReferenceSpec()
# A very small variant (12 x 12 = 144 visual tokens) that trains in about a minute on CPU, for tests.
TINY_SPEC = ReferenceSpec(
    patch_size=28, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
    text_hidden=64, text_layers=4, text_heads=4, text_kv_heads=2, text_mlp=128, max_positions=512,
)
SPECS = {"reference": REFERENCE_SPEC, "tiny": TINY_SPEC}


def _forms(words) -> set[str]:
    forms: set[str] = set()
    for word in words:
        for form in (word, word.lower(), word[:1].upper() + word[1:]):
            if form and not any(ch.isspace() for ch in form):
                forms.add(form)
    return forms


def vocabulary(with_added: bool = True) -> list[str]:
    """The tokenizer's word list after the specials.

    First the original list, from which the ids of the first shipped model were built: world words
    (`mmkit.world.vocab.world_words`) in lower and capitalised form, frame words, punctuation and digits, sorted so
    ids do not depend on set order. Then, sorted, the forms of the words added later (`added_words`, the detailed
    caption style) that the original list lacks: appended, so every original word keeps its id.
    `with_added=False` gives the original list alone (the vocabulary of the first shipped tokenizer).
    """
    from mmkit.world.vocab import added_words, world_words

    base = _forms(world_words())
    base.update(TEMPLATE_WORDS)
    base.update(EXTRA_SYMBOLS)
    base.difference_update(SPECIAL_TOKENS)
    added = _forms(added_words()) - base - set(SPECIAL_TOKENS) if with_added else set()
    return sorted(base) + sorted(added)


def build_tokenizer(with_added: bool = True):
    """A word-level `PreTrainedTokenizerFast` over the world's vocabulary.

    Whitespace splits words and every punctuation character is a token of its own, so "yes." is ["yes", "."];
    encoding prepends <s>; decoding joins words with spaces and re-attaches punctuation ("A red star and a blue
    cup."). `with_added=False` leaves out the words appended for the detailed caption style (`vocabulary`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from mmkit.models.builtin import LLAVA_CHAT_TEMPLATE

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary(with_added):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    # WordPiece's decoder joins tokens with spaces and its cleanup removes the space before . , ? ! and 's.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=REFERENCE_SPEC.max_positions,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, spec: ReferenceSpec = REFERENCE_SPEC):
    """A stock `LlavaProcessor`: CLIP preprocessing at 336 px and <image> expanded to `spec.num_image_tokens`."""
    from transformers import LlavaProcessor

    from mmkit.models.builtin import LLAVA_CHAT_TEMPLATE

    try:
        from transformers import CLIPImageProcessor as image_processor_cls  # noqa: N813 - torchvision backend
        import torchvision  # noqa: F401 - only a check: the torchvision backend needs it
    except ImportError:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as image_processor_cls
    image_processor = image_processor_cls(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )


def build_config(tokenizer, spec: ReferenceSpec = REFERENCE_SPEC):
    """The `LlavaConfig` for `spec`; the vision feature layer is the last one, so no CLIP layer is computed in vain."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_mlp, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=IMAGE_SIZE, patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden, hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=spec.num_image_tokens,
    )


def build_model(tokenizer, spec: ReferenceSpec = REFERENCE_SPEC, seed: int = 0):
    """A freshly initialised `LlavaForConditionalGeneration` for `spec`, deterministic for `seed`."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config = build_config(tokenizer, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
