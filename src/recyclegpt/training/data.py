"""Data files: for training, plain text as random fixed-length windows, prompt -> response JSONL as padded
examples, and a byte-level BPE trainer; for decoding, prompt files (`read_prompts`, `read_prompt_records`).

Every training batch is a pure function of (seed, step, micro-step): a resumed run draws exactly the batches the
uninterrupted run would have drawn, without storing any RNG state. The validation split is the contiguous tail of
the token stream (text) or of the example list (JSONL), so that it is text the model never trains on.

Both datasets answer `train_batch(seed=, index=, batch_size=) -> (idx (B, T) int64, loss_mask (B, T) bool or
None)`, index being the global micro-batch number (step * grad_accum + micro), and `val_batches(n_batches=,
batch_size=) -> [(idx, loss_mask), ...]`; loss_mask marks target positions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch

from ..loading.tokenizer import Tokenizer

EOT = "<|endoftext|>"


class DataError(ValueError):
    """Training data is missing, empty, too short or malformed."""


def _check_files(files: Sequence[str | Path]) -> list[Path]:
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("no data files given")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    return paths


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# -- tokenizer ---------------------------------------------------------------------------------------------------


def train_bpe(files: Sequence[str | Path], vocab_size: int, *, max_bytes: int | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation) on text files.

    The vocabulary holds `<|endoftext|>` (id 0, the eos and document separator), the 256 byte symbols and merges up
    to `vocab_size` in all (fewer when the corpus runs out of pairs). max_bytes: train on the first max_bytes
    characters of the corpus only, in file order (the merges of a large corpus settle early).
    """
    paths = _check_files(files)
    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size={vocab_size} is too small for byte-level BPE (needs > 257)")

    def docs() -> Iterator[str]:
        budget = max_bytes
        for p in paths:
            text = _read_text(p)
            if budget is not None:
                text, budget = text[:budget], budget - len(text)
            if text:
                yield text
            if budget is not None and budget <= 0:
                return

    if not any(p.stat().st_size for p in paths):
        raise DataError(f"empty corpus: all {len(paths)} file(s) are empty")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(docs(), trainer)
    eot = backend.token_to_id(EOT)
    return Tokenizer(backend, eos_ids=(eot,), special_tokens={"eos_token": EOT})


def separator_id(tokenizer: Tokenizer) -> int:
    """The token between documents: `<|endoftext|>` when the vocabulary has it, else the first eos id."""
    eot = tokenizer.backend.token_to_id(EOT)
    if eot is not None:
        return eot
    if not tokenizer.eos_ids:
        raise DataError("the tokenizer has neither <|endoftext|> nor an eos id to separate documents with")
    return tokenizer.eos_ids[0]


# -- plain text ----------------------------------------------------------------------------------------------------


def tokenize_files(files: Sequence[str | Path], tokenizer: Tokenizer, *,
                   cache_dir: str | Path | None = None) -> np.ndarray:
    """Tokenize each file as one document and concatenate them, each followed by the separator: (N,) int32.

    cache_dir: keep the result there as .npy, keyed by the tokenizer and the files' paths, sizes and mtimes.
    """
    paths = _check_files(files)
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256(tokenizer.backend.to_str().encode())
        for p in paths:
            st = p.stat()
            key.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        cache = Path(cache_dir) / f"tokens-{key.hexdigest()[:24]}.npy"
        if cache.is_file():
            return np.load(cache)
    sep = separator_id(tokenizer)
    texts = [_read_text(p) for p in paths]
    if not any(texts):
        raise DataError(f"empty corpus: all {len(paths)} file(s) are empty")
    # one document per file; encode_batch spreads the files over the tokenizers thread pool
    encoded = tokenizer.backend.encode_batch([t for t in texts if t], add_special_tokens=False)
    stream = np.concatenate([np.asarray(e.ids + [sep], dtype=np.int32) for e in encoded])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, stream)
        os.replace(tmp, cache)
    return stream


