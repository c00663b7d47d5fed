#!/usr/bin/env bash
# Self-distillation data for SmolLM2-135M-Instruct's module: the model's own greedy, chat-templated responses to
# the permissively licensed prompt sets (Apache-2.0 / MIT), and to two held-out sets used for evaluation only.
# usage: scripts/distill_smollm2.sh PROMPTS_DIR OUT_DIR [extra distill flags]
#   PROMPTS_DIR holds copies of ../shared/data/prompts/{arena_hard,self_instruct,open_assistant,gsm8k}/*.jsonl
#   (train) and wizardlm/WizardLM_testset.jsonl, alpaca_eval/alpaca_eval_instructions.jsonl (held out).
set -euo pipefail
src=$1; out=$2; shift 2
mkdir -p "$out/train" "$out/heldout"
run() { recyclegpt distill --prompts "$src/$1" --out "$3/${1%.jsonl}.jsonl" --max-new-tokens 256 \
          --max-prompt-tokens 1024 --batch-size 128 --limit "$2" --force "${@:4}"; }
for f in arena-hard-v0.1_question.jsonl arena-hard-v2.0_question.jsonl seed_tasks.jsonl \
         user_oriented_instructions.jsonl prompt_lottery_en_250_text.jsonl en_100_text.jsonl; do
  run "$f" 100000 "$out/train" "$@"
done
run train.jsonl 3000 "$out/train" "$@"   # the first 3000 GSM8K training questions
run WizardLM_testset.jsonl 218 "$out/heldout" "$@"
run alpaca_eval_instructions.jsonl 300 "$out/heldout" "$@"
