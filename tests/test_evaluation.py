"""`recyclegpt eval` on tiny random models: the scoring primitive against explicit forwards, the dataset formats
(the shared files when ../shared/data is present), stub modules with known answers, the CLI, clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from recyclegpt.api import RecycleGPT
from recyclegpt.cli.evaluate import add_eval_parser
from recyclegpt.cli.options import parse_dtype
from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.decoding.loops import standard
from recyclegpt.evals.quality import (
    MCItem,
    encode_pair,
    evaluate_agreement,
    evaluate_lastword,
    evaluate_mc,
    evaluate_ppl,
    load_lastword,
    load_mc,
    perplexity_windows,
    token_logprobs,
)
from recyclegpt.models import ModelOutput, RecyclableModule, RecycleModel, Transformer
from recyclegpt.training.data import train_bpe

EVAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
SENTENCES = ["the cat sat on the mat.", "a dog ran to the red ball.", "she sang a song of the sea.",
             "we walk home in the rain.", "birds fly over the green hill."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(SENTENCES * 40))
    return dataclasses.replace(train_bpe([path], 300), eos_ids=())  # no stop token: decode to the budget


def make_lm(tok, seed: int = 0, base_cls=Transformer, pair_cls=RecycleModel) -> RecycleGPT:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)
    base, module = base_cls(cfg).eval(), RecyclableModule(cfg, RecycleConfig()).eval()
    lm = RecycleGPT(base, tok, module=module, name="tiny")
    lm.model = pair_cls(lm.base, module)
    return lm


# -- the scoring primitive ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["standard", "recycle", "module"])
def test_token_logprobs_equal_explicit_forwards(tok, scoring):
    lm = make_lm(tok, seed=1)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in (9, 14, 5, 11, 7)]
    ctx = [3, 2, 2, 6, 4]
    got = token_logprobs(lm, seqs, ctx, scoring, batch_size=2)  # padding and several batches
    with torch.no_grad():
        for seq, L, sc in zip(seqs, ctx, got):
            ids = torch.tensor([seq])
            out = lm.base(ids)  # one explicit uncached forward, logits at every position
            ref_lp, ref_greedy, ref_mod = [], [], []
            for i in range(L, len(seq)):
                use_module = scoring == "module" or (scoring == "recycle" and (i - L) % 2 == 1)
                if use_module:  # the module at i-2 reads h_{i-2} and s_{i-1}
                    logits = lm.model.recycle(out.hidden[:, :i - 1], ids[:, 1:i]).logits[0, -1]
                else:
                    logits = out.logits[0, i - 1]
                ref_lp.append(torch.log_softmax(logits, -1)[seq[i]])
                ref_greedy.append(int(logits.argmax()) == seq[i])
                ref_mod.append(use_module)
            torch.testing.assert_close(sc.logprobs, torch.stack(ref_lp), rtol=1e-5, atol=1e-5)
            assert math.isclose(float(sc.logprobs.sum()), float(sum(ref_lp)), rel_tol=1e-5)
            assert sc.greedy.tolist() == ref_greedy and sc.by_module.tolist() == ref_mod


def test_module_scoring_over_the_draft_vocabulary(tok):
    """recycle_vocab "draft": the module's rows score over its draft vocabulary (as `recycle` then decodes), the
    full model's rows as before."""
    from recyclegpt.training.train import add_draft_vocab

    lm = make_lm(tok, seed=2)
    allowed = list(range(0, tok.vocab_size, 3))
    lm.model = RecycleModel(lm.base, add_draft_vocab(lm.model.module, allowed)).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in (30, 24)]
    full = token_logprobs(lm, seqs, [4, 4], "recycle")
    lm.model.recycle_vocab = "draft"
    draft = token_logprobs(lm, seqs, [4, 4], "recycle")
    for seq, a, b in zip(seqs, full, draft):
        cont = torch.tensor(seq[4:])
        inside = torch.tensor([t in allowed for t in seq[4:]])
        assert torch.equal(a.logprobs[~b.by_module], b.logprobs[~b.by_module])  # the full model's rows unchanged
        mod = b.by_module
        assert torch.isneginf(b.logprobs[mod & ~inside]).all()
        # inside: renormalised over the draft vocabulary, so at least as likely as over the whole head
        assert (b.logprobs[mod & inside] >= a.logprobs[mod & inside] - 1e-6).all()
        assert not b.greedy[mod & ~inside].any() and cont.numel() == len(b.greedy)
        assert (b.greedy[mod & inside] >= a.greedy[mod & inside]).all()


