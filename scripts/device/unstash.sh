#!/usr/bin/env bash
# On the lent machine, once every part has come (each call copies its carried .data/s20?/ files to /tmp/stash/): the
# nineteenth session's data as /tmp/d (distill_gpus.sh's layout, for retrofit_gpus.sh) and its modules as
# /tmp/ship/NAME (l1_init, l2_cont), with the prompt sets in /tmp/dwork/prompts for the α scores. Needs the inputs of
# prep_distill.sh in /tmp/stash/distill for the prompts (carried beside a part, as in the nineteenth session).
#   bash scripts/device/unstash.sh
set -euo pipefail
S=${STASH:-/tmp/stash}
cat $S/data_a? | xz -d | tar x -C /tmp
mkdir -p /tmp/ship && for t in $S/*.tar; do tar xf "$t" -C /tmp; done
mkdir -p /tmp/dwork && tar xJf $S/distill/prompts.tar.xz -C /tmp/dwork
echo "data: $(ls /tmp/d | grep -vc log) streams, $(cat /tmp/d/*/*.jsonl | wc -l) records; modules: $(ls /tmp/ship)"
