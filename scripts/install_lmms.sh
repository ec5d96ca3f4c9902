#!/usr/bin/env bash
# Install lmms-eval (for `--model mmkit` and the mmkit tasks) into the project venv without its heavy
# dependencies (torchvision, flash-attn, ...): the package itself with --no-deps, then only the pinned packages it
# imports on the paths mmkit uses (requirements-lmms.lock). Idempotent and quiet; PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
LMMS_VERSION="0.7.3"

if "$PYTHON" - "$LMMS_VERSION" <<'PY' 2>/dev/null; then exit 0; fi
import sys
from importlib.metadata import version
assert version("lmms_eval") == sys.argv[1]
import filelock._api, lmms_eval.evaluator, tenacity, pytablewriter, loguru, sacrebleu, evaluate, datasets  # noqa: F401
PY

"$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-conflicts --no-deps "lmms-eval==${LMMS_VERSION}"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-conflicts -r requirements-lmms.lock
