"""The llama.cpp baseline row of `recyclegpt bench` (evals/llama_cpp_baseline.py) and the --threads option.

The row's tests need llama-cpp-python and the real SmolLM2 GGUF, and skip without either; the --threads and
error-message tests run on the tiny checkpoint alone.
"""

from __future__ import annotations

import sys

import pytest
import torch

from recyclegpt.cli.main import build_parser, main
from recyclegpt.evals.speed import BUILTIN_PROMPTS, format_table, run_bench

N_TOKENS = 8


@pytest.fixture
def keep_threads():
    """Whatever a test sets, the process keeps torch's thread count it had before."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2_lm(smollm2_gguf):
    pytest.importorskip("llama_cpp")  # before the model loads
    from recyclegpt import RecycleGPT

    return RecycleGPT.from_pretrained("smollm2-135m-instruct", recycle="none", device="cpu")


# -- the llama_cpp row -------------------------------------------------------------------------------------------


def test_row_runs_and_agrees_with_standard(smollm2_lm, keep_threads):
    pytest.importorskip("llama_cpp")
    report = run_bench(smollm2_lm, BUILTIN_PROMPTS[:2], strategies=("standard", "llama_cpp"),
                       max_new_tokens=N_TOKENS, warmup=1, alpha=False, threads=1)
    row = next(r for r in report["results"] if r["strategy"] == "llama_cpp")
    assert row["new_tokens"] == 2 * N_TOKENS  # EOS ignored: every prompt runs to max_new_tokens
    assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0 and row["step_ms"] > 0
    assert row["peak_mem_mb"] is None
    assert row["engine"].startswith("llama.cpp") and "1 thread" in row["engine"]
    # the same prompt ids, greedy: llama.cpp's tokens are standard's up to where the two runtimes' arithmetic tips a
    # near-tie the other way (8-bit activations against float32): there its token is standard's second choice, a
    # fraction of a logit below the top
    prefix = row["same_prefix"]
    assert len(prefix) == 2 and all(n >= 1 for n in prefix), prefix
    assert row["same_as_standard"] == sum(n == N_TOKENS for n in prefix)
    assert [d["prompt"] for d in row["first_differences"]] == [i for i, n in enumerate(prefix) if n < N_TOKENS]
    for d in row["first_differences"]:
        assert d["new_token"] == prefix[d["prompt"]] and d["rank"] == 1 and 0 <= d["margin"] < 0.5, d
    assert row["same_token_share"] == sum(prefix) / (2 * N_TOKENS)
    assert report["llama_cpp"] and report["threads"] == 1
    table = format_table(report)
    assert "llama_cpp" in table and f"per prompt: {prefix[0]}, {prefix[1]}" in table


def test_baseline_starts_every_call_from_an_empty_cache(smollm2_gguf):
    pytest.importorskip("llama_cpp")
    from recyclegpt.evals.llama_cpp_baseline import LlamaCppBaseline

    base = LlamaCppBaseline(smollm2_gguf, n_threads=1, n_ctx=64)
    try:
        assert base.n_ctx == 256  # rounded up to llama.cpp's KV padding
        ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646]
        first = base.generate(ids, N_TOKENS)
        base.generate([1, 2683, 359], 3)  # another prompt in between
        again = base.generate(ids, N_TOKENS)
        assert len(first.tokens) == N_TOKENS and again.tokens == first.tokens
        assert len(first.step_s) == N_TOKENS - 1 and 0 < first.ttft_s < first.seconds
        assert first.eval_ms is not None and first.eval_ms > 0  # llama.cpp's own decode time
        with pytest.raises(ValueError, match="exceed the llama.cpp context"):
            base.generate(ids, 250)
        with pytest.raises(ValueError, match="outside llama.cpp's vocabulary"):
            base.generate([1, 10**6], 2)
    finally:
        base.close()


# -- errors that need no model -----------------------------------------------------------------------------------


def test_missing_llama_cpp_is_one_line(tiny_ckpt, monkeypatch, capsys):
    _, _, ckpt = tiny_ckpt
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    rc = main(["bench", "--model", str(ckpt), "--device", "cpu", "--strategies", "standard,llama_cpp",
               "--max-new-tokens", "2", "--limit", "1", "--no-alpha"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "needs llama-cpp-python" in err and "recyclegpt[llama-cpp]" in err


def test_llama_cpp_needs_a_gguf_model(tiny_ckpt, monkeypatch, capsys):
    _, _, ckpt = tiny_ckpt
    monkeypatch.setitem(sys.modules, "llama_cpp", object())  # installed or not: the model is checked as well
    rc = main(["bench", "--model", str(ckpt), "--device", "cpu", "--strategies", "standard,llama_cpp",
               "--max-new-tokens", "2", "--limit", "1", "--no-alpha"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "GGUF file" in err


@pytest.mark.parametrize("batching", [["--batch-size", "2"], ["--continuous"]])
def test_llama_cpp_runs_one_prompt_at_a_time(tiny_ckpt, batching, capsys):
    _, _, ckpt = tiny_ckpt
    rc = main(["bench", "--model", str(ckpt), "--device", "cpu", "--strategies", "standard,llama_cpp",
               "--max-new-tokens", "2", "--limit", "2", "--no-alpha", *batching])
    err = capsys.readouterr().err
    assert rc == 2 and "run at batch size 1, one prompt at a time" in err and batching[0] in err


# -- --threads ---------------------------------------------------------------------------------------------------

DECODING = {
    "generate": ["generate", "hi"],
    "bench": ["bench"],
    "demo": ["demo"],
    "serve": ["serve"],
    "distill": ["distill", "--prompts", "p.jsonl", "--out", "o.jsonl"],
    "eval agreement": ["eval", "agreement", "--prompts", "p.jsonl"],
    "eval ppl": ["eval", "ppl", "--data", "t.txt"],
}


@pytest.mark.parametrize("command", list(DECODING))
def test_every_decoding_command_takes_threads(command):
    args = build_parser().parse_args(DECODING[command] + ["--threads", "3"])
    assert args.threads == 3
    assert build_parser().parse_args(DECODING[command]).threads is None  # default: torch's own count


@pytest.mark.parametrize("command", ["generate", "bench", "demo", "serve", "eval agreement"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_below_one_is_a_one_line_error(command, value, capsys, keep_threads):
    rc = main(DECODING[command] + ["--threads", value])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"recyclegpt {command.split()[0]}: error: --threads must be >= 1, got {value}"
    assert torch.get_num_threads() == keep_threads  # refused before anything ran


def test_threads_is_applied(tiny_ckpt, capsys, keep_threads):
    _, _, ckpt = tiny_ckpt
    want = 1 if keep_threads != 1 else 2
    rc = main(["generate", "--model", str(ckpt), "--device", "cpu", "--threads", str(want), "--max-new-tokens",
               "2", "--no-stream", "the"])
    assert rc == 0, capsys.readouterr().err
    assert torch.get_num_threads() == want
    rc = main(["bench", "--model", str(ckpt), "--device", "cpu", "--threads", str(want), "--strategies", "standard",
               "--max-new-tokens", "2", "--limit", "1", "--no-alpha", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    import json

    report = json.loads(out.strip().splitlines()[-1])
    assert report["threads"] == want and f"{want} threads" in report["device"]
