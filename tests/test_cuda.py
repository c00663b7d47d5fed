"""CUDA: the same decoding on the GPU as on the CPU (fp32), and a bf16 run that stays finite. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.decoding.loops import recycle, standard
from recyclegpt.models import RecycleModel

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


@pytest.mark.parametrize("kv_heads", [4, 2])  # without and with grouped-query heads (folded into query rows)
def test_decode_kernel_matches_sdpa_in_cached_calls(kv_heads):
    """Cached calls on CUDA attend with the Triton decode kernel (KernelConfig.decode_attention): the same logits as
    SDPA (fp32, padded batch, 1-, 2- and 5-token calls) and the same tokens from the decoding loops."""
    import dataclasses

    from torch.profiler import ProfilerActivity, profile

    from recyclegpt.config import KernelConfig
    from recyclegpt.kernels import attention as triton_attention

    if not triton_attention.available():
        pytest.skip("needs triton")
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], d_model=64, n_head=4, n_kv_head=kv_heads)  # head_dim 16
    model = RecycleModel.build(cfg, RecycleConfig(n_layer=1)).cuda().eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [7] * 11]
    runs = {}
    for kernel in (True, False):
        model.kernels = KernelConfig(decode_attention=kernel)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            tokens = [s(m, prompts, max_new_tokens=16).tokens for s, m in ((standard, model.base), (recycle, model))]
        runs[kernel] = tokens, any("_attn_kernel" in e.name for e in prof.events())
    assert runs[True][1] and not runs[False][1]  # the kernel ran in one run and not in the other
    assert runs[True][0] == runs[False][0]
    # one cached call on 5 new tokens after a 9-token prompt, row 1 left-padded by 4: logits against SDPA's
    x = torch.randint(0, cfg.vocab_size, (2, 14), device="cuda")
    pad = torch.tensor([0, 4], device="cuda")
    logits = {}
    for kernel in (True, False):
        model.kernels = KernelConfig(decode_attention=kernel)
        cache = model.base.new_cache(2, 32)
        with torch.no_grad():
            model.base(x[:, :9], input_pos=torch.arange(9, device="cuda"), cache=cache, pad=pad, kv_end=32)
            logits[kernel] = model.base(x[:, 9:], input_pos=torch.arange(9, 14, device="cuda"), cache=cache,
                                        pad=pad, kv_end=32).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
