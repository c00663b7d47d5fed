"""lm-evaluation-harness: the `recyclegpt` adapter against `recyclegpt.evals.quality` on a tiny model, the packaged
offline tasks against `recyclegpt eval mc`'s formats, `recyclegpt lm-eval`'s argument hand-over, and (with the
real SmolLM2 and the shared data) lm-eval's accuracy on 20 ARC-Easy items against `recyclegpt eval`'s."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from recyclegpt.api import RecycleGPT
from recyclegpt.cli.main import build_parser, main
from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.evals.quality import MCItem, encode_pair, evaluate_mc, fit, load_mc, min_context, token_logprobs
from recyclegpt.loading.registry import DEFAULT_MODEL
from recyclegpt.models import RecyclableModule, Transformer
from recyclegpt.training.data import train_bpe

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SENTENCES = ["the cat sat on the mat.", "a dog ran to the red ball.", "she sang a song of the sea.",
             "we walk home in the rain.", "birds fly over the green hill."]
ITEMS = [MCItem("Question: where did the cat sit?\nAnswer:", [" on the mat", " in the sea", " over the hill"], 0),
         MCItem("a dog ran to the", [" red ball.", " green hill.", " rain"], 0),
         MCItem("she sang a song of the ", ["sea.", "cat.", "mat."], 0),
         MCItem("", [" birds fly", " we walk"], 1)]


def lm_eval_or_skip():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'recyclegpt[lm-eval]')")


def data_or_skip() -> Path:
    if not (DATA / "eval").is_dir():
        pytest.skip(f"{DATA / 'eval'} not present (the shared data folder sits beside the repository)")
    return DATA


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> RecycleGPT:
    """A tiny random base + module with a BPE of the sentences; EOS token 0 (the rolling windows' prefix)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(SENTENCES * 40))
    tok = dataclasses.replace(train_bpe([path], 300), eos_ids=(0,))
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)
    base, module = Transformer(cfg).eval(), RecyclableModule(cfg, RecycleConfig()).eval()
    return RecycleGPT(base, tok, module=module, name="tiny")


def requests(pairs, kind="loglikelihood"):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(pairs)]


def quality_scores(lm: RecycleGPT, pairs, scoring: str):
    need = min_context(scoring)
    seqs, lens = [], []
    for context, continuation in pairs:
        ctx, cont = encode_pair(lm.tokenizer, context, continuation)
        ctx = fit(ctx, cont, lm.base.cfg.context_length, need)
        seqs.append(ctx + cont)
        lens.append(len(ctx))
    return token_logprobs(lm, seqs, lens, scoring)


# -- without lm-eval ---------------------------------------------------------------------------------------------


def test_lm_eval_arguments_are_not_parsed_by_recyclegpt():
    argv = ["--tasks", "a,b", "-h", "--model_args", "scoring=recycle", "--data=X", "run", "--limit", "3"]
    assert build_parser().parse_args(["lm-eval", *argv]).args == argv


