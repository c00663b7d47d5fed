"""The decoding benchmark: every strategy on the same prompts in one process, side by side.

Strategies are interleaved prompt by prompt (prompt 1 with each strategy, then prompt 2, ...), so that a machine
that slows down mid-run slows them all alike. A warm-up generation per strategy is excluded. The result is a
human table and a JSON-ready dict (`run_bench`), which the CLI prints as its last line.
"""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..api import (
    DEFAULT_DRAFT_LEN,
    EngineOptions,
    Generation,
    RecycleGPT,
    default_min_draft_prob,
)
from ..config import ModelConfig, RecycleConfig
from ..decoding.batching import DRAFT_ROWS, PREFILL_CHUNK
from ..decoding.loops import tau_of
from ..decoding.strategies import get as get_strategy
from ..decoding.strategies import lossless_names
from ..decoding.strategies import names as strategy_names
from ..models import RecyclableModule, Transformer
from ..models.quantize import quantized
from .differential import NEAR_TIE_RANK, choice_margin, first_difference
from .llama_cpp_baseline import LLAMA_CPP
from .quality import evaluate_agreement

# A small built-in prompt set, used when no prompts file is given.
BUILTIN_PROMPTS = [
    "Explain why the sky is blue in a few sentences.",
    "Write a short poem about a lighthouse keeper.",
    "What are three tips for staying focused while studying?",
    "Describe how a bicycle works to a ten-year-old.",
    "Give me a simple recipe for tomato soup.",
    "Summarise the plot of a heist story in one paragraph.",
    "What is the difference between weather and climate?",
    "List some good habits for writing clean Python code.",
]


HF_STRATEGIES = {"hf_eager": "eager", "hf_compiled": "compiled", "hf_prompt_lookup": "prompt_lookup"}
# rows of other runtimes on the same prompts and weights (batch 1): transformers' generate, and llama.cpp on the GGUF
BASELINES = (*HF_STRATEGIES, LLAMA_CPP)

# paper-scale shapes for speed-only runs with random weights (`recyclegpt bench --shape`)
SHAPES = {
    # the paper's 1.3B base (24 layers, d 2048, 16 heads, SwiGLU 5504, LLaMA vocabulary)
    "1.3b": ModelConfig(vocab_size=32000, n_layer=24, n_head=16, n_kv_head=16, d_model=2048, d_ff=5504,
                        context_length=2048),
    # LLaMA-7B
    "7b": ModelConfig(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32, d_model=4096, d_ff=11008,
                      context_length=2048),
}
RANDOM_NOTE = "random weights, speed only"


