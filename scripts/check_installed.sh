#!/usr/bin/env bash
# Use mmkit as a user who installed the package, not the checkout: build the wheel, install it with the pinned
# dependencies into a separate virtual environment, and from a directory outside the repository run every
# command's --help, `mmkit methods`, `mmkit info`, a short `mmkit eval`, `mmkit generate` with a method,
# `python -m mmkit`, `mmkit export` followed by a reload, and lmms-eval finding the plug-in through its entry point.
#
# The environment's dependencies are kept between runs (WHEEL_VENV, default .venv-wheel, rebuilt when the lock
# files change); the mmkit wheel itself is rebuilt and reinstalled every run.
set -euo pipefail
# Engineers run the suite with the checkout on PYTHONPATH; it would shadow the installed wheel under test.
unset PYTHONPATH
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE_PYTHON=${PYTHON:-python3}
VENV=${WHEEL_VENV:-$ROOT/.venv-wheel}
PIP_FLAGS=(-q --disable-pip-version-check --no-warn-conflicts)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmkit-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

step() { printf '== %s\n' "$*"; }

lock_sum=$(cat "$ROOT/requirements.lock" "$ROOT/requirements-lmms.lock" "$ROOT/scripts/install_lmms.sh" | cksum)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.deps" 2>/dev/null)" != "$lock_sum" ]; then
    step "fresh environment $VENV with the pinned dependencies"
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" torch==2.13.0
    "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -r "$ROOT/requirements.lock"
    PYTHON="$VENV/bin/python" bash "$ROOT/scripts/install_lmms.sh"
    echo "$lock_sum" > "$VENV/.deps"
fi
PY="$VENV/bin/python"
MMKIT="$VENV/bin/mmkit"

step "build the wheel"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps "$ROOT" -w "$WORK/dist" >/dev/null
wheel=$(ls "$WORK"/dist/mmkit_vlm-*.whl)
"$PY" -m pip uninstall -q -y mmkit-vlm >/dev/null 2>&1 || true
# With the lock, so pip checks the wheel's declared dependencies against the pinned set.
"$PY" -m pip install "${PIP_FLAGS[@]}" -r "$ROOT/requirements.lock" "$wheel"

USER_DIR="$WORK/user"
mkdir -p "$USER_DIR"
cd "$USER_DIR"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$WORK/hf" MPLBACKEND=Agg

step "the installed package is imported, not the checkout"
"$PY" - "$ROOT" <<'PY'
import sys
from pathlib import Path
import mmkit
where = Path(mmkit.__file__).resolve()
assert where.parent != Path(sys.argv[1]) / "mmkit", f"mmkit imported from the checkout: {where}"
assert "site-packages" in where.parts, where
print(where.parent)
PY

step "mmkit --help and every command's --help"
"$MMKIT" --help >/dev/null
commands=$("$PY" -c "
import click
from mmkit.cli import main
print(' '.join(main.list_commands(click.Context(main))))")
for cmd in $commands; do
    "$MMKIT" "$cmd" --help >/dev/null || { echo "mmkit $cmd --help failed" >&2; exit 1; }
done
echo "commands: $commands"
"$PY" -m mmkit --help >/dev/null

step "mmkit methods, mmkit info"
"$MMKIT" methods > methods.txt
grep -q "^fastv " methods.txt
"$MMKIT" info --model reference > info.txt
grep "^architecture" info.txt

step "mmkit eval (reference model, 16 POPE questions, FastV)"
"$MMKIT" eval --model reference --bench pope --split random --limit 16 --method fastv:layer=2,keep=0.25 \
    --out "$USER_DIR/eval" >/dev/null
"$PY" - "$USER_DIR/eval" <<'PY'
import json, sys
from pathlib import Path
result = json.loads((Path(sys.argv[1]) / "results.json").read_text())
assert 0.0 <= result["metrics"]["f1"] <= 1.0
assert result["efficiency"]["visual_tokens_kept"] < result["efficiency"]["visual_tokens"]
samples = (Path(sys.argv[1]) / "samples.jsonl").read_text().splitlines()
assert len(samples) == 16, len(samples)
print("f1", round(result["metrics"]["f1"], 3), "over", len(samples), "questions")
PY

step "mmkit generate with a method"
"$PY" -c "from mmkit.world.scenes import generate_scene; generate_scene(1, 0).image.save('scene.png')"
"$MMKIT" generate --image scene.png --prompt "Describe the image briefly." --method fastv:layer=2,keep=0.25 \
    --max-new-tokens 12 --json > gen.json
"$PY" -c "
import json
out = json.load(open('gen.json'))
out = out[0] if isinstance(out, list) else out
assert out['text'].strip(), out
print('answer:', out['text'])"

step "mmkit export and reload"
"$MMKIT" export --model reference --method fastv:layer=2,keep=0.25 --out exported >/dev/null
"$PY" - <<'PY'
import mmkit
direct = mmkit.load("reference", methods=["fastv:layer=2,keep=0.25"])
loaded = mmkit.load("exported")
assert [h.spec for h in loaded.methods] == [h.spec for h in direct.methods], [h.spec for h in loaded.methods]
prompt = ["Is there a cup in the image?"]
a = direct.answer_logprobs(["scene.png"], prompt).logprobs
b = loaded.answer_logprobs(["scene.png"], prompt).logprobs
assert a == b, (a, b)
print("reloaded:", [h.spec for h in loaded.methods])
PY

step "lmms-eval finds the plug-in through its entry point"
tasks=$("$PY" -c "import mmkit.evals, pathlib; print(pathlib.Path(mmkit.evals.__file__).parent / 'tasks')")
"$PY" -m lmms_eval --model mmkit --model_args pretrained=reference --tasks mmkit_pope_random \
    --include_path "$tasks" --limit 4 --batch_size 4 --output_path "$USER_DIR/lmms" > lmms.log 2>&1 \
    || { tail -30 lmms.log >&2; exit 1; }
find "$USER_DIR/lmms" -name '*results*.json' | grep -q . \
    || { echo "lmms-eval wrote no results" >&2; tail -30 lmms.log >&2; exit 1; }

step "installed package: all checks passed"
