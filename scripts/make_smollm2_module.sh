#!/usr/bin/env bash
# Re-create the shipped SmolLM2-135M-Instruct module (src/recyclegpt/modules/smollm2-135m-instruct, MODEL_CARD.md
# there) from nothing but ../shared/data: four rounds of self-distillation data, a retrofit (v2), a fine-tune for
# multi-step drafting (v3), bf16 exports.
# About 60 minutes on one H100 (round 1 ~10 min, round 2 ~7, round 3 8.5, round 4 7, retrofit 8, fine-tune 5).
# usage: scripts/make_smollm2_module.sh SHARED_DATA_DIR WORK_DIR [SHIP_DIR]
#   SHIP_DIR defaults to WORK_DIR/ship; point it at src/recyclegpt/modules/smollm2-135m-instruct to replace the
#   shipped module. Rounds 3 and 4 stop after a fixed time (as it did for the shipped module), so on other hardware it
#   makes a different number of records; the card lists the counts behind the shipped module.
set -euo pipefail
shared=$1; work=$2; ship=${3:-$2/ship}
here=$(cd "$(dirname "$0")" && pwd)
p=$work/prompts
mkdir -p "$p" "$work/d2"
for f in arena_hard/arena-hard-v0.1_question arena_hard/arena-hard-v2.0_question self_instruct/seed_tasks \
         self_instruct/user_oriented_instructions open_assistant/prompt_lottery_en_250_text \
         open_assistant/en_100_text gsm8k/train wizardlm/WizardLM_testset alpaca_eval/alpaca_eval_instructions; do
  cp "$shared/prompts/$f.jsonl" "$p/"
done
tail -n +3001 "$p/train.jsonl" > "$p/gsm8k_rest.jsonl"           # GSM8K questions 3001-7473
python3 "$here/book_prompts.py" "$shared/corpora/gutenberg" --n 24000 --seed 0 --out "$work/books.jsonl"
head -n 12000 "$work/books.jsonl" > "$p/books_a.jsonl"
tail -n +12001 "$work/books.jsonl" > "$p/books_b.jsonl"

# round 1: greedy responses to every permissive chat prompt and the first 3000 GSM8K questions
bash "$here/distill_smollm2.sh" "$p" "$work/d1"
# round 2: greedy responses to the other GSM8K questions; one sampled response to each chat prompt
d() { recyclegpt distill --max-new-tokens 256 --max-prompt-tokens 1024 --batch-size 128 --force "$@"; }
d --prompts "$p/gsm8k_rest.jsonl" --out "$work/d2/gsm8k_rest.jsonl"
for f in seed_tasks user_oriented_instructions prompt_lottery_en_250_text en_100_text; do
  d --prompts "$p/$f.jsonl" --out "$work/d2/${f}_t08.jsonl" --temperature 0.8 --top-p 0.95 --seed 1
done
# round 3: four parallel streams for 495 s (GSM8K sampled, Gutenberg chat prompts greedy, chat prompts sampled x4)
bash "$here/distill_smollm2_more.sh" "$p" "$work/d3" 495
# round 4: the Gutenberg passages no earlier round used (three streams) and instructions the base writes itself
mkdir -p "$work/p4"
cp "$p/seed_tasks.jsonl" "$work/p4/"
python3 "$here/book_prompts.py" "$shared/corpora/gutenberg" --n 60000 --seed 1 --exclude "$work/books.jsonl" \
  --out "$work/p4/books_round4.jsonl"   # all 51,315 unused passages
bash "$here/distill_smollm2_round4.sh" "$work/p4" "$work/d4" 420

recyclegpt retrofit "$work/d1/train/*.jsonl" "$work/d2/*.jsonl" "$work/d3/gsm8k/*.jsonl" \
  "$work/d3/books_a/*.jsonl" "$work/d3/books_b/*.jsonl" "$work/d3/chat/*.jsonl" "$work/d4/books_c/*.jsonl" \
  "$work/d4/books_d/*.jsonl" "$work/d4/books_e/*.jsonl" "$work/d4/self_instruct/*.jsonl" --out "$work/module" \
  --recycle-layers 2 --target both --batch-size 32 --seq-len 768 --lr 1e-3 --min-lr 1e-4 --warmup 100 \
  --steps 5500 --eval-every 500 --save-every 500 --eval-batches 8 --val-fraction 0.02 --seed 0
python3 "$here/ship_module.py" "$work/module" "$work/ship_v2"    # version 2 (bf16), sha256 ca1c045e...
# version 3: v2 fine-tuned for multi-step drafting (speculative / tree decoding), same data and split
recyclegpt retrofit "$work/d1/train/*.jsonl" "$work/d2/*.jsonl" "$work/d3/gsm8k/*.jsonl" \
  "$work/d3/books_a/*.jsonl" "$work/d3/books_b/*.jsonl" "$work/d3/chat/*.jsonl" "$work/d4/books_c/*.jsonl" \
  "$work/d4/books_d/*.jsonl" "$work/d4/books_e/*.jsonl" "$work/d4/self_instruct/*.jsonl" --out "$work/module_v3" \
  --init-module "$work/ship_v2" --rollout 3 --rollout-weight 1.0 --recycle-layers 2 --target both --batch-size 32 \
  --seq-len 768 --lr 3e-4 --min-lr 3e-5 --warmup 50 --steps 1500 --eval-every 250 --save-every 250 --eval-batches 8 \
  --val-fraction 0.02 --seed 0
python3 "$here/ship_module.py" "$work/module_v3" "$ship"
# the draft vocabulary (weights unchanged): the 16,384 ids most frequent in the same training responses
python3 "$here/draft_vocab.py" "$ship" "$ship" --size 16384 --data "$work/d1/train/*.jsonl" --data "$work/d2/*.jsonl" \
  --data "$work/d3/gsm8k/*.jsonl" --data "$work/d3/books_a/*.jsonl" --data "$work/d3/books_b/*.jsonl" \
  --data "$work/d3/chat/*.jsonl" --data "$work/d4/books_c/*.jsonl" --data "$work/d4/books_d/*.jsonl" \
  --data "$work/d4/books_e/*.jsonl" --data "$work/d4/self_instruct/*.jsonl"
