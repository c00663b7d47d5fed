"""l2_persist.py: the module's weights moved into one buffer compute what they computed before, views into one
storage stay so, and (CUDA) graphs whose kernel nodes name the L2 window decode the same tokens."""

from __future__ import annotations

import pytest
import torch

from recyclegpt import engine as engine_mod
from recyclegpt import l2_persist
from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.decoding import recycle
from recyclegpt.engine import Engine
from recyclegpt.model import RecycleModel, fuse_projections

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def model_with_draft_vocab(seed: int = 0) -> RecycleModel:
    from recyclegpt.train import add_draft_vocab

    torch.manual_seed(seed)
    m = RecycleModel.build(PRESETS["tiny"], RecycleConfig(n_layer=2)).eval()
    return RecycleModel(m.base, add_draft_vocab(m.module, list(range(0, 97, 2)))).eval()


def test_gather_keeps_values_and_views():
    model = model_with_draft_vocab()
    fuse_projections(model)  # wq, wk, wv become views into wqkv: they must stay views into one storage
    model.refresh_draft_head()
    state = torch.randn(2, 5, model.base.cfg.d_model)
    tokens = torch.randint(0, model.base.cfg.vocab_size, (2, 5))
    with torch.no_grad():
        before = model.recycle(state, tokens).logits
        params = {n: p for n, p in model.module.named_parameters()}
        old_ptrs = {n: p.data_ptr() for n, p in params.items()}
        tensors = l2_persist.module_tensors(model)
        buf = l2_persist.gather(tensors)
        after = model.recycle(state, tokens).logits
    assert torch.equal(before, after)
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    for n, p in model.module.named_parameters():
        assert p is params[n] and lo <= p.data_ptr() < hi and p.data_ptr() != old_ptrs[n]  # moved, same Parameter
    assert lo <= model.draft_weight.data_ptr() < hi
    attn = model.module.layers[0].attn
    assert attn.wq.weight.untyped_storage().data_ptr() == attn.wqkv.untyped_storage().data_ptr()
    with torch.no_grad():
        attn.wqkv[0, 0] += 1.0  # an in-place change reaches the view, as fuse_projections promises
    assert attn.wq.weight[0, 0] == attn.wqkv[0, 0]
    assert model.module.draft_ids.dtype == torch.long  # integer buffers stay where they were


@CUDA
@pytest.mark.cuda
def test_cuda_graphs_with_the_l2_window_give_the_same_tokens(monkeypatch):
    model = model_with_draft_vocab(1).cuda()
    model.recycle_vocab = "draft"
    prompts = [[3, 4, 5, 6], [9, 10]]
    want = recycle(model, prompts, max_new_tokens=30).tokens
    monkeypatch.setattr(engine_mod, "L2_PERSIST", True)
    eng = Engine(model, graphs=True, bucket=16)
    for _ in range(2):  # capture, then replay
        assert eng.decode("recycle", prompts, max_new_tokens=30).tokens == want
    (dec,) = eng._decoders.values()
    assert dec.l2_window is not None and 0 < dec.l2_window.hit_ratio <= 1
    assert dec.l2_window.ptr == model._l2_buffer.data_ptr()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    x = torch.zeros(4, device="cuda")
    with torch.cuda.graph(graph):
        x.add_(1)
    assert l2_persist.apply_window(graph, dec.l2_window) >= 1
    graph.instantiate()
    graph.replay()
    torch.cuda.synchronize()
    assert x.sum().item() == 4  # captured (not run), then replayed once
