"""Processors for the LLaVA-OneVision and Qwen-VL families, with or without torchvision.

The stock `LlavaOnevisionProcessor`, `Qwen2VLProcessor`, `Qwen2_5_VLProcessor` and `Qwen3VLProcessor` require a video
processor, and building one needs torchvision. Their image processors have a PIL backend, so where the stock
processor cannot be built, mmkit uses an image-only subclass: the same class with only the image processor and the
tokenizer as attributes. It expands image placeholders exactly as the stock processor does (the expansion code is
the stock class's own) and saves a `processor_config.json` that names the stock class, so a user with torchvision
who loads the saved directory gets the stock processor.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

# Architecture -> the stock processor class name.
STOCK_PROCESSORS = {
    "LlavaOnevisionForConditionalGeneration": "LlavaOnevisionProcessor",
    "Qwen2VLForConditionalGeneration": "Qwen2VLProcessor",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
    "Qwen3VLForConditionalGeneration": "Qwen3VLProcessor",
}
# Processor settings that are not sub-processors (read from processor_config.json when present).
_PROCESSOR_KWARGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token")


@lru_cache(maxsize=None)
def image_only_class(stock_name: str):
    """A subclass of the stock processor `stock_name` whose only attributes are the image processor and tokenizer."""
    import transformers

    stock = getattr(transformers, stock_name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The stock __init__ sets the token attributes and then hands its three sub-processors to ProcessorMixin,
        # which pairs them with this class's two attributes; the missing video processor is simply not set.
        stock.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self):
        data = stock.to_dict(self)
        data["processor_class"] = stock_name  # saved directories name the stock class
        # The base class saves only the settings its own __init__ names; keep the stock class's settings too.
        data.update({k: getattr(self, k) for k in _PROCESSOR_KWARGS if getattr(self, k, None) is not None})
        return data

    cls = type(f"{stock_name}ImageOnly", (stock,), {"__init__": __init__, "to_dict": to_dict,
                                                      "__module__": __name__, "stock_name": stock_name})
    return cls


def image_only_processor(architecture: str, image_processor, tokenizer, chat_template=None, **kwargs):
    """The image-only processor of `architecture` from its image processor and tokenizer."""
    cls = image_only_class(STOCK_PROCESSORS[architecture])
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def load_family_processor(path: str, architecture: str):
    """The stock processor of a local checkpoint when it can be built (torchvision present), else the image-only one
    built from the same files (`preprocessor_config.json`, tokenizer files, chat template, processor settings)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, ValueError, TypeError, AttributeError, KeyError, OSError) as err:
        logger.info("stock processor for %s unavailable (%s); using the image-only processor",
                    architecture, str(err).splitlines()[0] if str(err) else type(err).__name__)
    return build_image_only_from_dir(path, architecture)


def build_image_only_from_dir(path: str, architecture: str):
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = _processor_settings(Path(path))
    chat_template = settings.pop("chat_template", None) or getattr(tokenizer, "chat_template", None)
    return image_only_processor(architecture, image_processor, tokenizer, chat_template=chat_template, **settings)


def _processor_settings(path: Path) -> dict:
    """Non-sub-processor settings and the chat template as a checkpoint directory stores them."""
    settings: dict = {}
    config_file = path / "processor_config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text())
        settings.update({k: data[k] for k in _PROCESSOR_KWARGS if k in data})
    for name in ("chat_template.jinja", "chat_template.json"):
        template_file = path / name
        if template_file.is_file():
            text = template_file.read_text()
            settings["chat_template"] = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    return settings
