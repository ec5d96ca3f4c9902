"""Rebuild run 3v: run 3's language model and projector (`training/reference-detailed-run3`) under the shipped
reference model's vision tower (the 71 vision-tower tensors), as an HF directory.

    .venv/bin/python training/rebuild_run3v.py [OUT]     # default OUT: runs/run3v

No training: the output is a deterministic function of the two stored weight files. Figures for it are in
docs/reference-model.md ("Where the POPE loss comes from: the vision tower").
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
RUN3 = ROOT / "training" / "reference-detailed-run3"
SHIPPED = ROOT / "mmkit" / "models" / "weights" / "reference" / "model.safetensors"


def main(out: Path) -> None:
    weights = load_file(RUN3 / "model.safetensors")
    shipped = load_file(SHIPPED)
    tower = [k for k in weights if k.startswith("vision_tower.")]
    if len(tower) != 71 or any(k not in shipped or shipped[k].shape != weights[k].shape for k in tower):
        raise SystemExit(f"{SHIPPED} does not hold the vision tower run 3 was continued from; nothing written")
    weights.update({k: shipped[k] for k in tower})
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to OUT, then renamed into place: no half-written directory.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        for f in RUN3.iterdir():
            if f.name != "model.safetensors":
                shutil.copy2(f, tmp / f.name)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} ({len(tower)} vision-tower tensors from the shipped model)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "run3v")
