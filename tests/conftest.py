import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_session():
    import mmkit

    session = mmkit.load("tiny-random", device="cpu")
    yield session
    session.close()


@pytest.fixture
def session(tiny_session):
    """The shared tiny session, guaranteed method-free before and after each test."""
    tiny_session.remove_all()
    yield tiny_session
    tiny_session.remove_all()


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return [(rng.random((112, 112, 3)) * 255).astype("uint8") for _ in range(3)]


PROMPTS = ["What is in the image?", "Describe the image in detail, please.", "Count the objects."]


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


def forward_logits(session, inputs):
    with torch.inference_mode():
        return session.model(**inputs).logits


def tiny_clip(path):
    """Save a small random CLIP checkpoint (CLIPModel + CLIPProcessor) at `path`."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        vocab.setdefault(chr(code), len(vocab))
        vocab.setdefault(chr(code) + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


BLIP_WORDS = ["what", "is", "in", "the", "image", "describe", "detail", "please", "count", "objects", "a", "there",
              "dog", "cat", "red", "blue", "picture", "of"]


def tiny_blip(path):
    """Save a small random BLIP image-text matching checkpoint (BlipForImageTextRetrieval + BlipProcessor with a
    word-level BertTokenizer and the PIL image processor) at `path`."""
    import os

    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    os.makedirs(path, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", "?", ",", "."]
    words += [chr(code) for code in range(ord("a"), ord("z") + 1)] + BLIP_WORDS
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as handle:
        handle.write("\n".join(words) + "\n")
    tokenizer = BertTokenizer(vocab, bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=5, sep_token_id=3, initializer_range=0.3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, initializer_range=0.3),
        projection_dim=16, image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    BlipForImageTextRetrieval(config).save_pretrained(path)
    image_processor = BlipImageProcessorPil(size={"height": 64, "width": 64})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
