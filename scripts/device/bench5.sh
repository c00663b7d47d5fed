#!/usr/bin/env bash
# A call on the device, once the GGUF has been joined (bench.sh's call): issue 5's strategies on the four prompt sets;
# its "tokens equal standard's" line is the bf16 bits check of the lossless strategies. With $SET (or the winners).
[ -z "${SET+x}" ] && [ -f /tmp/winners.sh ] && source /tmp/winners.sh
source scripts/device/env.sh
timeout 220 $BENCH $I5 --limit 5 --strategies standard,recycle-verified,speculative,tree --chart $OUT/issue5.png \
  > $OUT/issue5.txt 2>&1
grep -v "^bench:" $OUT/issue5.txt | grep -v "^{" | head -8
