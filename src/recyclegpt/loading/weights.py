"""The loading boundary: foreign checkpoints in, a `Transformer` and a `Tokenizer` out.

Two formats are read, both converted to our state-dict names (see `Transformer`):
- GGUF (llama.cpp; the built-in models of `recyclegpt.loading.registry`): tensors are dequantized with the `gguf`
  package, the Q and K projections are un-permuted from llama.cpp's interleaved rotary layout back to rotate-half,
  and the tokenizer is rebuilt from the file's metadata.
- A local Hugging Face LLaMA-family folder: config.json, safetensors weights (single or sharded) and tokenizer.json.
  Pickled `.bin` weights are refused: loading a pickle can run arbitrary code.

`load_base(name_or_path)` dispatches on the argument and returns a ready `(Transformer, Tokenizer)`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..config import ConfigError, ModelConfig
from ..models import Transformer
from . import registry as _registry
from .registry import MODELS, cache_dir, cache_lock, resolve_gguf, sha256_file
from .tokenizer import Tokenizer

StateDict = dict[str, torch.Tensor]


class LoadError(ValueError):
    """A checkpoint is missing, malformed, or uses something this model does not implement."""


# -- GGUF --------------------------------------------------------------------------------------------------------

_GGUF_TOP = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm": "attn_norm", "attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv",
               "attn_output": "attn.wo", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.w1", "ffn_up": "mlp.w3",
               "ffn_down": "mlp.w2"}

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> how text is split before byte-level BPE. The SmolLM family
# (like StarCoder's) isolates every digit, then applies the GPT-2 regex; this matches their tokenizer.json.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_FAMILY = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
_CONTROL = 3  # llama.cpp token type of control tokens such as <|im_end|>

_MISSING = object()


def load_gguf(path: str | Path) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """Read a llama-architecture GGUF: its config, float32 weights in our names, and its tokenizer."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, OSError or numpy's errors on empty, truncated or garbled files
        raise LoadError(f"{path}: not a readable GGUF file (empty, truncated or corrupt: {e}); download or convert "
                        f"it again") from None
    arch = _gguf_field(reader, "general.architecture", path)
    if arch != "llama":
        raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama': LLaMA, SmolLM, Mistral)")
    tok = _gguf_tokenizer(reader, path)
    cfg = _gguf_config(reader, arch, tok, path)

    sd: StateDict = {}
    for t in reader.tensors:
        name = _gguf_name(t.name, path)
        # Dequantized arrays come out in torch order (out, in): GGUF's ne order reversed.
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(arr if arr.flags.writeable and arr.dtype == np.float32 else arr.astype(np.float32))
        if name.endswith(("attn.wq.weight", "attn.wk.weight")):
            w = unpermute_rotary(w, cfg.n_head if "wq" in name else cfg.n_kv_head)
        sd[name] = w
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return cfg, sd, tok


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter permutation of a Q or K projection (n_head * head_dim, d_in).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ...; HF LLaMA rotates halves (x_i, x_{i + D/2}). The
    converter reorders each head's rows from [first half; second half] to interleaved, i.e. viewed as
    (n_head, 2, D/2, d_in) with axes 1 and 2 swapped. Here we swap them back: (n_head, D/2, 2) -> (n_head, 2, D/2).
    """
    rows, d_in = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, d_in).transpose(1, 2).reshape(rows, d_in)


def _gguf_name(name: str, path: Path) -> str:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_BLOCK
            and parts[3] == "weight"):
        return f"layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.weight"
    raise LoadError(f"{path}: unexpected tensor {name!r} (attention biases, rope_freqs or experts are not supported)")


def _gguf_field(reader, key: str, path: Path, default=_MISSING):
    """A metadata value as Python: str, int, float, bool, or a list of them. float32 values are rounded to the
    shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise LoadError(f"{path}: GGUF metadata has no {key!r}")
        return default
    T = gguf.GGUFValueType

    def scalar(part: np.ndarray, kind):
        if kind == T.STRING:
            return bytes(part).decode("utf-8")
        if kind == T.FLOAT32:
            return float(str(part[0]))
        return part[0].item()

    if field.types[0] == T.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _gguf_config(reader, arch: str, tok: Tokenizer, path: Path) -> ModelConfig:
    def get(key, default=_MISSING):
        return _gguf_field(reader, f"{arch}.{key}", path, default)

    if get("expert_count", 0):
        raise LoadError(f"{path}: mixture-of-experts GGUFs ({arch}.expert_count={get('expert_count')}) are not "
                        f"supported")
    if get("rope.scaling.type", "none") not in ("none", ""):
        raise LoadError(f"{path}: rope scaling {get('rope.scaling.type')!r} is not supported")
    n_head = get("attention.head_count")
    d_model = get("embedding_length")
    tensor_names = {t.name for t in reader.tensors}
    try:
        cfg = ModelConfig(
            vocab_size=get("vocab_size", tok.vocab_size), n_layer=get("block_count"), n_head=n_head,
            n_kv_head=get("attention.head_count_kv", n_head), d_model=d_model, d_ff=get("feed_forward_length"),
            context_length=get("context_length"), rope_theta=get("rope.freq_base", 10000.0),
            norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
            tie_embeddings="output.weight" not in tensor_names,
        )
    except (ConfigError, TypeError) as e:
        raise LoadError(f"{path}: GGUF metadata gives an invalid config: {e}") from None
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, cfg.head_dim) != cfg.head_dim:
            raise LoadError(f"{path}: {arch}.{key}={get(key)} differs from head_dim={cfg.head_dim} (not supported)")
    return cfg


