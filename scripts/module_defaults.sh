#!/usr/bin/env bash
# Choose RecycleConfig's defaults by measurement: retrofit a module on SmolLM2-135M-Instruct (frozen, bf16) for
# each (hidden, input_norm) variant with the same data, steps and seed, and print one JSON line of final metrics each.
# usage: scripts/module_defaults.sh 'TEXT_FILES_GLOB' OUT_DIR [extra retrofit flags]
set -euo pipefail
files=$1; out=$2; shift 2
mkdir -p "$out"
for hidden in pre_norm post_norm; do
  for norm in input-norm no-input-norm; do
    run=$out/$hidden-$norm
    start=$(date +%s.%N)
    recyclegpt retrofit "$files" --out "$run" --hidden $hidden --$norm --no-progress "$@" | tail -n 1 > "$run.last.json"
    secs=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
    python3 -c "import json; m=json.load(open('$run.last.json')); print(json.dumps({'hidden': '$hidden', 'norm': '$norm', 'seconds': $secs, **{k: v for k, v in m.items() if k.startswith('val_') or k == 'step'}}))"
  done
done
