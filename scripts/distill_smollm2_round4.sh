#!/usr/bin/env bash
# A fourth round of self-distillation data for SmolLM2-135M-Instruct's module, aimed at prompt variety (docs/training.md):
#   stream 1: the model writes new instructions (scripts/self_instruct_prompts.py meta -> distill --no-chat ->
#             extract), then answers them greedily, for as long as the deadline allows
#   streams 2-4: greedy answers to chat prompts from the Gutenberg passages no earlier round used (three thirds of
#             PROMPTS_DIR/books_round4.jsonl: scripts/book_prompts.py --exclude <round 3's books.jsonl>)
# Like distill_smollm2_more.sh: batch 256, all streams stopped after DEADLINE seconds, whole records kept.
# usage: scripts/distill_smollm2_round4.sh PROMPTS_DIR OUT_DIR DEADLINE_S [N_META]
#   PROMPTS_DIR holds seed_tasks.jsonl (self-instruct, Apache-2.0) and books_round4.jsonl.
set -uo pipefail
src=$1; out=$2; deadline=$3; n_meta=${4:-20000}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"/{self_instruct,books_c,books_d,books_e}
n=$(wc -l < "$src/books_round4.jsonl"); third=$(( (n + 2) / 3 ))
split -l "$third" -d -a 1 "$src/books_round4.jsonl" "$out/books_part_"
d() { recyclegpt distill --max-new-tokens 256 --max-prompt-tokens 1024 --batch-size 256 --force "$@"; }
export -f d
export here src out n_meta
stream() { timeout "$deadline" bash -c "$2" > "$out/$1.log" 2>&1; }
stream self_instruct 'set -e
  python3 $here/self_instruct_prompts.py meta $src/seed_tasks.jsonl --n $n_meta --seed 4 --out $out/meta.jsonl
  recyclegpt distill --prompts $out/meta.jsonl --out $out/made.jsonl --no-chat --temperature 0.9 --top-p 0.95 \
    --max-new-tokens 48 --batch-size 512 --seed 4 --force
  python3 $here/self_instruct_prompts.py extract $out/made.jsonl --seeds $src/seed_tasks.jsonl \
    --out $out/new_instructions.jsonl
  d --prompts $out/new_instructions.jsonl --out $out/self_instruct/self_instruct.jsonl' &
for k in 0 1 2; do
  name=$(echo c d e | cut -d" " -f$((k + 1)))
  stream "books_$name" "d --prompts $out/books_part_$k --out $out/books_$name/books_$name.jsonl" &
done
wait
# keep whole records only; a stopped stream's .partial file becomes its .jsonl
python3 "$here/keep_whole_records.py" "$out"
