# Sourced from the repository root on the device, by each call's script: the carried wheels unzipped to /tmp/site,
# the GGUF joined in the cache once its parts have come (one a call, .gguf3/part_a? or .gguf4/part_a?, never both
# in one lease; sha256 checked), and the switches in $SET (module.NAME=value ..., written into the carried copy of
# src/ only; the copy is fresh each call).
export PYTHONPATH=$PWD/src:/tmp/site RECYCLEGPT_CACHE=/tmp/rc
if [ ! -f /tmp/site/.done ]; then
  mkdir -p /tmp/site && for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done && touch /tmp/site/.done
fi
mkdir -p /tmp/gg /tmp/rc
# three parts, or four where a call carries data beside one
for p in .gguf3/part_a? .gguf4/part_a?; do [ -f "$p" ] && cp "$p" /tmp/gg/ && echo "carried $p"; done
G=/tmp/rc/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $G ] && ls /tmp/gg/part_a? > /dev/null 2>&1; then  # joined once the parts so far hash right
  cat /tmp/gg/part_a? > $G.part
  if echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G.part" | sha256sum -c --status; then
    mv $G.part $G && echo "joined $G, sha256 checked"
  else
    rm -f $G.part
  fi
fi
for kv in ${SET:-}; do
  mod=${kv%%.*}; rest=${kv#*.}; name=${rest%%=*}; val=${rest#*=}
  sed -i "s/^$name = .*/$name = $val/" src/recyclegpt/$mod.py && grep -H "^$name = " src/recyclegpt/$mod.py
done
D=.data/device
I4="--prompts $D/alpaca_eval_instructions.jsonl"
I5="--prompts $D/alpaca_eval_instructions.jsonl --prompts $D/WizardLM_testset.jsonl --prompts $D/gsm8k.jsonl --prompts $D/code_alpaca.jsonl"
# MODULE: another module for the benches (a checkpoint folder or a shipped name), else the shipped default
BENCH="python3 -m recyclegpt.cli bench --limit 20 --max-new-tokens 256 --engine compiled --compile-steps --kv-bucket 512 --no-alpha --json${MODULE:+ --recycle $MODULE}"
PROFILE="python3 scripts/gpu_step_profile.py --preset smollm2-135m --recycle-layers 2 --draft-vocab 16384 --compile --compile-steps --parts standard,recycle"