def test_recycle_scoring_alternates_from_the_first_continuation_token(tok):
    lm = make_lm(tok)
    (sc,) = token_logprobs(lm, [list(range(10, 20))], [4], "recycle")
    assert sc.by_module.tolist() == [False, True, False, True, False, True]


def test_harness_tokenization(tok):
    ctx, cont = encode_pair(tok, "the cat ", "sat")  # the context's trailing space moves to the continuation
    assert (ctx, cont) == encode_pair(tok, "the cat", " sat")
    assert ctx == tok.encode("the cat") and ctx + cont == tok.encode("the cat sat")
    with_eos = dataclasses.replace(tok, eos_ids=(0,))
    ctx, cont = encode_pair(with_eos, "", " the")  # an empty context conditions on the BOS, else EOS, token
    assert ctx == [0] and cont == tok.encode(" the")
    with pytest.raises(ValueError, match="needs a BOS or EOS token"):
        encode_pair(tok, "", " the")


# -- dataset formats ---------------------------------------------------------------------------------------------


def shared(rel: str) -> Path:
    path = EVAL_DATA / rel
    if not path.is_file():
        pytest.skip(f"{path} not present (the shared data folder sits beside the repository)")
    return path


@pytest.mark.shared_data
@pytest.mark.parametrize("fmt, rel, n, choices, first_context", [
    ("piqa", "piqa/valid.jsonl", 1838, {2},
     "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"),
    ("arc", "arc/ARC-Easy-Test.jsonl", 2376, {3, 4, 5},
     "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"),
    ("arc", "arc/ARC-Challenge-Test.jsonl", 1172, {3, 4, 5}, None),
    ("arc", "arc/ARC-Easy-Validation.jsonl", 570, {3, 4, 5}, None),  # no gold field: the answerKey's index
    ("arc", "arc/ARC-Challenge-Validation.jsonl", None, {3, 4, 5}, None),
    ("openbookqa", "openbookqa/test.jsonl", 500, {4},
     "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After "
     "looking over their budget and expenses, they decide the best way to save money is to"),
    ("boolq", "boolq/dev.jsonl", 3270, {2}, None),
    ("sciq", "sciq/validation.jsonl", 1000, {4},
     "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"),
])
def test_shared_eval_files_parse(fmt, rel, n, choices, first_context):
    items = load_mc(shared(rel), fmt)
    if n is not None:
        assert len(items) == n
    assert {len(it.choices) for it in items} <= choices
    assert all(0 <= it.gold < len(it.choices) and all(c.startswith(" ") for c in it.choices) for it in items)
    if first_context is not None:
        assert items[0].context == first_context
    if fmt == "piqa":
        assert [it.gold for it in items[:3]] == [0, 1, 1]  # valid-labels.lst, found beside valid.jsonl
    if fmt == "arc" and "Easy-Test" in rel:
        assert items[0].gold == 0 and items[1].choices[items[1].gold] == " breathing mask"
    if fmt == "openbookqa":
        assert items[0].choices[items[0].gold] == " quit eating lunch out"
    if fmt == "boolq":
        assert items[0].choices == [" no", " yes"] and items[0].gold == 0
        assert items[0].context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    if fmt == "sciq":
        assert items[0].gold == 3 and items[0].choices[3] == " darwin"
    assert len(load_mc(shared(rel), fmt, limit=7)) == 7


@pytest.mark.shared_data
def test_piqa_test_split_has_no_labels():
    with pytest.raises(FileNotFoundError, match="tests-labels.lst"):
        load_mc(shared("piqa/tests.jsonl"), "piqa")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_generic_and_lastword_files(tmp_path):
    gen = write_jsonl(tmp_path / "g.jsonl", [{"context": "Q: 2+2?\nA:", "choices": [" 4", " 5"], "gold": 0}, "",
                                             {"context": "x", "choices": ["yes", " no!"], "gold": 1}])
    items = load_mc(gen, "generic")
    assert items == [MCItem("Q: 2+2?\nA:", [" 4", " 5"], 0), MCItem("x", ["yes", " no!"], 1)]
    assert [items[1].norm_length(j) for j in range(2)] == [3, 3]  # the separating space is not counted
    lw = write_jsonl(tmp_path / "l.jsonl", [{"text": "the cat sat on the mat"}, {"text": "a dog  ran "}])
    assert load_lastword(lw) == [("the cat sat on the", " mat"), ("a dog ", " ran")]
    assert load_lastword(lw, limit=1) == [("the cat sat on the", " mat")]


