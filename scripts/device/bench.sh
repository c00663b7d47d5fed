#!/usr/bin/env bash
# A call on the device, once the GGUF's parts have come: issue 4's SmolLM2 rows (HF eager, standard, recycle in one
# process), then standard and recycle with the module's tokens over its draft vocabulary (--recycle-vocab draft),
# each run with α, and with $SET (or profiles.sh's winners).
[ -z "${SET+x}" ] && [ -f /tmp/winners.sh ] && source /tmp/winners.sh
source scripts/device/env.sh
B4=${BENCH/ --no-alpha/}
# WARM=1: a short run first, so that the compiles (the prompt's dynamic one takes minutes on a cold inductor cache)
# are cached on disk before the timed runs start, on a fresh machine
[ -n "${WARM:-}" ] && timeout 420 $BENCH $I4 --limit 1 --strategies standard,recycle \
  > /tmp/warm.txt 2>&1  # not in $OUT: a call brings back at most 8 files
# RUNS: which of the two runs ("full draft", the default; one of them where a call has no time for both)
if [[ " ${RUNS:-full draft} " == *" full "* ]]; then
  timeout 330 $B4 $I4 --strategies hf_eager,standard,recycle --chart $OUT/issue4.png > $OUT/issue4.txt 2>&1
  grep -v "^bench:" $OUT/issue4.txt | grep -v "^{" | tail -8
fi
if [[ " ${RUNS:-full draft} " == *" draft "* ]]; then
  timeout 200 $B4 $I4 --strategies standard,recycle --recycle-vocab draft --chart $OUT/issue4_draft.png \
    > $OUT/issue4_draft.txt 2>&1
  grep -v "^bench:" $OUT/issue4_draft.txt | grep -v "^{" | tail -8
fi
