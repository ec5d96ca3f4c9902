"""Resolve a model argument (built-in name, local directory, hub id) to a loaded HF model and processor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmkit.errors import MmkitError, UnsupportedModelError
from mmkit.models.adapters import SUPPORTED_ARCHITECTURES
from mmkit.models.builtin import BUILTIN_NAMES as _BASE_BUILTINS
from mmkit.models.builtin import build_tiny_random, build_tiny_random_next, reference_dir
from mmkit.models.builtin_families import FAMILY_BUILTIN_NAMES, build_family_builtin
from mmkit.models.families import MODEL_TYPES as _MODEL_TYPES
from mmkit.models.processors import STOCK_PROCESSORS, load_family_processor

logger = logging.getLogger(__name__)

BUILTIN_NAMES = (*_BASE_BUILTINS, *FAMILY_BUILTIN_NAMES)
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


def load_model_and_processor(model: str, device=None, dtype=None, attn_implementation: str | dict | None = None,
                              device_map=None, quantization_config=None, offload_folder=None):
    """Load `model` (built-in name, local dir or hub id). Returns (model, processor, source string).

    `attn_implementation`, `device_map`, `quantization_config` and `offload_folder` (for "disk" entries of a device
    map) go to `from_pretrained` unchanged (`attn_implementation` may be a dict per sub-config, as transformers
    takes it); with a `device_map` the model stays where accelerate placed it (`device` is then ignored). Built-in
    models are built in memory: they take `attn_implementation`, not a device map or quantization.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device) if device_map is None else None
    load_options = {k: v for k, v in (("attn_implementation", attn_implementation), ("device_map", device_map),
                                      ("quantization_config", quantization_config),
                                      ("offload_folder", offload_folder)) if v is not None}
    if not isinstance(model, str) or not model.strip():
        raise MmkitError(f"model must be a built-in name ({', '.join(BUILTIN_NAMES)}), a local directory or a hub id")
    if model == "tiny-random":
        hf_model, processor = build_tiny_random()
        source = "tiny-random"
    elif model == "tiny-random-next":
        hf_model, processor = build_tiny_random_next()
        source = "tiny-random-next"
    elif model in FAMILY_BUILTIN_NAMES:
        hf_model, processor = build_family_builtin(model)
        source = model
    else:
        path = reference_dir() if model == "reference" else Path(model).expanduser()
        if model != "reference" and _looks_like_path(model) and not path.is_dir():
            raise MmkitError(
                f"model {model!r} is not a directory, a built-in name ({', '.join(BUILTIN_NAMES)}) or a hub id"
            )
        hf_model, processor = _from_pretrained(str(path) if path.is_dir() else model, torch_dtype, load_options)
        source = model
    if model in BUILTIN_NAMES and model != "reference":
        unsupported = sorted(set(load_options) - {"attn_implementation"})
        if unsupported:
            raise MmkitError(f"{', '.join(unsupported)} applies to checkpoints loaded from disk, not the built-in "
                             f"{model!r}; save it with `save_pretrained` and load the directory")
        if attn_implementation is not None:
            _set_attn_implementation(hf_model, attn_implementation)
    if dev is not None and "quantization_config" not in load_options:
        if torch_dtype is not None:
            hf_model = hf_model.to(torch_dtype)
        hf_model = hf_model.to(dev)
    return hf_model.eval(), processor, source


def _first_sentence(err: Exception) -> str:
    """transformers' errors run to several sentences of advice; a one-line error keeps the statement."""
    line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return line.split(". ")[0].rstrip(".")


def _set_attn_implementation(hf_model, name) -> None:
    try:
        hf_model.set_attn_implementation(name)
    except (ValueError, ImportError) as err:
        raise MmkitError(f"attention implementation {name!r} cannot run here: {_first_sentence(err)}") from None


def _from_pretrained(name: str, torch_dtype, load_options: dict | None = None):
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
    kwargs = dict(load_options or {})
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        hf_model = cls.from_pretrained(name, **kwargs)
    except OSError as err:
        raise MmkitError(f"cannot load model files from {name!r}: {str(err).splitlines()[0]}") from None
    except (ValueError, ImportError) as err:
        # Unknown or unavailable attention implementation, a device map that does not fit, a missing quantizer.
        raise MmkitError(f"cannot load {name!r} with {', '.join(sorted(kwargs)) or 'these settings'}: "
                         f"{_first_sentence(err)}") from None
    try:
        if arch in STOCK_PROCESSORS:
            processor = load_family_processor(name, arch)
        else:
            processor = AutoProcessor.from_pretrained(name)
    except OSError as err:
        raise MmkitError(f"cannot load processor files from {name!r}: {str(err).splitlines()[0]}") from None
    _check_image_token(processor, hf_model.config, name)
    if getattr(processor.tokenizer, "padding_side", "left") != "left":
        # Batched generation appends new tokens on the right, so prompts must be padded on the left.
        processor.tokenizer.padding_side = "left"
    return hf_model, processor


def _check_image_token(processor, config, name: str) -> None:
    """The tokenizer must map the processor's image placeholder to the model's image token id; otherwise image
    spans would be found in the wrong place (or nowhere). A missing tokenizer file makes transformers build an
    empty tokenizer, which this catches."""
    tokenizer = getattr(processor, "tokenizer", None)
    token = getattr(processor, "image_token", None)
    expected = getattr(config, "image_token_id", None)
    if tokenizer is None or token is None or expected is None:
        return
    got = tokenizer.convert_tokens_to_ids(token)
    if got != expected:
        raise MmkitError(f"the tokenizer in {name!r} maps the image token {token!r} to {got}, but config.json says "
                         f"{expected}; the tokenizer files are missing or belong to another model")
