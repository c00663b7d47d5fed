"""Tokenizer: a `tokenizers.Tokenizer` plus what decoding needs beside it (stop ids, BOS, chat template).

Built from a tokenizer.json (Hugging Face folders, RecycleGPT checkpoints) or from GGUF metadata (see
`recyclegpt.loading.weights`). Chat templates are Jinja2, rendered the way transformers renders them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers


@functools.lru_cache(maxsize=8)
def _compiled(chat_template: str):
    """The Jinja2 template, compiled once per template text (compiling costs ~100x a render)."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template)


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    eos_ids: tuple[int, ...] = ()  # generation stops at any of these
    bos_id: int | None = None
    add_bos: bool = False  # prepend bos_id when encoding a prompt
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # e.g. {"eos_token": "<|im_end|>"} for templates

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """`encode` of each text, the texts split over the tokenizer's threads (the same ids as one at a time)."""
        bos = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None else []
        return [bos + e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation [{"role": ..., "content": ...}, ...] to the prompt text the model was tuned on."""
        if self.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template; pass a plain prompt (drop --chat)")
        return _compiled(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    # -- files -------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_meta.json into `folder`."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        meta = {"eos_ids": list(self.eos_ids), "bos_id": self.bos_id, "add_bos": self.add_bos,
                "chat_template": self.chat_template, "special_tokens": self.special_tokens}
        (folder / "tokenizer_meta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "Tokenizer":
        """Read what `save` wrote."""
        folder = Path(folder)
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        meta = json.loads((folder / "tokenizer_meta.json").read_text())
        return cls(backend, eos_ids=tuple(meta["eos_ids"]), bos_id=meta["bos_id"], add_bos=meta["add_bos"],
                   chat_template=meta["chat_template"], special_tokens=meta.get("special_tokens", {}))
