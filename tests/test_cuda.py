"""CUDA: the same decoding on the GPU as on the CPU (fp32), and a bf16 run that stays finite. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.decoding import recycle, standard
from recyclegpt.model import RecycleModel

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_fp32_matches_cpu_and_bf16_runs():
    torch.manual_seed(0)
    model = RecycleModel.build(PRESETS["tiny"], RecycleConfig(n_layer=2)).eval()
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7] * 11]
    cpu = {s.__name__: s(m, prompts, max_new_tokens=12).tokens
           for s, m in ((standard, model.base), (recycle, model))}
    model.cuda()
    for s, m in ((standard, model.base), (recycle, model)):
        assert s(m, prompts, max_new_tokens=12).tokens == cpu[s.__name__]
    model.to(torch.bfloat16)
    res = recycle(model, prompts, max_new_tokens=12)
    assert all(len(t) == 12 for t in res.tokens)
    with torch.no_grad():
        out = model.base(torch.tensor(prompts[:1], device="cuda"))
    assert torch.isfinite(out.logits).all()
