"""Weight-only int8 products on the CPU (models/quantize.py, `--quantize int8`): the int8 form and its product
against a dequantised reference, rows that do not depend on the rows beside them, every product of a model taking
its int8 form, the lossless strategies exact against the int8 model's own `standard` (eager, on the static engine,
by continuous batching), the state dict untouched, and the clear errors (CUDA, an unknown choice)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_cli import last_json
from test_differential import OPTS, assert_all_identical, sequence, with_draft_vocab
from test_llama_cpp import DECODING
from test_speculative import STRATEGIES, predictable, prompts_for

from recyclegpt.api import RecycleGPT
from recyclegpt.cli.main import build_parser, main
from recyclegpt.config import ConfigError
from recyclegpt.decoding import strategies
from recyclegpt.decoding.engine import Engine
from recyclegpt.decoding.loops import standard
from recyclegpt.decoding.strategies import reference_decode
from recyclegpt.evals import differential as dt
from recyclegpt.models import Int8Weight, Linear, RecycleModel, quantize_int8_
from recyclegpt.models import transformer as tf
from recyclegpt.models.quantize import check_quantize, kernel_available, quantized

KERNEL = pytest.mark.skipif(not kernel_available(), reason="this torch has no _weight_int8pack_mm")


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)  # rows of different ranges


def within_bf16(y: torch.Tensor, x: torch.Tensor, w: Int8Weight) -> None:
    """y equals x @ w.T (x rounded to bfloat16, the dequantised weight, in float64) up to the bfloat16 rounding of
    the result and float32 sums."""
    xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).double()
    deq = w.dequantized().double()
    exact = xb @ deq.T
    bound = exact.abs() * 2.0 ** -8 + 1e-6 * (xb.abs() @ deq.abs().T)
    assert ((y.reshape(exact.shape).double() - exact).abs() <= bound).all()


def test_the_int8_form_is_per_row_symmetric():
    w = weight(40, 64)
    w[3] = 0  # a row of zeros: scale 0, values 0, no NaN
    q = Int8Weight.of(w)
    assert q.values.dtype == torch.int8 and q.scales.dtype == torch.bfloat16 and q.scales.shape == (40,)
    assert q.values.abs().max() <= 127 and (q.values.abs().amax(1)[torch.arange(40) != 3] >= 126).all()
    s = q.scales.float()[:, None]
    assert torch.equal(s[:, 0], (w.abs().amax(1) / 127).to(torch.bfloat16).float())
    assert ((w - q.dequantized()).abs() <= 0.5001 * s).all()  # the nearest multiple of its row's scale
    assert not q.values[3].any() and q.scales[3] == 0 and torch.isfinite(q.dequantized()).all()


@pytest.mark.parametrize("k", [32, 64, 576, 24])  # 24: not a multiple of 16, the dequantised product
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_product_equals_the_dequantised_reference(k, dtype):
    q = Int8Weight.of(weight(37, k))
    assert q.packed == (k % 16 == 0 and kernel_available())
    for rows in (1, 2, 5, 33):
        x = torch.randn(1, rows, k).to(dtype)
        y = q(x)
        assert y.dtype == dtype and y.shape == (1, rows, 37)
        within_bf16(y, x, q)
    ref = Int8Weight(q.values, q.scales)
    ref.packed = False  # the form without the kernel: the same bound
    x = torch.randn(3, k)
    within_bf16(ref(x), x, q)
    assert q(torch.randn(2, 0, k)).shape == (2, 0, 37)  # no rows (a call that needs no logits)


@KERNEL
def test_an_offset_bfloat16_view_is_copied_before_the_kernel():
    """The kernel loads activation rows with aligned vector loads: a view 2 bytes into its storage (a bfloat16
    model's slice of positions) crashed the process before the product copied its input."""
    q = Int8Weight.of(weight(8, 64))
    x = torch.randn(4 * 64 + 1).to(torch.bfloat16)[1:].view(4, 64)
    assert x.data_ptr() % 32 != 0
    within_bf16(q(x), x, q)


@KERNEL
@pytest.mark.parametrize("n, k", [(37, 64), (3072, 576), (576, 1536)])
def test_a_row_does_not_depend_on_the_rows_beside_it(n, k):
    """What keeps the lossless strategies exact: a verification's k rows give the bits of k one-row steps (and the
    thread count changes nothing either)."""
    q = Int8Weight.of(weight(n, k))
    x = torch.randn(40, k)
    one = torch.cat([q(x[r:r + 1]) for r in range(40)])
    for rows in (2, 3, 4, 5, 8, 17, 40):
        assert torch.equal(q(x[:rows]), one[:rows]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(q(x[:7]), one[:7])
    finally:
        torch.set_num_threads(threads)


def test_a_tied_head_keeps_the_float_embedding(tiny_model):
    embedding = tiny_model.tok_emb.weight.detach().clone()
    assert quantized(tiny_model) is None
    quantize_int8_(tiny_model)
    assert quantized(tiny_model) == "int8" and tiny_model.lm_head.weight is tiny_model.tok_emb.weight
    assert torch.equal(tiny_model.tok_emb.weight, embedding)  # lookups read the float32 rows
    assert torch.equal(tiny_model.lm_head.int8.values, Int8Weight.of(embedding).values)


def test_every_product_takes_its_int8_form(monkeypatch):
    """After quantize_int8_ no decoding path multiplies by a float weight: F.linear and the transposed CPU form
    fail if called, and every strategy still decodes (the module's draft-vocabulary head included)."""
    model = quantize_int8_(with_draft_vocab(predictable(0, 0.05)))
    for m in model.modules():
        if isinstance(m, Linear):
            assert m.int8 is not None
    for block in list(model.base.layers) + list(model.module.layers):
        attn, mlp = block.attn, block.mlp
        assert attn.wq.int8.values.data_ptr() == attn.wqkv_int8.values.data_ptr()  # the parts: views
        assert mlp.w3.int8.values.data_ptr() == mlp.w13_int8.values.data_ptr() + mlp.w1.weight.numel()

    def boom(*a, **k):
        raise AssertionError("a float product in an int8 model")

    monkeypatch.setattr(F, "linear", boom)
    monkeypatch.setattr(tf, "_transposed_product", boom)
    prompts = prompts_for(0, 3)
    with torch.inference_mode():
        for name in strategies.names():
            reference_decode(model, name, prompts, max_new_tokens=12)
        model.recycle_vocab = "draft"
        reference_decode(model, "recycle", prompts, max_new_tokens=12)
    ids = model.module.draft_ids
    assert torch.equal(model.draft_int8.values, model.base.lm_head.int8.values[ids])


def test_the_state_dict_stays_the_float_one():
    model = predictable(1, 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_int8_(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    again = RecycleModel.build(model.base.cfg, model.module.cfg).eval()
    again.load_state_dict(after)
    quantize_int8_(again)
    assert torch.equal(again.base.layers[1].mlp.w13_int8.values, model.base.layers[1].mlp.w13_int8.values)
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(again.base(x).logits, model.base(x).logits)


def folded_mask(sees: torch.Tensor, groups: int) -> torch.Tensor:
    """The additive mask (B, 1, g*T, S) of a bool (B, T, S) one, its rows repeated for each query head of a group."""
    B, T, S = sees.shape
    rows = sees[:, None, None].expand(B, 1, groups, T, S).reshape(B, 1, groups * T, S)
    return torch.zeros(rows.shape).masked_fill_(~rows, float("-inf"))


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_the_row_plan_computes_the_attention(kind):
    """RowPlan's rows (each in a step's form: a bucket of slots, a tree row against a copy of its branch) give
    SDPA's values for the same mask: a chain over a bucket boundary with left-padded batch rows, and a tree whose
    batch rows see different branches."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, groups, D, first = 2, 2, 3, 16, 62
    slots = list(range(first, first + 4))
    S = tf.round_up(slots[-1] + 1, tf.ROW_BUCKET)  # as run_blocks rounds kv_end
    pos = torch.arange(S)
    if kind == "chain":
        pad = torch.tensor([0, 5])
        sees = (pos[None, None] <= torch.tensor(slots)[None, :, None]) & (pos[None, None] >= pad[:, None, None])
    else:  # node 0 the root; row 0: 1 and 2 its children, 3 a child of 2; row 1: 1, 2 and 3 a chain
        parents = [[-1, 0, 0, 2], [-1, 0, 1, 2]]
        sees = torch.zeros(B, 4, S, dtype=torch.bool)
        sees[:, :, :first] = True
        for b in range(B):
            for t in range(4):
                node = t
                while node >= 0:
                    sees[b, t, first + node] = True
                    node = parents[b][node]
    mask = folded_mask(sees, groups)
    q = torch.randn(B, Hkv, groups * 4, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    plan = tf.RowPlan(mask, slots, groups)
    assert bool(plan.buckets) == (kind == "chain") and len(plan.buckets) in (0, 2)  # slots 62, 63 | 64, 65
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(plan.attend(q, k, v), want, rtol=1e-5, atol=1e-5)


def mixed_prompts(seed: int) -> list[list[int]]:
    """Short prompts (1-15 tokens) and long ones (40-180) in one sequence."""
    g = torch.Generator().manual_seed(100 + seed)
    long = [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in torch.randint(40, 180, (2,), generator=g)]
    short = prompts_for(seed, 3)
    return [short[0], long[0], short[1], long[1], short[2]]


@pytest.mark.parametrize("noise", [0.05, 0.15, 1.0])
def test_lossless_strategies_equal_the_int8_standard(noise):
    """The int8 model is its own reference: every lossless strategy (recycle-verified, speculative chains, trees,
    prompt lookup) gives exactly its greedy `standard` tokens, one prompt at a time and as a left-padded batch."""
    lossless = strategies.lossless_names()
    accepted = 0
    for seed in range(2):
        model = quantize_int8_(predictable(seed, noise))
        prompts = mixed_prompts(seed)
        with torch.inference_mode():
            want = standard(model.base, prompts, max_new_tokens=24).tokens
            for prompt, row in zip(prompts, want):
                for name, (fn, kw) in STRATEGIES.items():
                    res = fn(model, [prompt], max_new_tokens=24, **kw)
                    assert res.tokens[0] == row, (name, noise, seed, len(prompt))
                    accepted += sum(res.stats.accept_hist[1:])
                for name in lossless:
                    assert reference_decode(model, name, [prompt], max_new_tokens=24).tokens[0] == row, name
            for name in lossless:
                assert reference_decode(model, name, prompts, max_new_tokens=24).tokens == want, name
    assert accepted > 0


def test_the_int8_model_on_the_static_engine_and_in_continuous_batches():
    """The differential harness on the int8 model: every strategy on the static engine against the eager
    reference over a request sequence (prompts of 1 token to near the context, greedy and sampled, stops), and
    greedy requests arriving into a continuous batch of 3 rows, each equal to its reference alone."""
    model = quantize_int8_(with_draft_vocab(predictable(3, 0.05)))
    model.recycle_vocab = "draft"
    engines = {"static": Engine(model, graphs=False, bucket=16, prefill_bucket=8)}
    assert_all_identical(dt.run_sequence(model, engines, sequence(model, 8, seed=1), opts=OPTS))
    assert_all_identical(dt.run_arrivals(model, engines, sequence(model, 6, seed=3), rows=3, opts=OPTS, seed=1))


def test_the_compiled_engine_refuses_int8_weights():
    model = quantize_int8_(predictable(2, 0.05))
    with pytest.raises(ValueError, match="the compiled engine does not run int8 weights"):
        Engine(model, graphs=False, compile=True, bucket=64)
    Engine(model, graphs=False, bucket=64)  # the static engine does


def test_quantize_is_refused_off_the_cpu_and_for_unknown_choices():
    check_quantize(None, "cuda")  # nothing asked: nothing to refuse
    with pytest.raises(ConfigError, match=r"--quantize int8 \(weight-only int8 products\) runs on the CPU only.*"
                                          r"cuda.*--device cpu"):
        RecycleGPT.from_pretrained("no-such-model", device="cuda", quantize="int8")  # refused before loading
    with pytest.raises(ConfigError, match="unknown quantize 'int4'; choose int8"):
        RecycleGPT.from_pretrained("no-such-model", device="cpu", quantize="int4")


@pytest.mark.parametrize("command", list(DECODING))
def test_every_decoding_command_takes_quantize(command):
    assert build_parser().parse_args(DECODING[command] + ["--quantize", "int8"]).quantize == "int8"
    assert build_parser().parse_args(DECODING[command]).quantize is None


def test_the_cli_decodes_and_benches_with_int8_weights(tiny_ckpt, capsys):
    _, _, ckpt = tiny_ckpt
    base = ["--model", str(ckpt), "--device", "cpu", "--max-new-tokens", "8"]
    assert main(["generate", *base, "--quantize", "int8", "--strategy", "standard", "--json", "the quick"]) == 0
    want = last_json(capsys)["token_ids"]
    assert main(["generate", *base, "--quantize", "int8", "--strategy", "speculative", "--json", "the quick"]) == 0
    assert last_json(capsys)["token_ids"] == want
    assert main(["bench", *base, "--quantize", "int8", "--limit", "2", "--no-chat", "--json",
                 "--strategies", "standard,speculative"]) == 0
    out = capsys.readouterr().out
    assert "dtype: float32 (int8 weights)" in out
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["quantize"] == "int8" and rep["results"][1]["same_as_standard"] == 2
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", str(ckpt), "--quantize", "int4", "hi"])
    assert exit.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
