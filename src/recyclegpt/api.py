"""The Python API: load a model and its recyclable module in one call, then generate.

    from recyclegpt import RecycleGPT
    lm = RecycleGPT.from_pretrained("smollm2-135m-instruct")  # with the module shipped for it, if there is one
    out = lm.generate("The capital of France is", strategy="recycle", max_new_tokens=32)
    print(out.text, out.stats.tokens_per_s)

The CLI is a thin layer over this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import KernelConfig, RecycleConfig
from .decoding import strategies
from .decoding.batching import DRAFT_ROWS, PREFILL_CHUNK, continuous_decode
from .decoding.engine import KV_BUCKET as DEFAULT_KV_BUCKET
from .decoding.engine import Engine
from .decoding.loops import DecodeStats
from .decoding.sampling import SamplingParams
from .decoding.speculative import DEFAULT_DRAFT_LEN, TreeShape
from .decoding.strategies import reference_decode
from .loading import load
from .loading.registry import shipped_module, shipped_modules
from .loading.tokenizer import Tokenizer
from .models import RecyclableModule, RecycleModel, Transformer

DEFAULT_MODEL = "smollm2-135m-instruct"
# how the decode loop runs: "eager" the reference loop of decoding/loops.py (a forward and a host sync per step);
# "static" the engine's fixed-shape steps (decoding/engine.py) without graphs; "graphs" those steps captured as CUDA
# graphs; "compiled" torch.compile inside the graphs (on the CPU: the static steps compiled by inductor); "auto" is
# "graphs" on CUDA and "eager" on the CPU
ENGINES = ("auto", "eager", "static", "graphs", "compiled")
RANDOM_MODULE_NOTE = "untrained (random) recyclable module: the text is meaningless, use it for speed measurements only"


def __getattr__(name: str):
    if name == "STRATEGY_NAMES":  # the registered strategies (strategies.names()), read when asked
        return strategies.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def module_hint(model: str) -> str:
    """How to get a recyclable module for `model`: the end of every error that needs one and has none."""
    how = ("--recycle PATH (a checkpoint from `recyclegpt retrofit`), or --recycle random for an untrained one "
           "(speed measurements only)")
    shipped = shipped_module(model)
    others = [n for n in shipped_modules(model) if n != model]
    also = f"; also shipped: {', '.join(others)} (--recycle NAME)" if others else ""
    if shipped is not None:
        return f"pass --recycle default for the one shipped for {model} ({shipped}){also}, or {how}"
    return f"no module is shipped for {model}{also}: pass {how}"


@dataclass
class Generation:
    text: list[str]  # one per prompt
    token_ids: list[list[int]]  # the new tokens of each prompt
    strategy: str
    stats: DecodeStats
    module: str | None  # where the recyclable module came from, None without one

    def to_dict(self) -> dict:
        """The JSON record the CLI prints: one prompt's text and ids are unwrapped."""
        single = len(self.text) == 1
        d = {"text": self.text[0] if single else self.text,
             "token_ids": self.token_ids[0] if single else self.token_ids,
             "strategy": self.strategy, **self.stats.to_dict()}
        if self.module is not None:
            d["module"] = self.module
        return d


CPU_MIN_DRAFT_PROB = 0.4  # measured: docs/speculative.md (0.35: 1.26x, 0.5: 1.27x, 0.2: 1.17x, 0: 1.15x)


def default_min_draft_prob(device: torch.device, engine: str) -> float:
    """The adaptive-draft threshold used when none is given: on the CPU's eager loop, where a full call on several
    tokens costs more than on one, CPU_MIN_DRAFT_PROB (chosen by measurement, docs/speculative.md); 0 (fixed
    draft lengths) elsewhere."""
    return CPU_MIN_DRAFT_PROB if torch.device(device).type == "cpu" and engine == "eager" else 0.0


