"""Bad input to the `recyclegpt` command: missing, empty, truncated and garbled model files (GGUF, safetensors,
Hugging Face folders, RecycleGPT checkpoints), a module that does not fit its base, unknown names, bad prompts,
out-of-range options, broken data files and devices that are not there.

Every case exits with status 2 and prints exactly one line on stderr that names the problem (and, where there is
one, the fix), never a traceback, and leaves every file it was given, and any output that already existed,
byte-identical (no partial output either). The models are the tiny checkpoint of conftest.py and files made from
it here, so that the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_weights import _cfg, _model, _write_gguf, _write_hf_folder
from tokenizers import Tokenizer as HFTokenizer

from recyclegpt.cli.main import main
from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.loading.checkpoint import save_checkpoint
from recyclegpt.models import RecyclableModule, RecycleModel, Transformer

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
NO_SERVE = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")),
                              reason="serve needs the [serve] extra")


@dataclasses.dataclass
class BadFiles:
    paths: dict[str, str]  # placeholder -> path, for the argv templates below
    roots: tuple[Path, ...]  # every file under these must be left as it was

    def snapshot(self) -> dict[str, bytes | None]:
        """Every file (its bytes) and folder (None) under the roots."""
        out: dict[str, bytes | None] = {}
        for root in self.roots:
            for dirpath, dirnames, filenames in os.walk(root):
                for d in dirnames:
                    out[os.path.join(dirpath, d)] = None
                for f in filenames:
                    p = os.path.join(dirpath, f)
                    out[p] = Path(p).read_bytes()
        return out


def _copy(src: Path, dst: Path, change) -> str:
    shutil.copytree(src, dst)
    change(dst)
    return str(dst)


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _jsonl(path: Path, *lines: str | dict) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


@pytest.fixture(scope="module")
def bad(tiny_ckpt, tmp_path_factory) -> BadFiles:
    tiny_root, corpus, ckpt = tiny_ckpt
    root = tmp_path_factory.mktemp("bad")
    p: dict[str, str] = {"ckpt": str(ckpt), "corpus": str(corpus), "root": str(root)}

    # -- GGUF: a valid one (over the tiny checkpoint's BPE), then broken copies
    tok = HFTokenizer.from_file(str(ckpt / "tokenizer.json"))
    src = _model(_cfg(tok.get_vocab_size(), tie=True))
    good = _write_gguf(root / "good.gguf", src, tok).read_bytes()
    (root / "empty.gguf").write_bytes(b"")
    (root / "trunc.gguf").write_bytes(good[: len(good) // 2])
    (root / "header.gguf").write_bytes(good[:20])
    (root / "random.gguf").write_bytes(os.urandom(4096))
    (root / "random.safetensors").write_bytes(os.urandom(4096))
    (root / "empty.safetensors").write_bytes(b"")

    # -- Hugging Face folders
    hf = _write_hf_folder(root / "hf", src, tok)
    weights = (hf / "model.safetensors").read_bytes()
    hf_cases = {
        "hf_no_config": lambda d: (d / "config.json").unlink(),
        "hf_bad_config": lambda d: (d / "config.json").write_text('{"model_type": "llama", '),
        "hf_list_config": lambda d: (d / "config.json").write_text("[1, 2]"),
        "hf_config_no_heads": lambda d: _edit_json(d / "config.json", lambda c: c.pop("num_attention_heads")),
        "hf_config_str_size": lambda d: _edit_json(d / "config.json", lambda c: c.update(hidden_size="32")),
        "hf_empty_weights": lambda d: (d / "model.safetensors").write_bytes(b""),
        "hf_trunc_weights": lambda d: (d / "model.safetensors").write_bytes(weights[: len(weights) // 2]),
        "hf_random_weights": lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)),
        "hf_no_weights": lambda d: (d / "model.safetensors").unlink(),
        "hf_bad_tokenizer": lambda d: (d / "tokenizer.json").write_text("{}"),
        "hf_bad_tokenizer_config": lambda d: (d / "tokenizer_config.json").write_text("{oops"),
    }
    for name, change in hf_cases.items():
        p[name] = _copy(hf, root / name, change)

    # -- RecycleGPT checkpoints
    def base_ref(meta):
        meta["base"] = {"ref": str(root / "no-such-base"), "config": meta["base"]["config"]}
        meta["tokenizer"] = None

    ck_cases = {
        "ck_bad_meta": lambda d: (d / "recycle.json").write_text('{"format": '),
        "ck_empty_meta": lambda d: (d / "recycle.json").write_text(""),
        "ck_version": lambda d: _edit_json(d / "recycle.json", lambda m: m.update(version=99)),
        "ck_empty_base": lambda d: (d / "base.safetensors").write_bytes(b""),
        "ck_random_base": lambda d: (d / "base.safetensors").write_bytes(os.urandom(4096)),
        "ck_trunc_module": lambda d: (d / "module.safetensors").write_bytes(
            (d / "module.safetensors").read_bytes()[:500]),
        "ck_no_module": lambda d: (d / "module.safetensors").unlink(),
        "ck_no_tokenizer": lambda d: (d / "tokenizer.json").unlink(),
        "ck_missing_base": lambda d: _edit_json(d / "recycle.json", base_ref),
    }
    for name, change in ck_cases.items():
        p[name] = _copy(ckpt, root / name, change)

    # -- modules trained for other bases, and a checkpoint without a module
    torch.manual_seed(0)
    for name, cfg in (("mod_wider", dataclasses.replace(PRESETS["tiny"], d_model=64, vocab_size=300)),
                      ("mod_other_vocab", dataclasses.replace(PRESETS["tiny"], vocab_size=280))):
        model = RecycleModel(Transformer(cfg), RecyclableModule(cfg, RecycleConfig()))
        p[name] = str(save_checkpoint(root / name, model, base_ref=str(root / "elsewhere")))
    plain_cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=300)
    p["plain_base"] = str(save_checkpoint(root / "plain_base", Transformer(plain_cfg), base_ref=str(ckpt)))

    # -- prompt and data files
    p["good_jsonl"] = _jsonl(root / "good.jsonl", {"prompt": "the quick"}, {"prompt": "a stitch"})
    p["empty_jsonl"] = _jsonl(root / "empty.jsonl")
    p["badline_jsonl"] = _jsonl(root / "badline.jsonl", {"prompt": "the quick"}, '{"prompt": "a st',
                                {"prompt": "a stitch"})
    p["nofield_jsonl"] = _jsonl(root / "nofield.jsonl", {"prompt": "the quick"}, {"text": "no prompt field"})
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "the quick"}\n{"prompt": "caf\xe9 au lait"}\n')
    (root / "lw_latin1.jsonl").write_bytes(b'{"text": "the quick brown fox"}\n{"text": "caf\xe9 au lait"}\n')
    p["blank_prompt_jsonl"] = _jsonl(root / "blank_prompt.jsonl", {"prompt": "the quick"}, {"prompt": "  "})
    p["surrogate_jsonl"] = _jsonl(root / "surrogate.jsonl", '{"prompt": "caf\\udce9"}')
    p["long_jsonl"] = _jsonl(root / "long.jsonl", {"prompt": "the quick brown fox " * 400})
    (root / "latin1.txt").write_bytes(b"the quick brown caf\xe9 fox \xff\xfe jumps")
    (root / "empty.txt").write_bytes(b"")
    p["lw_badline"] = _jsonl(root / "lw_badline.jsonl", {"text": "the quick brown fox"}, '{"text": "the')
    p["lw_nofield"] = _jsonl(root / "lw_nofield.jsonl", {"text": "the quick brown fox"}, {"words": "a b c"})
    p["mc_nofield"] = _jsonl(root / "mc_nofield.jsonl", {"question": "which?", "choices": ["a", "b"]})
    p["rf_badline"] = _jsonl(root / "rf_badline.jsonl", {"prompt": "the quick", "response": "brown fox"},
                             '{"prompt": "a stitch", "resp')
    p["rf_nofield"] = _jsonl(root / "rf_nofield.jsonl", {"prompt": "the quick"})

    # -- outputs that exist already and must survive a failed run
    (root / "existing.jsonl").write_text('{"prompt": "keep me", "response": "as I am"}\n')
    (root / "resume.jsonl.partial").write_text('{"prompt": "the quick", "response": "half done"}\n')
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not a checkpoint\n")

    p.update({k.replace(".", "_"): str(root / k) for k in (
        "good.gguf", "empty.gguf", "trunc.gguf", "header.gguf", "random.gguf", "random.safetensors",
        "empty.safetensors", "latin1.jsonl", "lw_latin1.jsonl", "latin1.txt", "empty.txt")})
    return BadFiles(p, (root, tiny_root))


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (an unknown choice, a value that is not a number)
        return e.code


def _assert_one_line_error(rc, err: str, command: str, needles: tuple[str, ...]) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(f"recyclegpt {command}") and ": error: " in line, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert rc == 2, (rc, line)


def _no_cuda(*, index: int | None = None):
    present = HAS_CUDA if index is None else HAS_CUDA and torch.cuda.device_count() > index
    return pytest.mark.skipif(present, reason="that CUDA device is present here")


G = ["generate", "--model", "{ckpt}"]  # then options and the prompt
B0 = ["bench", "--model", "{ckpt}", "--no-chat", "--max-new-tokens", "2"]
B = B0 + ["--limit", "1"]
D = ["distill", "--model", "{ckpt}", "--max-new-tokens", "2"]
T = ["train", "{corpus}", "--preset", "tiny", "--vocab-size", "300", "--steps", "2", "--warmup", "0",
     "--no-progress", "--device", "cpu"]
R = ["retrofit", "{corpus}", "--model", "{ckpt}", "--out", "{root}/retrofit-out", "--steps", "2", "--warmup", "0",
     "--no-progress", "--device", "cpu"]


def case(id: str, argv: list[str], *needles: str, marks=()):
    return pytest.param(argv, needles, id=id, marks=marks)


CASES = [
    # -- model files: GGUF
    case("gguf-missing", ["generate", "--model", "{root}/missing.gguf", "hi"], "missing.gguf", "no such file"),
    case("gguf-empty", ["generate", "--model", "{empty_gguf}", "hi"], "empty.gguf", "not a readable GGUF file",
         "download or convert it again"),
    case("gguf-truncated", ["generate", "--model", "{trunc_gguf}", "hi"], "trunc.gguf", "not a readable GGUF file"),
    case("gguf-header-only", ["generate", "--model", "{header_gguf}", "hi"], "header.gguf", "not a readable GGUF"),
    case("gguf-random-bytes", ["generate", "--model", "{random_gguf}", "hi"], "random.gguf", "GGUF magic"),
    # -- model files: safetensors
    case("safetensors-lone-random", ["generate", "--model", "{random_safetensors}", "hi"], "random.safetensors",
         "pass the Hugging Face folder"),
    case("safetensors-lone-empty", ["generate", "--model", "{empty_safetensors}", "hi"], "empty.safetensors",
         "pass the Hugging Face folder"),
    case("hf-weights-empty", ["generate", "--model", "{hf_empty_weights}", "hi"], "model.safetensors",
         "corrupt or truncated", "download it again"),
    case("hf-weights-truncated", ["generate", "--model", "{hf_trunc_weights}", "hi"], "model.safetensors",
         "corrupt or truncated"),
    case("hf-weights-random", ["generate", "--model", "{hf_random_weights}", "hi"], "model.safetensors",
         "corrupt or truncated"),
    case("hf-weights-missing", ["generate", "--model", "{hf_no_weights}", "hi"], "no *.safetensors weights"),
    # -- model files: Hugging Face folders
    case("hf-config-missing", ["generate", "--model", "{hf_no_config}", "hi"], "no config.json"),
    case("hf-config-malformed", ["generate", "--model", "{hf_bad_config}", "hi"], "config.json: corrupt JSON"),
    case("hf-config-not-object", ["generate", "--model", "{hf_list_config}", "hi"], "config.json",
         "expected a JSON object"),
    case("hf-config-missing-field", ["generate", "--model", "{hf_config_no_heads}", "hi"],
         "config.json: missing 'num_attention_heads'"),
    case("hf-config-wrong-type", ["generate", "--model", "{hf_config_str_size}", "hi"], "config.json",
         "wrong type"),
    case("hf-tokenizer-garbled", ["generate", "--model", "{hf_bad_tokenizer}", "hi"], "tokenizer.json",
         "not a readable tokenizer"),
    case("hf-tokenizer-config-malformed", ["generate", "--model", "{hf_bad_tokenizer_config}", "hi"],
         "tokenizer_config.json: corrupt JSON"),
    # -- model files: RecycleGPT checkpoints
    case("ckpt-meta-malformed", ["generate", "--model", "{ck_bad_meta}", "hi"], "recycle.json: corrupt JSON"),
    case("ckpt-meta-empty", ["generate", "--model", "{ck_empty_meta}", "hi"], "recycle.json: corrupt JSON"),
    case("ckpt-version", ["generate", "--model", "{ck_version}", "hi"], "version 99 is not supported"),
    case("ckpt-base-empty", ["generate", "--model", "{ck_empty_base}", "hi"], "base.safetensors",
         "corrupt or truncated"),
    case("ckpt-base-random", ["generate", "--model", "{ck_random_base}", "hi"], "base.safetensors",
         "corrupt or truncated"),
    case("ckpt-module-truncated", ["generate", "--model", "{ck_trunc_module}", "hi"], "module.safetensors",
         "corrupt or truncated"),
    case("ckpt-module-missing", ["generate", "--model", "{ck_no_module}", "hi"], "module.safetensors: missing",
         "copy the whole directory again"),
    case("ckpt-tokenizer-missing", ["generate", "--model", "{ck_no_tokenizer}", "hi"], "tokenizer.json",
         "copy the whole directory again"),
    case("ckpt-base-ref-missing", ["generate", "--model", "{ck_missing_base}", "hi"], "no-such-base",
         "does not load"),
    # -- a module that does not fit the base
    case("module-other-shape", G + ["--recycle", "{mod_wider}", "hi"], "trained for another base model",
         "d_model=64 (module) vs 32 (base)"),
    case("module-other-tokenizer", G + ["--recycle", "{mod_other_vocab}", "hi"], "trained for another base model",
         "vocab_size=280 (module) vs 300 (base)"),
    case("module-shipped-for-smollm2", G + ["--recycle", "smollm2-135m-instruct-l1", "hi"],
         "trained for another base model", "d_model"),
    case("module-is-a-hf-folder", G + ["--recycle", "{root}/hf", "hi"], "not a recyclable module checkpoint",
         "recyclegpt retrofit"),
    case("module-is-a-gguf", G + ["--recycle", "{good_gguf}", "hi"], "not a recyclable module checkpoint"),
    case("module-plain-base", G + ["--recycle", "{plain_base}", "hi"], "plain base model", "--recycle none"),
    case("module-missing", G + ["--recycle", "{root}/no-such-module", "hi"], "does not exist"),
    case("retrofit-init-module-other-shape", R + ["--init-module", "{mod_wider}"], "trained for another base model"),
    # -- unknown names
    case("unknown-model", ["generate", "--model", "no-such-model", "hi"], "not a built-in model name",
         "smollm2-135m-instruct"),
    case("unknown-strategy", G + ["--strategy", "nope", "hi"], "invalid choice: 'nope'", "--help"),
    case("unknown-engine", G + ["--engine", "warp", "hi"], "invalid choice: 'warp'"),
    case("unknown-recycle-vocab", G + ["--recycle-vocab", "tiny", "hi"], "invalid choice: 'tiny'"),
    case("unknown-recycle-variant", G + ["--recycle", "smollm2-135m-instruct-l9", "hi"], "does not exist",
         "'none'"),
    case("unknown-dtype", G + ["--dtype", "int8", "hi"], "unknown dtype 'int8'", "float32"),
    case("unknown-bench-strategy", B + ["--strategies", "standard,warp"], "unknown strategy 'warp'", "choose from"),
    case("unknown-suite", ["suite", "nope"], "unknown suite 'nope'", "mixed-13"),
    case("unknown-bench-suite", B + ["--suite", "nope", "--data", "{root}"], "unknown suite 'nope'"),
    case("unknown-demo-strategy", ["demo", "--model", "{ckpt}", "--limit", "1", "--strategies", "standard,warp"],
         "warp"),
    case("unknown-preset", T + ["--out", "{root}/t-out", "--preset", "huge"], "unknown preset 'huge'", "tiny"),
    case("unknown-eval-format", ["eval", "mc", "--model", "{ckpt}", "--data", "{good_jsonl}", "--format", "mmlu"],
         "invalid choice: 'mmlu'"),
    case("unknown-scoring", ["eval", "agreement", "--model", "{ckpt}", "--prompts", "{good_jsonl}", "--scoring",
                             "oracle"], "invalid choice: 'oracle'"),
    # -- prompts
    case("prompt-empty", G + [""], "the prompt is empty"),
    case("prompt-blank", G + ["  \n "], "the prompt is empty"),
    case("prompt-not-utf8", G + ["caf\udce9"], "not UTF-8"),
    case("prompt-beyond-context", G + ["the quick brown fox " * 300], "context is 256", "shorten the prompt"),
    case("prompt-plus-new-tokens-beyond-context", G + ["--max-new-tokens", "250", "the quick brown fox " * 5],
         "exceeds the model's context"),
    case("chat-without-template", G + ["--chat", "hi"], "no chat template", "drop --chat"),
    case("bench-prompt-beyond-context", B + ["--prompts", "{long_jsonl}"], "prompt 1", "exceeds the model's context",
         "lower --max-new-tokens"),
    case("prompts-file-not-utf8", B0 + ["--prompts", "{latin1_jsonl}"], "latin1.jsonl:2", "not UTF-8",
         "save the file as UTF-8"),
    case("prompts-blank-prompt", B0 + ["--prompts", "{blank_prompt_jsonl}"], "blank_prompt.jsonl:2", "non-empty"),
    case("prompts-lone-surrogate", D + ["--prompts", "{surrogate_jsonl}", "--out", "{root}/out.jsonl"],
         "surrogate.jsonl:1", "lone surrogate"),
    case("text-file-not-utf8", ["eval", "ppl", "--model", "{ckpt}", "--data", "{latin1_txt}"], "latin1.txt",
         "not UTF-8"),
    case("lastword-file-not-utf8", ["eval", "lastword", "--model", "{ckpt}", "--data", "{lw_latin1_jsonl}"],
         "lw_latin1.jsonl:2", "not UTF-8"),
    # -- numeric options out of range: generate
    case("max-new-tokens-zero", G + ["--max-new-tokens", "0", "hi"], "--max-new-tokens must be >= 1"),
    case("max-new-tokens-negative", G + ["--max-new-tokens", "-5", "hi"], "--max-new-tokens must be >= 1"),
    case("max-new-tokens-not-a-number", G + ["--max-new-tokens", "many", "hi"], "invalid int value: 'many'"),
    case("temperature-negative", G + ["--temperature", "-1", "hi"], "--temperature must be >= 0"),
    case("temperature-nan", G + ["--temperature", "nan", "hi"], "--temperature must be a finite number"),
    case("temperature-inf", G + ["--temperature", "inf", "hi"], "--temperature must be a finite number"),
    case("top-p-zero", G + ["--top-p", "0", "hi"], "--top-p must be in (0, 1]"),
    case("top-p-above-one", G + ["--top-p", "1.5", "hi"], "--top-p must be in (0, 1]"),
    case("top-k-zero", G + ["--top-k", "0", "hi"], "--top-k must be >= 1"),
    case("seed-too-large", G + ["--seed", str(2 ** 70), "--temperature", "1", "hi"], "--seed must fit in 64 bits"),
    case("draft-len-zero", G + ["--strategy", "speculative", "--draft-len", "0", "hi"],
         "--draft-len (draft_len) must be >= 1"),
    case("draft-len-negative", G + ["--strategy", "lookup", "--draft-len", "-2", "hi"],
         "--draft-len (draft_len) must be >= 1"),
    case("min-draft-prob-negative", G + ["--strategy", "speculative", "--min-draft-prob", "-0.1", "hi"],
         "--min-draft-prob (min_draft_prob) must be >= 0"),
    case("min-draft-prob-one", G + ["--strategy", "speculative", "--min-draft-prob", "1", "hi"],
         "--min-draft-prob (min_draft_prob) must be below 1"),
    case("tree-depth-zero", G + ["--strategy", "tree", "--tree-depth", "0", "hi"], "tree depth", ">= 1"),
    case("tree-topk-zero", G + ["--strategy", "tree", "--tree-topk", "0", "hi"], "tree topk", ">= 1"),
    case("tree-lookup-negative", G + ["--strategy", "tree", "--tree-lookup", "-1", "hi"], "tree lookup", ">= 0"),
    case("kv-bucket-small", G + ["--kv-bucket", "8", "hi"], "--kv-bucket must be at least 16"),
    case("recycle-layers-zero", G + ["--recycle", "random", "--recycle-layers", "0", "hi"],
         "--recycle-layers must be >= 1"),
    # -- numeric options out of range: bench, distill, eval, demo, serve, train, retrofit
    case("bench-batch-size-zero", B + ["--batch-size", "0"], "--batch-size must be >= 1"),
    case("bench-check-prompts-zero", B + ["--check-prompts", "0"], "--check-prompts must be >= 1"),
    case("bench-threads-zero", B + ["--threads", "0"], "--threads must be >= 1"),
    case("bench-threads-negative", B + ["--threads", "-2"], "--threads must be >= 1"),
    case("bench-limit-zero", ["bench", "--model", "{ckpt}", "--limit", "0"], "--limit must be >= 1"),
    case("bench-limit-negative", ["bench", "--model", "{ckpt}", "--limit", "-1"], "--limit must be >= 1"),
    case("bench-max-new-tokens-zero", B + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    case("bench-kv-bucket-negative", B + ["--kv-bucket", "-16"], "--kv-bucket must be at least 16"),
    case("distill-batch-size-zero", D + ["--prompts", "{good_jsonl}", "--out", "{root}/out.jsonl", "--batch-size",
                                         "0"], "--batch-size must be >= 1"),
    case("distill-max-prompt-tokens-zero", D + ["--prompts", "{good_jsonl}", "--out", "{root}/out.jsonl",
                                                "--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1"),
    case("distill-no-room-for-prompts", ["distill", "--model", "{ckpt}", "--prompts", "{good_jsonl}", "--out",
                                         "{root}/out.jsonl", "--max-new-tokens", "1000"],
         "leaves no room in the model's context of 256 tokens", "lower --max-new-tokens"),
    case("distill-limit-zero", D + ["--prompts", "{good_jsonl}", "--out", "{root}/out.jsonl", "--limit", "0"],
         "--limit must be >= 1"),
    case("distill-top-p", D + ["--prompts", "{good_jsonl}", "--out", "{root}/out.jsonl", "--top-p", "2"],
         "--top-p must be in (0, 1]"),
    case("ppl-max-length", ["eval", "ppl", "--model", "{ckpt}", "--data", "{corpus}", "--max-length", "2"],
         "--max-length must be >= 3"),
    case("ppl-stride-zero", ["eval", "ppl", "--model", "{ckpt}", "--data", "{corpus}", "--stride", "0"],
         "--stride must be >= 1"),
    case("ppl-limit-negative", ["eval", "ppl", "--model", "{ckpt}", "--data", "{corpus}", "--limit", "-1"],
         "--limit must be >= 1"),
    case("agreement-batch-size-zero", ["eval", "agreement", "--model", "{ckpt}", "--prompts", "{good_jsonl}",
                                       "--batch-size", "0"], "--batch-size must be >= 1"),
    case("agreement-max-new-tokens-zero", ["eval", "agreement", "--model", "{ckpt}", "--prompts", "{good_jsonl}",
                                           "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    case("demo-limit-zero", ["demo", "--model", "{ckpt}", "--limit", "0"], "--limit must be >= 1"),
    case("demo-max-new-tokens-zero", ["demo", "--model", "{ckpt}", "--limit", "1", "--max-new-tokens", "0"],
         "--max-new-tokens must be >= 1"),
    case("serve-port", ["serve", "--model", "{ckpt}", "--port", "70000"], "--port must be in 0..65535",
         marks=NO_SERVE),
    case("serve-max-batch-zero", ["serve", "--model", "{ckpt}", "--max-batch", "0"], "--max-batch must be at least 1",
         marks=NO_SERVE),
    case("serve-max-queue-zero", ["serve", "--model", "{ckpt}", "--max-queue", "0"], "--max-queue must be at least 1",
         marks=NO_SERVE),
    case("serve-max-model-len", ["serve", "--model", "{ckpt}", "--max-model-len", "1"], "--max-model-len must be",
         marks=NO_SERVE),
    case("train-steps-zero", T + ["--out", "{root}/t-out", "--steps", "0"], "steps must be a positive integer"),
    case("train-lr-negative", T + ["--out", "{root}/t-out", "--lr", "-1"], "need lr > 0"),
    case("train-seq-len", T + ["--out", "{root}/t-out", "--seq-len", "2"], "seq_len must be at least 3"),
    case("train-val-fraction", T + ["--out", "{root}/t-out", "--val-fraction", "1.5"], "val_fraction must be in"),
    case("train-vocab-size-small", T + ["--out", "{root}/t-out", "--vocab-size", "10"], "too small for byte-level"),
    case("train-vocab-size-zero", T + ["--out", "{root}/t-out", "--vocab-size", "0"], "--vocab-size must be >= 1"),
    case("train-bpe-max-bytes", T + ["--out", "{root}/t-out", "--bpe-max-bytes", "-5"],
         "--bpe-max-bytes must be >= 1"),
    case("train-taps-past-the-base", T + ["--out", "{root}/t-out", "--taps", "7"], "taps", "past the base"),
    case("retrofit-steps-zero", R + ["--steps", "0"], "steps must be a positive integer"),
    case("retrofit-seq-len-beyond-context", R + ["--seq-len", "1000"], "exceeds the base's context_length"),
    # -- prompt and data files: missing, empty, a malformed line, a missing field
    case("prompts-missing", B + ["--prompts", "{root}/missing.jsonl"], "missing.jsonl", "does not exist"),
    case("prompts-a-folder", B + ["--prompts", "{root}"], "is a folder", "give a JSONL file"),
    case("prompts-empty", B + ["--prompts", "{empty_jsonl}"], "empty.jsonl", "no prompts found"),
    case("prompts-malformed-line", B0 + ["--prompts", "{badline_jsonl}"], "badline.jsonl:2", "bad JSON"),
    case("prompts-missing-field", B0 + ["--prompts", "{nofield_jsonl}"], "nofield.jsonl:2", "prompt"),
    case("distill-prompts-missing", D + ["--prompts", "{root}/missing.jsonl", "--out", "{root}/out.jsonl"],
         "does not exist"),
    case("distill-prompts-malformed-line", D + ["--prompts", "{badline_jsonl}", "--out", "{root}/out.jsonl"],
         "badline.jsonl:2", "bad JSON"),
    case("agreement-prompts-missing-field", ["eval", "agreement", "--model", "{ckpt}", "--prompts",
                                             "{nofield_jsonl}"], "nofield.jsonl:2"),
    case("lastword-malformed-line", ["eval", "lastword", "--model", "{ckpt}", "--data", "{lw_badline}"],
         "lw_badline.jsonl:2", "bad JSON"),
    case("lastword-missing-field", ["eval", "lastword", "--model", "{ckpt}", "--data", "{lw_nofield}"],
         "lw_nofield.jsonl:2", "'text'"),
    case("mc-missing-field", ["eval", "mc", "--model", "{ckpt}", "--data", "{mc_nofield}", "--format", "generic"],
         "mc_nofield.jsonl:1"),
    case("mc-empty", ["eval", "mc", "--model", "{ckpt}", "--data", "{empty_jsonl}", "--format", "generic"],
         "no items found"),
    case("ppl-text-missing", ["eval", "ppl", "--model", "{ckpt}", "--data", "{root}/missing.txt"], "does not exist"),
    case("ppl-text-empty", ["eval", "ppl", "--model", "{ckpt}", "--data", "{empty_txt}"], "0 tokens"),
    case("train-text-missing", T[:1] + ["{root}/missing.txt"] + T[2:] + ["--out", "{root}/t-out"], "missing.txt",
         "no such file"),
    case("train-text-empty", T[:1] + ["{empty_txt}"] + T[2:] + ["--out", "{root}/t-out"], "empty corpus"),
    case("retrofit-data-malformed-line", R[:1] + ["{rf_badline}"] + R[2:], "rf_badline.jsonl:2", "bad JSON"),
    case("retrofit-data-missing-field", R[:1] + ["{rf_nofield}"] + R[2:], "rf_nofield.jsonl:1", "'response'"),
    case("retrofit-data-empty", R[:1] + ["{empty_jsonl}"] + R[2:], "empty corpus"),
    # -- outputs that exist are left alone
    case("distill-out-exists", D + ["--prompts", "{good_jsonl}", "--out", "{root}/existing.jsonl"], "exists",
         "pass --force"),
    case("distill-forced-out-kept-on-bad-prompts", D + ["--prompts", "{badline_jsonl}", "--out",
                                                        "{root}/existing.jsonl", "--force"], "bad JSON"),
    case("distill-partial-without-resume", D + ["--prompts", "{good_jsonl}", "--out", "{root}/resume.jsonl"],
         "resume.jsonl.partial exists", "pass --resume"),
    case("distill-out-folder-missing", D + ["--prompts", "{good_jsonl}", "--out", "{root}/no-dir/out.jsonl"],
         "does not exist", "create it first"),
    case("train-out-holds-a-checkpoint", T + ["--out", "{ckpt}"], "already holds a checkpoint"),
    case("train-resume-nothing", T + ["--out", "{root}/foreign", "--resume"], "nothing to resume"),
    case("retrofit-out-holds-a-checkpoint", R + ["--out", "{ckpt}"], "already holds a checkpoint"),
    # -- devices that are not there
    case("device-cuda", G + ["--device", "cuda", "hi"], "--device cuda", "use --device cpu", marks=_no_cuda()),
    case("device-cuda-7", G + ["--device", "cuda:7", "hi"], "--device cuda:7", marks=_no_cuda(index=7)),
    case("device-foo", G + ["--device", "foo", "hi"], "unknown device 'foo'", "cuda:N"),
    case("device-meta", G + ["--device", "meta", "hi"], "--device meta"),
    case("device-mps", G + ["--device", "mps", "hi"], "--device mps", "use cpu or cuda",
         marks=pytest.mark.skipif(HAS_MPS, reason="MPS is present here")),
    case("bench-device-cuda-7", B + ["--device", "cuda:7"], "--device cuda:7", marks=_no_cuda(index=7)),
    case("train-device-cuda", T + ["--out", "{root}/t-out", "--device", "cuda"], "--device cuda",
         marks=_no_cuda()),
    case("retrofit-device-foo", R + ["--device", "foo"], "unknown device 'foo'"),
    case("eval-device-cuda-7", ["eval", "ppl", "--model", "{ckpt}", "--data", "{corpus}", "--device", "cuda:7"],
         "--device cuda:7", marks=_no_cuda(index=7)),
]


@pytest.mark.parametrize("argv, needles", CASES)
def test_bad_input_is_one_line_and_exit_2(bad, capsys, argv, needles):
    argv = [a.format_map(bad.paths) for a in argv]
    before = bad.snapshot()
    rc = _run(argv)
    err = capsys.readouterr().err
    _assert_one_line_error(rc, err, argv[0], needles)
    after = bad.snapshot()
    assert after.keys() == before.keys(), f"files appeared or vanished: {sorted(after.keys() ^ before.keys())}"
    assert [k for k in before if before[k] != after[k]] == [], "the command changed files it was given"


def test_there_are_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("argv, needles", [
    pytest.param(["generate", "--model", "{ckpt}", "--max-new-tokens", "2", b"caf\xe9 au lait"], ("not UTF-8",),
                 id="prompt-bytes-not-utf8"),
    pytest.param(["generate", "--model", "{random_gguf}", "hi"], ("random.gguf", "not a readable GGUF file"),
                 id="random-gguf"),
    pytest.param(["generate", "--model", "{ckpt}", "--strategy", "nope", "hi"], ("invalid choice",),
                 id="argparse-choice"),
])
def test_bad_input_in_a_real_process(bad, argv, needles):
    """The same contract through `python -m recyclegpt.cli`: the exit status and stderr of a real process (the
    prompt's bytes reach Python through the OS, undecodable bytes as surrogates)."""
    argv = [a.format_map(bad.paths) if isinstance(a, str) else a for a in argv]
    before = bad.snapshot()
    proc = subprocess.run([sys.executable, "-m", "recyclegpt.cli", *argv], capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", errors="replace")
    _assert_one_line_error(proc.returncode, err, argv[0], needles)
    assert proc.stdout == b""
    assert bad.snapshot() == before


@pytest.mark.real_model
def test_a_tiny_module_on_smollm2_is_refused(smollm2_gguf, bad, capsys):
    """A module trained for another base (shape and tokenizer) over the real SmolLM2: refused before decoding."""
    before = bad.snapshot()
    rc = _run(["generate", "--model", "smollm2-135m-instruct", "--recycle", bad.paths["ckpt"], "hi"])
    _assert_one_line_error(rc, capsys.readouterr().err, "generate",
                           ("trained for another base model", "vocab_size=300 (module) vs 49152 (base)"))
    assert bad.snapshot() == before
