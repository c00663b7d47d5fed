"""Online distillation (training/online.py, `recyclegpt distill-train`) on the CPU with a tiny base: learning,
exact resume, the deadline, argument errors."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from recyclegpt.cli.main import main
from recyclegpt.config import PRESETS, ConfigError, RecycleConfig
from recyclegpt.loading.checkpoint import load_module, save_checkpoint
from recyclegpt.models import Transformer
from recyclegpt.training.data import DataError, train_bpe
from recyclegpt.training.online import CLOCK_FIELDS, OnlineConfig, online_retrofit
from recyclegpt.training.train import TrainConfig

SENTENCES = ["the cat sat on the mat.", "a dog ran to the red ball.", "she sang a song of the sea.",
             "we walk home in the rain.", "birds fly over the green hill."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random base saved as a checkpoint, its BPE, a text file and a prompt file."""
    folder = tmp_path_factory.mktemp("online")
    rng = random.Random(0)
    text = folder / "corpus.txt"
    text.write_text(" ".join(rng.choice(SENTENCES) for _ in range(400)))
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(SENTENCES) for _ in range(2))}) + "\n"
                               for _ in range(40)))
    tok = train_bpe([text], 300)
    torch.manual_seed(0)
    base = Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)).eval()
    save_checkpoint(folder / "base", base, tokenizer=tok)
    return folder, base, tok, prompts, text


def cfgs(**kw):
    train = dict(steps=12, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=6, log_every=3,
                 target="distill", progress=False, val_fraction=0.1)
    online = dict(gen_batch=16, buffer=32, max_new_tokens=12, max_prompt_tokens=40, prefix_min=4, prefix_max=12,
                  val_prompts=8, val_new_tokens=10, greedy_share=0.25, text_share=0.5)
    t = {k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    o = {k: v for k, v in kw.items() if k not in t}
    return TrainConfig(**{**train, **t}), OnlineConfig(**{**online, **o})


def run(setup, out, **kw):
    _, base, tok, prompts, text = setup
    stop = kw.pop("stop_at_step", None)
    resume = kw.pop("resume", False)
    cfg, ocfg = cfgs(**kw)
    return online_retrofit(cfg=cfg, ocfg=ocfg, base=base, tokenizer=tok, rcfg=RecycleConfig(n_layer=1),
                           out_dir=out, base_ref=str(setup[0] / "base"), prompt_files=[prompts], text_files=[text],
                           resume=resume, stop_at_step=stop)


def without_clock(records):
    return [{k: v for k, v in r.items() if k not in CLOCK_FIELDS} for r in records if r["split"] != "run"]


def test_short_run_lowers_kl_and_logs(setup, tmp_path):
    _, metrics = run(setup, tmp_path / "m", steps=24, eval_every=24, lr=1e-2, min_lr=1e-3, steps_per_round=4)
    val = [m for m in metrics if m["split"] == "val"]
    assert val[-1]["val_kl"] < 0.7 * val[0]["val_kl"]
    assert val[-1]["val_agree"] > val[0]["val_agree"] and val[-1]["alpha"] >= val[0]["alpha"]
    last = metrics[-1]
    assert last["split"] == "run" and last["end"] == "steps" and last["step"] == 24
    assert last["tokens_generated"] > 0 and last["tokens_trained"] > 0
    assert {"gen_tok_s", "train_tok_s", "gen_share", "gen_s", "train_s"} <= set(last)
    train = [m for m in metrics if m["split"] == "train"]
    assert train[-1]["tokens_trained"] > train[0]["tokens_trained"] and train[-1]["rounds"] >= 2
    logged = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert logged == metrics


def test_resume_is_bit_identical(setup, tmp_path):
    full, m_full = run(setup, tmp_path / "full", save_every=4)
    _, m_first = run(setup, tmp_path / "split", save_every=4, stop_at_step=5)  # mid-round, past a checkpoint
    assert m_first[-1]["end"] == "stop" and m_first[-1]["step"] == 5
    resumed, m_split = run(setup, tmp_path / "split", save_every=4, resume=True)
    assert without_clock(m_split) == without_clock(m_full)
    for a, b in zip(full.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)
    _, base, _, _, _ = setup
    on_disk = load_module(tmp_path / "split", base)
    for a, b in zip(full.module.state_dict().values(), on_disk.state_dict().values()):
        assert torch.equal(a, b)


def test_deadline_ends_cleanly_with_a_loadable_checkpoint(setup, tmp_path):
    _, metrics = run(setup, tmp_path / "d", steps=100000, warmup=2, deadline=1e-9)
    assert metrics[-1]["split"] == "run" and metrics[-1]["end"] == "deadline"
    _, base, _, _, _ = setup
    load_module(tmp_path / "d", base)
    state = json.loads((tmp_path / "d" / "trainer_state.json").read_text())
    assert state["step"] == metrics[-1]["step"] and "buffer" in state["stream"]


def test_config_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="buffer"):
        OnlineConfig(gen_batch=64, buffer=32)
    with pytest.raises(ConfigError, match="greedy-share"):
        OnlineConfig(greedy_share=1.5)
    _, base, tok, prompts, text = setup
    cfg, ocfg = cfgs(text_share=0.5)
    with pytest.raises(DataError, match="--text"):
        online_retrofit(cfg=cfg, ocfg=ocfg, base=base, tokenizer=tok, rcfg=RecycleConfig(), out_dir=tmp_path / "x",
                        base_ref="b", prompt_files=[prompts])
    run(setup, tmp_path / "r", steps=3, eval_every=0)
    with pytest.raises(ConfigError, match="online.gen_batch"):
        run(setup, tmp_path / "r", steps=3, gen_batch=24, resume=True)


