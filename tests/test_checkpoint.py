"""The checkpoint directory: round trips, optimizer state, clear errors on bad files, atomic replacement."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import safetensors.torch
import torch

from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.loading import checkpoint
from recyclegpt.loading.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_module,
    load_trainer_state,
    save_checkpoint,
)
from recyclegpt.models import RecycleModel, Transformer
from recyclegpt.training.data import train_bpe


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.txt"
    path.write_text("the cat sat on the mat. " * 50)
    return train_bpe([path], 280)


def build(seed=0, cfg=PRESETS["tiny"]):
    torch.manual_seed(seed)
    return RecycleModel.build(cfg, RecycleConfig(n_layer=1))


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_roundtrip_trained_base(tmp_path, tok):
    model = build()
    save_checkpoint(tmp_path / "ck", model, tokenizer=tok, train_config={"lr": 1.0}, metrics={"val_lm": 2.0})
    loaded, tok2, meta = load_checkpoint(tmp_path / "ck")
    assert_same(model, loaded)
    assert loaded.base.lm_head.weight is loaded.base.tok_emb.weight  # re-tied, not a copy
    assert tok2.encode("the cat") == tok.encode("the cat") and tok2.eos_ids == tok.eos_ids
    assert meta["train"] == {"lr": 1.0} and meta["metrics"] == {"val_lm": 2.0}
    stored = safetensors.torch.load_file(str(tmp_path / "ck" / "base.safetensors"))
    assert "lm_head.weight" not in stored


def test_roundtrip_base_ref_and_plain_base(tmp_path, tok):
    model = build()
    save_checkpoint(tmp_path / "mod", model, base_ref="tiny-base")
    assert not (tmp_path / "mod" / "base.safetensors").exists()
    with pytest.raises(CheckpointError, match="base_loader"):
        load_checkpoint(tmp_path / "mod")
    loaded, tok2, meta = load_checkpoint(tmp_path / "mod", base_loader=lambda ref: (model.base, tok))
    assert_same(model.module, loaded.module) and tok2 is tok and meta["base"]["ref"] == "tiny-base"

    save_checkpoint(tmp_path / "plain", model.base, tokenizer=tok)
    base, _, meta = load_checkpoint(tmp_path / "plain", dtype=torch.bfloat16)
    assert isinstance(base, Transformer) and meta["recycle"] is None
    assert base.tok_emb.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="plain base"):
        load_module(tmp_path / "plain", model.base)


def test_optimizer_state_roundtrip(tmp_path, tok):
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model.base(torch.randint(0, 97, (2, 8))).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, tokenizer=tok, optimizer=opt, trainer_state={"step": 1})
    opt2 = torch.optim.AdamW(build().parameters(), lr=5.0)
    assert load_trainer_state(tmp_path / "ck", opt2) == {"step": 1}
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid, state in s1["state"].items():
        for key, value in state.items():
            assert torch.equal(value, s2["state"][pid][key]), (pid, key)


def test_truncated_safetensors_is_a_clear_error(tmp_path, tok):
    save_checkpoint(tmp_path / "ck", build(), tokenizer=tok)
    path = tmp_path / "ck" / "module.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="module.safetensors: corrupt or truncated"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "base.safetensors").write_bytes(b"\x08")
    with pytest.raises(CheckpointError, match="base.safetensors: corrupt or truncated"):
        load_checkpoint(tmp_path / "ck")


def test_bad_json_is_a_clear_error(tmp_path, tok):
    save_checkpoint(tmp_path / "ck", build(), tokenizer=tok)
    meta_path = tmp_path / "ck" / "recycle.json"
    good = meta_path.read_text()
    meta_path.write_text(good[:30])
    with pytest.raises(CheckpointError, match="recycle.json: corrupt JSON"):
        load_checkpoint(tmp_path / "ck")
    meta_path.write_text(json.dumps({**json.loads(good), "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "ck")
    meta_path.write_text(good)
    (tmp_path / "ck" / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nowhere")


def test_module_over_a_mismatched_base_is_a_clear_error(tmp_path, tok):
    save_checkpoint(tmp_path / "ck", build(), base_ref="tiny")
    wider = Transformer(dataclasses.replace(PRESETS["tiny"], d_model=64, d_ff=128))
    with pytest.raises(CheckpointError, match=r"d_model=32 \(module\) vs 64 \(base\)"):
        load_module(tmp_path / "ck", wider)
    other_vocab = Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=300))
    with pytest.raises(CheckpointError, match=r"vocab_size=97 \(module\) vs 300 \(base\)"):
        load_module(tmp_path / "ck", other_vocab)
    module = load_module(tmp_path / "ck", Transformer(PRESETS["tiny"]).to(torch.bfloat16))
    assert module.fc.weight.dtype == torch.bfloat16


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, tok, monkeypatch):
    first, second = build(seed=0), build(seed=1)
    save_checkpoint(tmp_path / "ck", first, tokenizer=tok)
    (tmp_path / "ck" / "metrics.jsonl").write_text('{"step": 1}\n')

    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):  # half a file, then the process dies
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", second, tokenizer=tok)
    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", real_save)
    assert_same(load_checkpoint(tmp_path / "ck")[0], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind

    # a crash between the two renames: the previous checkpoint is restored from its backup
    real_rename, renames = os.rename, []

    def crash_on_second_rename(src, dst):
        renames.append(src)
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", second, tokenizer=tok)
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    assert not (tmp_path / "ck").exists()
    assert_same(load_checkpoint(tmp_path / "ck")[0], first)

    save_checkpoint(tmp_path / "ck", second, tokenizer=tok)
    assert_same(load_checkpoint(tmp_path / "ck")[0], second)
    assert (tmp_path / "ck" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the log is carried over


def test_refuses_to_replace_a_foreign_directory(tmp_path, tok):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_checkpoint(tmp_path / "notes", build(), tokenizer=tok)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"
