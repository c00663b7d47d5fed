#!/usr/bin/env bash
# A call on the device, once the GGUF's parts have come: issue 4's batch rows (standard and recycle at batch 8 and 32,
# the compiled engine; batches of more than 4 rows take cuBLAS), 64 prompts of different lengths (16 of each of the
# four prompt copies, in one file: per-file categories need batch 1), with $SET (or profiles.sh's winners).
[ -z "${SET+x}" ] && [ -f /tmp/winners.sh ] && source /tmp/winners.sh
source scripts/device/env.sh
for f in .data/device/*.jsonl; do head -16 "$f"; done > /tmp/mix64.jsonl
for B in 8 32; do
  timeout 250 ${BENCH/--limit 20/--limit 64} --prompts /tmp/mix64.jsonl --batch-size $B --strategies standard,recycle \
    > $OUT/batch$B.txt 2>&1
  grep -v "^bench:" $OUT/batch$B.txt | grep -v "^{" | head -6
done