@dataclass
class TextWindows:
    """Random windows of seq_len tokens from a token stream; the last val_fraction of the stream is validation."""

    train: np.ndarray  # (N_train,) int32
    val: np.ndarray  # (N_val,) int32; empty when there is no validation split
    seq_len: int

    @classmethod
    def from_stream(cls, stream: np.ndarray, *, seq_len: int, val_fraction: float) -> "TextWindows":
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n_val = 0 if val_fraction == 0 else max(int(len(stream) * val_fraction), seq_len)
        train, val = stream[: len(stream) - n_val], stream[len(stream) - n_val:]
        if len(train) < seq_len:
            raise DataError(f"the corpus has {len(stream)} tokens ({len(val)} held out for validation), which leaves "
                            f"{len(train)} for training: shorter than one window of seq_len={seq_len}")
        return cls(train, val, seq_len)

    @classmethod
    def from_files(cls, files: Sequence[str | Path], tokenizer: Tokenizer, *, seq_len: int, val_fraction: float,
                   cache_dir: str | Path | None = None) -> "TextWindows":
        stream = tokenize_files(files, tokenizer, cache_dir=cache_dir)
        return cls.from_stream(stream, seq_len=seq_len, val_fraction=val_fraction)

    def train_batch(self, *, seed: int, index: int, batch_size: int) -> tuple[torch.Tensor, None]:
        rng = np.random.default_rng([seed, index])
        starts = rng.integers(0, len(self.train) - self.seq_len + 1, size=batch_size)
        return self._windows(self.train, starts), None

    def val_batches(self, *, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, None]]:
        """n_batches fixed batches of windows spread evenly over the validation split (overlapping if it is short)."""
        if len(self.val) == 0:
            return []
        starts = np.linspace(0, len(self.val) - self.seq_len, n_batches * batch_size).astype(np.int64)
        return [(self._windows(self.val, s), None) for s in starts.reshape(n_batches, batch_size)]

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> torch.Tensor:
        rows = np.stack([tokens[s: s + self.seq_len] for s in starts])
        return torch.from_numpy(rows.astype(np.int64))


# -- prompt -> response --------------------------------------------------------------------------------------------


def _example_messages(obj: object, where: str) -> list[dict[str, str]]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if (not isinstance(msgs, list) or len(msgs) < 2
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs)):
            raise DataError(f"{where}: 'messages' must be a list of at least two {{'role', 'content'}} objects")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message is the response and must have role 'assistant'")
        return msgs
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    raise DataError(f"{where}: expected {{'prompt': str, 'response': str}} or {{'messages': [...]}}")


def example_texts(messages: list[dict[str, str]], tokenizer: Tokenizer,
                  where: str = "example", *, chat: bool = True) -> tuple[str, str, bool]:
    """(prompt text, response text, whether a separator token follows the response) for a conversation whose last
    message is the response to learn; `encode_example` tokenizes them.

    With a chat template, the prompt is everything before the last message plus the generation prompt and the
    response is the rest of the rendered conversation (the template's end-of-turn included). Without one, a
    prompt/response pair is encoded as plain text and the response gets the eos token appended. chat=False (a
    record with "chat": false, as `recyclegpt distill --no-chat` writes): plain text, and the response is a
    continuation, so no eos is appended.
    """
    if chat and tokenizer.chat_template is not None:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render the conversation as prompt + response")
        return prompt, full[len(prompt):], False
    if len(messages) != 2:
        raise DataError(f"{where}: a multi-turn 'messages' example needs a tokenizer with a chat template")
    return messages[0]["content"], messages[1]["content"], chat


