#!/usr/bin/env bash
# The CPU joint-training experiment (docs/training.md): a RecycleGPT (preset gutenberg-small + the default 1-layer
# module) and the same base without the module, trained from scratch side by side on the Gutenberg books, one
# thread each. Both runs train the same byte-level BPE (8192) on the books, see the same batches and start from the
# same base initialisation. Curves: OUT/{joint,baseline}/metrics.jsonl; table: scripts/training_table.py OUT.
# usage: [STEPS=200] scripts/gutenberg_joint.sh [BOOKS_DIR] [OUT]
set -euo pipefail
books=${1:-../shared/data/corpora/gutenberg/books}
out=${2:-runs/gutenberg-cli}
steps=${STEPS:-200}
mkdir -p "$out"
common=(--preset gutenberg-small --steps "$steps" --batch-size 16 --seq-len 128 --lr 3e-3 --min-lr 3e-4 --warmup 20
        --eval-every $((steps / 5)) --eval-batches 8 --save-every 50 --val-fraction 0.03 --seed 1234
        --token-cache runs/token_cache --no-progress)
OMP_NUM_THREADS=1 recyclegpt train "$books/*.txt" --out "$out/joint" "${common[@]}" > "$out/joint.log" 2>&1 &
OMP_NUM_THREADS=1 recyclegpt train "$books/*.txt" --out "$out/baseline" --no-module "${common[@]}" \
  > "$out/baseline.log" 2>&1 &
wait
