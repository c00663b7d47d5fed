#!/usr/bin/env bash
# A call on the device, after the GGUF's three parts have come: issue 4's SmolLM2 rows (HF eager, standard, recycle in
# one process), then issue 5's strategies (their "tokens equal standard's" line is the bf16 bits check), with $SET
# (or profiles.sh's winners).
[ -z "${SET+x}" ] && [ -f /tmp/winners.sh ] && source /tmp/winners.sh
source scripts/device/env.sh
timeout 330 $BENCH $I4 --strategies hf_eager,standard,recycle --chart $OUT/issue4.png > $OUT/issue4.txt 2>&1
grep -v "^bench:" $OUT/issue4.txt | grep -v "^{" | tail -8
timeout 200 $BENCH $I5 --limit 5 --strategies standard,recycle-verified,speculative,tree --chart $OUT/issue5.png \
  > $OUT/issue5.txt 2>&1
grep -v "^bench:" $OUT/issue5.txt | grep -v "^{" | head -8
