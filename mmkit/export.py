"""Export a configured model: HF files + `mmkit_config.json` (+ learned method state), reloadable with `mmkit.load`.

The directory is assembled under a temporary name beside the target and renamed into place at the end, so an
interrupted export never leaves a directory that loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mmkit.contract import ExportsConfig, ExportsState
from mmkit.errors import MmkitError

MMKIT_CONFIG = "mmkit_config.json"
FORMAT_VERSION = 1
REMOTE_CODE_FILE = "modeling_mmkit.py"
# The remote-code class of each supported architecture (what `auto_map` names in an export's config.json), with the
# model type whose checkpoint layout it shares.
_REMOTE_ARCHITECTURES = (("LlavaForConditionalGeneration", "llava"), ("LlavaNextForConditionalGeneration", "llava_next"),
                         ("LlavaOnevisionForConditionalGeneration", "llava_onevision"),
                         ("Qwen2VLForConditionalGeneration", "qwen2_vl"),
                         ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
                         ("Qwen3VLForConditionalGeneration", "qwen3_vl"))
REMOTE_CLASSES = {arch: f"Mmkit{arch}" for arch, _ in _REMOTE_ARCHITECTURES}

# Written into an export made with remote_code=True: plain transformers loads it with trust_remote_code=True and
# the exported methods come back attached to the model, so `model.generate` runs with them.
_REMOTE_CODE_HEAD = '''"""Remote code of an mmkit export: `AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)`
loads the model with plain transformers and re-attaches the methods in mmkit_config.json (scoped hooks on this
instance), so `model.generate(**processor(...))` runs with them. Needs the mmkit-vlm package; `model.mmkit_session`
is the session that owns the hooks (`model.mmkit_session.close()` detaches them)."""

from transformers import {imports}


def _attach(model, source):
    try:
        from mmkit.export import attach_exported_methods
    except ImportError as err:
        raise ImportError("this model was exported by mmkit with methods that run inside its forward; "
                          "`pip install mmkit-vlm` to load it with trust_remote_code=True") from err
    return attach_exported_methods(model, source)
'''
_REMOTE_CODE_CLASS = '''

class {remote}({stock}):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return _attach(model, pretrained_model_name_or_path)
'''
_REMOTE_CODE_TAIL = '''

def _share_checkpoint_layout():
    # transformers renames checkpoint keys per class; remote-code classes get no renaming unless registered, and
    # these are the stock classes' layouts.
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    for cls, stock, model_type in ({pairs}):
        # Some layouts are registered under the stock class name (Qwen-VL), others under the model type (LLaVA).
        mapping = get_checkpoint_conversion_mapping(stock) or get_checkpoint_conversion_mapping(model_type)
        if mapping:
            register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


_share_checkpoint_layout()
'''


def remote_code_source(architecture: str) -> str:
    """The `modeling_mmkit.py` of an export of `architecture`: one class, subclassing the stock one."""
    remote = REMOTE_CLASSES[architecture]
    model_type = dict(_REMOTE_ARCHITECTURES)[architecture]
    return (_REMOTE_CODE_HEAD.format(imports=architecture)
            + _REMOTE_CODE_CLASS.format(remote=remote, stock=architecture)
            + _REMOTE_CODE_TAIL.format(pairs=f"({remote}, {architecture!r}, {model_type!r}),"))


def save_session(session, out_dir: str | os.PathLike, overwrite: bool = False, remote_code: bool = False) -> Path:
    """Write the session's model, processor, method configs and learned method state to `out_dir`.

    remote_code: also write `modeling_mmkit.py` and an `auto_map` in config.json, so that plain transformers
    (`AutoModelForImageTextToText.from_pretrained(out_dir, trust_remote_code=True)`) loads the model with its methods
    attached and `model.generate` runs them. Every method whose effect lives in the model's forward supports this;
    methods that add decoding branches (VCD, AGLA, VHR) run in `Session.generate` only and are refused.
    """
    from safetensors.torch import save_file

    from mmkit import __version__
    from mmkit.atomic import atomic_directory
    from mmkit.registry import config_to_dict

    out = Path(out_dir)
    if remote_code:
        # Branching methods combine several forwards per step in Session.generate.
        branched = [h.spec for h in session.methods if h.info.capabilities.branches_logits]
        if branched:
            raise MmkitError(f"{', '.join(branched)} decode with extra branches inside Session.generate, which plain "
                             "transformers' generate does not run; export them without --remote-code")
    if out.exists() and not out.is_dir():
        raise MmkitError(f"{out} is a file, not a directory; pick a new --out directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MmkitError(f"{out} exists and is not empty; pick a new --out directory (or overwrite)")
    with atomic_directory(out) as tmp:
        attn = session.model.config.text_config._attn_implementation
        session.model.save_pretrained(tmp)
        session.processor.save_pretrained(tmp)
        methods: list[dict[str, Any]] = []
        for i, handle in enumerate(session.methods):
            impl = handle.impl
            entry = config_to_dict(impl.export_config() if isinstance(impl, ExportsConfig) else handle.config)
            files = _carry_files(handle, entry, tmp, f"method_{i}_{handle.info.name}")
            if files:
                entry["files"] = files
            state = impl.export_state() if isinstance(impl, ExportsState) else None
            if state:
                filename = f"method_{i}_{handle.info.name}.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / filename))
                entry["state"] = filename
            methods.append(entry)
        manifest = {"format": FORMAT_VERSION, "mmkit_version": __version__, "base_model": session.source,
                    "text_attn_implementation_at_export": attn, "methods": methods, "remote_code": remote_code}
        (tmp / MMKIT_CONFIG).write_text(json.dumps(manifest, indent=2))
        if remote_code:
            (tmp / REMOTE_CODE_FILE).write_text(remote_code_source(session.adapter.architecture))
            config = json.loads((tmp / "config.json").read_text())
            name = REMOTE_CLASSES[session.adapter.architecture]
            config["auto_map"] = {"AutoModelForImageTextToText": f"{REMOTE_CODE_FILE[:-3]}.{name}"}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _local_source(value: str) -> Path | None:
    """The local file or directory behind a config value: the path itself, or for a hub id the snapshot that
    from_pretrained loaded it from (the local Hugging Face cache); None if neither exists."""
    source = Path(value).expanduser()
    if source.exists():
        return source
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(value, local_files_only=True))
    except Exception:  # not a valid repo id, or not cached: the caller says what to fix
        return None


def _carry_files(handle, entry: dict[str, Any], tmp: Path, prefix: str) -> dict[str, str]:
    """Copy the local files or directories a method's config points at (fields marked `"export": "copy"`; a hub id
    is copied from its cached snapshot) into the export, so that it does not depend on paths outside it. Returns
    {field: name inside the export}."""
    import dataclasses

    files = {}
    for f in dataclasses.fields(handle.config):
        value = entry["config"].get(f.name)
        if f.metadata.get("export") != "copy" or not value:
            continue
        source = _local_source(value)
        if source is None:
            raise MmkitError(f"{handle.info.name}: {f.name}={value} no longer exists as a local path and is not a "
                             "checkpoint in the local Hugging Face cache, so the export cannot carry it; point it at "
                             "the files again or export without this method")
        name = f"{prefix}_{f.name}"
        if source.is_dir():
            shutil.copytree(source, tmp / name)
        else:
            shutil.copy2(source, tmp / name)
        files[f.name] = name
        entry["config"][f.name] = None  # filled with the export's own copy when it is loaded
    return files


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MMKIT_CONFIG
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MmkitError(f"{path} is not valid JSON ({err.msg}); re-export the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "methods" not in manifest:
        raise MmkitError(f"{path} is not an mmkit export of format {FORMAT_VERSION}; re-export the model")
    for entry in manifest["methods"]:
        state = entry.get("state")
        if state and not (Path(directory) / state).is_file():
            raise MmkitError(f"export {directory} is incomplete: {state} is missing; re-export the model")
        for name in entry.get("files", {}).values():
            if not (Path(directory) / name).exists():
                raise MmkitError(f"export {directory} is incomplete: {name} is missing; re-export the model")
    return manifest


def apply_manifest(session, directory: Path, manifest: dict[str, Any]) -> None:
    """Re-apply exported methods, in order, restoring their learned state."""
    from safetensors.torch import load_file

    from mmkit.registry import config_from_dict

    for entry in manifest["methods"]:
        if entry.get("files"):
            entry = {**entry, "config": {**entry["config"],
                                         **{k: str(Path(directory) / name) for k, name in entry["files"].items()}}}
        handle = session.apply(config_from_dict(entry))
        if entry.get("state"):
            if not isinstance(handle.impl, ExportsState):
                raise MmkitError(f"method {entry['method']} in {directory} has saved state but cannot load it")
            handle.impl.load_state(load_file(str(Path(directory) / entry["state"]), device=str(session.device)))


def attach_exported_methods(model, source):
    """Re-attach an export's methods to a model that plain transformers loaded from it (the remote-code path).

    Returns the model; `model.mmkit_session` is the session owning the hooks (kept alive by the model).
    """
    from transformers import AutoProcessor
    from transformers.utils import cached_file

    from mmkit.session import Session

    manifest_file = cached_file(str(source), MMKIT_CONFIG)
    directory = Path(manifest_file).parent
    manifest = read_manifest(directory)
    if manifest is None:
        raise MmkitError(f"{source} has no {MMKIT_CONFIG}; it is not an mmkit export")
    for entry in manifest["methods"]:
        if entry.get("state"):
            cached_file(str(source), entry["state"])  # a hub export's state files land beside the manifest
    from mmkit.models.adapters import supported_base
    from mmkit.models.processors import STOCK_PROCESSORS, load_family_processor

    architecture = supported_base(model)
    if architecture in STOCK_PROCESSORS:  # the stock processor, or the image-only one without torchvision
        processor = load_family_processor(str(directory), architecture)
    else:
        processor = AutoProcessor.from_pretrained(str(source))
    processor.tokenizer.padding_side = "left"
    session = Session(model.eval(), processor, source=str(source))
    apply_manifest(session, directory, manifest)
    model.mmkit_session = session
    return model
