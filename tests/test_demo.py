"""The shipped-module lookup, recycle="default", and `recyclegpt demo`, on a tiny model registered under a fake
built-in name: its base comes from a stub loader and its "shipped" module from a monkeypatched SHIPPED_MODULES."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import recyclegpt.loading.weights
from recyclegpt.api import RecycleGPT
from recyclegpt.cli.main import main
from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.loading import registry
from recyclegpt.loading.checkpoint import save_checkpoint
from recyclegpt.models import RecyclableModule, RecycleModel, Transformer
from recyclegpt.training.data import train_bpe

NAME = "tiny-builtin"
TEXT = "explain why the sky is blue. write a short poem about a lighthouse. what are three tips for studying? " * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return dataclasses.replace(train_bpe([path], 300), eos_ids=())  # no stop token: answers run to the budget


def tiny_base(tok) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)).eval()


@pytest.fixture
def builtin(tok, monkeypatch, tmp_path) -> Path:
    """NAME as a built-in model whose load needs no download; returns the (empty) shipped-modules folder."""
    monkeypatch.setitem(registry.MODELS, NAME, dataclasses.replace(registry.MODELS[registry.DEFAULT_MODEL],
                                                                    description="tiny test model"))

    def load_base(name, *, device=None, dtype=None):
        assert str(name) == NAME, f"unexpected load of {name!r}"
        return tiny_base(tok).to(device=device, dtype=dtype), tok

    monkeypatch.setattr(recyclegpt.loading.weights, "build_base", load_base)
    shipped = tmp_path / "modules"
    monkeypatch.setattr(registry, "SHIPPED_MODULES", shipped)
    return shipped


def ship_module(tok, shipped: Path, folder: str = NAME) -> Path:
    """A trained-looking module for NAME in the shipped folder (bf16, as the real one is stored), under `folder`."""
    base = tiny_base(tok)
    torch.manual_seed(1)
    module = RecyclableModule(base.cfg, RecycleConfig()).eval()
    return save_checkpoint(shipped / folder, RecycleModel(base, module).to(torch.bfloat16), base_ref=NAME)


def test_shipped_module_is_found_only_with_recycle_json(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "SHIPPED_MODULES", tmp_path)
    name = registry.DEFAULT_MODEL
    assert registry.shipped_module(name) is None  # no folder
    (tmp_path / name).mkdir()
    (tmp_path / name / "MODEL_CARD.md").write_text("weights still training")
    assert registry.shipped_module(name) is None  # a folder without recycle.json
    (tmp_path / name / "recycle.json").write_text("{}")
    assert registry.shipped_module(name) == tmp_path / name
    (tmp_path / "not-a-builtin").mkdir()
    (tmp_path / "not-a-builtin" / "recycle.json").write_text("{}")
    assert registry.shipped_module("not-a-builtin") is None  # only built-in names have shipped modules


def test_other_shipped_modules_load_by_name(tok, builtin, capsys):
    ship_module(tok, builtin)  # the default, NAME
    other = ship_module(tok, builtin, NAME + "-1layer")
    (builtin / "tiny-builtin-empty").mkdir()  # no recycle.json: not a module
    (builtin / "unrelated").mkdir()
    (builtin / "unrelated" / "recycle.json").write_text("{}")  # not this model's name
    assert list(registry.shipped_modules(NAME)) == [NAME, NAME + "-1layer"]
    assert registry.shipped_module_named(NAME + "-1layer") == other
    assert registry.shipped_module_named("unrelated") is None
    lm = RecycleGPT.from_pretrained(NAME, recycle=NAME + "-1layer", device="cpu")
    assert lm.module_source == str(other) and lm.model is not None
    with pytest.raises(FileNotFoundError, match="a shipped module .tiny-builtin, tiny-builtin-1layer."):
        RecycleGPT.from_pretrained(NAME, recycle=NAME + "-2layer", device="cpu")
    assert main(["generate", "--model", NAME, "--recycle", "none", "--strategy", "recycle", "--max-new-tokens", "4",
                 "hi"]) == 2
    assert "also shipped: tiny-builtin-1layer (--recycle NAME)" in capsys.readouterr().err


def test_default_loads_the_shipped_module_and_none_does_not(tok, builtin):
    assert RecycleGPT.from_pretrained(NAME, device="cpu").model is None  # nothing shipped yet
    folder = ship_module(tok, builtin)
    lm = RecycleGPT.from_pretrained(NAME, device="cpu")
    assert lm.model is not None and lm.module_source == str(folder)
    assert lm.model.module.cfg == RecycleConfig() and next(lm.model.module.parameters()).dtype == torch.float32
    for off in (None, "none"):
        lm = RecycleGPT.from_pretrained(NAME, recycle=off, device="cpu")
        assert lm.model is None and lm.module_source is None
    assert RecycleGPT.from_pretrained(NAME, recycle="random", device="cpu").module_source == "random"


def test_a_checkpoint_model_brings_its_own_module_by_default(tok, builtin, tmp_path):
    own = ship_module(tok, tmp_path / "elsewhere")
    lm = RecycleGPT.from_pretrained(str(own), device="cpu")
    assert lm.module_source == str(own)
    assert RecycleGPT.from_pretrained(str(own), recycle="none", device="cpu").model is None


def test_recycle_without_a_module_says_none_is_shipped(builtin, capsys):
    assert main(["generate", "--model", NAME, "--strategy", "recycle", "--max-new-tokens", "4", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no module is shipped for tiny-builtin" in err and "--recycle PATH" in err and len(err.splitlines()) == 1
    assert main(["bench", "--model", NAME, "--max-new-tokens", "4", "--limit", "1"]) == 2
    assert "no module is shipped" in capsys.readouterr().err


def test_demo_prints_a_table_and_a_json_line(tok, builtin, capsys):
    folder = ship_module(tok, builtin)
    assert main(["demo", "--model", NAME, "--device", "cpu", "--max-new-tokens", "8", "--limit", "2",
                 "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(out[-1])
    assert {"model", "module", "device", "strategies", "speedup", "alpha"} <= set(rec)
    assert rec["model"] == NAME and rec["module"] == str(folder) and rec["device"].startswith("cpu")
    assert list(rec["strategies"]) == ["standard", "recycle", "speculative"]
    for s in rec["strategies"].values():
        assert {"tokens_per_s", "new_tokens", "seconds", "texts", "speedup"} <= set(s)
        assert s["new_tokens"] == 2 * 8 and len(s["texts"]) == 2 and s["tokens_per_s"] > 0
    assert rec["strategies"]["recycle"]["full_calls"] == 2 * 4  # one full call per two tokens
    spec = rec["strategies"]["speculative"]
    assert spec["same_as_standard"] and spec["texts"] == rec["strategies"]["standard"]["texts"] and spec["tau"] >= 1
    assert 0 <= rec["alpha"] <= 1 and rec["alpha_positions"] == 2 * 4 and rec["speedup"] > 0
    table = "\n".join(out[:-1])
    assert "[1] Explain why the sky is blue" in table and "[3]" not in table
    assert "speed-up of recycle over standard" in table and "alpha" in table
    assert "(the same as standard)" in table and "identical to standard's" in table


def test_demo_strategies_option(tok, builtin, capsys):
    ship_module(tok, builtin)
    assert main(["demo", "--model", NAME, "--device", "cpu", "--max-new-tokens", "6", "--limit", "1", "--json",
                 "--strategies", "standard,tree"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(rec["strategies"]) == ["standard", "tree"] and rec["speedup"] is None
    assert rec["strategies"]["tree"]["same_as_standard"]
    assert main(["demo", "--model", NAME, "--device", "cpu", "--strategies", "recycle,nope"]) == 2
    assert "must include standard" in capsys.readouterr().err


def test_demo_with_a_random_module_notes_it(builtin, capsys):
    assert main(["demo", "--model", NAME, "--recycle", "random", "--device", "cpu", "--max-new-tokens", "4",
                 "--limit", "1", "--json"]) == 0
    captured = capsys.readouterr()
    rec = json.loads(captured.out.strip().splitlines()[-1])
    assert rec["module"] == "random" and "speed" in rec["note"] and "untrained" in captured.err


@pytest.mark.parametrize("flags", [[], ["--recycle", "none"]])
def test_demo_without_a_module_exits_2_before_loading(builtin, monkeypatch, capsys, flags):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(recyclegpt.loading.weights, "build_base", no_load)
    assert main(["demo", "--model", NAME, *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "demo needs a recyclable module" in err
    assert "--recycle PATH" in err and "--recycle random" in err


def test_demo_on_a_checkpoint_without_a_module(tok, tmp_path, capsys):
    plain = save_checkpoint(tmp_path / "plain", tiny_base(tok), tokenizer=tok)
    assert main(["demo", "--model", str(plain), "--device", "cpu", "--max-new-tokens", "4"]) == 2
    assert "demo needs a recyclable module and none is loaded" in capsys.readouterr().err


def test_excerpt_is_one_line_cut_at_a_word():
    from recyclegpt.evals.demo import excerpt

    assert excerpt("short\n\tanswer") == "short answer"
    assert excerpt("alpha beta gamma delta", limit=12) == "alpha beta …"
    assert excerpt("x" * 20, limit=5) == "xxxxx …"
