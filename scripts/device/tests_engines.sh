#!/usr/bin/env bash
# A call on the device: the products', the engines' and test_cuda's CUDA tests, with $SET (or profiles.sh's winners).
[ -z "${SET+x}" ] && [ -f /tmp/winners.sh ] && source /tmp/winners.sh
source scripts/device/env.sh
timeout 420 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_linear.py tests/test_engine.py \
  tests/test_cuda.py -rA --durations 10 2>&1 | grep -v DEBUG > $OUT/tests_engines.txt
tail -30 $OUT/tests_engines.txt