@pytest.mark.parametrize("records, fmt, error, match", [
    (['{"context": "a", "choices": [" b", " c"], "gold": 0}', "{not json"], "generic", ValueError,
     r"bad\.jsonl:2: bad JSON"),
    ([{"context": "a", "choices": [" b", " c"], "gold": 5}], "generic", ValueError,
     r"bad\.jsonl:1: gold 5 is out of range for 2 choices"),
    ([{"context": "a", "choices": [" b", " c"], "gold": True}], "generic", ValueError, "gold True is out of range"),
    ([{"context": "a", "choices": [" b"], "gold": 0}], "generic", ValueError, "at least two strings"),
    ([{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}], "arc",
     ValueError, r"bad\.jsonl:1: answerKey 'C' is not one of the choice labels"),
    ([{"question": "q", "passage": "p"}], "boolq", ValueError, "field 'answer'"),
    ([{"question": "q", "support": "", "distractor1": "a", "distractor2": "b", "correct_answer": "c"}], "sciq",
     ValueError, "'distractor3'"),
    ([[1, 2]], "generic", ValueError, "expected a JSON object"),
    ([{"goal": "g", "sol1": "a", "sol2": "b"}], "piqa", FileNotFoundError, "bad-labels.lst"),
    ([{"text": "x"}], "nope", ValueError, "unknown format 'nope'"),
])
def test_bad_mc_files(tmp_path, records, fmt, error, match):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(error, match=match):
        load_mc(path, fmt)


