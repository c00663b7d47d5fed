#!/usr/bin/env bash
# The second, larger round of self-distillation data for SmolLM2-135M-Instruct's module (after
# scripts/distill_smollm2.sh): four `recyclegpt distill` streams run side by side on one GPU, because eager decoding
# at batch 256 is bound by kernel launches, not by the card, so four processes get ~3x the tokens of one.
#   stream 1: one sampled response (T 0.7, top-p 0.95) to every GSM8K training question
#   stream 2-3: greedy responses to chat prompts built from Gutenberg passages (scripts/book_prompts.py)
#   stream 4: four sampled responses (T 0.7, seeds 21-24) to arena-hard, self-instruct and OpenAssistant prompts
# Every stream writes OUT/<stream>/<file>.jsonl(.partial); after DEADLINE seconds the streams are stopped and the
# records made so far are kept (torn last lines dropped, .partial files renamed).
# usage: scripts/distill_smollm2_more.sh PROMPTS_DIR OUT_DIR DEADLINE_S
#   PROMPTS_DIR holds the permissive prompt files (as for distill_smollm2.sh) plus books_a.jsonl and books_b.jsonl.
set -uo pipefail
src=$1; out=$2; deadline=$3
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"/{gsm8k,books_a,books_b,chat}
d() { recyclegpt distill --max-new-tokens 256 --max-prompt-tokens 1024 --batch-size 256 --force "$@"; }
export -f d
# `timeout` signals its whole process group, so a stream's current distill and the loop around it stop together
stream() { timeout "$deadline" bash -c "$2" > "$out/$1.log" 2>&1; }
stream gsm8k "d --prompts $src/train.jsonl --out $out/gsm8k/train_t07.jsonl --temperature 0.7 --top-p 0.95 \
  --seed 11" &
stream books_a "d --prompts $src/books_a.jsonl --out $out/books_a/books_a.jsonl" &
stream books_b "d --prompts $src/books_b.jsonl --out $out/books_b/books_b.jsonl" &
stream chat "for seed in 21 22 23 24; do
  for f in arena-hard-v0.1_question arena-hard-v2.0_question seed_tasks user_oriented_instructions \
           prompt_lottery_en_250_text en_100_text; do
    d --prompts $src/\$f.jsonl --out $out/chat/\${f}_s\$seed.jsonl --temperature 0.7 --top-p 0.95 --seed \$seed
  done
done" &
wait
# A stream stopped mid-batch may leave a torn last line in its .partial file: keep the whole records only.
python3 "$here/keep_whole_records.py" "$out"
