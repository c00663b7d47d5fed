"""llama.cpp (through llama-cpp-python) as a baseline row of the decoding benchmark, on the same GGUF file.

`LlamaCppBaseline(gguf, n_threads=..., n_ctx=...)` loads the file with llama.cpp on the CPU (no GPU layers, the
weights in their GGUF quantisation, as llama.cpp runs them) and `generate(ids, n)` greedy-decodes exactly n tokens
after the given token ids, batch 1: the prompt goes in as the project's token ids (llama.cpp's own tokenizer is not
used, so both see the same prompt), one `llama_decode` per new token, the argmax of llama.cpp's logits as the next
token (the first index on ties, as `torch.argmax`), EOS ignored. Every call starts from an empty KV cache, so no
prompt prefix is reused between calls.

llama.cpp multiplies the quantised weights by activations quantised to 8 bits (Q8_1 for Q4_1 weights), where the
project dequantises the weights to the model's dtype: their logits differ slightly, and greedy tokens can part at a
near-tie. The bench reports how many of `standard`'s tokens llama.cpp reproduces.

llama-cpp-python is optional (`pip install 'recyclegpt[llama-cpp]'`): it is imported inside the functions, with a
one-line error when it is missing.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP = "llama_cpp"  # the bench's strategy name for this row
KV_PAD = 256  # n_ctx is rounded up to a multiple of this (llama.cpp pads its attention window to 256 cells)


def require_llama_cpp():
    """The llama_cpp module, or an ImportError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("the llama_cpp baseline needs llama-cpp-python: pip install 'recyclegpt[llama-cpp]' "
                          "(or pip install llama-cpp-python)") from e
    return llama_cpp


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def gguf_of(name: str) -> Path:
    """The GGUF file behind the bench's --model `name`: a .gguf path as it is, a built-in name's file from the
    registry; anything else (a Hugging Face folder, a checkpoint, a random shape) is a ValueError."""
    from ..loading.registry import MODELS, resolve_gguf

    if name in MODELS:
        return resolve_gguf(name)
    path = Path(name)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    raise ValueError(f"the {LLAMA_CPP} row runs llama.cpp on the model's GGUF file: give --model a built-in name "
                     f"({', '.join(MODELS)}) or a .gguf file, not {name!r}")


@dataclass
class LlamaCppRun:
    """One greedy decode, timed like `hf_baselines.HFRun`.

    tokens: the new tokens. seconds: wall time from before the prompt's decode to the last token (tokens/s =
    len(tokens) / seconds). ttft_s: time to the first new token (the prompt's decode and its argmax). step_s: the
    time of each later token (one `llama_decode` of one token and its argmax). eval_ms: llama.cpp's own time in
    `llama_decode` for the prompt and for the single-token decodes (`llama_perf_context`), without Python.
    """

    tokens: list[int]
    seconds: float
    ttft_s: float
    step_s: list[float]
    prompt_eval_ms: float | None = None
    eval_ms: float | None = None
    peak_mem_mb: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


class LlamaCppBaseline:
    """llama.cpp greedy decoding of one GGUF file on the CPU; `generate(ids, n)` returns a `LlamaCppRun`.

    n_threads: llama.cpp's threads for the prompt and for each decode step (the bench passes torch's thread count).
    n_ctx: the KV cache's size in tokens (at least the longest prompt + max_new_tokens; rounded up to KV_PAD).
    flash_attn: llama.cpp's fused attention (on by default: on the 2-core VM of docs/cpu.md it decodes 5-7% faster
    than without, and a token's logits then do not depend on how many tokens share its decode; dev/LOG.md).
    """

    def __init__(self, gguf: str | Path, *, n_threads: int, n_ctx: int = 2048, flash_attn: bool = True) -> None:
        if not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < 1:
            raise ValueError(f"n_threads must be an integer >= 1, got {n_threads!r}")
        if n_ctx < 2:
            raise ValueError(f"n_ctx must be at least 2, got {n_ctx}")
        llama_cpp = require_llama_cpp()
        self._lib = llama_cpp
        self.gguf = Path(gguf)
        self.n_threads = n_threads
        self.n_ctx = -(-n_ctx // KV_PAD) * KV_PAD
        self.flash_attn = flash_attn
        self.llm = llama_cpp.Llama(str(self.gguf), n_gpu_layers=0, n_ctx=self.n_ctx, n_threads=n_threads,
                                   n_threads_batch=n_threads, flash_attn=flash_attn, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.version = llama_cpp_version()
        self.config_note = (f"llama.cpp (llama-cpp-python {self.version}), {n_threads} "
                            f"thread{'s' if n_threads != 1 else ''}"
                            f"{', flash attn' if flash_attn else ''}")

    def _argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, ids: list[int], max_new_tokens: int) -> LlamaCppRun:
        """Greedy-decode exactly max_new_tokens tokens after the token ids `ids` (one prompt), from an empty cache."""
        if not ids:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"{len(ids)} prompt tokens + {max_new_tokens} new ones exceed the llama.cpp context of "
                             f"{self.n_ctx} tokens")
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside llama.cpp's vocabulary of {self.n_vocab}")
        llm, lib = self.llm, self._lib
        llm.reset()  # n_tokens = 0: the next eval drops every cached cell first
        lib.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        llm.eval(list(ids))
        tokens = [self._argmax()]
        times = [time.perf_counter()]
        while len(tokens) < max_new_tokens:
            llm.eval(tokens[-1:])
            tokens.append(self._argmax())
            times.append(time.perf_counter())
        perf = lib.llama_perf_context(llm.ctx)
        return LlamaCppRun(tokens=tokens, seconds=times[-1] - t0, ttft_s=times[0] - t0,
                           step_s=[b - a for a, b in zip(times, times[1:])],
                           prompt_eval_ms=float(perf.t_p_eval_ms), eval_ms=float(perf.t_eval_ms))

    def close(self) -> None:
        self.llm.close()