def _gguf_tokenizer(reader, path: Path) -> Tokenizer:
    def get(key, default=_MISSING):
        return _gguf_field(reader, f"tokenizer.{key}", path, default)

    kind = get("ggml.model")
    if kind != "gpt2":
        raise LoadError(f"{path}: GGUF tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = get("ggml.tokens")
    token_type = get("ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in get("ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise LoadError(f"{path}: malformed tokenizer.ggml.merges (expected 'left right' pairs)")

    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(get("ggml.pre", "gpt-2"), path)
    backend.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, kind in enumerate(token_type) if kind == _CONTROL]
    # Control tokens are matched whole in the text (so a rendered chat template encodes its markers as one id each)
    # and dropped by decode(skip_special=True).
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    ids = {name: get(f"ggml.{key}_token_id", None) for name, key in
           (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
    eos_ids = [ids["eos_token"]] if ids["eos_token"] is not None else []
    # Base-model text ends with <|endoftext|> even where the chat turn ends with another eos.
    if "<|endoftext|>" in control and tokens.index("<|endoftext|>") not in eos_ids:
        eos_ids.append(tokens.index("<|endoftext|>"))
    return Tokenizer(
        backend, eos_ids=tuple(eos_ids), bos_id=ids["bos_token"], add_bos=bool(get("ggml.add_bos_token", False)),
        chat_template=get("chat_template", None),
        special_tokens={name: tokens[i] for name, i in ids.items() if i is not None},
    )


def _gguf_pre_tokenizer(pre: str, path: Path):
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt-2":
        return gpt2
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in _LLAMA3_FAMILY:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = ", ".join(("gpt-2", *_DIGITS_THEN_GPT2, *_LLAMA3_FAMILY))
    raise LoadError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported; known: {known}")


# -- Hugging Face folders ----------------------------------------------------------------------------------------

_HF_TOP = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head.weight"}
_HF_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk",
             "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo", "post_attention_layernorm": "mlp_norm",
             "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2"}
_HF_MODEL_TYPES = ("llama", "mistral")


def load_hf_folder(path: str | Path) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """Read a local Hugging Face LLaMA-family folder: config.json, *.safetensors, tokenizer.json (+ its config)."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    hf = _read_json(config_file)
    if not isinstance(hf, dict):
        raise LoadError(f"{config_file}: expected a JSON object, got {type(hf).__name__}")
    try:
        cfg = _hf_config(hf, folder)
    except LoadError:
        raise
    except KeyError as e:
        raise LoadError(f"{config_file}: missing {e.args[0]!r} (not a complete LLaMA-family config)") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise LoadError(f"{config_file}: a field has the wrong type or value ({e})") from None
    sd = _hf_state_dict(folder, cfg)
    return cfg, sd, _hf_tokenizer(folder, hf)


def _read_json(path: Path):
    """A JSON file of a Hugging Face folder, or a LoadError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: corrupt JSON ({e}); download the file again") from None


def _hf_config(hf: dict, folder: Path) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        raise LoadError(f"{folder}: model_type {model_type!r} is not supported "
                        f"(supported: {', '.join(_HF_MODEL_TYPES)})")
    problems = []
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention/MLP biases (attention_bias, mlp_bias)")
    if hf.get("sliding_window") is not None:
        problems.append(f"sliding-window attention (sliding_window={hf['sliding_window']})")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {hf['hidden_act']!r} (only silu)")
    # transformers 4 writes rope_theta and rope_scaling; transformers 5 writes rope_parameters holding both.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r}")
    n_head, d_model = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, d_model // n_head):
        problems.append(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads")
    if problems:
        raise LoadError(f"{folder}: unsupported architecture: {'; '.join(problems)}")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d_model, d_ff=hf["intermediate_size"],
            context_length=hf.get("max_position_embeddings", 2048),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise LoadError(f"{folder}/config.json: missing {e.args[0]!r}") from None
    except ConfigError as e:
        raise LoadError(f"{folder}/config.json: {e}") from None


def _hf_state_dict(folder: Path, cfg: ModelConfig) -> StateDict:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        meta = _read_json(index)
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index}: no 'weight_map' object; download the file again")
        shards = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
            raise LoadError(f"{folder}: only pickled weights (.bin/.pt) found; they are not loaded, since unpickling "
                            f"can run arbitrary code. Convert them to safetensors first, e.g. with transformers: "
                            f"model.save_pretrained(folder, safe_serialization=True)")
        raise LoadError(f"{folder}: no *.safetensors weights")
    sd: StateDict = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise LoadError(f"{folder}: shard {shard} named in model.safetensors.index.json is missing")
        try:
            tensors = load_file(folder / shard)
        except Exception as e:  # safetensors raises SafetensorError or OSError on truncated or garbled files
            raise LoadError(f"{folder / shard}: corrupt or truncated safetensors file ({e}); download it "
                            f"again") from None
        for name, w in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed here
                continue
            sd[_hf_name(name, folder)] = w
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]  # a tied checkpoint may or may not store a copy
    return sd


def _hf_name(name: str, folder: Path) -> str:
    if name in _HF_TOP:
        return _HF_TOP[name]
    parts = name.split(".")  # model.layers.{i}.{module...}.weight
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[-1] == "weight":
        kind = ".".join(parts[3:-1])
        if kind in _HF_BLOCK:
            return f"layers.{parts[2]}.{_HF_BLOCK[kind]}.weight"
    raise LoadError(f"{folder}: unexpected tensor {name!r} (not a plain LLaMA-family checkpoint)")


def _hf_tokenizer(folder: Path, hf: dict) -> Tokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise LoadError(f"{folder}: no tokenizer.json (a slow-tokenizer-only folder, e.g. tokenizer.model, must be "
                        f"converted: AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    try:
        backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on a garbled tokenizer.json
        raise LoadError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({e}); download it again") from None
    tc_file = folder / "tokenizer_config.json"
    tc = _read_json(tc_file) if tc_file.is_file() else {}
    if not isinstance(tc, dict):
        raise LoadError(f"{tc_file}: expected a JSON object, got {type(tc).__name__}")
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tc.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value

    def token_id(name: str) -> int | None:
        return backend.token_to_id(special[name]) if name in special else None

    bos_id = token_id("bos_token")
    if bos_id is None and isinstance(hf.get("bos_token_id"), int):
        bos_id = hf["bos_token_id"]
    # Stop ids: the tokenizer's eos, then generation_config.json's and config.json's eos_token_id (int or list).
    eos_ids = [token_id("eos_token")]
    gen_file = folder / "generation_config.json"
    for source in (_read_json(gen_file) if gen_file.is_file() else {}, hf):
        value = source.get("eos_token_id") if isinstance(source, dict) else None
        eos_ids += value if isinstance(value, list) else [value]
    eos_ids = tuple(dict.fromkeys(i for i in eos_ids if isinstance(i, int)))
    add_bos = tc.get("add_bos_token")
    if add_bos is None:  # a tokenizer.json whose post-processor prepends BOS (LLaMA's TemplateProcessing)
        ids = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and ids[:1] == [bos_id]
    template = tc.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(backend, eos_ids=eos_ids, bos_id=bos_id, add_bos=bool(add_bos), chat_template=template,
                     special_tokens=special)


# -- dispatch ----------------------------------------------------------------------------------------------------


# Bump when the GGUF conversion or the converted folder's layout changes, so that converted copies made by an older
# version are not reused (the next conversion deletes them). 2: manifest.json (sizes, sha256) beside the files.
_CONVERTED_VERSION = 2


class _CorruptCopy(Exception):
    """A converted copy in the cache that fails its manifest check or does not load: (path, why)."""


def _converted_folder(name: str) -> Path:
    return cache_dir() / "converted" / f"{name}-{MODELS[name].sha256[:16]}-v{_CONVERTED_VERSION}"


def read_weights(name_or_path: str | Path) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """A built-in model name, a .gguf file or a Hugging Face folder -> (config, state dict, tokenizer)."""
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return _load_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path)
    if path.is_dir():
        return load_hf_folder(path)
    if not path.exists():
        raise LoadError(f"{name_or_path!s}: no such file or folder, and not a built-in model name "
                        f"(built-in: {', '.join(sorted(MODELS))})")
    if path.suffix == ".safetensors":
        raise LoadError(f"{path}: a lone .safetensors file has no config or tokenizer; pass the Hugging Face folder "
                        f"that holds it (config.json, tokenizer.json) or a .gguf file")
    raise LoadError(f"{path}: neither a .gguf file nor a Hugging Face model folder (with config.json)")


def _load_builtin(name: str) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """A built-in model, through a converted copy in the cache (config.json, float32 model.safetensors, tokenizer).

    Reading and dequantizing the GGUF takes seconds; the converted copy is memory-mapped in a fraction of one. It is
    keyed by the GGUF's sha256 and the converter version, written once under the registry's `cache_lock` (a
    concurrent first run waits, then loads it) into a temporary folder that is renamed into place, and checked on
    every load against its manifest.json: sizes always, sha256 when a file's mtime changed. A copy that fails the
    check or does not load is named on stderr in one line, deleted and converted again.
    """
    entry = MODELS[name]
    folder = _converted_folder(name)
    try:
        loaded = _read_converted(folder)
    except _CorruptCopy:
        loaded = None  # looked at again under the lock, where it is reported and rebuilt
    if loaded is not None:
        return loaded
    with cache_lock(entry) as locked:
        try:
            loaded = _read_converted(folder)  # another process may have converted it while this one waited
        except _CorruptCopy as e:
            path, why = e.args
            _note(f"converted copy {path} is corrupt ({' '.join(why.split())}); deleting {folder.name} and "
                  f"converting again")
            shutil.rmtree(folder, ignore_errors=True)
        if loaded is not None:
            return loaded
        gguf_path = resolve_gguf(name)  # fetches the GGUF if needed (the lock is re-entrant)
        if _registry._stderr_is_tty():  # seconds of work: said on a terminal, quiet in logs and pipes
            _note(f"converting {gguf_path.name} to float32 safetensors in {folder} (once per model)")
        cfg, sd, tok = load_gguf(gguf_path)
        _write_converted(folder, name, cfg, sd, tok, clean=locked)
        return cfg, sd, tok


def _note(line: str) -> None:
    print(f"recyclegpt: {line}", file=sys.stderr, flush=True)


def _read_converted(folder: Path) -> tuple[ModelConfig, StateDict, Tokenizer] | None:
    """The converted copy in `folder`; None if there is none; _CorruptCopy(path, why) if it fails its manifest or
    does not load."""
    from safetensors.torch import load_file

    if not folder.exists():
        return None
    manifest_file = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
        files = {name: (int(f["size"]), int(f["mtime_ns"]), str(f["sha256"])) for name, f in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _CorruptCopy(manifest_file, f"unreadable manifest: {e}") from None
    rehashed = False
    for name, (size, mtime_ns, sha256) in files.items():
        path = folder / name
        try:
            st = path.stat()
            if st.st_size != size:
                raise _CorruptCopy(path, f"{st.st_size} bytes, expected {size}")
            if st.st_mtime_ns != mtime_ns:  # touched since it was written: only the hash can vouch for it
                if sha256_file(path) != sha256:
                    raise _CorruptCopy(path, "sha256 differs from its manifest")
                rehashed = True
        except OSError as e:
            raise _CorruptCopy(path, f"unreadable: {e.strerror}") from None
    try:
        cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
        sd = load_file(folder / "model.safetensors")
        tok = Tokenizer.load(folder)
    except Exception as e:  # json, safetensors, tokenizers and the config raise many kinds on garbled files
        raise _CorruptCopy(folder, f"does not load: {e}") from None
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    if rehashed:
        _write_manifest(folder, manifest_file)  # best effort: spares the hash next time
    return cfg, sd, tok


def _write_manifest(folder: Path, dest: Path) -> None:
    """Record size, mtime and sha256 of every file in `folder` into `dest` (atomically; best effort)."""
    try:
        files = {}
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."):
                st = p.stat()
                files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
        tmp = dest.with_name(f".manifest.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"files": files}, indent=2))
        os.replace(tmp, dest)
    except OSError:
        pass


def _write_converted(folder: Path, name: str, cfg: ModelConfig, sd: StateDict, tok: Tokenizer, *,
                     clean: bool = False) -> None:
    """Write the converted copy into a temporary folder beside `folder` and rename it into place. Best effort:
    without a writable cache every load converts again. `clean` (only while holding the model's `cache_lock`) first
    deletes what a killed conversion or an older converter version left."""
    from safetensors.torch import save_file

    parent = folder.parent
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for old in parent.iterdir() if clean else ():
            if old.name.startswith(f".{folder.name}.tmp-") or _older_version(old.name, name):
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        tok.save(tmp)
        save_file({k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")},
                  tmp / "model.safetensors")
        _write_manifest(tmp, tmp / "manifest.json")
        if not (tmp / "manifest.json").is_file():
            return
        os.replace(tmp, folder)
    except OSError:
        pass
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _older_version(folder_name: str, name: str) -> bool:
    """Whether `folder_name` is a converted copy of built-in `name` made by an older converter version."""
    stem, _, version = folder_name.rpartition("-v")
    return (stem.startswith(f"{name}-") and len(stem) == len(name) + 17 and version.isdigit()
            and int(version) < _CONVERTED_VERSION)


def build_base(name_or_path: str | Path, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """A base model for inference from a built-in name, a .gguf file or a Hugging Face folder (`read_weights`):
    eval mode, on `device` (default CPU), in `dtype` (default float32). `recyclegpt.loading.load_base` also takes
    RecycleGPT checkpoints."""
    cfg, sd, tok = read_weights(name_or_path)
    if tok.vocab_size > cfg.vocab_size:
        raise LoadError(f"{name_or_path}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
        model = Transformer(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise LoadError(f"{name_or_path}: weights do not fit the config: {e}") from None
    if cfg.tie_embeddings:  # assign=True made two Parameters of the one tensor; make them one again
        model.lm_head.weight = model.tok_emb.weight
    return model.to(device=device, dtype=dtype or torch.float32).eval(), tok
