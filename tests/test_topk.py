"""The sort-free top-k selection (recyclegpt.decoding.topk) against torch.topk and torch.sort, and the draft tree built with it."""

from __future__ import annotations

import pytest
import torch
from test_speculative import predictable, prompts_for

from recyclegpt.config import KernelConfig
from recyclegpt.decoding import topk
from recyclegpt.decoding.loops import standard
from recyclegpt.decoding.speculative import TreeShape, tree


@pytest.mark.parametrize("shape,k", [((3, 7), 1), ((2, 5, 50), 4), ((4, 1024), 8), ((2, 3, 4096), 4), ((1, 49152), 4)])
def test_top_k_equals_torch_topk_on_distinct_values(shape, k):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(k))
    values, ids = topk.top_k(x, k, cuda_path=True)  # the sort-free path CUDA takes
    want = x.topk(k, dim=-1)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)


@pytest.mark.parametrize("n", [40, 2048])
def test_top_k_with_ties_and_minus_inf_keeps_indices_distinct(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 4, (6, n), generator=g).float()  # many ties
    x[0] = 1.0  # a row of one value
    x[1] = float("-inf")
    x[1, [5, n - 1]] = 2.0  # fewer finite values than k
    k = 5
    values, ids = topk.top_k(x, k, cuda_path=True)
    assert torch.equal(values, x.topk(k, dim=-1).values)  # the same multiset, largest first
    assert torch.equal(x.gather(-1, ids), values)
    assert all(len(set(row.tolist())) == k for row in ids)
    if n <= topk.SMALL:  # ranked whole: ties go to the lower index, as in a stable sort
        want = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(ids, want)


def test_chunks_are_exact_where_the_top_values_share_a_chunk():
    x = torch.full((1, 1024 * 4), -5.0)
    x[0, 130:134] = torch.tensor([9.0, 8.0, 7.0, 6.0])  # all four in chunk 1
    x[0, 0] = 5.0
    values, ids = topk.top_k_chunked(x, 4)
    assert ids.tolist() == [[130, 131, 132, 133]] and values.tolist() == [[9.0, 8.0, 7.0, 6.0]]


def test_best_in_order_equals_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    for n, k in [(10, 3), (52, 16), (76, 24)]:
        score = torch.randint(-6, 0, (5, n), generator=g).float()  # ties everywhere
        want = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values
        assert torch.equal(topk.best_in_order(score, k, cuda_path=True), want)
        assert torch.equal(topk.best_in_order(score, k), want)  # torch's sort on the CPU


def test_stable_rank_is_a_stable_descending_sort():
    x = torch.tensor([[3.0, 1.0, 3.0, float("-inf"), 2.0, float("-inf")]])
    assert topk.stable_rank(x).tolist() == [[0, 3, 1, 4, 2, 5]]


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="top-k of 5 from rows of 4"):
        topk.top_k(torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match="whole chunks"):
        topk.top_k_chunked(torch.zeros(2, 1000), 4)


@pytest.mark.parametrize("shape", [(3, 49152), (2, 5, 3000), (4, 1025), (1, 1024), (2, 7)])
def test_split_argmax_equals_torch_argmax(shape):
    """Chunk maxima, then the best chunk: the first index among equal maxima, as torch.argmax, with ties, -inf rows
    and a last partial chunk."""
    g = torch.Generator().manual_seed(shape[-1])
    for x in (torch.randn(shape, generator=g), torch.randint(0, 3, shape, generator=g).float(),
              torch.full(shape, float("-inf"))):
        for chunk in (topk.ARGMAX_CHUNK, 16, 1000):
            assert torch.equal(topk.split_argmax(x, chunk), x.argmax(-1)), (shape, chunk)
    x = torch.full(shape, float("-inf"))
    x[..., -1] = 1.0  # the maximum in the padded last chunk
    assert torch.equal(topk.split_argmax(x, 16), x.argmax(-1))


@pytest.mark.parametrize("cuda_path", [False, True])
def test_argmax_compiled_equals_torch_argmax(cuda_path):
    """Under torch.compile the CUDA path splits the argmax in chunks (`split_argmax`); either way the indices are
    torch.argmax's, ties included."""
    x = torch.randint(0, 3, (4, 2048), generator=torch.Generator().manual_seed(0)).float()
    x[1] = float("-inf")
    compiled = torch.compile(lambda t: topk.argmax(t, cuda_path=cuda_path), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), x.argmax(-1))
    assert torch.equal(topk.argmax(x, cuda_path=cuda_path), x.argmax(-1))


@pytest.mark.parametrize("vocab", [97, 2048])  # 2048: past SMALL, so the vocabulary is chunked
def test_the_tree_drafts_the_same_with_either_selection(vocab):
    """The sort-free path drafts the very trees torch's topk and sort did (random scores: no ties), so rounds accept
    the same lengths; and the output is standard's."""
    model = predictable(2, 0.05, vocab=vocab)
    prompts = prompts_for(2, 3, vocab)
    runs = {}
    for mode in ("never", "always"):
        model.kernels = KernelConfig(cuda_paths_on_cpu=mode == "always")
        runs[mode] = tree(model, prompts, max_new_tokens=24, shape=TreeShape(4, 3, 10))
    assert runs["always"].tokens == runs["never"].tokens == standard(model.base, prompts, max_new_tokens=24).tokens
    assert runs["always"].stats.accept_hist == runs["never"].stats.accept_hist
    assert sum(runs["always"].stats.accept_hist[1:]) > 0


@pytest.mark.parametrize("cuda_path", [False, True])  # on the CPU: torch.topk, then the sort-free path
@pytest.mark.parametrize("draft_vocab", [False, True])
def test_draft_top_equals_the_top_of_the_draft_logits(draft_vocab, cuda_path):
    """RecycleModel.draft_top searches the draft vocabulary's logits directly; it must give the tokens and
    log-probabilities that the top-k of log_softmax(draft_logits) (V wide, -inf outside the vocabulary) gives."""
    from recyclegpt.training.train import add_draft_vocab

    model = predictable(3, 0.1, vocab=2048)
    model.kernels = KernelConfig(cuda_paths_on_cpu=cuda_path)
    if draft_vocab:
        ids = torch.randperm(2048, generator=torch.Generator().manual_seed(0))[:640]
        model.module = add_draft_vocab(model.module, ids)
    model.refresh_draft_head()
    assert (model.draft_weight is not None) == draft_vocab
    out = torch.randn(2, 3, model.base.cfg.d_model, generator=torch.Generator().manual_seed(1))
    logp, got = model.draft_top(out, 4)
    want = torch.log_softmax(model.draft_logits(out).float(), -1).topk(4, dim=-1)
    assert torch.equal(got, want.indices)
    torch.testing.assert_close(logp, want.values)
    if draft_vocab:
        assert set(got.flatten().tolist()) <= set(ids.tolist())