def encode_example(messages: list[dict[str, str]], tokenizer: Tokenizer,
                   where: str = "example", *, chat: bool = True) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens) of `example_texts`' prompt and response: the prompt as the model's
    prompts are encoded (a bos where the model has one), the response after it without one."""
    prompt, response, separator = example_texts(messages, tokenizer, where, chat=chat)
    return _joined(tokenizer.encode(prompt), tokenizer.encode(response, add_bos=False), separator, tokenizer)


def _joined(prompt_ids: list[int], response_ids: list[int], separator: bool,
            tokenizer: Tokenizer) -> tuple[list[int], int]:
    return prompt_ids + response_ids + ([separator_id(tokenizer)] if separator else []), len(prompt_ids)


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("path:line", value) for each non-blank line of a JSONL file; a DataError names a line that is not JSON."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save "
                                f"the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(files: Sequence[str | Path]) -> list[tuple[list[dict[str, str]], str, bool]]:
    """[(messages, "file:line", chat), ...] from JSONL files; blank lines are skipped. chat is False for a record
    marked "chat": false (a plain-text prompt and its continuation)."""
    out = [(_example_messages(obj, where), where, obj.get("chat", True) is not False)
           for path in _check_files(files) for where, obj in iter_jsonl(path)]
    if not out:
        raise DataError(f"empty corpus: no examples in {len(files)} JSONL file(s)")
    return out


@dataclass
class ChatExamples:
    """Prompt -> response examples, each truncated to seq_len and right-padded to the longest in its batch.

    Padding rather than packing: examples never attend to one another, and the padding after a sequence cannot
    change its causal outputs; padded positions are simply not targets. Epoch e visits the training examples in
    the order of a permutation drawn from (seed, e).
    """

    train: list[tuple[list[int], int]]  # (ids, n_prompt)
    val: list[tuple[list[int], int]]
    seq_len: int
    pad_id: int
    dropped: int = 0  # examples left out because no response token fits in seq_len

    @classmethod
    def from_files(cls, files: Sequence[str | Path], tokenizer: Tokenizer, *, seq_len: int,
                   val_fraction: float) -> "ChatExamples":
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        examples = []
        read = read_jsonl(files)
        texts = [example_texts(messages, tokenizer, where, chat=chat) for messages, where, chat in read]
        # the same ids as encode_example's, the tokenizer's threads sharing the work (~1 ms an example one at a
        # time: two minutes for 99,890 records on 2026-11-27)
        prompts = tokenizer.encode_batch([p for p, _, _ in texts])
        responses = tokenizer.encode_batch([r for _, r, _ in texts], add_bos=False)
        for p_ids, r_ids, (_, _, separator) in zip(prompts, responses, texts):
            ids, n_prompt = _joined(p_ids, r_ids, separator, tokenizer)
            ids = ids[:seq_len]
            if n_prompt < len(ids):  # at least one response token fits (the first response token is a target)
                examples.append((ids, n_prompt))
        if not examples:
            raise DataError(f"no example has a response token within seq_len={seq_len} (prompts too long?)")
        n_val = 0 if val_fraction == 0 else max(1, int(len(examples) * val_fraction))
        if n_val >= len(examples):
            raise DataError(f"{len(examples)} usable example(s): too few to hold {n_val} out for validation")
        return cls(examples[: len(examples) - n_val], examples[len(examples) - n_val:], seq_len,
                   separator_id(tokenizer), dropped=len(read) - len(examples))

    def train_batch(self, *, seed: int, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.train)
        perms: dict[int, np.ndarray] = {}
        picks = []
        for k in range(index * batch_size, (index + 1) * batch_size):  # k: the global example number
            if k // n not in perms:
                perms[k // n] = np.random.default_rng([seed, k // n]).permutation(n)
            picks.append(self.train[perms[k // n][k % n]])
        return self._collate(picks)

    def val_batches(self, *, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The validation examples in order, in at most n_batches batches."""
        chunks = [self.val[i: i + batch_size] for i in range(0, len(self.val), batch_size)]
        return [self._collate(c) for c in chunks[:n_batches]]

    def _collate(self, examples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(3, max(len(ids) for ids, _ in examples))
        idx = torch.full((len(examples), T), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(examples), T), dtype=torch.bool)
        for b, (ids, n_prompt) in enumerate(examples):
            idx[b, : len(ids)] = torch.tensor(ids)
            mask[b, n_prompt: len(ids)] = True
        return idx, mask


