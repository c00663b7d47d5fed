#!/usr/bin/env bash
# The paper-style quality table for a model and its recyclable module: standard vs recycle scoring on six zero-shot
# multiple-choice sets, perplexity on WikiText-2 and PTB test, and the module's agreement α on held-out prompts.
# Every `recyclegpt eval` run appends its final JSON line to OUT.jsonl; scripts/paper_table.py makes the table.
# usage: scripts/paper_table.sh DATA_DIR OUT.jsonl [flags for every eval, e.g. --recycle CKPT]
#   DATA_DIR is ../shared/data (eval/, corpora/ and prompts/ inside). Jobs run JOBS (default 8) at a time;
#   SCORINGS (default "standard recycle") picks the scorings of the multiple-choice and perplexity runs.
set -euo pipefail
data=$1; out=$2; shift 2
: > "$out"
jobs=()
for s in ${SCORINGS:-standard recycle}; do
  jobs+=("mc --format piqa --data $data/eval/piqa/valid.jsonl --scoring $s"
         "mc --format arc --data $data/eval/arc/ARC-Easy-Test.jsonl --scoring $s"
         "mc --format arc --data $data/eval/arc/ARC-Challenge-Test.jsonl --scoring $s"
         "mc --format openbookqa --data $data/eval/openbookqa/test.jsonl --scoring $s"
         "mc --format boolq --data $data/eval/boolq/dev.jsonl --scoring $s"
         "mc --format sciq --data $data/eval/sciq/validation.jsonl --scoring $s"
         "ppl --data $data/corpora/wikitext2/test.txt --scoring $s"
         "ppl --data $data/corpora/ptb/ptb.test.txt --scoring $s")
done
jobs+=("agreement --prompts $data/prompts/wizardlm/WizardLM_testset.jsonl --max-new-tokens 128 --batch-size 32"
       "agreement --prompts $data/prompts/alpaca_eval/alpaca_eval_instructions.jsonl --max-new-tokens 128 --batch-size 32")
printf '%s\n' "${jobs[@]}" | xargs -P "${JOBS:-8}" -I{} bash -c \
  'set -o pipefail; recyclegpt eval {} --json "$@" 2>>'"$out.log"' | tail -1 >> '"$out" _ "$@"
echo "$(wc -l < "$out") of ${#jobs[@]} results in $out"
