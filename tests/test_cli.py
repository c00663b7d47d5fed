"""The CLI end to end on a tiny model trained in the test: train -> generate -> bench -> retrofit -> distill."""

from __future__ import annotations

import json

import pytest
import torch

from recyclegpt.api import RecycleGPT
from recyclegpt.cli.main import main



def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_has_the_documented_keys(tiny_ckpt, capsys):
    _, _, ckpt = tiny_ckpt
    for strategy in ("standard", "recycle"):
        assert main(["generate", "--model", str(ckpt), "--strategy", strategy, "--max-new-tokens", "9", "--json",
                     "the quick"]) == 0
        rec = last_json(capsys)
        for key in ("text", "token_ids", "strategy", "new_tokens", "full_calls", "module_calls", "seconds",
                    "tokens_per_s"):
            assert key in rec
        assert rec["strategy"] == strategy
        if rec["new_tokens"] == 9 and strategy == "recycle":
            assert rec["full_calls"] == 5 and rec["module_calls"] == 4


def test_bench_json(tiny_ckpt, capsys):
    _, _, ckpt = tiny_ckpt
    assert main(["bench", "--model", str(ckpt), "--max-new-tokens", "8", "--limit", "2", "--no-chat", "--json"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.strip().splitlines()[-1])
    table = out[:out.rindex("\n{")]
    assert "nan" not in table and " 1.00x       -  " in table  # no HF run: its column says so
    assert {"device", "model", "results", "speedup", "speedup_vs_hf_eager", "batch_size", "engine"} <= set(rep)
    assert [r["strategy"] for r in rep["results"]] == ["standard", "recycle"]
    for r in rep["results"]:
        assert {"strategy", "tokens_per_s", "median_tokens_per_s", "full_calls", "module_calls", "new_tokens",
                "ttft_ms", "step_ms", "peak_mem_mb", "engine"} <= set(r)
        assert r["new_tokens"] == 16  # ignore_eos: every prompt runs to max_new_tokens
        assert r["ttft_ms"] > 0 and r["step_ms"] > 0
    assert rep["results"][1]["full_calls"] == 2 * 4  # one full call per two tokens, per prompt
    assert 0.0 <= rep["results"][1]["alpha"] <= 1.0 and "alpha" not in rep["results"][0]
    assert set(rep["speedup"]) == {"standard", "recycle"} and rep["speedup"]["standard"] == 1.0
    assert rep["speedup_vs_hf_eager"] == {}  # no HF run asked for
    assert rep["recycle_vocab"] == "full"


def test_kv_bucket_reaches_the_engine_and_keeps_the_tokens(tiny_ckpt, capsys, monkeypatch):
    from recyclegpt.decoding import engine

    _, _, ckpt = tiny_ckpt
    buckets = []
    init = engine.Engine.__init__
    monkeypatch.setattr(engine.Engine, "__init__", lambda self, *a, **k: buckets.append(k["bucket"]) or init(self, *a, **k))
    tokens = []
    for extra in ([], ["--kv-bucket", "16"]):
        assert main(["generate", "--model", str(ckpt), "--max-new-tokens", "20", "--json", "--engine", "static",
                     "--strategy", "speculative", *extra, "the quick"]) == 0
        tokens.append(last_json(capsys)["token_ids"])
    assert buckets == [engine.KV_BUCKET, 16] and tokens[0] == tokens[1]


def test_lossless_strategies_from_the_cli(tiny_ckpt, capsys, tmp_path):
    _, _, ckpt = tiny_ckpt
    assert main(["generate", "--model", str(ckpt), "--max-new-tokens", "12", "--json", "the quick"]) == 0
    want = last_json(capsys)["token_ids"]
    for extra in (["--strategy", "recycle-verified"], ["--strategy", "speculative", "--draft-len", "2"],
                  ["--strategy", "speculative", "--tree", "--tree-depth", "3", "--tree-topk", "2", "--tree-nodes", "5"],
                  ["--strategy", "tree", "--engine", "static"],
                  ["--strategy", "speculative", "--draft-len", "3", "--min-draft-prob", "0.3"]):
        assert main(["generate", "--model", str(ckpt), "--max-new-tokens", "12", "--json", *extra, "the quick"]) == 0
        rec = last_json(capsys)
        assert rec["token_ids"] == want, extra  # lossless: standard's tokens
        assert rec["tau"] >= 1.0 and sum(rec["accept_hist"]) >= 1
        assert rec["strategy"] == ("tree" if "--tree" in extra or "tree" in extra else extra[1])
    a, b = tmp_path / "cat_a.jsonl", tmp_path / "cat_b.jsonl"
    a.write_text('{"prompt": "the quick"}\n{"prompt": "a stitch"}\n')
    b.write_text('{"prompt": "the lazy"}\n')
    assert main(["bench", "--model", str(ckpt), "--prompts", str(a), "--prompts", str(b), "--max-new-tokens", "6",
                 "--no-chat", "--no-alpha", "--json", "--strategies", "standard,speculative,tree"]) == 0
    rep = last_json(capsys)
    spec = rep["results"][1]
    assert spec["tau"] >= 1.0 and len(spec["accept_hist"]) == rep["draft_len"] + 1
    assert set(spec["per_category"]) == {"cat_a", "cat_b"}
    assert {"tokens_per_s", "speedup", "tau"} <= set(spec["per_category"]["cat_a"])
    assert rep["results"][0]["per_category"]["cat_b"]["speedup"] == 1.0 and "tau" not in rep["results"][0]
    # lossless: every prompt's tokens equal standard's, and bench says so
    assert [r.get("same_as_standard") for r in rep["results"]] == [None, 3, 3]


def test_bench_batches_engines_and_hf_baseline(tiny_ckpt, capsys):
    pytest.importorskip("transformers")
    _, _, ckpt = tiny_ckpt
    assert main(["bench", "--model", str(ckpt), "--max-new-tokens", "6", "--limit", "4", "--no-chat", "--json",
                 "--batch-size", "2", "--engine", "static", "--no-alpha"]) == 0
    rep = last_json(capsys)
    assert rep["batch_size"] == 2 and rep["engine"] == "static"
    assert all(r["new_tokens"] == 4 * 6 for r in rep["results"])
    assert main(["bench", "--model", str(ckpt), "--max-new-tokens", "6", "--limit", "5", "--no-chat", "--json",
                 "--batch-size", "2", "--continuous", "--no-alpha", "--check-prompts", "5",
                 "--strategies", "standard,recycle,recycle-verified", "--draft-rows", "1"]) == 0
    rep = last_json(capsys)  # continuous batching: on the static engine, every prompt checked against the reference
    assert rep["continuous"] and rep["engine"] == "static" and rep["check"]["checked"] == 5
    assert rep["draft_rows"] == 1  # recycle-verified's two rows verify without drafts
    assert all(r["new_tokens"] == 5 * 6 for r in rep["results"])
    assert main(["bench", "--model", str(ckpt), "--max-new-tokens", "6", "--limit", "2", "--no-chat", "--json",
                 "--strategies", "hf_eager,standard"]) == 0
    rep = last_json(capsys)
    assert [r["strategy"] for r in rep["results"]] == ["hf_eager", "standard"]
    assert rep["speedup_vs_hf_eager"]["hf_eager"] == 1.0 and rep["results"][0]["engine"].startswith("dynamic")
    assert main(["bench", "--model", str(ckpt), "--strategies", "hf_eager", "--batch-size", "2"]) == 2
    assert "batch size 1" in capsys.readouterr().err
    assert main(["bench", "--model", str(ckpt), "--max-new-tokens", "6", "--limit", "2", "--no-chat", "--json",
                 "--engine", "static", "--no-alpha", "--kv-bucket", "16"]) == 0
    assert last_json(capsys)["kv_bucket"] == 16
    assert main(["bench", "--model", str(ckpt), "--engine", "static", "--kv-bucket", "8"]) == 2
    assert "--kv-bucket must be at least 16" in capsys.readouterr().err


def test_retrofit_then_recycle_on_the_trained_base(tiny_ckpt, capsys, tmp_path):
    _, corpus, ckpt = tiny_ckpt
    out = tmp_path / "module"
    assert main(["retrofit", str(corpus), "--model", str(ckpt), "--out", str(out), "--steps", "2", "--batch-size",
                 "2", "--seq-len", "32", "--warmup", "1", "--eval-every", "0", "--eval-batches", "1",
                 "--val-fraction", "0.1", "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(ckpt), "--recycle", str(out), "--strategy", "recycle",
                 "--max-new-tokens", "6", "--json", "the lazy"]) == 0
    assert last_json(capsys)["module"] == str(out)


def test_distill_writes_jsonl_and_never_overwrites(tiny_ckpt, tmp_path, capsys):
    _, _, ckpt = tiny_ckpt
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["the quick", "a stitch", "over the"]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["distill", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "5",
            "--batch-size", "2"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == ["a stitch", "over the", "the quick"]
    assert all(isinstance(r["response"], str) for r in rows)
    assert all(r["chat"] is False for r in rows)  # no chat template: plain continuations, marked for retrofit
    before = out.read_text()
    assert main(args) == 2  # exists: refused without --force
    assert "exists" in capsys.readouterr().err and out.read_text() == before
    # the engine is named: eager gives the same records; graphs needs CUDA, said before anything is written
    out2 = tmp_path / "eager.jsonl"
    assert main(args[:6] + [str(out2)] + args[7:] + ["--engine", "eager"]) == 0
    assert out2.read_text() == before
    if not torch.cuda.is_available():
        assert main(args[:6] + [str(tmp_path / "g.jsonl")] + args[7:] + ["--engine", "graphs"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err and not (tmp_path / "g.jsonl.partial").exists()


def test_distill_halves_a_batch_that_runs_out_of_memory(tiny_ckpt, tmp_path, capsys, monkeypatch):
    _, _, ckpt = tiny_ckpt
    prompts = tmp_path / "prompts.jsonl"
    words = ["the quick", "a stitch", "over the", "the lazy", "a dog"]
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in words) + "\n")
    real = RecycleGPT.generate
    sizes = []

    def generate(self, prompt, **kw):  # a card that holds at most two prompts at a time
        sizes.append(len(prompt))
        if len(prompt) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, prompt, **kw)

    monkeypatch.setattr(RecycleGPT, "generate", generate)
    out = tmp_path / "out.jsonl"
    assert main(["distill", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "4", "--batch-size", "5"]) == 0
    assert sorted(json.loads(line)["prompt"] for line in out.read_text().splitlines()) == sorted(words)
    assert sizes == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, and 3 -> 1 + 2
    assert "out of GPU memory at batch 5" in capsys.readouterr().err

    monkeypatch.setattr(RecycleGPT, "generate", lambda self, prompt, **kw: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("simulated")))
    assert main(["distill", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "o2.jsonl"),
                 "--max-new-tokens", "4", "--batch-size", "1"]) == 2
    assert "single prompt" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "no-such-model", "hi"], "not a built-in model name"),
    (["generate", "--strategy", "recycle", "--model", "{ckpt}", "--recycle", "/no/such/dir", "hi"], "does not exist"),
    (["generate", "--model", "{ckpt}", "--temperature", "-1", "hi"], "temperature"),
    (["generate", "--model", "{ckpt}", "--max-new-tokens", "100000", "hi"], "context length"),
    (["generate", "--model", "{ckpt}", ""], "empty"),
    (["bench", "--model", "{ckpt}", "--prompts", "/no/such.jsonl"], "does not exist"),
    (["generate", "--model", "{ckpt}", "--strategy", "recycle", "--tree", "hi"], "--tree drafts a tree"),
    (["generate", "--model", "{ckpt}", "--strategy", "speculative", "--draft-len", "0", "hi"], "draft_len"),
    (["generate", "--model", "{ckpt}", "--strategy", "tree", "--tree-nodes", "500", "hi"], "at most"),
    (["generate", "--model", "{ckpt}", "--recycle", "none", "--strategy", "speculative", "hi"], "needs a recyclable"),
    (["generate", "--model", "{ckpt}", "--strategy", "speculative", "--min-draft-prob", "1.5", "hi"], "min_draft_prob"),
    (["generate", "--model", "{ckpt}", "--strategy", "speculative", "--engine", "static", "--min-draft-prob", "0.5",
      "hi"], "eager loop"),
    (["generate", "--model", "{ckpt}", "--compile-mode", "max-autotune-no-cudagraphs", "hi"], "--engine compiled"),
    (["bench", "--model", "{ckpt}", "--compile-mode", "default"], "--engine compiled"),
    (["bench", "--model", "{ckpt}", "--engine", "static", "--compile-steps"], "--compile-steps applies"),
    (["generate", "--model", "{ckpt}", "--no-compile-prefill", "hi"], "--no-compile-prefill applies"),
    (["generate", "--model", "{ckpt}", "--strategy", "recycle", "--recycle-vocab", "draft", "hi"],
     "needs a module with a draft vocabulary"),
    (["bench", "--model", "{ckpt}", "--recycle", "none", "--recycle-vocab", "draft"], "needs a recyclable module"),
])
def test_bad_input_exits_2_with_one_line(tiny_ckpt, capsys, argv, message):
    _, _, ckpt = tiny_ckpt
    argv = [a.replace("{ckpt}", str(ckpt)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_checks_its_tokens_against_the_reference(tiny_ckpt, capsys, tmp_path):
    """A bench run on an engine that is not the reference loop decodes a sample of its prompts again with the eager
    loop and says so; prompts that carry a category are reported per category with α and the lossless share."""
    _, _, ckpt = tiny_ckpt
    f = tmp_path / "suite.jsonl"
    f.write_text('{"category": "short", "prompt": "the quick"}\n{"category": "long", "prompt": "'
                 + "a stitch in time saves nine. " * 6 + '"}\n{"category": "short", "prompt": "the lazy"}\n')
    assert main(["bench", "--model", str(ckpt), "--prompts", str(f), "--max-new-tokens", "8", "--no-chat",
                 "--engine", "static", "--check-prompts", "2", "--json",
                 "--strategies", "standard,recycle,recycle-verified"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["check"]["checked"] == 2 and rep["check"]["tokens"] == "all" and rep["check"]["strategy"] == "standard"
    assert rep["check"]["prompts"] == [0, 1]  # the shortest and the longest
    assert "checked 2/2: standard's tokens (all) equal the eager reference loop" in out
    rec, ver = rep["results"][1], rep["results"][2]
    assert set(rec["per_category"]) == {"short", "long"} and "alpha" in rec["per_category"]["long"]
    assert ver["same_token_share"] == 1.0 and ver["per_category"]["short"]["same_token_share"] == 1.0


def test_bench_refuses_a_run_whose_tokens_differ_from_the_reference(tiny_ckpt, capsys, monkeypatch):
    from recyclegpt.decoding import engine as engine_module

    _, _, ckpt = tiny_ckpt
    real = engine_module.Engine.decode

    def wrong(self, strategy, prompts, **kw):  # an engine that emits a wrong token on one prompt
        res = real(self, strategy, prompts, **kw)
        if len(prompts[0]) > 3 and res.tokens[0]:
            res.tokens[0][-1] = (res.tokens[0][-1] + 1) % 300
        return res

    monkeypatch.setattr(engine_module.Engine, "decode", wrong)
    rc = main(["bench", "--model", str(ckpt), "--max-new-tokens", "6", "--no-chat", "--engine", "static",
               "--strategies", "standard", "--limit", "3"])
    out, err = capsys.readouterr()
    assert rc == 2 and "differ from the eager reference" in err and "no speed is reported" in err
    assert "tok/s" not in out  # no table
    rc = main(["bench", "--model", str(ckpt), "--engine", "static", "--check-prompts", "0"])
    assert rc == 2 and "--check-prompts must be >= 1" in capsys.readouterr().err


def test_check_sample_spans_the_lengths():
    from recyclegpt.evals.speed import check_sample, same_token_share

    ids = [[1] * n for n in (5, 1, 9, 3, 7)]
    assert check_sample(ids, 2) == [1, 2] and check_sample(ids, 3) == [0, 1, 2]
    assert check_sample(ids, 9) == list(range(5))
    assert same_token_share([[1, 2, 3], [4]], [[1, 2, 4], [4]]) == 3 / 4


def test_the_check_passes_a_16_bit_near_tie_and_names_it_but_not_a_wrong_token(tiny_ckpt):
    """In bf16 a difference from the eager reference passes only at a near-tie (the engine's token among the
    reference's five most likely), and the report lists it with its margin and rank; a token the reference ranks
    last stops the bench."""
    from recyclegpt.evals.speed import CheckFailed, StrategyRun, check_tokens

    _, _, ckpt = tiny_ckpt
    lm = RecycleGPT.from_pretrained(str(ckpt), device="cpu", dtype=torch.bfloat16)
    head = lm.base.lm_head.weight
    with torch.no_grad():
        head.mul_(20.0)  # sharp: distinct tokens are far apart
    ids = [lm.encode("the quick")]
    want = lm.generate(ids, max_new_tokens=6, ignore_eos=True, engine="eager").token_ids[0]
    t = want[2]
    u = (t + 1) % head.shape[0]
    with torch.no_grad():
        head[u] = head[t]  # u ties with t exactly wherever t is the choice
    want = lm.generate(ids, max_new_tokens=6, ignore_eos=True, engine="eager").token_ids[0]
    k = next(i for i, x in enumerate(want) if x in (t, u))
    draft = {"draft_len": 3, "tree_shape": (5, 4, 24)}

    def check(got):
        run = StrategyRun("standard")
        run.outputs = [got]
        return check_tokens(lm, ids, {"standard": run}, ["standard"], max_new_tokens=6, ignore_eos=True,
                            engine="static", batch_size=1, sample=1, draft=draft)

    tied = want[:k] + [u if want[k] == t else t] + want[k + 1:]
    rep = check(tied)
    assert rep["near_ties"] and rep["near_ties"][0]["new_token"] == k and rep["near_ties"][0]["margin"] == 0.0
    assert rep["near_ties"][0]["rank"] == 0
    assert check(want)["near_ties"] == []
    lowest = int(lm.base(torch.tensor([ids[0] + want[:1]])).logits[0, -1].float().argmin())
    with pytest.raises(CheckFailed, match="below the top's"):
        check(want[:1] + [lowest] + want[2:])


def test_engine_options_are_given_when_the_model_is_made(tiny_ckpt, capsys):
    """How the engines are built is one EngineOptions, given to from_pretrained (the CLI's --kv-bucket,
    --compile-mode, --compile-steps and --no-compile-prefill make it), not attributes set on the object afterwards."""
    from recyclegpt.api import EngineOptions
    from recyclegpt.cli.main import build_parser
    from recyclegpt.cli.options import engine_options

    _, _, ckpt = tiny_ckpt
    lm = RecycleGPT.from_pretrained(str(ckpt), device="cpu", engine_options=EngineOptions(kv_bucket=32))
    assert lm.engine("static").bucket == 32
    assert RecycleGPT.from_pretrained(str(ckpt), device="cpu").engine("static").bucket == 256
    with pytest.raises(ValueError, match="kv_bucket must be an integer of at least 16"):
        EngineOptions(kv_bucket=8)
    assert lm.engine("static").compile_prefill  # on by default
    off = RecycleGPT.from_pretrained(str(ckpt), device="cpu", engine_options=EngineOptions(compile_prefill=False))
    assert not off.engine("static").compile_prefill
    with pytest.raises(ValueError, match="compile_prefill must be True or False"):
        EngineOptions(compile_prefill=None)
    for extra, want in (([], True), (["--no-compile-prefill"], False)):
        args = build_parser().parse_args(["generate", "--engine", "compiled", *extra, "hi"])
        assert engine_options(args).compile_prefill is want
    assert main(["generate", "--model", str(ckpt), "--compile-steps", "--engine", "static", "the quick"]) == 2
    assert "--compile-steps applies to --engine compiled" in capsys.readouterr().err
