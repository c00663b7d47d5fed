#!/usr/bin/env bash
# On a lent machine of four GPUs, after distill_gpus.sh: four module variants trained side by side on the same data
# (the recipe of scripts/make_smollm2_module.sh: frozen bf16 base, target both, 32 x 768 tokens a step), each then
# scored for α on held-out prompts the data never used (WizardLM's 218, alpaca_eval's first 300; 128 greedy tokens),
# given the draft vocabulary of its data and shipped in bf16 (scripts/ship_module.py) as OUT/NAME.tar.
#   GPU 0 l1:        one layer, from scratch (lr 1e-3);
#   GPU 1 l1_init:   one layer, from the shipped module's first layer (scripts/truncate_module.py; lr 5e-4);
#   GPU 2 l2:        two layers, from scratch, as the shipped module was made (on this data instead of its own);
#   GPU 3 l2_cont:   the shipped module trained on, on this data (lr 3e-4); beside it, the shipped module's own α.
#   bash scripts/device/retrofit_gpus.sh DATA OUT [L1_INIT]
# VARIANTS replaces the four (a line each: NAME GPU STEPS RETROFIT_ARGS, INIT standing for L1_INIT); SCORE_SHIPPED=0
# skips the shipped module's α.
# DATA holds distill_gpus.sh's OUT/<stream>/*.jsonl. STEPS_L1 / STEPS_L2 / TRAIN_LIMIT (seconds) / WIZ_LIMIT /
# ALP_LIMIT (prompts) shorten a trial; TRIAL_ARGS, retrofit flags last on its line, too.
set -uo pipefail
data=$1; out=$2; init=${3:-/tmp/stash/modules/l1-init}
source scripts/device/env.sh
P=/tmp/dwork/prompts
shipped=src/recyclegpt/modules/smollm2-135m-instruct
files="$data/*/*.jsonl"
common="--target both --batch-size 32 --seq-len 768 --eval-every 500 --save-every 500 --eval-batches 8
        --val-fraction 0.02 --seed 0 --no-progress"
s1=${STEPS_L1:-4000}; s2=${STEPS_L2:-3200}
mkdir -p "$out" /tmp/m /tmp/ship
score() {  # NAME GPU MODULE_DIR: α on the held-out prompts, one JSON line each
  CUDA_VISIBLE_DEVICES=$2 timeout 110 python3 -m recyclegpt.cli eval agreement --prompts $P/wizardlm/WizardLM_testset.jsonl \
    --limit ${WIZ_LIMIT:-218} --recycle "$3" --max-new-tokens 128 --batch-size 64 --json \
    > "/tmp/m/$1.alpha_wizardlm.txt" 2>&1
  CUDA_VISIBLE_DEVICES=$2 timeout 110 python3 -m recyclegpt.cli eval agreement \
    --prompts $P/alpaca_eval/alpaca_eval_instructions.jsonl --limit ${ALP_LIMIT:-300} --recycle "$3" \
    --max-new-tokens 128 --batch-size 64 --json > "/tmp/m/$1.alpha_alpaca300.txt" 2>&1
}
variant() {  # NAME GPU STEPS RETROFIT_ARGS
  local t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=$2 timeout ${TRAIN_LIMIT:-320} python3 -m recyclegpt.cli retrofit "$files" --out /tmp/m/$1 \
    $common --steps $3 $4 ${TRIAL_ARGS:-} > "/tmp/m/$1.train.log" 2>&1
  local rc=$?
  echo "$1 train_s $(( $(date +%s) - t0 )) exit $rc" >> "/tmp/m/$1.train.log"
  python3 scripts/draft_vocab.py /tmp/m/$1 /tmp/ship/$1.dv --size 16384 --data "$files" >> "/tmp/m/$1.train.log" 2>&1
  python3 scripts/ship_module.py /tmp/ship/$1.dv /tmp/ship/$1 >> "/tmp/m/$1.train.log" 2>&1
  score $1 $2 /tmp/ship/$1
  cp /tmp/m/$1/metrics.jsonl "/tmp/m/$1.metrics.jsonl" 2>/dev/null
  tar cf "$out/$1.tar" -C /tmp ship/$1 $(cd /tmp && ls m/$1.*)
}
# VARIANTS: one "NAME GPU STEPS RETROFIT_ARGS..." a line, to train others (INIT and SHIPPED in them are expanded)
default_variants="l1 0 $s1 --recycle-layers 1 --lr 1e-3 --min-lr 1e-4 --warmup 100
l1_init 1 $s1 --init-module $init --lr 5e-4 --min-lr 5e-5 --warmup 50
l2 2 $s2 --recycle-layers 2 --lr 1e-3 --min-lr 1e-4 --warmup 100
l2_cont 3 $s2 --init-module $shipped --lr 3e-4 --min-lr 3e-5 --warmup 50"
while read -r name gpu steps args; do
  [ -n "$name" ] && variant "$name" "$gpu" "$steps" "${args//INIT/$init}" < /dev/null &
done <<< "${VARIANTS:-$default_variants}"
[ "${SCORE_SHIPPED:-1}" = 1 ] && score shipped 3 $shipped &  # beside GPU 3's run (it slows that run a little)
wait
[ "${SCORE_SHIPPED:-1}" = 1 ] && tar cf "$out/shipped_alpha.tar" -C /tmp $(cd /tmp && ls m/shipped.*)
for f in /tmp/m/*.alpha_*.txt; do echo "$(basename $f): $(grep -h "^eval agreement" $f | tail -1)"; done
grep -h "train_s\|sha256" /tmp/m/*.train.log
