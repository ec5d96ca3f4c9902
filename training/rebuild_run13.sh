#!/usr/bin/env bash
# Rebuild run 13, the shipped reference model, from stored files and three CPU trainings (docs/reference-model.md,
# "Runs 12c to 12f and run 13"). Training is deterministic for a seed on CPU, so the output equals the shipped
# weights. About 70 minutes on a 2-core machine: 9r90b and 12a run side by side on one thread each, then 12c.
#
#     bash training/rebuild_run13.sh [OUT]        # default OUT: runs/run13; intermediate runs go to runs/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/run13}
PY=${PY:-.venv/bin/python}
MMKIT=${MMKIT:-.venv/bin/mmkit}
export OMP_NUM_THREADS=1
mkdir -p runs

# Run 3v: run 3's projector and language model under the first model's vision tower (run 13 kept that tower).
"$PY" training/rebuild_run3v.py runs/run3v
common=(--device cpu --freeze-vision --captions detailed --detailed-share 0.25 --answer-loss sample --batch 16
        --workers 1 --checkpoint-every 100 --eval-every 0 --eval-scenes 0 --log-every 20
        --caption-noise 0.9 --caption-noise-place relation)
"$MMKIT" train-reference --init runs/run3v "${common[@]}" --steps 0,0,400 --warmup 20 --scene-offset 7000000 \
    --lr 2e-4 --out runs/reference-detailed-9r90b &
first=$!
"$MMKIT" train-reference --init runs/run3v "${common[@]}" --steps 0,0,400 --warmup 20 --scene-offset 7000000 \
    --lr 2e-4 --pope-negatives random=1,adversarial=1 --out runs/reference-detailed-12a
"$MMKIT" train-reference --init runs/reference-detailed-12a "${common[@]}" --steps 0,0,200 --warmup 10 \
    --scene-offset 7100000 --pope-negatives random=1,adversarial=1 --lr 1e-4 --out runs/reference-detailed-12c
wait "$first"
"$PY" training/average_weights.py "$OUT" runs/reference-detailed-9r90b runs/reference-detailed-12c
