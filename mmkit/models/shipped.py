"""Where the artefacts that ship with mmkit live: the reference model and the learned or tuned state of methods.

Every shipped file is found through this module, so the layout lives in one place.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name -> (directory under WEIGHTS_DIR, a file that must be there for the artefact to be installed)
ARTEFACTS = {
    "reference": ("reference", "config.json"),            # the reference LLaVA model (HF directory)
    "sam": ("sam", "config.json"),                        # the small SAM trained on the reference world
    "dyvte": ("dyvte", "reference/gates.safetensors"),    # DyVTE exit gates, one directory per model
    "visor": ("visor", "reference/visor.safetensors"),    # VISOR blocks and policy, one directory per model
    "vflowopt": ("vflowopt", "reference-0.25.json"),      # tuned VFlowOpt configurations, one JSON per name
}


def shipped_dir(name: str) -> Path:
    """Directory of the shipped artefact `name` (one of ARTEFACTS)."""
    if name not in ARTEFACTS:
        raise KeyError(f"no shipped artefact {name!r}; known: {', '.join(ARTEFACTS)}")
    return WEIGHTS_DIR / ARTEFACTS[name][0]


def missing_artefacts() -> list[str]:
    """Names of shipped artefacts absent from this install (empty for a complete one)."""
    return [name for name, (folder, marker) in ARTEFACTS.items() if not (WEIGHTS_DIR / folder / marker).is_file()]
