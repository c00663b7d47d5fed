#!/usr/bin/env bash
# On the development machine, before a lease that makes self-distillation data (distill_gpus.sh) and trains modules
# on it (retrofit_gpus.sh): the GGUF in four parts of 24.6 MB (.gguf4/part_a{a,b,c,d}: the inputs travel beside
# the first), the inputs (.data/distill/: Gutenberg as gutenberg.tar.xz, 16.7 MB; the permissive prompt sets and the
# held-out ones as prompts.tar.xz) and the one-layer starting point (.data/modules/l1-init, scripts/truncate_module.py).
# Needs prep.sh's .gguf3 parts. All of it is ignored by git.
#   bash scripts/device/prep_distill.sh [../shared/data]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-../shared/data}
PY=${PYTHON:-python3}
grep -qx "/.gguf4/" .git/info/exclude || echo "/.gguf4/" >> .git/info/exclude
mkdir -p .gguf4 .data/distill .data/modules
cat .gguf3/part_a? > /tmp/smollm2.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smollm2.gguf" | sha256sum -c -
rm -f .gguf4/part_* && split -n 4 /tmp/smollm2.gguf .gguf4/part_ && rm /tmp/smollm2.gguf
tar cf - -C "$DATA/corpora" gutenberg | xz -9 > .data/distill/gutenberg.tar.xz
(cd "$DATA" && tar cf - prompts/arena_hard/arena-hard-v0.1_question.jsonl \
  prompts/arena_hard/arena-hard-v2.0_question.jsonl \
  prompts/self_instruct/seed_tasks.jsonl prompts/self_instruct/user_oriented_instructions.jsonl \
  prompts/open_assistant/prompt_lottery_en_250_text.jsonl prompts/open_assistant/en_100_text.jsonl \
  prompts/gsm8k/train.jsonl prompts/wizardlm/WizardLM_testset.jsonl \
  prompts/alpaca_eval/alpaca_eval_instructions.jsonl) | xz -9 > .data/distill/prompts.tar.xz
$PY scripts/truncate_module.py src/recyclegpt/modules/smollm2-135m-instruct .data/modules/l1-init --layers 1
ls -la .gguf4 .data/distill .data/modules/l1-init