@dataclass
class StrategyRun:
    strategy: str
    new_tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    prefill_seconds: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    peak_mem_mb: list[float] = field(default_factory=list)
    full_calls: int = 0
    module_calls: int = 0
    texts: list[str] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)  # the new token ids of every prompt
    accept_hist: list[int] | None = None  # verified strategies: summed over the generations
    hists: list[list[int]] = field(default_factory=list)  # and per generation (for per-category τ)

    def add(self, gen: Generation, peak_mem_mb: float | None = None) -> None:
        """Record one generation (a prompt, or a batch of prompts)."""
        st = gen.stats
        self.record(st.new_tokens, st.seconds, st.prefill_seconds, st.step_ms, peak_mem_mb,
                    full_calls=st.full_calls, module_calls=st.module_calls, text=gen.text[0])
        self.outputs.extend(gen.token_ids)
        if st.accept_hist is not None:
            self.add_hist(st.accept_hist)

    def add_hist(self, hist: list[int]) -> None:
        """One generation's acceptance histogram: kept, and summed into accept_hist."""
        self.hists.append(hist)
        self.accept_hist = [a + b for a, b in zip(self.accept_hist or [0] * len(hist), hist)]

    def record(self, new_tokens: int, seconds: float, prefill_seconds: float, step_ms: float,
               peak_mem_mb: float | None, *, full_calls: int = 0, module_calls: int = 0, text: str = "") -> None:
        self.new_tokens.append(new_tokens)
        self.seconds.append(seconds)
        self.prefill_seconds.append(prefill_seconds)
        self.step_ms.append(step_ms)
        if peak_mem_mb is not None:
            self.peak_mem_mb.append(peak_mem_mb)
        self.full_calls += full_calls
        self.module_calls += module_calls
        self.texts.append(text)

    def summary(self, only: Sequence[int] | None = None) -> dict:
        """The aggregate over all generations, or over those with the indices in `only` (a category)."""
        if only is not None:
            part = StrategyRun(self.strategy)
            for i in only:
                part.record(self.new_tokens[i], self.seconds[i], self.prefill_seconds[i], self.step_ms[i], None)
                if self.hists:
                    part.add_hist(self.hists[i])
            return {k: v for k, v in part.summary().items() if k in ("strategy", "tokens_per_s",
                                                                     "median_tokens_per_s", "tau", "accept_hist")}
        tokens, secs = sum(self.new_tokens), sum(self.seconds)
        decode_secs = secs - sum(self.prefill_seconds)
        per_prompt = [n / s for n, s in zip(self.new_tokens, self.seconds) if s > 0]
        return {
            "strategy": self.strategy,
            "tokens_per_s": tokens / secs if secs > 0 else 0.0,  # all tokens over all time, prefill included
            "median_tokens_per_s": statistics.median(per_prompt) if per_prompt else 0.0,
            "decode_tokens_per_s": (tokens - len(self.new_tokens)) / decode_secs if decode_secs > 0 else 0.0,
            "ttft_ms": 1000 * statistics.median(self.prefill_seconds) if self.prefill_seconds else 0.0,
            "step_ms": statistics.median(self.step_ms) if self.step_ms else 0.0,
            "peak_mem_mb": max(self.peak_mem_mb) if self.peak_mem_mb else None,
            "new_tokens": tokens,
            "full_calls": self.full_calls,
            "module_calls": self.module_calls,
            "tokens_per_full_call": tokens / self.full_calls if self.full_calls else 0.0,
            "seconds": secs,
            **(tau_fields(self.accept_hist) if self.accept_hist is not None else {}),
        }


def tau_fields(hist: list[int]) -> dict:
    """tau (mean tokens emitted per verifying full call) and the histogram of accepted draft lengths."""
    return {"tau": tau_of(hist), "accept_hist": hist}