def test_bad_inputs(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_mc(tmp_path / "missing.jsonl", "arc")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_lastword(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"one\.jsonl:1: the text needs at least two words"):
        load_lastword(write_jsonl(tmp_path / "one.jsonl", [{"text": "word"}]))
    (tmp_path / "labels-labels.lst").write_text("0\n2\n")
    with pytest.raises(ValueError, match=r"labels-labels\.lst:2: expected 0 or 1"):
        load_mc(write_jsonl(tmp_path / "labels.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2), "piqa")
    with pytest.raises(ValueError, match="empty"):
        load_mc(write_jsonl(tmp_path / "empty.jsonl", []), "generic")
    lm = make_lm(tok)
    lm.model = None
    with pytest.raises(ValueError, match="needs a recyclable module"):
        token_logprobs(lm, [[1, 2, 3]], [1], "recycle")
    with pytest.raises(ValueError, match="unknown scoring"):
        token_logprobs(lm, [[1, 2, 3]], [1], "lossy")
    with pytest.raises(ValueError, match="context length 1 of 3 tokens; module scoring needs at least 2"):
        token_logprobs(make_lm(tok), [[1, 2, 3]], [1], "module")
    with pytest.raises(ValueError, match="stride"):
        perplexity_windows(100, 10, 9)
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")
    assert parse_dtype("bf16") is torch.bfloat16


# -- evaluations with stubs whose answers are known --------------------------------------------------------------


class Favour(Transformer):
    """A base whose head puts all probability, evenly, on the token ids in `favoured` (shared by the module)."""

    favoured: list[int] = []

    def head(self, hidden):
        logits = torch.full((*hidden.shape[:-1], self.cfg.vocab_size), -30.0)
        logits[..., self.favoured] = 0.0
        return logits


@pytest.mark.parametrize("scoring", ["standard", "recycle", "module"])
def test_mc_accuracy_when_the_answer_is_certain(tok, scoring):
    lm = make_lm(tok, base_cls=Favour)
    items = [MCItem("the cat", [" sat on the mat", " ran to the red ball"], 0),
             MCItem("we walk", [" dog ran", " on the mat", " home"], 1)]
    lm.base.favoured = sorted(set(encode_pair(tok, "the cat", " sat on the mat")[1] +
                                  encode_pair(tok, "we walk", " on the mat")[1]))
    for it in items:  # every wrong choice has a token the stub never predicts
        for j, c in enumerate(it.choices):
            assert (j == it.gold) == (set(encode_pair(tok, it.context, c)[1]) <= set(lm.base.favoured))
    assert evaluate_mc(lm, items, scoring=scoring) == {"accuracy": 1.0, "accuracy_norm": 1.0, "n": 2}
    wrong = [dataclasses.replace(it, gold=it.gold + 1) for it in items]
    assert evaluate_mc(lm, wrong, scoring=scoring, batch_size=1) == {"accuracy": 0.0, "accuracy_norm": 0.0, "n": 2}


def test_lastword_when_the_word_is_certain(tok):
    lm = make_lm(tok, base_cls=Favour)
    (word_id,) = encode_pair(tok, "the cat sat on the", " mat")[1]  # a one-token word: a unique argmax
    lm.base.favoured = [word_id]
    res = evaluate_lastword(lm, [("the cat sat on the", " mat"), ("a dog ran to the red", " ball")],
                            scoring="recycle")
    assert res["accuracy"] == 0.5 and res["n"] == 2
    assert res["perplexity"] > 1e3 and res["n_tokens"] >= 2


class CopyBase(RecycleModel):
    """A module stub that predicts what the full model would: teacher-forced, its output at t is the base's h_{t+1}."""

    def recycle(self, hidden, next_tokens, **kw):
        shifted = torch.cat((hidden[:, 1:], hidden[:, -1:]), dim=1)
        return ModelOutput(self.base.head(shifted), shifted)


def random_prompts(vocab: int, n: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, vocab, (int(L),), generator=g).tolist() for L in torch.randint(2, 9, (n,), generator=g)]


@pytest.mark.parametrize("scoring", ["recycle", "module", "standard"])
def test_agreement_is_one_with_a_module_that_copies_the_full_model(tok, scoring):
    lm = make_lm(tok, seed=2, pair_cls=CopyBase)
    res = evaluate_agreement(lm, random_prompts(tok.vocab_size), max_new_tokens=20, scoring=scoring, batch_size=2)
    per_prompt = 10 if scoring != "module" else 20  # offsets 1, 3, ..., 19 or every offset
    assert res["alpha"] == 1.0 and res["n"] == 5 * per_prompt and res["prompts"] == 5
    assert sum(v["n"] for v in res["alpha_by_offset"].values()) == res["n"]
    assert sum(v["n"] for v in res["alpha_by_leading_space"].values()) == res["n"]
    assert set(res["alpha_by_offset"]) == ({"0", "1-15", "16-63"} if scoring == "module" else {"1-15", "16-63"})


def test_agreement_is_below_one_with_a_random_module(tok):
    lm = make_lm(tok, seed=2)
    res = evaluate_agreement(lm, random_prompts(tok.vocab_size), max_new_tokens=20)
    assert res["alpha"] < 1.0 and res["n"] == 50


def test_agreement_on_given_continuations_equals_decoding_them(tok):
    """bench hands standard's output (run past EOS) to the α measurement instead of decoding again."""
    lm = make_lm(tok, seed=2)
    lm.tokenizer = dataclasses.replace(lm.tokenizer, eos_ids=(0,))
    prompts = random_prompts(tok.vocab_size)
    conts = standard(lm.base, prompts, max_new_tokens=20, stop_ids=lm.tokenizer.eos_ids).tokens
    eos = lm.tokenizer.eos_ids[0]
    given = [c[:3] + [eos] + c[3:] if k % 2 else c + [eos] * 3 for k, c in enumerate(conts)]
    cut = evaluate_agreement(lm, prompts, max_new_tokens=20, continuations=given)
    assert cut == evaluate_agreement(lm, prompts, max_new_tokens=20, continuations=[
        c[:3] if k % 2 else c for k, c in enumerate(conts)])
    assert evaluate_agreement(lm, prompts, max_new_tokens=20, continuations=conts) == \
        evaluate_agreement(lm, prompts, max_new_tokens=20)
    with pytest.raises(ValueError, match="2 continuations for 5 prompts"):
        evaluate_agreement(lm, prompts, max_new_tokens=20, continuations=conts[:2])


def test_ppl_windows_cover_every_token_once():
    for n, max_len, stride in ((50, 10, 4), (50, 10, 8), (9, 10, 5), (50, 3, 1)):
        scored = []
        for begin, end, ctx in perplexity_windows(n, max_len, stride):
            assert end - begin <= max_len and ctx >= 2
            scored += range(begin + ctx, end)
        assert scored == list(range(2, n))


@pytest.mark.parametrize("scoring", ["standard", "recycle"])
def test_ppl_strided_equals_one_window_when_the_context_is_kept(tok, scoring):
    lm = make_lm(tok, seed=4)
    text = " ".join(SENTENCES)
    ids = tok.encode(text)
    one = evaluate_ppl(lm, text, scoring=scoring, max_length=len(ids))
    assert one["n_tokens"] == len(ids) - 2 and one["windows"] == 1
    (sc,) = token_logprobs(lm, [ids], [2], scoring)
    assert math.isclose(one["perplexity"], math.exp(-float(sc.logprobs.mean())), rel_tol=1e-6)
    strided = evaluate_ppl(lm, text, scoring=scoring, max_length=16, stride=6, batch_size=3)
    assert strided["n_tokens"] == one["n_tokens"] and strided["windows"] > 1


# -- the CLI -----------------------------------------------------------------------------------------------------


def run_cli(argv, lm, monkeypatch, capsys) -> tuple[list[str], dict]:
    import recyclegpt.cli.evaluate as ev

    parser = argparse.ArgumentParser(prog="recyclegpt")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(ev, "load_model", lambda args: lm)
    args = parser.parse_args(argv)
    args.func(args)
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_cli_subcommands_end_with_one_json_line(tok, tmp_path, monkeypatch, capsys):
    lm = make_lm(tok)
    gen = write_jsonl(tmp_path / "g.jsonl", [{"context": "the cat", "choices": [" sat", " ran"], "gold": 0}] * 3)
    lines, rec = run_cli(["eval", "mc", "--data", str(gen), "--format", "generic", "--scoring", "recycle",
                          "--limit", "2", "--json"], lm, monkeypatch, capsys)
    assert len(lines) == 2 and lines[0].startswith("eval mc [recycle scoring] generic: accuracy")
    assert rec["task"] == "mc" and rec["n"] == 2 and {"accuracy", "accuracy_norm", "seconds"} <= set(rec)
    lw = write_jsonl(tmp_path / "l.jsonl", [{"text": t} for t in SENTENCES])
    _, rec = run_cli(["eval", "lastword", "--data", str(lw), "--json"], lm, monkeypatch, capsys)
    assert rec["n"] == 5 and {"accuracy", "perplexity"} <= set(rec)
    txt = tmp_path / "t.txt"
    txt.write_text(" ".join(SENTENCES * 3))
    _, rec = run_cli(["eval", "ppl", "--data", str(txt), "--max-length", "32", "--stride", "16", "--json"], lm,
                     monkeypatch, capsys)
    assert rec["perplexity"] > 1 and rec["n_tokens"] == len(tok.encode(txt.read_text())) - 2
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": s} for s in SENTENCES])
    lines, rec = run_cli(["eval", "agreement", "--prompts", str(prompts), "--max-new-tokens", "6", "--json"], lm,
                         monkeypatch, capsys)
    assert rec["prompts"] == 5 and rec["n"] == 15 and 0 <= rec["alpha"] <= 1 and not rec["chat"]


def test_cli_without_json_prints_the_summary_only(tok, tmp_path, monkeypatch, capsys):
    import recyclegpt.cli.evaluate as ev

    gen = write_jsonl(tmp_path / "g.jsonl", [{"context": "the cat", "choices": [" sat", " ran"], "gold": 0}])
    parser = argparse.ArgumentParser(prog="recyclegpt")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(ev, "load_model", lambda args: make_lm(tok))
    args = parser.parse_args(["eval", "mc", "--data", str(gen), "--format", "generic"])
    args.func(args)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("eval mc [standard scoring] generic: accuracy")


@pytest.mark.parametrize("task", ["mc", "lastword", "ppl", "agreement"])
def test_cli_help(task, capsys):
    parser = argparse.ArgumentParser(prog="recyclegpt")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["eval", task, "--help"])
    assert e.value.code == 0 and "--scoring" in capsys.readouterr().out


def test_read_prompts_json_array_and_alpaca_input(tmp_path):
    """Alpaca-style releases are one JSON array; a non-empty "input" follows the instruction after a blank line."""
    from recyclegpt.training.data import DataError, read_prompt_records, read_prompts

    records = [{"instruction": "Sort the list.", "input": "[3, 1, 2]", "output": "[1, 2, 3]"},
               {"instruction": "Name a colour.", "input": "", "output": "Red."}, "A bare string."]
    arr = tmp_path / "alpaca.json"
    arr.write_text("\n  " + json.dumps(records, indent=2))
    assert read_prompts(arr) == ["Sort the list.\n\n[3, 1, 2]", "Name a colour.", "A bare string."]
    lines = tmp_path / "alpaca.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_prompts(lines) == read_prompts(arr) and read_prompts(arr, limit=2) == read_prompts(arr)[:2]
    assert read_prompt_records(arr)[0] == (None, "Sort the list.\n\n[3, 1, 2]")
    (tmp_path / "bad.json").write_text('[{"instruction": "a"},\n {"instruction": }]')
    with pytest.raises(DataError, match=r"bad\.json:2: bad JSON"):
        read_prompts(tmp_path / "bad.json")
    (tmp_path / "item.json").write_text('[{"instruction": "a"}, {"output": "b"}]')
    with pytest.raises(ValueError, match=r"item\.json: item 1: expected"):
        read_prompts(tmp_path / "item.json")
