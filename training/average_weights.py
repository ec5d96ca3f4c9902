"""Average the weights of model directories that share one architecture and tokenizer (a uniform "model soup").

    .venv/bin/python training/average_weights.py OUT DIR DIR [DIR ...]

Run 13 (docs/reference-model.md) is the average of runs 9r90b and 12c, two continuations of the same model with the
vision tower frozen: averaging keeps each run's gain where the other lost (POPE random from 9r90b, popular and
adversarial from 12c) at a CHAIR_S between theirs.

Every tensor is averaged in float64 and cast back to its dtype; the non-weight files (config, tokenizer, chat
template) are copied from the first DIR and must be identical in all of them, so the output loads exactly like its
inputs. The output is written with `mmkit.atomic.atomic_directory`: no half-written directory.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from mmkit.atomic import atomic_directory

WEIGHTS = "model.safetensors"
# Files that define how the weights are read: averaging models that disagree on them would be meaningless.
MUST_MATCH = ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


def average_weights(dirs: list[Path], out: Path) -> Path:
    if len(dirs) < 2:
        raise ValueError("give at least two model directories to average")
    for d in dirs:
        if not (d / WEIGHTS).is_file():
            raise ValueError(f"{d} has no {WEIGHTS}: give HF model directories saved by mmkit train-reference")
    for name in MUST_MATCH:
        texts = {(d / name).read_bytes() if (d / name).is_file() else None for d in dirs}
        if len(texts) > 1:
            raise ValueError(f"{name} differs between the directories: only the same architecture and tokenizer "
                             "can be averaged")
    states = [load_file(d / WEIGHTS) for d in dirs]
    first = states[0]
    for d, state in zip(dirs[1:], states[1:]):
        if state.keys() != first.keys():
            raise ValueError(f"{d} holds other tensors than {dirs[0]}")
        for k, t in state.items():
            if t.shape != first[k].shape or t.dtype != first[k].dtype:
                raise ValueError(f"{k}: {tuple(t.shape)} {t.dtype} in {d}, {tuple(first[k].shape)} "
                                 f"{first[k].dtype} in {dirs[0]}")
    averaged = {k: (sum(s[k].double() for s in states) / len(states)).to(first[k].dtype) for k in first}
    with atomic_directory(out) as tmp:
        for f in dirs[0].iterdir():
            if f.is_file() and f.name != WEIGHTS:
                shutil.copy2(f, tmp / f.name)
        save_file(averaged, tmp / WEIGHTS, metadata={"format": "pt"})
    return out


if __name__ == "__main__":
    try:
        if len(sys.argv) < 4:
            raise ValueError("usage: average_weights.py OUT DIR DIR [DIR ...]")
        path = average_weights([Path(a) for a in sys.argv[2:]], Path(sys.argv[1]))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} (average of {len(sys.argv) - 2} models)")