class PeakMemory:
    """Peak GPU memory of one run: the model's weights plus everything the run allocates on top (caches,
    activations, graph pools), so that strategies holding different weights (HF copies) compare fairly."""

    def __init__(self, device: torch.device, weights_bytes: int) -> None:
        self.cuda, self.device, self.weights = device.type == "cuda", device, weights_bytes

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.mb = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.mb = (self.weights + torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20


def weights_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


def time_strategies(lm: RecycleGPT, ids: list[list[int]], strategies: Sequence[str], *, max_new_tokens: int,
                    ignore_eos: bool, warmup: int = 1, batch_size: int = 1, engine: str = "auto",
                    hf: dict | None = None, log: Callable[[str], None] | None = None,
                    draft: dict | None = None, continuous: bool = False,
                    draft_rows: int | None = DRAFT_ROWS,
                    prefill_chunk: int | None = PREFILL_CHUNK) -> dict[str, StrategyRun]:
    """Warm each strategy up (untimed: a whole run of the first batch, and of every other with the graph engines,
    else two tokens of each), then run them greedily on every batch of prompts, interleaved batch by batch. `hf`
    maps HF strategy names to their `hf_baselines.HFBaseline`, and LLAMA_CPP to its
    `llama_cpp_baseline.LlamaCppBaseline` (batch 1 only). continuous: all prompts in one call by continuous
    batching, batch_size at a time (`RecycleGPT.generate`'s max_batch, draft_rows and prefill_chunk)."""
    log = log or (lambda line: None)
    hf = hf or {}
    batches = [ids] if continuous else [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    many = {"max_batch": batch_size, "draft_rows": draft_rows, "prefill_chunk": prefill_chunk} if continuous else {}
    ours = weights_bytes(lm.model if lm.model is not None else lm.base)

    def run(s: str, batch: list[list[int]], n: int, runs: dict | None) -> None:
        if s in HF_STRATEGIES:
            with PeakMemory(lm.device, weights_bytes(hf[s].model)) as mem:
                r = hf[s].generate(batch[0], n)
            if runs is not None:
                runs[s].record(len(r.tokens), r.seconds, r.ttft_s, 1000 * statistics.median(r.step_s)
                               if r.step_s else 0.0, mem.mb, full_calls=len(r.step_s) + 1)
            return
        if s == LLAMA_CPP:  # on the CPU, outside torch: no peak memory
            r = hf[s].generate(batch[0], n)
            if runs is not None:
                runs[s].record(len(r.tokens), r.seconds, r.ttft_s, 1000 * statistics.median(r.step_s)
                               if r.step_s else 0.0, None, full_calls=len(r.tokens),
                               text=lm.tokenizer.decode(r.tokens) if lm.tokenizer is not None else "")
                runs[s].outputs.append(r.tokens)
            return
        with PeakMemory(lm.device, ours) as mem:
            gen = lm.generate(batch, strategy=s, max_new_tokens=n, ignore_eos=ignore_eos, engine=engine,
                              **(draft or {}), **many)
        if runs is not None:
            runs[s].add(gen, mem.mb)

    # the graph engines capture (and compile) a graph per step kind, attention bucket and padded prompt length when
    # first met: their warm-up runs every batch to the end, so that no capture lands in the timed runs (a prompt
    # longer than the first reaches buckets the first never did). Other strategies: the first batch whole, two
    # tokens of every other (HF's eager `generate` at ~30 tok/s would double the bench otherwise)
    graphs = lm.resolve_engine(engine) in ("graphs", "compiled")
    for s in strategies:
        if warmup:  # with a compiled engine this takes minutes: say which strategy is compiling
            log(f"warm-up: {s}")
        for _ in range(warmup):
            run(s, batches[0], max_new_tokens, None)
        if warmup:
            whole = graphs and s not in BASELINES
            for batch in batches[1:]:
                run(s, batch, max_new_tokens if whole else 2, None)
    runs = {s: StrategyRun(s) for s in strategies}
    for k, batch in enumerate(batches, 1):
        log(f"batch {k}/{len(batches)}" if batch_size > 1 else f"prompt {k}/{len(batches)}")
        for s in strategies:
            run(s, batch, max_new_tokens, runs)
    return runs


def run_bench(lm: RecycleGPT, prompts: list[str] | list[list[int]], *,
              strategies: Sequence[str] | None = None, max_new_tokens: int = 128, chat: bool = True,
              ignore_eos: bool = True, warmup: int = 1, batch_size: int = 1, engine: str = "auto",
              alpha: bool = True, log: Callable[[str], None] | None = None, draft_len: int = DEFAULT_DRAFT_LEN,
              min_draft_prob: float | None = None,
              tree_shape: tuple[int, ...] | None = None, categories: Sequence[str] | None = None,
              check_prompts: int = 4, continuous: bool = False, threads: int | None = None,
              gguf: str | None = None, draft_rows: int | None = DRAFT_ROWS,
              prefill_chunk: int | None = PREFILL_CHUNK) -> dict:
    """Run each strategy (default: every registered one) greedily on every prompt (texts, or token-id lists);
    return {"device", "model", "results", "speedup", "speedup_vs_hf_eager", ...}. HF strategies (`HF_STRATEGIES`)
    need batch_size 1.
    alpha: also measure the module's agreement α on these prompts (evaluation.evaluate_agreement).
    draft_len, tree_shape: the options of speculative and tree. categories: a label per prompt (batch size 1);
    then every result also carries "per_category": {label: {tokens_per_s, median_tokens_per_s, speedup, tau,
    alpha (recycle), same_token_share (lossless)}}. check_prompts: how many prompts (`check_sample`) are decoded
    again by the eager reference loop and compared (`check_tokens`: a difference raises CheckFailed).
    continuous: decode all prompts by continuous batching, batch_size at a time, each joining as another ends;
    draft_rows: there, the verified strategies draft while at most this many rows are live (None: always);
    prefill_chunk: there, longer prompts joining while rows decode are prefilled this many tokens at a time.
    LLAMA_CPP ("llama_cpp") runs llama.cpp greedily on the model's GGUF file (`gguf`, default: the file behind
    lm.name, `llama_cpp_baseline.gguf_of`) with `threads` threads (default: torch.get_num_threads()); with
    `standard` in the run, its row reports how many of standard's tokens it reproduces and where they part
    (`llama_cpp_agreement`: same_as_standard, same_token_share, same_prefix, first_differences)."""
    strategies = tuple(strategy_names() if strategies is None else strategies)
    known = strategy_names() + BASELINES
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(known)}")
    hf_names = [s for s in strategies if s in HF_STRATEGIES]
    outside = [s for s in strategies if s in BASELINES]
    if outside and (batch_size != 1 or continuous):
        raise ValueError(f"the baselines ({', '.join(outside)}) run at batch size 1, one prompt at a time; drop "
                         f"them for {'--continuous' if continuous else f'--batch-size {batch_size}'}")
    threads = torch.get_num_threads() if threads is None else threads
    if LLAMA_CPP in strategies:  # before any work: the package, and a GGUF file to give it
        from .llama_cpp_baseline import LlamaCppBaseline, gguf_of, require_llama_cpp

        try:
            require_llama_cpp()
        except ImportError as e:
            raise ValueError(str(e)) from None
        gguf = gguf or gguf_of(lm.name)
    if prompts and isinstance(prompts[0], str):
        chat = chat and lm.tokenizer is not None and lm.tokenizer.chat_template is not None
        ids = [lm.encode(p, chat=chat) for p in prompts]
    else:
        ids = [list(p) for p in prompts]
    hf, notes = {}, {}
    if hf_names:
        from .hf_baselines import HFBaseline

        longest = max(len(p) for p in ids) + max_new_tokens
        for s in hf_names:
            hf[s] = HFBaseline(lm.base, HF_STRATEGIES[s], max_cache_len=longest)
            notes[s] = hf[s].config_note
    if LLAMA_CPP in strategies:
        hf[LLAMA_CPP] = LlamaCppBaseline(gguf, n_threads=threads, n_ctx=max(len(p) for p in ids) + max_new_tokens)
        notes[LLAMA_CPP] = hf[LLAMA_CPP].config_note
    if categories is not None and (len(categories) != len(ids) or batch_size != 1):
        raise ValueError("categories need one label per prompt and batch size 1")
    draft = {"draft_len": draft_len, "tree_shape": tree_shape, "min_draft_prob": min_draft_prob}
    try:
        runs = time_strategies(lm, ids, strategies, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                               warmup=warmup, batch_size=batch_size, engine=engine, hf=hf, log=log, draft=draft,
                               continuous=continuous, draft_rows=draft_rows, prefill_chunk=prefill_chunk)
    finally:
        if LLAMA_CPP in hf:
            hf[LLAMA_CPP].close()
    del hf
    results = [runs[s].summary() for s in strategies]
    if categories is not None:
        labels = list(dict.fromkeys(categories))
        for r in results:
            r["per_category"] = {c: runs[r["strategy"]].summary([i for i, x in enumerate(categories) if x == c])
                                 for c in labels}
        if "standard" in strategies:
            ref = next(x for x in results if x["strategy"] == "standard")["per_category"]
            for r in results:
                for c, part in r["per_category"].items():
                    base = ref[c]["tokens_per_s"]
                    part["speedup"] = part["tokens_per_s"] / base if base > 0 else 0.0
    kind = lm.resolve_engine(engine)
    if continuous and kind == "eager":  # continuous batching runs on an engine: "auto" takes "static" on the CPU
        kind = "static"
    for r in results:
        r["engine"] = notes.get(r["strategy"], kind)
    if "standard" in runs:  # lossless strategies must give standard's tokens: count the prompts where they do
        ref = runs["standard"].outputs
        for r in results:
            if r["strategy"] in lossless_names():  # greedy, their tokens are standard's
                outs = runs[r["strategy"]].outputs
                r["same_as_standard"] = sum(a == b for a, b in zip(outs, ref))
                r["same_token_share"] = same_token_share(outs, ref)
                if categories is not None:
                    for c, part in r["per_category"].items():
                        idx = [i for i, x in enumerate(categories) if x == c]
                        part["same_token_share"] = same_token_share([outs[i] for i in idx], [ref[i] for i in idx])
            elif r["strategy"] == LLAMA_CPP:  # another runtime's arithmetic: where do its greedy tokens part?
                r.update(llama_cpp_agreement(lm, ids, runs[LLAMA_CPP].outputs, ref))
    if alpha and "recycle" in strategies and lm.model is not None and lm.module_source != "random":
        (log or (lambda line: None))("alpha")
        # the full model's greedy output is standard's, when it ran (no second decode); else decoded here
        conts = runs["standard"].outputs if "standard" in runs else None
        rec = next(r for r in results if r["strategy"] == "recycle")
        groups = {None: list(range(len(ids)))} if categories is None else \
            {c: [i for i, x in enumerate(categories) if x == c] for c in dict.fromkeys(categories)}
        hits = n = 0
        for c, idx in groups.items():
            try:
                a = evaluate_agreement(lm, [ids[i] for i in idx], max_new_tokens=max_new_tokens, scoring="recycle",
                                       continuations=None if conts is None else [conts[i] for i in idx])
            except ValueError:  # no position to compare (every answer under two tokens)
                continue
            hits, n = hits + a["alpha"] * a["n"], n + a["n"]
            if c is not None:
                rec["per_category"][c]["alpha"] = a["alpha"]
        if n:
            rec["alpha"] = hits / n
    check = check_tokens(lm, ids, runs, strategies, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                         engine=kind, batch_size=batch_size, sample=check_prompts, draft=draft, log=log)

    def ratios(ref: str) -> dict:
        base = next((r for r in results if r["strategy"] == ref), None)
        if base is None or base["tokens_per_s"] <= 0:
            return {}
        return {r["strategy"]: r["tokens_per_s"] / base["tokens_per_s"] for r in results}

    return {
        "device": device_name(lm.device),
        "dtype": str(lm.base.tok_emb.weight.dtype).removeprefix("torch."),
        "quantize": quantized(lm.base),
        "model": lm.name,
        "module": lm.module_source,
        "prompts": len(ids),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "continuous": continuous,
        "draft_rows": draft_rows if continuous else None,
        "prefill_chunk": prefill_chunk if continuous else None,
        "greedy": True,
        "ignore_eos": ignore_eos,
        "engine": kind,
        "torch": torch.__version__,
        "transformers": _version("transformers") if hf_names else None,
        "llama_cpp": _version("llama_cpp_python") if LLAMA_CPP in strategies else None,
        "threads": threads,
        "draft_len": draft_len if "speculative" in strategies else None,
        "min_draft_prob": (min_draft_prob if min_draft_prob is not None
                           else default_min_draft_prob(lm.device, kind))
        if {"speculative", "recycle-verified"} & set(strategies) else None,
        "tree": list(tree_shape) if "tree" in strategies and tree_shape is not None else None,
        "recycle_vocab": lm.model.recycle_vocab if "recycle" in strategies and lm.model is not None else None,
        "results": results,
        "speedup": ratios("standard"),
        "speedup_vs_hf_eager": ratios("hf_eager"),
        "check": check,
    }


# bench checks a sample of its prompts against the eager reference loop: every token in float32; in 16-bit dtypes,
# where the fused kernels sum in another order than the eager operators, the first CHECK_PREFIX tokens, and a
# difference there passes only at a near-tie (the engine's token among the reference's differential.NEAR_TIE_RANK
# most likely there), which the report lists with its logit margin and rank
CHECK_PREFIX = 32


class CheckFailed(ValueError):
    """A bench run whose checked tokens differ from the reference's: its speeds measure wrong output."""


def llama_cpp_agreement(lm: RecycleGPT, ids: list[list[int]], outputs: list[list[int]],
                        reference: list[list[int]]) -> dict:
    """How llama.cpp's greedy tokens compare with `standard`'s on the same prompts: same_as_standard (prompts with
    every token equal), same_token_share, same_prefix (per prompt, the tokens equal before the first difference) and
    first_differences: where they part, the margin by which standard's top logit there exceeds llama.cpp's token and
    that token's rank in standard's logits (`differential.choice_margin`; rank 1 and a small margin: a near-tie that
    llama.cpp's 8-bit activations tip the other way)."""
    parts = []
    for i, (got, want) in enumerate(zip(outputs, reference)):
        n = first_difference(got, want)
        if n is not None and n < min(len(got), len(want)):
            margin, rank = choice_margin(lm.base, ids[i] + want[:n], got[n])
            parts.append({"prompt": i, "new_token": n, "margin": margin, "rank": rank})
    return {"same_as_standard": sum(a == b for a, b in zip(outputs, reference)),
            "same_token_share": same_token_share(outputs, reference),
            "same_prefix": [len(b) if (n := first_difference(a, b)) is None else n for a, b in zip(outputs, reference)],
            "first_differences": parts}


def check_sample(ids: Sequence[Sequence[int]], n: int) -> list[int]:
    """n prompt indices spread over the prompts sorted by length: the shortest, the longest and evenly between."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    n = min(n, len(order))
    if n <= 1:
        return order[-1:] if n else []
    return sorted({order[round(k * (len(order) - 1) / (n - 1))] for k in range(n)})


def same_token_share(outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """The share of the reference's tokens that `outputs` reproduce before their first difference, per prompt."""
    same = total = 0
    for a, b in zip(outputs, reference):
        n = first_difference(a, b)
        same, total = same + (len(b) if n is None else n), total + len(b)
    return same / total if total else 1.0


def check_tokens(lm: RecycleGPT, ids: list[list[int]], runs: dict[str, StrategyRun], strategies: Sequence[str], *,
                 max_new_tokens: int, ignore_eos: bool, engine: str, batch_size: int, sample: int,
                 draft: dict, log: Callable[[str], None] | None = None) -> dict | None:
    """Decode `sample` of the prompts (`check_sample`) with the eager reference loop and compare with the run's
    tokens of `standard` (else its first project strategy): every token in float32, the first CHECK_PREFIX in 16-bit
    dtypes. Raises CheckFailed naming the prompts that differ; returns what was checked (None: no project strategy,
    nothing of ours to check)."""
    ours = [s for s in strategies if s in strategy_names()]
    if not ours:
        return None
    strategy = "standard" if "standard" in ours else ours[0]
    exact = lm.base.tok_emb.weight.dtype == torch.float32
    kind = lm.resolve_engine(engine)
    if kind == "eager":  # the run is the reference loop
        return {"strategy": strategy, "checked": len(ids), "of": len(ids), "tokens": "all",
                "against": "the eager reference loop (the run itself)"}
    if sample < 1:
        raise ValueError("the bench checks its tokens on at least one prompt (--check-prompts >= 1)")
    picked = check_sample(ids, sample)
    (log or (lambda line: None))(f"check: {len(picked)} prompts against the eager reference")
    outputs = runs[strategy].outputs
    bad, ties = [], []
    for i in picked:
        want = lm.generate([ids[i]], strategy=strategy, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                           engine="eager", draft_len=draft["draft_len"], tree_shape=draft["tree_shape"],
                           min_draft_prob=0.0).token_ids[0]
        got = outputs[i]  # a batched run's outputs are in prompt order too
        n = len(want) if exact else min(CHECK_PREFIX, len(want))
        if got[:n] == want[:n]:
            continue
        first = first_difference(got, want)
        where = f"prompt {i} ({len(ids[i])} tokens): first difference at new token {first}"
        margin = rank = None
        if not exact and first < min(len(want), len(got)) and get_strategy(strategy).lossless:  # a near-tie?
            margin, rank = choice_margin(lm.base, ids[i] + want[:first], got[first])
        if rank is not None and rank < NEAR_TIE_RANK:
            ties.append({"prompt": i, "prompt_tokens": len(ids[i]), "new_token": first, "margin": margin,
                         "rank": rank})
        else:
            bad.append(where + ("" if margin is None else f", its logit {margin:.4f} below the top's, rank {rank} (a "
                                                          f"near-tie ranks below {NEAR_TIE_RANK})"))
    if bad:
        raise CheckFailed(f"{strategy}'s tokens differ from the eager reference on {len(bad)} of {len(picked)} "
                          f"checked prompts ({'; '.join(bad)}): the engine decodes wrong output, so no speed is "
                          f"reported")
    return {"strategy": strategy, "checked": len(picked), "of": len(picked),
            "tokens": "all" if exact else f"first {CHECK_PREFIX}", "against": "the eager reference loop",
            "prompts": picked, "near_ties": ties}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def random_model(shape: str, *, module_layers: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, engine_options: EngineOptions = EngineOptions()) -> RecycleGPT:
    """A RecycleGPT of a paper-scale shape with random weights (speed only), built directly on `device`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cfg = SHAPES[shape]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: a 7B fp32 copy would double the memory
    try:
        with torch.device(device):
            base = Transformer(cfg).eval()
            module = RecyclableModule(cfg, RecycleConfig(n_layer=module_layers)).eval()
    finally:
        torch.set_default_dtype(previous)
    return RecycleGPT(base, None, module=module, name=f"{shape} ({RANDOM_NOTE})", module_source="random",
                      engine_options=engine_options)


def random_prompts(n: int, vocab_size: int, *, seed: int = 0, lengths: tuple[int, int] = (32, 160)) -> list[list[int]]:
    """n random token-id prompts with lengths drawn from `lengths` (for random-weight shapes)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (L,), generator=g).tolist() for L in sizes]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(report: dict) -> str:
    head = f"{'strategy':<17} {'tok/s':>8} {'median':>8} {'ttft ms':>8} {'step ms':>8} {'mem MB':>8} {'tokens':>7} " \
           f"{'tok/full':>8} {'tau':>5} {'alpha':>6} {'vs std':>7} {'vs HF':>7}  engine"
    weights = f" ({report['quantize']} weights)" if report.get("quantize") else ""
    lines = [f"device: {report['device']}  dtype: {report['dtype']}{weights}  model: {report['model']}  "
             f"module: {report['module']}  prompts: {report['prompts']}  batch: {report['batch_size']}"
             f"{' (continuous)' if report.get('continuous') else ''}  "
             f"max_new_tokens: {report['max_new_tokens']}"
             + (f"  recycle vocab: {report['recycle_vocab']}" if report.get("recycle_vocab") == "draft" else ""),
             head, "-" * len(head)]
    def ratio(x: float | None, width: int = 6) -> str:  # "-" where there is no baseline to divide by
        return f"{x:>{width}.2f}x" if x is not None and x == x else f"{'-':>{width + 1}}"

    for r in report["results"]:
        sp = ratio(report["speedup"].get(r["strategy"]))
        hf = ratio(report.get("speedup_vs_hf_eager", {}).get(r["strategy"]))
        mem = f"{r['peak_mem_mb']:>8.0f}" if r.get("peak_mem_mb") is not None else f"{'-':>8}"
        alpha = f"{r['alpha']:>6.3f}" if r.get("alpha") is not None else f"{'-':>6}"
        tau = f"{r['tau']:>5.2f}" if r.get("tau") is not None else f"{'-':>5}"
        lines.append(f"{r['strategy']:<17} {r['tokens_per_s']:>8.1f} {r['median_tokens_per_s']:>8.1f} "
                     f"{r['ttft_ms']:>8.1f} {r['step_ms']:>8.2f} {mem} {r['new_tokens']:>7} "
                     f"{r['tokens_per_full_call']:>8.2f} {tau} {alpha} {sp} {hf}  {r.get('engine', '')}")
    check = report.get("check")
    if check:
        lines.append("")
        ties = check.get("near_ties") or []
        lines.append(f"checked {check['checked']}/{check['of']}: {check['strategy']}'s tokens ({check['tokens']}) "
                     f"equal {check['against']}" + (f", but for {len(ties)} at a near-tie (" + "; ".join(
                         f"prompt {t['prompt']}, new token {t['new_token']}, logit margin {t['margin']:.4f}"
                         + (f", rank {t['rank']}" if t.get("rank") is not None else "") for t in ties) + ")"
                         if ties else ""))
    same = [f"{r['strategy']} {r['same_as_standard']}/{report['prompts']} ({r['same_token_share']:.1%} of tokens)"
            for r in report["results"] if r.get("same_as_standard") is not None]
    if same:
        lines.append("")
        lines.append("prompts whose tokens equal standard's: " + ", ".join(same))
    for r in report["results"]:
        if r.get("same_prefix") is not None:
            lines.append(f"{r['strategy']}: tokens equal to standard's before the first difference, per prompt: "
                         f"{', '.join(map(str, r['same_prefix']))} (of {report['max_new_tokens']})")
            parts = r.get("first_differences") or []
            if parts:
                lines.append("  where they part, standard's top logit exceeds its token's by " + ", ".join(
                    f"{d['margin']:.3f} (rank {d['rank']})" for d in parts))
    hists = [(r["strategy"], r["accept_hist"]) for r in report["results"] if r.get("accept_hist")]
    if hists:
        lines.append("")
        lines.append("accepted draft tokens per verifying call (share of calls, 0 = the draft's first token rejected):")
        for name, h in hists:
            total = sum(h) or 1
            lines.append(f"  {name:<17} " + "  ".join(f"{k}: {c / total:5.1%}" for k, c in enumerate(h)))
    cats = [r for r in report["results"] if r.get("per_category")]
    if cats:
        lines += ["", f"per category: {'category':<20} {'strategy':<17} {'tok/s':>8} {'vs std':>7} {'tau':>5} "
                      f"{'alpha':>6} {'same':>6}"]
        for c in cats[0]["per_category"]:
            for r in cats:
                part = r["per_category"][c]
                tau = f"{part['tau']:>5.2f}" if part.get("tau") is not None else f"{'-':>5}"
                alpha = f"{part['alpha']:>6.3f}" if part.get("alpha") is not None else f"{'-':>6}"
                same = f"{part['same_token_share']:>6.1%}" if part.get("same_token_share") is not None else f"{'-':>6}"
                lines.append(f"{'':<14}{c:<20} {r['strategy']:<17} {part['tokens_per_s']:>8.1f} "
                             f"{ratio(part.get('speedup'))} {tau} {alpha} {same}")
    return "\n".join(lines)
