"""Export a configured model: HF files + `mmkit_config.json` (+ learned method state), reloadable with `mmkit.load`.

The directory is assembled under a temporary name beside the target and renamed into place at the end, so an
interrupted export never leaves a directory that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmkit.errors import MmkitError

MMKIT_CONFIG = "mmkit_config.json"
FORMAT_VERSION = 1


def save_session(session, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the session's model, processor, method configs and learned method state to `out_dir`."""
    from safetensors.torch import save_file

    from mmkit import __version__
    from mmkit.registry import config_to_dict

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MmkitError(f"{out} exists and is not empty; pick a new --out directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        attn = session.model.config.text_config._attn_implementation
        session.model.save_pretrained(tmp)
        session.processor.save_pretrained(tmp)
        methods: list[dict[str, Any]] = []
        for i, handle in enumerate(session.methods):
            entry = config_to_dict(getattr(handle.impl, "export_config", lambda: handle.config)())
            state = handle.impl.export_state() if hasattr(handle.impl, "export_state") else None
            if state:
                filename = f"method_{i}_{handle.info.name}.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / filename))
                entry["state"] = filename
            methods.append(entry)
        manifest = {"format": FORMAT_VERSION, "mmkit_version": __version__, "base_model": session.source,
                    "text_attn_implementation_at_export": attn, "methods": methods}
        (tmp / MMKIT_CONFIG).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
    return manifest


def apply_manifest(session, directory: Path, manifest: dict[str, Any]) -> None:
    """Re-apply exported methods, in order, restoring their learned state."""
    from safetensors.torch import load_file

    from mmkit.registry import config_from_dict

    for entry in manifest["methods"]:
        handle = session.apply(config_from_dict(entry))
        if entry.get("state"):
            if not hasattr(handle.impl, "load_state"):
                raise MmkitError(f"method {entry['method']} in {directory} has saved state but cannot load it")
            handle.impl.load_state(load_file(str(Path(directory) / entry["state"]), device=str(session.device)))
