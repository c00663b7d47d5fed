#!/usr/bin/env bash
# Re-create the shipped one-layer SmolLM2-135M-Instruct module (src/recyclegpt/modules/smollm2-135m-instruct-l1,
# MODEL_CARD.md there) from ../shared/data and the shipped default module, with the public CLI:
#   1. self-distillation data: 12 `recyclegpt distill` streams over the permissive prompt sets (the chat sets greedy
#      and sampled, GSM8K's training questions greedy and sampled, every Gutenberg passage as a chat prompt,
#      instructions the base writes itself), in four groups of two to four streams side by side, each group stopped
#      after DISTILL_S seconds (default 465);
#   2. l2_cont: the default module (two layers, v3) trained on for 3,200 steps on that data, lr 3e-4 -> 3e-5;
#   3. its first layer alone (scripts/truncate_module.py --layers 1);
#   4. 3,600 steps from (3) at lr 5e-4 -> 5e-5, the draft vocabulary of the data (scripts/draft_vocab.py), the bf16
#      export (scripts/ship_module.py) to SHIP_DIR, and its α on the held-out WizardLM and alpaca_eval prompts.
# Needs one CUDA GPU (four eager streams at batch 256 side by side, as make_smollm2_module.sh's round 3 runs on one
# H100). The shipped module's data came from the same streams run on four GPUs at once, so this one-GPU form has not
# been run end to end. The data step takes 4 x DISTILL_S (31 min at the default); in the runs that made the shipped
# module, step 2 took 301 s of training on an H200 and step 4 362 s on an H100 (3,600 steps at 0.09 s each, plus
# loading).
# usage: scripts/make_smollm2_module_l1.sh SHARED_DATA_DIR WORK_DIR [SHIP_DIR]
#   SHIP_DIR defaults to WORK_DIR/ship; point it at src/recyclegpt/modules/smollm2-135m-instruct-l1 to replace the
#   shipped module. The streams stop at a fixed time, so other hardware makes a different number of records; the card
#   lists the counts behind the shipped module (99,890 records, 20.25M response tokens). Given the same records, the
#   training is deterministic up to GPU arithmetic.
#   Optional: DISTILL_S (seconds a group runs), ENGINE (the engine of the eager streams: graphs made ~2.9x the records
#   of an eager stream), BATCH / BATCH_GRAPHS / NEW_TOKENS / N_META / STEPS_L2 / STEPS_L1 (smaller for a trial).
set -euo pipefail
shared=$1; work=$2; ship=${3:-$2/ship}
here=$(cd "$(dirname "$0")" && pwd)
P=$shared/prompts
p=$work/prompts; d=$work/d
mkdir -p "$p" "$d"
secs=${DISTILL_S:-465}
B=${BATCH:-256} BG=${BATCH_GRAPHS:-128} NEW=${NEW_TOKENS:-256} E=${ENGINE:-eager}
# the default module as shipped (v3), from the installed package
default=$(python3 -c "import pathlib, recyclegpt
print(pathlib.Path(recyclegpt.__file__).parent / 'modules' / 'smollm2-135m-instruct')")

# 1. the data: every Gutenberg passage as a chat prompt, in eight parts (one book stream each)
python3 "$here/book_prompts.py" "$shared/corpora/gutenberg" --n 1000000 --seed 5 --out "$p/books.jsonl"
split -n l/8 -d -a 1 "$p/books.jsonl" "$p/books_part_"
d() { recyclegpt distill --max-new-tokens "$NEW" --max-prompt-tokens 1024 --force "$@"; }
export -f d
export NEW
# `timeout` signals its whole process group, so a stream's current distill and the loop around it stop together
stream() { mkdir -p "$d/$1"; timeout "$secs" bash -c "$2" > "$d/$1.log" 2>&1; }
chat="arena_hard/arena-hard-v0.1_question arena_hard/arena-hard-v2.0_question self_instruct/seed_tasks
      self_instruct/user_oriented_instructions open_assistant/prompt_lottery_en_250_text open_assistant/en_100_text"
# a book stream answers its passages greedily, then, while time is left, samples new answers to them, a seed at a time
books() { stream "books_$1" "d --prompts $p/books_part_$1 --out $d/books_$1/books_$1.jsonl $2
  for seed in 51 52 53 54 55 56 57 58; do d --prompts $p/books_part_$1 --out $d/books_$1/books_$1_s\$seed.jsonl $2 \
    --temperature 0.7 --top-p 0.95 --seed \$seed; done"; }
# group 1: two book streams through the CUDA-graph engine
books 0 "--engine graphs --batch-size $BG" &
books 1 "--engine graphs --batch-size $BG" &
wait
# group 2: the chat sets (greedy, then sampled with new seeds), GSM8K greedy, two book streams
stream chat "for f in $(echo $chat); do n=\$(basename \$f)
    d --prompts $P/\$f.jsonl --out $d/chat/\${n}_greedy.jsonl --engine $E --batch-size $B; done
  for seed in 31 32 33 34 35 36 37 38; do for f in $(echo $chat); do n=\$(basename \$f)
    d --prompts $P/\$f.jsonl --out $d/chat/\${n}_s\$seed.jsonl --engine $E --batch-size $B \
      --temperature 0.7 --top-p 0.95 --seed \$seed; done; done" &
stream gsm8k_greedy "d --prompts $P/gsm8k/train.jsonl --out $d/gsm8k_greedy/train.jsonl --engine $E --batch-size $B" &
books 2 "--engine $E --batch-size $B" &
books 3 "--engine $E --batch-size $B" &
wait
# group 3: instructions the base writes itself and their answers, GSM8K sampled, two book streams
stream self_instruct "set -e
  python3 $here/self_instruct_prompts.py meta $P/self_instruct/seed_tasks.jsonl --n ${N_META:-24000} --seed 7 \
    --out $p/meta.jsonl
  recyclegpt distill --prompts $p/meta.jsonl --out $p/made.jsonl --no-chat --temperature 0.9 --top-p 0.95 \
    --max-new-tokens 48 --batch-size $((2 * B)) --seed 7 --engine $E --force
  python3 $here/self_instruct_prompts.py extract $p/made.jsonl --seeds $P/self_instruct/seed_tasks.jsonl \
    --out $p/new_instructions.jsonl
  d --prompts $p/new_instructions.jsonl --out $d/self_instruct/self_instruct.jsonl --engine $E --batch-size $B" &
stream gsm8k_sampled "d --prompts $P/gsm8k/train.jsonl --out $d/gsm8k_sampled/train_t07.jsonl --engine $E \
  --batch-size $B --temperature 0.7 --top-p 0.95 --seed 41" &
books 4 "--engine $E --batch-size $B" &
books 5 "--engine $E --batch-size $B" &
wait
# group 4: two book streams
books 6 "--engine $E --batch-size $B" &
books 7 "--engine $E --batch-size $B" &
wait
# keep whole records only; a stopped stream's .partial file becomes its .jsonl
python3 "$here/keep_whole_records.py" "$d" > /dev/null
python3 - "$d" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
stats = {}
for s in sorted(p for p in out.iterdir() if p.is_dir()):
    recs = [json.loads(line) for f in s.glob("*.jsonl") for line in f.open(encoding="utf-8") if line.strip()]
    stats[s.name] = {"records": len(recs), "response_tokens": sum(r["response_tokens"] for r in recs)}
total = {k: sum(s[k] for s in stats.values()) for k in ("records", "response_tokens")}
print(json.dumps({"streams": stats, "total": total}, indent=1))
EOF

files="$d/*/*.jsonl"
common=(--target both --batch-size 32 --seq-len 768 --eval-every 500 --save-every 500 --eval-batches 8
        --val-fraction 0.02 --seed 0 --no-progress)
# 2. l2_cont: the default module trained on, on this data; with the data's draft vocabulary, in bf16
recyclegpt retrofit "$files" --out "$work/l2_cont" "${common[@]}" --steps "${STEPS_L2:-3200}" \
  --init-module "$default" --lr 3e-4 --min-lr 3e-5 --warmup 50
python3 "$here/draft_vocab.py" "$work/l2_cont" "$work/l2_cont.dv" --size 16384 --data "$files"
python3 "$here/ship_module.py" "$work/l2_cont.dv" "$work/l2_cont.ship"
# 3. its first layer alone
python3 "$here/truncate_module.py" "$work/l2_cont.ship" "$work/l1_from_l2_cont" --layers 1
# 4. the one-layer module trained from it, given the data's draft vocabulary and shipped in bf16
recyclegpt retrofit "$files" --out "$work/l1" "${common[@]}" --steps "${STEPS_L1:-3600}" \
  --init-module "$work/l1_from_l2_cont" --lr 5e-4 --min-lr 5e-5 --warmup 50
python3 "$here/draft_vocab.py" "$work/l1" "$work/l1.dv" --size 16384 --data "$files"
python3 "$here/ship_module.py" "$work/l1.dv" "$ship"
# α on the held-out prompts (the card: 0.617 on WizardLM's 218, 0.637 on alpaca_eval's first 300)
recyclegpt eval agreement --prompts "$P/wizardlm/WizardLM_testset.jsonl" --limit 218 --recycle "$ship" \
  --max-new-tokens 128 --batch-size 64 --json | tail -1
recyclegpt eval agreement --prompts "$P/alpaca_eval/alpaca_eval_instructions.jsonl" --limit 300 --recycle "$ship" \
  --max-new-tokens 128 --batch-size 64 --json | tail -1
