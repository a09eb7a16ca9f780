#!/usr/bin/env bash
# Trains the default model's base (ARAD buckets), the square-only baseline and the x4 upscaler side by
# side on one GPU for MINUTES of training each, from the VAE in VAE_DIR, then exports each run's EMA
# weights (diffusers layout) and, with PACK_DIR set, packs fp16 copies there in <= 15 MiB pieces
# (what the device tool can bring back).
#
#   tools/train_gpu.sh MINUTES RUNS_DIR [VAE_DIR]     # e.g. tools/train_gpu.sh 7 runs/gpu runs/vae/model
#
# BASE_STEPS and UP_STEPS (default: no limit) stop the base runs and the upscaler at a step count
# instead, which is how the shipped weights are reproduced (the Makefile's train-default-gpu).
# Runs again with the same RUNS_DIR resume from the last checkpoints. Scene rendering is CPU work:
# each run gets WORKERS processes for it (default 5; 3 runs x (1 + 5) suit a 16-core GPU machine).
#
# Every process is held to one CPU thread: left to itself, each of the 3 trainers and 15 render workers
# starts a thread per core (torch and numpy's BLAS), and on an H100 with 16 cores that ran at a load of
# ~50 with the GPU mostly idle: 0.64 s a step (742 steps in 7.9 min at batch 256). With one thread
# each: 0.26 s a step (1861 steps in 8.1 min), data 0.10 s of it.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
MINUTES=${1:?minutes}
RUNS=${2:?runs directory}
VAE=${3:-runs/vae/model}
WORKERS=${WORKERS:-5}
PY=${PY:-python3}
BASE_BATCH=${BASE_BATCH:-256}
UP_BATCH=${UP_BATCH:-64}
BASE_STEPS=${BASE_STEPS:-1000000}
UP_STEPS=${UP_STEPS:-1000000}
mkdir -p "$RUNS"
common=(--workers "$WORKERS" --max-minutes "$MINUTES" --checkpoint-every 1000 --quiet)
base=(--vae "$VAE" --batch-size "$BASE_BATCH" --steps "$BASE_STEPS" "${common[@]}")
$PY -m anysize train base -o "$RUNS/base" --buckets arad "${base[@]}" >"$RUNS/base.log" 2>&1 &
$PY -m anysize train base -o "$RUNS/base-square" --buckets square "${base[@]}" >"$RUNS/base-square.log" 2>&1 &
$PY -m anysize train upscaler -o "$RUNS/upscaler" --vae "$VAE" --batch-size "$UP_BATCH" --steps "$UP_STEPS" "${common[@]}" \
    >"$RUNS/upscaler.log" 2>&1 &
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
for run in base base-square upscaler; do
    echo "$run: $(tail -n 1 "$RUNS/$run/log.jsonl")"
    tail -n 3 "$RUNS/$run.log"
done
[ "$status" = 0 ] || exit 1
if [ -n "${PACK_DIR:-}" ]; then
    PYTHONPATH="$(dirname "$0")${PYTHONPATH:+:$PYTHONPATH}" $PY -c '
import sys
from ship_default import save_fp16
for run in ("base", "base-square", "upscaler"):
    save_fp16(f"{sys.argv[1]}/{run}/model", f"{sys.argv[1]}/fp16/{run}")
' "$RUNS"
    mkdir -p "$PACK_DIR"
    for run in base base-square upscaler; do
        cp "$RUNS/$run/log.jsonl" "$RUNS/fp16/$run.jsonl"
        cp "$RUNS/$run.log" "$RUNS/fp16/$run.log"
    done
    tar -C "$RUNS" -cf - fp16 | split -b 15m - "$PACK_DIR/models.tar."
fi
