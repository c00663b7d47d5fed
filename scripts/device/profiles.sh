#!/usr/bin/env bash
# A call on the device: the products alone (linear_bench.py, 1 and 2 rows), then SmolLM2's step profiles (random
# weights), the defaults and each switch of $SWITCHES (lines "name<TAB>SET entry<TAB>profile flags"), then the winners
# together (pick.py), over 256 and 512 slots. Leaves /tmp/winners.sh for bench.sh and tests_engines.sh; returns p_prof.tgz.
#   SWITCHES=$'merge_tile\ttriton_attention.MERGE_TILE=True\t--merge-tile' bash scripts/device/profiles.sh
source scripts/device/env.sh
rm -rf /tmp/prof && mkdir -p /tmp/prof
printf '%s\n' "$SWITCHES" | grep -v '^$' > /tmp/prof/switches.tsv
timeout 120 python3 scripts/linear_bench.py --rows 1,2 --settings ${LINEAR_SETTINGS:-default} > /tmp/prof/linear_bench_rows1_2.txt 2>&1
grep -E "^(best|mlp|gate-up with|down \(act)" /tmp/prof/linear_bench_rows1_2.txt
run() { name=$1; shift; timeout 150 $PROFILE "$@" > /tmp/prof/prof_$name.txt 2>&1
        echo "== $name: $(grep -E '^(standard|recycle) step' /tmp/prof/prof_$name.txt | awk '{print $1, $3}' | tr '\n' ' ')"
        tar czf $OUT/p_prof.tgz -C /tmp prof; }
run default
while IFS=$'\t' read -r name entry flags; do run "$name" $flags; done < /tmp/prof/switches.tsv
python3 scripts/device/pick.py /tmp/prof > /tmp/winners.sh; cat /tmp/winners.sh; cp /tmp/winners.sh /tmp/prof/
source /tmp/winners.sh
[ -n "$FLAGS" ] && run winners $FLAGS
run default_kv512 --kv-bucket 512
[ -n "$FLAGS" ] && run winners_kv512 $FLAGS --kv-bucket 512
