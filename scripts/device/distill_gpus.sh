#!/usr/bin/env bash
# On a lent machine of four GPUs, once the GGUF has joined: self-distillation data for DEADLINE seconds, many
# `recyclegpt distill` streams side by side, as scripts/make_smollm2_module.sh's rounds made it on one GPU (the same
# permissive prompt sets, every Gutenberg passage as a chat prompt, instructions the model writes itself).
#   GPU 0: two streams through the CUDA-graph engine (batch 128): its throughput against the eager streams';
#   every book stream samples more answers to its passages once it has answered them all;
#   GPU 1: the chat sets (greedy, then sampled with new seeds), GSM8K greedy, two book streams (eager, batch 256);
#   GPU 2: self-written instructions and their answers, GSM8K sampled, two book streams;
#   GPU 3: PROFILES (a command, if set) first, then two book streams.
# The records land in OUT/<stream>/*.jsonl (torn last lines dropped); the last lines printed count them per stream.
#   bash scripts/device/distill_gpus.sh DEADLINE OUT [INPUTS]
# INPUTS holds gutenberg.tar.xz and prompts.tar.xz (scripts/device/prep_distill.sh; default /tmp/stash/distill).
set -uo pipefail
deadline=$1; out=$2; inputs=${3:-/tmp/stash/distill}
source scripts/device/env.sh
w=/tmp/dwork
mkdir -p "$w" "$out"
tar xJf "$inputs/gutenberg.tar.xz" -C "$w" && tar xJf "$inputs/prompts.tar.xz" -C "$w" || exit 1
P=$w/prompts
python3 scripts/book_prompts.py "$w/gutenberg" --n 1000000 --seed 5 --out "$w/books.jsonl"  # every passage
split -n l/8 -d -a 1 "$w/books.jsonl" "$w/books_part_"
B=${BATCH:-256} BG=${BATCH_GRAPHS:-128} NEW=${NEW_TOKENS:-256}  # smaller for a trial on the CPU
# the engine of the streams on GPUs 1-3: eager as in the nineteenth session; its two graph streams made 88 records a
# second each against an eager stream's 30, so ENGINE=graphs (at BATCH) for a later round
E=${ENGINE:-eager}
export P w out B BG NEW E
d() { python3 -m recyclegpt.cli distill --max-new-tokens $NEW --max-prompt-tokens 1024 --force "$@"; }
export -f d
start=$(date +%s)
stream() {  # stream NAME GPU COMMAND: COMMAND on that GPU until the deadline
  mkdir -p "$out/$1"
  CUDA_VISIBLE_DEVICES=$2 timeout $((deadline - ($(date +%s) - start))) bash -c "$3" > "$out/$1.log" 2>&1
}
chat="arena_hard/arena-hard-v0.1_question arena_hard/arena-hard-v2.0_question self_instruct/seed_tasks
      self_instruct/user_oriented_instructions open_assistant/prompt_lottery_en_250_text open_assistant/en_100_text"
# a book stream answers its passages greedily, then (if time is left: six of eight ran out of passages in the
# nineteenth session) samples new answers to them, a seed at a time
books() { stream "books_$1" "$2" "d --prompts $w/books_part_$1 --out $out/books_$1/books_$1.jsonl $3
  for seed in 51 52 53 54 55 56 57 58; do d --prompts $w/books_part_$1 --out $out/books_$1/books_$1_s\$seed.jsonl $3 \
    --temperature 0.7 --top-p 0.95 --seed \$seed; done"; }
books 0 0 "--engine graphs --batch-size $BG" &
books 1 0 "--engine graphs --batch-size $BG" &
stream chat 1 "for f in $(echo $chat); do n=\$(basename \$f)
    d --prompts $P/\$f.jsonl --out $out/chat/\${n}_greedy.jsonl --engine $E --batch-size $B; done
  for seed in 31 32 33 34 35 36 37 38; do for f in $(echo $chat); do n=\$(basename \$f)
    d --prompts $P/\$f.jsonl --out $out/chat/\${n}_s\$seed.jsonl --engine $E --batch-size $B \
      --temperature 0.7 --top-p 0.95 --seed \$seed; done; done" &
stream gsm8k_greedy 1 "d --prompts $P/gsm8k/train.jsonl --out $out/gsm8k_greedy/train.jsonl --engine $E \
  --batch-size $B" &
books 2 1 "--engine $E --batch-size $B" &
books 3 1 "--engine $E --batch-size $B" &
stream self_instruct 2 "set -e
  python3 scripts/self_instruct_prompts.py meta $P/self_instruct/seed_tasks.jsonl --n ${N_META:-24000} --seed 7 \
    --out $w/meta.jsonl
  python3 -m recyclegpt.cli distill --prompts $w/meta.jsonl --out $w/made.jsonl --no-chat --temperature 0.9 \
    --top-p 0.95 --max-new-tokens 48 --batch-size $((2 * B)) --seed 7 --engine $E --force
  python3 scripts/self_instruct_prompts.py extract $w/made.jsonl --seeds $P/self_instruct/seed_tasks.jsonl \
    --out $w/new_instructions.jsonl
  d --prompts $w/new_instructions.jsonl --out $out/self_instruct/self_instruct.jsonl --engine $E --batch-size $B" &
stream gsm8k_sampled 2 "d --prompts $P/gsm8k/train.jsonl --out $out/gsm8k_sampled/train_t07.jsonl --engine $E \
  --batch-size $B --temperature 0.7 --top-p 0.95 --seed 41" &
books 4 2 "--engine $E --batch-size $B" &
books 5 2 "--engine $E --batch-size $B" &
( if [ -n "${PROFILES:-}" ]; then CUDA_VISIBLE_DEVICES=3 bash -c "$PROFILES" > "$out/../profiles.txt" 2>&1; fi
  books 6 3 "--engine $E --batch-size $B" & books 7 3 "--engine $E --batch-size $B" & wait ) &
wait
python3 scripts/keep_whole_records.py "$out" > /dev/null
python3 - "$out" "$deadline" <<'EOF'
import json, pathlib, sys
out, secs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
stats = {}
for d in sorted(p for p in out.iterdir() if p.is_dir()):
    recs = [json.loads(line) for f in d.glob("*.jsonl") for line in f.open(encoding="utf-8") if line.strip()]
    toks = sum(r["response_tokens"] for r in recs)
    stats[d.name] = {"records": len(recs), "response_tokens": toks, "tokens_per_s": round(toks / secs, 1)}
total = {k: sum(s[k] for s in stats.values()) for k in ("records", "response_tokens")}
print(json.dumps({"deadline_s": secs, "streams": stats, "total": total}, indent=1))
EOF
