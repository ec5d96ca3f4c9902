#!/usr/bin/env bash
# The main job of `make run`: POPE on the embedded reference model, baseline and FastV side by side, then the
# report table and plot. Runs are resumable: re-running `make run` reuses finished samples in runs/.
set -euo pipefail
MMKIT=.venv/bin/mmkit
LIMIT=${LIMIT:-300}
OUT=${OUT:-runs/main}
mkdir -p "$OUT"
$MMKIT eval --model reference --bench pope --split random --limit "$LIMIT" --out "$OUT/baseline" >/dev/null
$MMKIT eval --model reference --bench pope --split random --limit "$LIMIT" \
       --method fastv:layer=2,keep=0.25 --out "$OUT/fastv-0.25" >/dev/null
$MMKIT eval --model reference --bench pope --split random --limit "$LIMIT" \
       --method fastv:layer=2,keep=0.1 --out "$OUT/fastv-0.1" >/dev/null
$MMKIT report "$OUT/baseline" "$OUT/fastv-0.25" "$OUT/fastv-0.1" --plot "$OUT/pareto.png"