def load_dataset(files: Sequence[str | Path], tokenizer: Tokenizer, *, seq_len: int, val_fraction: float,
                 cache_dir: str | Path | None = None) -> TextWindows | ChatExamples:
    """Plain text files -> TextWindows; .jsonl files -> ChatExamples; both -> ChatExamples with the text mixed in.

    In a mix, the text is cut into consecutive windows of seq_len tokens that join the training examples as
    examples whose every token is a target (so a retrofit module learns plain prose as well as chat responses);
    the share of text is set by the files given. Validation stays on the JSONL examples alone.
    """
    paths = _check_files(files)
    jsonl = [p for p in paths if p.suffix == ".jsonl"]
    text = [p for p in paths if p.suffix != ".jsonl"]
    if not jsonl:
        return TextWindows.from_files(paths, tokenizer, seq_len=seq_len, val_fraction=val_fraction, cache_dir=cache_dir)
    chat = ChatExamples.from_files(jsonl, tokenizer, seq_len=seq_len, val_fraction=val_fraction)
    if not text:
        return chat
    stream = tokenize_files(text, tokenizer, cache_dir=cache_dir)
    windows = [(stream[i: i + seq_len].tolist(), 0) for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not windows:
        raise DataError(f"the text files hold {len(stream)} tokens: fewer than one window of seq_len={seq_len}")
    return dataclasses.replace(chat, train=windows + chat.train)


# -- prompt files (bench, distill, eval agreement) ----------------------------------------------------------------


PROMPT_FIELDS = ("prompt", "instruction", "question", "Instruction")


def read_prompts(path: str | Path, *, limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file: each line an object with a "prompt" field (or, as the shared prompt sets have
    it, "instruction", "question" or "Instruction"), or a bare JSON string. Blank lines are skipped. A file whose
    text starts with "[" is one JSON array of such records (the Alpaca, LIMA and Code Alpaca releases). A record's
    non-empty "input" string (Alpaca's instruction context) follows its instruction after a blank line."""
    return [p for _, p in read_prompt_records(path, limit=limit)]


def _iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """("where", value) for each record of a JSONL file, or of a file holding one JSON array."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from iter_jsonl(path)
        return
    raw = path.read_bytes()
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as "
                        f"UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of prompt records")
    for i, item in enumerate(items):
        yield f"{path}: item {i}", item


def read_prompt_records(path: str | Path, *, limit: int | None = None) -> list[tuple[str | None, str]]:
    """(category, prompt) from a JSONL file as `read_prompts` reads it; the category is a record's "category"
    string field (as `recyclegpt suite --out` writes), else None."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"prompts file {str(path)!r} is a folder: give a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    prompts = []
    for where, rec in _iter_records(path):
        category = None
        if isinstance(rec, dict):
            category = rec.get("category") if isinstance(rec.get("category"), str) else None
            extra = rec.get("input")
            rec = next((rec[k] for k in PROMPT_FIELDS if isinstance(rec.get(k), str)), None)
            if isinstance(rec, str) and isinstance(extra, str) and extra.strip():
                rec = f"{rec}\n\n{extra}"
        if not isinstance(rec, str) or not rec.strip():
            raise ValueError(f"{where}: expected a JSON string or an object with a non-empty string field "
                             f"{' / '.join(PROMPT_FIELDS)}")
        if not rec.isascii():
            try:
                rec.encode("utf-8")
            except UnicodeEncodeError:  # a \ud800-\udfff escape on its own: JSON allows it, no tokenizer takes it
                raise ValueError(f"{where}: the prompt holds a lone surrogate escape (\\ud800-\\udfff), which is "
                                 f"not text; fix the escape") from None
        prompts.append((category, rec))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts
