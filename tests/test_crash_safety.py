"""Crash-safe training: a run killed with SIGKILL at any moment (mid-step, mid-checkpoint write, between the two
renames of a checkpoint swap) leaves its output directory loadable, and `resume` continues it exactly: the final
weights and every log record equal those of the run that was never interrupted. A full disk during a save is a
clear error that keeps the previous checkpoint."""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from test_train import SENTENCES, write_corpus

from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.loading import checkpoint
from recyclegpt.training.data import train_bpe
from recyclegpt.training.train import TrainConfig, train_joint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked training processes")
assert SENTENCES  # the corpus of test_train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash")
    path = write_corpus(folder)
    tok = train_bpe([path], 300)
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=4,
                      eval_batches=1, val_fraction=0.1, log_every=2, save_every=2, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children start clean
    try:
        model_cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)
        start = time.perf_counter()
        full, metrics = train_joint(cfg=cfg, model_cfg=model_cfg, rcfg=RecycleConfig(), files=[path],
                                    out_dir=folder / "full", tokenizer=tok)
        yield dict(path=path, tok=tok, cfg=cfg, model_cfg=model_cfg, full=full, metrics=metrics,
                   seconds=time.perf_counter() - start, folder=folder)
    finally:
        torch.set_num_threads(threads)


def train(s, out, resume=False):
    return train_joint(cfg=s["cfg"], model_cfg=s["model_cfg"], rcfg=RecycleConfig(), files=[s["path"]],
                       out_dir=out, tokenizer=None if resume else s["tok"], resume=resume)


def killed_run(s, out, *, after: float | None = None, rename: int | None = None, fsync: int | None = None) -> None:
    """Train into `out` in a forked child killed by SIGKILL: `after` seconds in, or right after its rename-th
    os.rename of a checkpoint swap, or at its fsync-th fsync of a checkpoint write."""
    def child():
        calls = {"rename": 0, "fsync": 0}

        def counted(kind, limit, fn):
            def wrapper(*a):
                result = fn(*a)
                calls[kind] += 1
                if calls[kind] == limit:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result
            return wrapper

        if rename is not None:
            checkpoint.os.rename = counted("rename", rename, os.rename)
        if fsync is not None:
            checkpoint._fsync = counted("fsync", fsync, checkpoint._fsync)
        train(s, out)
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    if after is not None:
        time.sleep(after)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    assert not proc.is_alive()


def untimed(records: list[dict]) -> list[dict]:
    """Log records without their clock readings (the only fields a resumed run may not repeat)."""
    return [{k: v for k, v in r.items() if k != "elapsed_s" and not k.endswith("per_s")} for r in records]


def resume_and_compare(s, out) -> str:
    """Resume (or start again, when no checkpoint was written) and require the uninterrupted run's weights and
    log; returns how it went on."""
    moved_aside = out.parent / f".{out.name}.old" / "trainer_state.json"  # killed between a swap's renames
    has_state = (out / "trainer_state.json").is_file() or moved_aside.is_file()
    if (out / "trainer_state.json").is_file():
        checkpoint.load_checkpoint(out)  # the directory loads as it was left
    model, _ = train(s, out, resume=has_state)  # puts a checkpoint moved aside back first
    checkpoint.load_checkpoint(out)
    for (name, a), (_, b) in zip(s["full"].state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert untimed(logged) == untimed(s["metrics"])
    return "resumed" if has_state else "restarted"


def test_kill_9_at_random_moments_then_resume_exactly(setup):
    s, rng = setup, random.Random(0)
    outcomes = []
    # 14 random moments over the run (its time in a forked child is close to the parent's)
    for i in range(14):
        out = s["folder"] / f"random{i}"
        killed_run(s, out, after=rng.uniform(0.0, 1.2 * s["seconds"]))
        outcomes.append(resume_and_compare(s, out))
    # 3 kills between the two renames of a checkpoint swap (the old checkpoint moved aside, the new one not yet in
    # place), 3 in the middle of a checkpoint's writes
    for i, n in enumerate((3, 5, 9)):  # the first save has one rename (nothing to move aside): 3, 5, 9 are swaps
        out = s["folder"] / f"rename{i}"
        killed_run(s, out, rename=n)
        assert not out.exists() and (out.parent / f".{out.name}.old").is_dir()
        outcomes.append(resume_and_compare(s, out))
    for i, n in enumerate((2, 9, 17)):
        out = s["folder"] / f"fsync{i}"
        killed_run(s, out, fsync=n)
        outcomes.append(resume_and_compare(s, out))
    assert len(outcomes) == 20 and outcomes.count("resumed") >= 12, outcomes


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(setup, monkeypatch):
    s = setup
    out = s["folder"] / "full_disk"
    real = checkpoint.safetensors.torch.save_file
    saves = {"n": 0}

    def no_space(tensors, path, *a, **kw):
        saves["n"] += 1
        if saves["n"] > 3:  # the first checkpoint is written; the second runs out of space
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", no_space)
    with pytest.raises(OSError, match="No space left"):
        train(s, out)
    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", real)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 2 and not (out.parent / f".{out.name}.tmp").exists()
    checkpoint.load_checkpoint(out)
    resume_and_compare(s, out)


def test_the_cli_says_the_disk_is_full_in_one_line(setup, monkeypatch, capsys):
    from recyclegpt.cli.main import main

    s = setup
    out = s["folder"] / "cli_full"
    real = checkpoint.safetensors.torch.save_file

    def no_space(tensors, path, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", no_space)
    rc = main(["train", str(s["path"]), "--out", str(out), "--preset", "tiny", "--vocab-size", "300", "--steps", "2",
               "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--eval-every", "0", "--no-progress",
               "--device", "cpu"])
    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", real)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0], err
    assert "Traceback" not in err[0] and not (out.parent / f".{out.name}.tmp").exists()
