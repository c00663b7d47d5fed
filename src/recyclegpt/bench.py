"""The decoding benchmark: every strategy on the same prompts in one process, side by side.

Strategies are interleaved prompt by prompt (prompt 1 with each strategy, then prompt 2, ...), so that a machine
that slows down mid-run slows them all alike. A warm-up generation per strategy is excluded. The result is a
human table and a JSON-ready dict (`run_bench`), which the CLI prints as its last line.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .api import Generation, RecycleGPT
from .data import iter_jsonl

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


PROMPT_FIELDS = ("prompt", "instruction", "question", "Instruction")


def read_prompts(path: str | Path, *, limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file: each line an object with a "prompt" field (or, as the shared prompt sets have
    it, "instruction", "question" or "Instruction"), or a bare JSON string. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    prompts = []
    for where, rec in iter_jsonl(path):
        if isinstance(rec, dict):
            rec = next((rec[k] for k in PROMPT_FIELDS if isinstance(rec.get(k), str)), None)
        if not isinstance(rec, str) or not rec.strip():
            raise ValueError(f"{where}: expected a JSON string or an object with a non-empty string field "
                             f"{' / '.join(PROMPT_FIELDS)}")
        prompts.append(rec)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


@dataclass
class StrategyRun:
    strategy: str
    new_tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    prefill_seconds: list[float] = field(default_factory=list)
    full_calls: int = 0
    module_calls: int = 0
    texts: list[str] = field(default_factory=list)

    def add(self, gen: Generation) -> None:
        """Record one prompt's generation."""
        st = gen.stats
        self.new_tokens.append(st.new_tokens)
        self.seconds.append(st.seconds)
        self.prefill_seconds.append(st.prefill_seconds)
        self.full_calls += st.full_calls
        self.module_calls += st.module_calls
        self.texts.append(gen.text[0])

    def summary(self) -> dict:
        tokens, secs = sum(self.new_tokens), sum(self.seconds)
        decode_secs = secs - sum(self.prefill_seconds)
        per_prompt = [n / s for n, s in zip(self.new_tokens, self.seconds) if s > 0]
        return {
            "strategy": self.strategy,
            "tokens_per_s": tokens / secs if secs > 0 else 0.0,  # all tokens over all time, prefill included
            "median_tokens_per_s": statistics.median(per_prompt) if per_prompt else 0.0,
            "decode_tokens_per_s": (tokens - len(self.new_tokens)) / decode_secs if decode_secs > 0 else 0.0,
            "ttft_ms": 1000 * statistics.median(self.prefill_seconds) if self.prefill_seconds else 0.0,
            "new_tokens": tokens,
            "full_calls": self.full_calls,
            "module_calls": self.module_calls,
            "tokens_per_full_call": tokens / self.full_calls if self.full_calls else 0.0,
            "seconds": secs,
        }


def time_strategies(lm: RecycleGPT, ids: list[list[int]], strategies: Sequence[str], *, max_new_tokens: int,
                    ignore_eos: bool, warmup: int = 1,
                    log: Callable[[str], None] | None = None) -> dict[str, StrategyRun]:
    """Warm each strategy up (untimed), then run them greedily on every prompt, interleaved prompt by prompt."""
    log = log or (lambda line: None)
    log("warm-up")
    for s in strategies:
        for _ in range(warmup):
            lm.generate(ids[0], strategy=s, max_new_tokens=min(max_new_tokens, 16), ignore_eos=ignore_eos)
    runs = {s: StrategyRun(s) for s in strategies}
    for k, prompt in enumerate(ids, 1):
        log(f"prompt {k}/{len(ids)}")
        for s in strategies:
            runs[s].add(lm.generate(prompt, strategy=s, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos))
    return runs


def run_bench(lm: RecycleGPT, prompts: list[str], *, strategies: tuple[str, ...] = ("standard", "recycle"),
              max_new_tokens: int = 128, chat: bool = True, ignore_eos: bool = True, warmup: int = 1) -> dict:
    """Run each strategy greedily on every prompt; return {"device", "model", "results", "speedup", ...}."""
    chat = chat and lm.tokenizer.chat_template is not None
    ids = [lm.encode(p, chat=chat) for p in prompts]
    runs = time_strategies(lm, ids, strategies, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                           warmup=warmup)
    results = [runs[s].summary() for s in strategies]
    base = next((r for r in results if r["strategy"] == "standard"), None)
    speedup = {r["strategy"]: r["tokens_per_s"] / base["tokens_per_s"] for r in results
               if base is not None and r["strategy"] != "standard" and base["tokens_per_s"] > 0}
    return {
        "device": device_name(lm.device),
        "dtype": str(lm.base.tok_emb.weight.dtype).removeprefix("torch."),
        "model": lm.name,
        "module": lm.module_source,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "batch_size": 1,
        "greedy": True,
        "ignore_eos": ignore_eos,
        "torch": torch.__version__,
        "results": results,
        "speedup": speedup,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(report: dict) -> str:
    head = f"{'strategy':<10} {'tok/s':>8} {'median':>8} {'decode':>8} {'ttft ms':>8} {'tokens':>7} " \
           f"{'full':>6} {'module':>7} {'tok/full':>8} {'speedup':>8}"
    lines = [f"device: {report['device']}  dtype: {report['dtype']}  model: {report['model']}  "
             f"module: {report['module']}  prompts: {report['prompts']}  max_new_tokens: {report['max_new_tokens']}",
             head, "-" * len(head)]
    for r in report["results"]:
        sp = report["speedup"].get(r["strategy"], 1.0 if r["strategy"] == "standard" else float("nan"))
        lines.append(f"{r['strategy']:<10} {r['tokens_per_s']:>8.1f} {r['median_tokens_per_s']:>8.1f} "
                     f"{r['decode_tokens_per_s']:>8.1f} {r['ttft_ms']:>8.1f} {r['new_tokens']:>7} "
                     f"{r['full_calls']:>6} {r['module_calls']:>7} {r['tokens_per_full_call']:>8.2f} {sp:>7.2f}x")
    return "\n".join(lines)