@dataclass(frozen=True)
class EngineOptions:
    """How `RecycleGPT` builds its engines (decoding/engine.py), fixed when it is made (the engines are built once and
    kept).

    kv_bucket: the static, graphs and compiled engines' attention reads the cache up to the next multiple of this
    many slots; every bucket is a graph (and a compile) of its own, so a larger one means fewer of them and a little
    more attention work. compile_mode: inductor's mode for the compiled engine (None: its default).
    compile_steps: the compiled engine also compiles each greedy step and verified round whole.
    compile_prefill: the compiled engine also compiles the prompt's forwards, once for every prompt length (dynamic
    shapes): a faster first token for more compile time once per process; False leaves them eager in its graphs.
    kernels: which fused Triton kernels the model's calls take on CUDA (`KernelConfig`; every engine and the eager
    loops alike). max_decoders: each engine keeps at most this many Decoders (one per batch size and cache length
    in use, each with its cache and graphs), dropping the least recently used: memory stays bounded whatever the
    traffic, at the cost of capturing again a shape that comes back. A server's continuous batch of 32 rows uses
    11: one per power-of-two row count, four that prefill joining prompts (1 to 8 rows), one that prefills them in
    chunks."""

    kv_bucket: int = DEFAULT_KV_BUCKET
    compile_mode: str | None = None
    compile_steps: bool = False
    compile_prefill: bool = True
    kernels: KernelConfig = KernelConfig()
    max_decoders: int = 12

    def __post_init__(self) -> None:
        if not isinstance(self.kv_bucket, int) or isinstance(self.kv_bucket, bool) or self.kv_bucket < 16:
            raise ValueError(f"kv_bucket must be an integer of at least 16 slots, got {self.kv_bucket!r}")
        if self.compile_mode is not None and not isinstance(self.compile_mode, str):
            raise ValueError(f"compile_mode must be an inductor mode name or None, got {self.compile_mode!r}")
        if not isinstance(self.compile_prefill, bool):
            raise ValueError(f"compile_prefill must be True or False, got {self.compile_prefill!r}")
        if not isinstance(self.max_decoders, int) or isinstance(self.max_decoders, bool) or self.max_decoders < 1:
            raise ValueError(f"max_decoders must be an integer of at least 1, got {self.max_decoders!r}")
        if not isinstance(self.kernels, KernelConfig):
            raise ValueError(f"kernels must be a KernelConfig, got {self.kernels!r}")


