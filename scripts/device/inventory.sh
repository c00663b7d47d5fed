#!/usr/bin/env bash
# A call on the device: every kernel of SmolLM2's compiled standard and recycle steps (random weights, attention over
# 512 slots), the recycle step with the full head and over the draft vocabulary, for the module's share of a step.
source scripts/device/env.sh
for V in full draft; do
  timeout 150 $PROFILE --kv-bucket 512 --top 80 --recycle-vocab $V > $OUT/inventory_$V.txt 2>&1
  grep -E "^(standard|recycle) step" $OUT/inventory_$V.txt
done
