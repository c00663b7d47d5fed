#!/usr/bin/env bash
# A call on the device (the first of a lease: it also reports the card and the versions): the attention kernels'
# CUDA tests and the products' row-bits test, with $SET.
source scripts/device/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/tests_kernels.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a $OUT/tests_kernels.txt
timeout 320 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_attention.py \
  tests/test_triton_linear.py::test_cuda_rows_get_the_same_bits_in_any_call -rA --durations 10 2>&1 \
  | grep -v DEBUG >> $OUT/tests_kernels.txt
tail -12 $OUT/tests_kernels.txt
