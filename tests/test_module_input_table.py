"""MODULE_INPUT_TABLE: the token half of the module's input product taken from a per-token table while decoding.

The table's rows are W_e norm_e(e) for every token id; the module's output with them equals the concatenated
product's up to the order of the sums (float32); the engine and the reference loops use the same table, so they
agree exactly; the lossless strategies stay equal to `standard`; training never sees a stale table."""

from __future__ import annotations

import pytest
import torch

from recyclegpt import model as model_module
from recyclegpt.decoding import recycle, standard
from recyclegpt.engine import Engine
from recyclegpt.speculative import speculative, tree
from test_engine import build
from test_speculative import predictable


@pytest.fixture
def table_on(monkeypatch):
    monkeypatch.setattr(model_module, "MODULE_INPUT_TABLE", True)


def test_table_rows_give_the_module_the_same_input(table_on):
    model = build(0)
    model.refresh_input_table()
    V, d = model.base.cfg.vocab_size, model.base.cfg.d_model
    assert model.input_table.shape == (V, d) and model.input_table.dtype == torch.float32
    state = torch.randn(2, 5, d)
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        want = model.module(state, model.base.tok_emb(ids))
        got = model.module(state, None, tok_part=model.input_table[ids])
        via_recycle = model.recycle(state, ids).hidden
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, want)  # the halves are summed apart: other bits, which tell the paths apart below
    assert torch.equal(via_recycle, got)  # recycle() takes the table's rows without grad


def test_switch_off_training_and_changed_weights(monkeypatch, table_on):
    model = build(0)
    model.refresh_input_table()
    assert model.input_table is not None
    model.train()
    assert model.input_table is None  # the weights may change: no table in train mode
    model.eval()
    model.refresh_input_table()
    first = model.input_table.clone()
    with torch.no_grad():
        model.module.fc.weight.mul_(2.0)  # a weight change (its version moves): the table is made again
    model.refresh_input_table()
    torch.testing.assert_close(model.input_table, 2 * first)
    ids = torch.tensor([[1, 2, 3]])
    state = torch.randn(1, 3, model.base.cfg.d_model)
    with torch.enable_grad():  # with autograd (training's losses) the module reads the embeddings
        out = model.recycle(state, ids).hidden
    assert out.requires_grad
    monkeypatch.setattr(model_module, "MODULE_INPUT_TABLE", False)
    model.refresh_input_table()
    assert model.input_table is None


@pytest.mark.parametrize("n_layer", [1, 2])
def test_engine_equals_the_reference_with_the_table(table_on, n_layer):
    model = build(3, n_layer)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    want = recycle(model, prompts, max_new_tokens=21).tokens
    assert model.input_table is not None
    got = Engine(model, bucket=8).decode("recycle", prompts, max_new_tokens=21, check_every=3).tokens
    assert got == want


def test_lossless_strategies_stay_exact_with_the_table(table_on):
    model = predictable(1, 0.05)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    want = standard(model.base, prompts, max_new_tokens=30).tokens
    assert speculative(model, prompts, max_new_tokens=30).tokens == want
    assert tree(model, prompts, max_new_tokens=30).tokens == want
    for strategy in ("speculative", "tree", "recycle-verified"):
        assert Engine(model, bucket=16).decode(strategy, prompts, max_new_tokens=30).tokens == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["recycle", "speculative"])
def test_cuda_graphs_with_the_table(table_on, strategy):
    """Captured graphs read the table made before capture; the fused path gives the eager reference's tokens."""
    model = build(5, 2).cuda() if strategy == "recycle" else predictable(1, 0.05).cuda()
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    ref = recycle(model, prompts, max_new_tokens=40).tokens if strategy == "recycle" else \
        standard(model.base, prompts, max_new_tokens=40).tokens
    graphs = Engine(model, graphs=True, bucket=16)
    first = graphs.decode(strategy, prompts, max_new_tokens=40).tokens
    assert first == graphs.decode(strategy, prompts, max_new_tokens=40).tokens == ref
