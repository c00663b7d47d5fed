#!/usr/bin/env bash
# Choose RecycleConfig's defaults by measurement: retrofit a 1-layer module on SmolLM2-135M-Instruct (frozen, bf16)
# for each (hidden, input_norm) variant with the same data, steps and seed, and print each run's last metrics.
# usage: scripts/module_defaults.sh TEXT_FILES_GLOB OUT_DIR [extra retrofit flags]
set -euo pipefail
files=$1; out=$2; shift 2
for hidden in pre_norm post_norm; do
  for norm in input-norm no-input-norm; do
    run=$out/$hidden-$norm
    start=$(date +%s)
    recyclegpt retrofit "$files" --out "$run" --hidden $hidden --$norm --no-progress "$@" | tail -n 1 \
      | python3 -c "import json,sys; m=json.loads(sys.stdin.read()); print(json.dumps({'hidden':'$hidden','norm':'$norm','seconds':$(date +%s)-$start, **{k:v for k,v in m.items() if k.startswith('val_') or k=='step'}}))"
  done
done