def test_missing_lm_eval_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of lm_eval now fails
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)
    assert main(["lm-eval", "--tasks", "recyclegpt_arc_easy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'recyclegpt[lm-eval]'" in err[0]


# -- the adapter against quality.py ------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["standard", "recycle", "module"])
def test_loglikelihood_equals_quality_scoring(tiny_lm, scoring):
    lm_eval_or_skip()
    from recyclegpt.evals.lm_eval_adapter import RecycleGPTLM

    adapter = RecycleGPTLM(tiny_lm, scoring=scoring, batch_size=3)
    items = ITEMS if scoring != "module" else ITEMS[:3]  # module scoring needs two context tokens
    pairs = [(it.context, c) for it in items for c in it.choices]
    got = adapter.loglikelihood(requests(pairs))
    ref = quality_scores(tiny_lm, pairs, scoring)
    assert len(got) == len(pairs)
    for (ll, greedy), sc in zip(got, ref):
        assert math.isclose(ll, float(sc.logprobs.sum()), rel_tol=1e-5, abs_tol=1e-5)
        assert greedy == bool(sc.greedy.all())
    # the accuracies lm-eval makes of these (acc, acc_norm) are evaluate_mc's
    lls = iter(ll for ll, _ in got)
    acc = acc_norm = 0
    for it in items:
        ll = [next(lls) for _ in it.choices]
        norm = [x / it.norm_length(j) for j, x in enumerate(ll)]
        acc += ll.index(max(ll)) == it.gold
        acc_norm += norm.index(max(norm)) == it.gold
    res = evaluate_mc(tiny_lm, items, scoring=scoring)
    assert (res["accuracy"], res["accuracy_norm"]) == (acc / len(items), acc_norm / len(items))


def test_scorings_differ_and_need_a_module(tiny_lm):
    lm_eval_or_skip()
    from recyclegpt.evals.lm_eval_adapter import RecycleGPTLM

    pairs = [(ITEMS[0].context, c) for c in ITEMS[0].choices]
    std = RecycleGPTLM(tiny_lm).loglikelihood(requests(pairs))
    rec = RecycleGPTLM(tiny_lm, scoring="recycle").loglikelihood(requests(pairs))
    assert [a for a, _ in std] != [a for a, _ in rec]  # the module scores the odd offsets
    with pytest.raises(ValueError, match="unknown scoring"):
        RecycleGPTLM(tiny_lm, scoring="paper")
    no_module = RecycleGPT(tiny_lm.base, tiny_lm.tokenizer, name="tiny")
    with pytest.raises(ValueError, match="needs a recyclable module"):
        RecycleGPTLM(no_module, scoring="recycle")


@pytest.mark.parametrize("scoring", ["standard", "recycle"])
def test_loglikelihood_rolling(tiny_lm, scoring):
    lm_eval_or_skip()
    from recyclegpt.evals.lm_eval_adapter import RecycleGPTLM

    adapter = RecycleGPTLM(tiny_lm, scoring=scoring)
    short, long = SENTENCES[0], " ".join(SENTENCES * 20)
    ids = tiny_lm.tokenizer.encode(short, add_bos=False)
    (ref,) = token_logprobs(tiny_lm, [[0] + ids], [1], scoring)  # every token, the first after the EOS prefix
    got = adapter.loglikelihood_rolling(requests([(short,), (long,)], "loglikelihood_rolling"))
    assert math.isclose(got[0], float(ref.logprobs.sum()), rel_tol=1e-5)
    n_long = len(tiny_lm.tokenizer.encode(long, add_bos=False))
    assert n_long > tiny_lm.base.cfg.context_length and math.isfinite(got[1]) and got[1] < got[0] < 0
    with pytest.raises(ValueError, match="scoring=module"):
        RecycleGPTLM(tiny_lm, scoring="module").loglikelihood_rolling(requests([(short,)], "loglikelihood_rolling"))


def test_generate_until_stops_at_the_stop_strings(tiny_lm):
    lm_eval_or_skip()
    from recyclegpt.evals.lm_eval_adapter import RecycleGPTLM

    lm = RecycleGPT(tiny_lm.base, dataclasses.replace(tiny_lm.tokenizer, eos_ids=()), name="tiny")  # no EOS stop
    adapter = RecycleGPTLM(lm, batch_size=2)
    prompts = ["the cat sat", "a dog ran to the red", "we walk"]
    full = [lm.generate(p, max_new_tokens=12).text[0] for p in prompts]
    stop = full[0][-2:]  # the text is cut at this string's first occurrence
    got = adapter.generate_until(requests([(p, {"until": [stop], "max_gen_toks": 12}) for p in prompts]
                                          + [(prompts[1], {"until": "\n\n", "max_gen_toks": 3})], "generate_until"))
    assert got[:3] == [f.split(stop)[0] for f in full] and stop not in got[0] and len(got[0]) < len(full[0])
    assert got[3] == lm.generate(prompts[1], max_new_tokens=3).text[0]


def test_model_args_from_lm_eval(tiny_lm, monkeypatch):
    lm_eval_or_skip()
    from lm_eval.api.registry import get_model

    from recyclegpt.cli import options
    from recyclegpt.evals.lm_eval_adapter import RecycleGPTLM

    seen = []
    monkeypatch.setattr(options, "load_model", lambda args: seen.append(vars(args)) or tiny_lm)
    assert get_model("recyclegpt") is RecycleGPTLM
    # lm-eval's --batch_size / --device arrive beside --model_args: the model arguments win; no CUDA: the CPU
    lm = RecycleGPTLM.create_from_arg_string("model=m,recycle=none,scoring=recycle,batch_size=4,dtype=bfloat16",
                                             {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert (lm.scoring, lm.batch_size) == ("recycle", 4)
    assert seen[-1] == {"model": "m", "recycle": "none", "device": None if not torch.cuda.is_available() else "cuda:0",
                        "dtype": "bfloat16", "recycle_layers": 1, "recycle_vocab": "full", "quantize": None}
    lm = RecycleGPTLM.create_from_arg_obj({}, {"batch_size": "auto", "device": "cpu"})
    assert (lm.scoring, lm.batch_size, seen[-1]["model"], seen[-1]["device"]) == ("standard", 16, DEFAULT_MODEL, "cpu")
    RecycleGPTLM.create_from_arg_string("quantize=int8", {"device": "cpu"})
    assert seen[-1]["quantize"] == "int8"  # as --quantize
    with pytest.raises(ValueError, match="unknown model argument.*scorng"):
        RecycleGPTLM.create_from_arg_string("scorng=recycle")


def test_cli_hands_the_arguments_to_lm_eval(tmp_path, monkeypatch, capsys):
    lm_eval_or_skip()
    import lm_eval.__main__

    calls = []

    def fake_cli():
        argv = sys.argv[1:]
        inc = Path(argv[argv.index("--include_path") + 1])
        calls.append((argv, sorted(p.relative_to(inc).as_posix() for p in inc.rglob("*.*"))))

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    (tmp_path / "eval").mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "t.yaml").write_text("task: t\n")
    user = ["--tasks", "recyclegpt_arc_easy,t", "--model_args", "scoring=recycle,batch_size=8", "--limit", "20"]
    assert main(["lm-eval", *user, "--data", str(tmp_path), "--include_path", str(mine)]) == 0
    argv, files = calls[-1]
    assert argv[:2] == ["--model", "recyclegpt"] and argv[2:-2] == user and argv[-2] == "--include_path"
    assert "recyclegpt_tasks/recyclegpt_arc_easy.yaml" in files and "recyclegpt_tasks/piqa.py" in files
    assert "include/t.yaml" in files  # the caller's include path joins ours
    assert main(["lm-eval", "run", "--model", "hf", "--tasks", "x", "--data", str(tmp_path)]) == 0
    assert calls[-1][0][:5] == ["run", "--model", "hf", "--tasks", "x"]
    assert main(["lm-eval", "ls", "tasks", f"--data={tmp_path}"]) == 0
    assert calls[-1][0][:2] == ["ls", "tasks"] and "--model" not in calls[-1][0]
    capsys.readouterr()
    assert main(["lm-eval", "--tasks", "recyclegpt_piqa", "--data", str(tmp_path / "nowhere")]) == 2
    assert "pass --data DIR" in capsys.readouterr().err


# -- the packaged tasks ------------------------------------------------------------------------------------------


def test_written_tasks_read_the_given_data_folder(tmp_path):
    lm_eval_or_skip()
    from recyclegpt.evals.lm_eval_adapter import TASK_NAMES, TASKS_DIR, write_tasks

    data = data_or_skip()
    dest = write_tasks(data, tmp_path)
    yamls = sorted(p.stem for p in dest.glob("*.yaml"))
    assert yamls == sorted(TASK_NAMES) == sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
    for p in dest.glob("*.yaml"):
        assert f"data_dir: {json.dumps(str(data.resolve()))}" in p.read_text()
    with pytest.raises(FileNotFoundError, match="no eval/ folder"):
        write_tasks(tmp_path / "nowhere", tmp_path / "out")


TASK_FILES = {"recyclegpt_arc_easy": ("arc", "arc/ARC-Easy-Test.jsonl"),
              "recyclegpt_arc_challenge": ("arc", "arc/ARC-Challenge-Test.jsonl"),
              "recyclegpt_openbookqa": ("openbookqa", "openbookqa/test.jsonl"),
              "recyclegpt_boolq": ("boolq", "boolq/dev.jsonl"),
              "recyclegpt_sciq": ("sciq", "sciq/validation.jsonl"),
              "recyclegpt_piqa": ("piqa", "piqa/valid.jsonl")}


def test_tasks_score_what_recyclegpt_eval_scores(tiny_lm, tmp_path):
    """Each task's first items through lm_eval.simple_evaluate: the same choices' log-likelihoods (so prompts,
    choices and gold) and the same acc / acc_norm as `recyclegpt eval mc` on the same file."""
    lm_eval_or_skip()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from recyclegpt.evals.lm_eval_adapter import RecycleGPTLM, write_tasks

    data, n = data_or_skip(), 3
    tm = TaskManager(include_path=str(write_tasks(data, tmp_path)), include_defaults=False)
    out = simple_evaluate(RecycleGPTLM(tiny_lm, scoring="recycle"), tasks=list(TASK_FILES), limit=n,
                          task_manager=tm, log_samples=True, bootstrap_iters=0)
    for task, (fmt, rel) in TASK_FILES.items():
        items = load_mc(data / "eval" / rel, fmt, limit=n)
        res = evaluate_mc(tiny_lm, items, scoring="recycle")
        metrics = out["results"][task]
        assert (metrics["acc,none"], metrics["acc_norm,none"]) == (res["accuracy"], res["accuracy_norm"]), task
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        for it, s in zip(items, samples):
            ref = quality_scores(tiny_lm, [(it.context, c) for c in it.choices], "recycle")
            got = [float(r[0]) for r in s["filtered_resps"]]
            assert got == pytest.approx([float(r.logprobs.sum()) for r in ref], rel=1e-5), task
            assert s["target"] == it.gold, task


# -- the real model ----------------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.shared_data
def test_smollm2_arc_easy_equals_recyclegpt_eval(smollm2_gguf, tmp_path, capsys, monkeypatch):
    """20 ARC-Easy items under recycle scoring: `recyclegpt lm-eval` (lm-eval's command line, which runs
    lm_eval.simple_evaluate) reports the accuracies `recyclegpt eval mc` reports. One SmolLM2 serves both commands
    (load_model patched); standard and module scoring run the same code, checked item by item above."""
    lm_eval_or_skip()
    from recyclegpt.cli import evaluate, options

    data = data_or_skip()
    lm = RecycleGPT.from_pretrained(DEFAULT_MODEL, device="cpu")
    loaded = []
    for where in (evaluate, options):
        monkeypatch.setattr(where, "load_model", lambda args: loaded.append(args.model) or lm)
    arc = str(data / "eval" / "arc" / "ARC-Easy-Test.jsonl")
    assert main(["eval", "mc", "--format", "arc", "--data", arc, "--limit", "20", "--scoring", "recycle",
                 "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert main(["lm-eval", "--tasks", "recyclegpt_arc_easy", "--limit", "20", "--model_args", "scoring=recycle",
                 "--batch_size", "16", "--data", str(data), "--output_path", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "recyclegpt_arc_easy" in table and "acc_norm" in table
    (path,) = (tmp_path / "out").rglob("results_*.json")
    m = json.loads(path.read_text())["results"]["recyclegpt_arc_easy"]
    assert (m["acc,none"], m["acc_norm,none"]) == (rec["accuracy"], rec["accuracy_norm"])
    assert loaded == [DEFAULT_MODEL] * 2  # `eval`, then lm-eval's model_args (model= defaults to SmolLM2)