@pytest.mark.parametrize("extra, message", [
    (["--greedy-share", "2"], "--greedy-share must be in [0, 1]"),
    (["--buffer", "4"], "--buffer 4 must hold at least one round"),
    (["--text-share", "0"], "--prompts"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--engine", "warp"], "unknown --engine 'warp'"),
    (["--deadline", "-1"], "--deadline must be"),
])
def test_cli_errors_are_one_line(setup, tmp_path, capsys, extra, message):
    folder, _, _, _, text = setup
    args = ["distill-train", "--model", str(folder / "base"), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--text", str(text), "--no-progress", "--max-prompt-tokens", "40", "--prefix-min", "4",
            "--prefix-max", "12", "--max-new-tokens", "8", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("recyclegpt distill-train: error:") and message in err, err


def test_cli_runs_and_resumes(setup, tmp_path, capsys):
    folder, _, _, prompts, text = setup
    args = ["distill-train", "--model", str(folder / "base"), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--prompts", str(prompts), "--text", str(text), "--no-progress", "--steps", "4", "--batch-size", "4",
            "--warmup", "1", "--gen-batch", "8", "--buffer", "8", "--max-new-tokens", "8", "--max-prompt-tokens",
            "40", "--prefix-min", "4", "--prefix-max", "12", "--val-prompts", "4", "--val-new-tokens", "6",
            "--recycle-layers", "1"]
    assert main(args + ["--stop-after", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["end"] == "stop"
    assert main(args) == 2  # the directory holds a checkpoint: --resume it
    assert "resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["end"] == "steps" and last["step"] == 4


def test_round_batches_draw_evenly_and_pad_little():
    """A round's batches: a pure function of (seed, round, lengths), batch_size indices each, every sequence drawn
    about equally often, and far less padding than batches drawn at random."""
    import numpy as np

    from recyclegpt.training.online import round_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 1000, size=300)
    a = round_batches(lengths, 1, 4, 16, 32)
    assert len(a) == 16 and all(len(b) == 32 for b in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, round_batches(lengths, 1, 4, 16, 32)))
    assert not all(np.array_equal(x, y) for x, y in zip(a, round_batches(lengths, 1, 5, 16, 32)))
    counts = np.bincount(np.concatenate(a), minlength=300)
    assert counts.min() >= 1 and counts.max() <= 3  # 512 draws from 300 sequences: each once or twice (or thrice)

    def fill(batches):
        return sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches)

    random_batches = [rng.choice(300, 32, replace=False) for _ in range(16)]
    assert fill(a) > 0.85 > 0.6 > fill(random_batches)
    assert [len(b) for b in round_batches(lengths[:5], 0, 0, 3, 32)] == [5, 5, 5]  # a buffer smaller than a batch