class RecycleGPT:
    """A base LM, its tokenizer and (optionally) a recyclable module, on one device."""

    def __init__(self, base: Transformer, tokenizer: Tokenizer | None, *, module: RecyclableModule | None = None,
                 name: str = "", module_source: str | None = None,
                 engine_options: EngineOptions = EngineOptions()) -> None:
        self.base, self.tokenizer, self.name = base, tokenizer, name
        base.kernels = engine_options.kernels
        self.model = RecycleModel(base, module) if module is not None else None
        self.module_source = module_source
        self.engine_options = engine_options  # how the static, graphs and compiled engines are built
        self._engines: dict[str, Engine] = {}

    # -- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, recycle: str | Path | None = "default",
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        random_module: RecycleConfig = RecycleConfig(), seed: int = 0,
                        engine_options: EngineOptions = EngineOptions(),
                        quantize: str | None = None) -> "RecycleGPT":
        """Load by built-in name, GGUF file, Hugging Face folder or RecycleGPT checkpoint directory.

        recycle: "default" is a checkpoint's own module when `model` is a checkpoint that has one, else the module
            shipped with the package for built-in `model` (registry.shipped_module), else none; a RecycleGPT
            checkpoint directory puts its module on this base, as does a shipped module's name
            (registry.shipped_modules: `<model>-<variant>`); "random" an untrained module shaped by
            `random_module` (speed measurements only); None or "none" loads no module. `module_source` records
            which: the directory's path, "random", or None.
        engine_options: how the engines are built (`EngineOptions`).
        quantize: "int8" for weight-only int8 products on the CPU (models.quantize, docs/cpu.md): faster decoding,
            a slightly different model (its own reference: the lossless strategies give its own `standard`'s
            tokens); None: the float weights. On CUDA a ConfigError.
        """
        device = torch.device(device) if device is not None else default_device()
        loaded = load(model, recycle=recycle, device=device, dtype=dtype or default_dtype(device),
                      random_module=random_module, seed=seed, quantize=quantize)
        return cls(loaded.base, loaded.tokenizer, module=loaded.module, name=str(model),
                   module_source=loaded.module_source, engine_options=engine_options)

    @property
    def device(self) -> torch.device:
        return self.base.tok_emb.weight.device

    # -- generation ------------------------------------------------------------------------------------------------

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give a non-empty text")
        return ids

    def generate(self, prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], *,
                 strategy: str = "standard", max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None, chat: bool = False,
                 ignore_eos: bool = False, stream: Callable[[list[list[int]]], None] | None = None,
                 engine: str = "auto", draft_len: int = DEFAULT_DRAFT_LEN,
                 tree_shape: TreeShape | tuple[int, ...] | None = None,
                 min_draft_prob: float | None = None, max_batch: int | None = None,
                 draft_rows: int | None = DRAFT_ROWS, prefill_chunk: int | None = PREFILL_CHUNK) -> Generation:
        """Generate from one prompt or a batch: texts (encoded, chat-templated if `chat`) or token-id lists.

        strategy (`strategies.names()`): "standard" (one full-model call per token); "recycle" (the paper's
        alternating schedule, lossy); "recycle-verified", "speculative" (chains of `draft_len` drafted tokens),
        "tree" (a draft tree of `tree_shape` = (depth, topk, nodes[, lookup])) and "lookup" (chains of `draft_len`
        tokens found by prompt lookup) are lossless: their output is standard decoding's, exactly when greedy, in
        distribution when sampling. All but standard and lookup need a recyclable module.
        ignore_eos: run to max_new_tokens (benchmarks). engine: how the decode loop runs (`ENGINES`; the tokens
        are the same): "auto" captures CUDA graphs on a GPU, runs the eager reference loop on the CPU. With
        graphs, `stream` receives tokens every few steps, not every step. min_draft_prob: adaptive draft length
        for speculative and recycle-verified (`speculative.speculative`), eager loop only; None: the measured
        default for the loop that runs (`default_min_draft_prob`). max_batch: decode many prompts by continuous
        batching, at most this many at once, each joining as another ends (`decoding.batching`; on an engine:
        "auto" takes "static" on the CPU here): many prompts of mixed lengths keep the rows busy where a plain
        batch waits for its longest row. The tokens are each prompt's alone: greedy, or sampled (standard and
        recycle) with prompt i seeded `seed + i`. draft_rows: with max_batch, the verified strategies draft only while
        at most this many prompts decode together (more verify the full model's next token alone: faster, τ 1);
        None: always. prefill_chunk: with max_batch, a prompt longer than this joining while others decode is
        prefilled this many tokens at a time, one chunk each time the batch hands out tokens (None: whole).
        """
        if strategies.get(strategy).needs_module and self.model is None:
            raise ValueError(f"strategy {strategy!r} needs a recyclable module and none is loaded; "
                             f"{module_hint(self.name)}")
        shape = TreeShape(*tree_shape).check() if tree_shape is not None else TreeShape()
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        prompts = self._prompt_ids(prompt, chat=chat)
        stop_ids = () if ignore_eos or self.tokenizer is None else self.tokenizer.eos_ids
        kind = self.resolve_engine(engine)
        if max_batch is not None:
            if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
                raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
            if kind == "eager":
                if engine != "auto":
                    raise ValueError("max_batch (continuous batching) runs on an engine: static, graphs or compiled")
                kind = "static"
        if min_draft_prob is None:
            min_draft_prob = default_min_draft_prob(self.device, kind)
        elif min_draft_prob and kind != "eager":
            raise ValueError(f"min_draft_prob (adaptive draft length) needs the eager loop; the {kind!r} engine's "
                             f"rounds have fixed shapes (use engine='eager', or min_draft_prob=0)")
        common = dict(max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids, stream=stream)
        if max_batch is not None:
            res = continuous_decode(self.engine(kind), strategy, prompts, max_new_tokens=max_new_tokens,
                                    max_rows=max_batch, stop_ids=stop_ids, stream=stream, draft_len=draft_len,
                                    tree=shape, sampling=sampling, draft_rows=draft_rows,
                                    prefill_chunk=prefill_chunk)
        elif kind != "eager":
            res = self.engine(kind).decode(strategy, prompts, draft_len=draft_len, tree=shape, **common)
        else:
            res = reference_decode(self.model if self.model is not None else self.base, strategy, prompts,
                                   draft_len=draft_len, tree_shape=shape, min_draft_prob=min_draft_prob, **common)
        texts = [self.tokenizer.decode(t) if self.tokenizer is not None else "" for t in res.tokens]
        module = None
        if strategies.get(strategy).needs_module:
            module = RANDOM_MODULE_NOTE if self.module_source == "random" else self.module_source
        return Generation(texts, res.tokens, strategy, res.stats, module)

    def resolve_engine(self, engine: str) -> str:
        """The concrete engine `engine` names here ("auto" depends on the device); a clear error for a bad one."""
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if engine == "auto":
            return "graphs" if self.device.type == "cuda" else "eager"
        if engine == "graphs" and self.device.type != "cuda":
            raise ValueError(f"engine 'graphs' captures CUDA graphs and needs a CUDA device; this model is on "
                             f"{self.device} (use 'static', 'compiled' or 'eager')")
        return engine

    def engine(self, kind: str) -> Engine:
        """The engine of this kind, created on first use and kept, so that its captured graphs are reused."""
        if kind not in self._engines:
            model = self.model if self.model is not None else self.base
            opts = self.engine_options
            compile = (opts.compile_mode or True) if kind == "compiled" else False
            graphs = kind == "graphs" or (kind == "compiled" and self.device.type == "cuda")
            self._engines[kind] = Engine(model, graphs=graphs, compile=compile,
                                         compile_steps=kind == "compiled" and opts.compile_steps,
                                         compile_prefill=opts.compile_prefill, bucket=opts.kv_bucket,
                                         max_decoders=opts.max_decoders)
        return self._engines[kind]

    def _prompt_ids(self, prompt, *, chat: bool) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.encode(prompt, chat=chat)]
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        prompt = list(prompt)
        if not prompt:
            raise ValueError("no prompt given")
        if all(isinstance(p, int) for p in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return [self.encode(p, chat=chat) for p in prompt]
        if all(isinstance(p, (list, tuple)) for p in prompt):
            return [list(p) for p in prompt]
        raise TypeError("prompt must be a string, a list of strings, a list of token ids or a list of such lists")
