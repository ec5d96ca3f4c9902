"""Resolve a model argument (built-in name, local directory, hub id) to a loaded HF model and processor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmkit.errors import MmkitError, UnsupportedModelError
from mmkit.models.adapters import SUPPORTED_ARCHITECTURES
from mmkit.models.builtin import BUILTIN_NAMES, build_tiny_random, build_tiny_random_next, reference_dir

logger = logging.getLogger(__name__)

_MODEL_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise MmkitError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}") from None


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MmkitError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MmkitError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1


def load_model_and_processor(model: str, device=None, dtype=None):
    """Load `model` (built-in name, local dir or hub id). Returns (model, processor, source string)."""
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if not isinstance(model, str) or not model.strip():
        raise MmkitError(f"model must be a built-in name ({', '.join(BUILTIN_NAMES)}), a local directory or a hub id")
    if model == "tiny-random":
        hf_model, processor = build_tiny_random()
        source = "tiny-random"
    elif model == "tiny-random-next":
        hf_model, processor = build_tiny_random_next()
        source = "tiny-random-next"
    else:
        path = reference_dir() if model == "reference" else Path(model).expanduser()
        if model != "reference" and _looks_like_path(model) and not path.is_dir():
            raise MmkitError(
                f"model {model!r} is not a directory, a built-in name ({', '.join(BUILTIN_NAMES)}) or a hub id"
            )
        hf_model, processor = _from_pretrained(str(path) if path.is_dir() else model, torch_dtype)
        source = model
    if torch_dtype is not None:
        hf_model = hf_model.to(torch_dtype)
    hf_model = hf_model.to(dev).eval()
    return hf_model, processor, source


def _from_pretrained(name: str, torch_dtype):
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        raise MmkitError(f"cannot load model config from {name!r}: {str(err).splitlines()[0]}") from None
    except ValueError:
        # transformers' "Unrecognized model": a config.json without a model_type it knows.
        raise UnsupportedModelError(f"{name!r} is not a supported vision-language model (its config.json names no "
                                    f"known model_type); mmkit supports {', '.join(SUPPORTED_ARCHITECTURES)}") from None
    arch = _MODEL_TYPES.get(getattr(config, "model_type", ""))
    if arch is None:
        raise UnsupportedModelError(
            f"{name!r} is a {getattr(config, 'model_type', 'unknown')!r} model; mmkit supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    import transformers

    cls = getattr(transformers, arch)
    if not logger.isEnabledFor(logging.INFO):
        transformers.utils.logging.disable_progress_bar()  # per-tensor loading bars are noise in CLI output
    try:
        hf_model = cls.from_pretrained(name, dtype=torch_dtype) if torch_dtype else cls.from_pretrained(name)
        processor = AutoProcessor.from_pretrained(name)
    except OSError as err:
        raise MmkitError(f"cannot load model files from {name!r}: {str(err).splitlines()[0]}") from None
    if getattr(processor.tokenizer, "padding_side", "left") != "left":
        # Batched generation appends new tokens on the right, so prompts must be padded on the left.
        processor.tokenizer.padding_side = "left"
    return hf_model, processor
