"""`recyclegpt demo`: the first thing to run. It loads the default model with the recyclable module shipped for it,
answers a few built-in chat prompts greedily with `standard`, the paper's `recycle` and the lossless `speculative`
decoding (`--strategies` picks others), and prints the answers side by side, each strategy's tokens/s and speed-up,
τ for the lossless ones (and whether their answers equal standard's, as they must), and α, the module's agreement
with the full model on the same prompts and length (evaluation.evaluate_agreement). As in `bench`, a warm-up per
strategy is not timed and the strategies alternate prompt by prompt; unlike `bench`, answers stop at EOS, so that
they read as answers.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..api import RANDOM_MODULE_NOTE, RecycleGPT, module_hint
from ..decoding.strategies import lossless_names
from ..decoding.strategies import names as strategy_names
from ..loading import NO_MODULE
from ..loading.registry import MODELS, shipped_module
from .quality import evaluate_agreement
from .speed import device_name, time_strategies

STRATEGIES = ("standard", "recycle", "speculative")
DEFAULT_PROMPTS = 4
EXCERPT_CHARS = 150  # per answer in the table; --json has the whole texts


def run_demo(lm: RecycleGPT, prompts: Sequence[str], *, max_new_tokens: int = 128, warmup: int = 1,
             strategies: Sequence[str] = STRATEGIES, log: Callable[[str], None] | None = None) -> dict:
    """The strategies greedily on every prompt (chat-templated when the model has a template), then α.

    Returns the record that `recyclegpt demo --json` prints: model, module, device, strategies (name ->
    tokens_per_s, new_tokens, seconds, texts, speedup, and for the lossless ones tau and same_as_standard),
    speedup (recycle over standard, in tokens/s) and alpha. `log` receives one line per step, for a progress display.
    """
    strategies = tuple(strategies)
    unknown = [s for s in strategies if s not in strategy_names()]
    if unknown or "standard" not in strategies:
        raise ValueError(f"demo strategies must include standard and come from {', '.join(strategy_names())}; "
                         f"got {', '.join(strategies)}")
    if lm.model is None:
        raise ValueError(f"the demo needs a recyclable module and none is loaded; {module_hint(lm.name)}")
    if not prompts:
        raise ValueError("no prompt given")
    log = log or (lambda line: None)
    chat = lm.tokenizer.chat_template is not None
    ids = [lm.encode(p, chat=chat) for p in prompts]
    runs = time_strategies(lm, ids, strategies, max_new_tokens=max_new_tokens, ignore_eos=False, warmup=warmup,
                           log=log)
    log("alpha")
    agreement = evaluate_agreement(lm, ids, max_new_tokens=max_new_tokens, scoring="recycle")

    base = runs["standard"].summary()["tokens_per_s"]
    table = {}
    for s in strategies:
        r = runs[s].summary()
        table[s] = {"tokens_per_s": r["tokens_per_s"], "median_tokens_per_s": r["median_tokens_per_s"],
                    "new_tokens": r["new_tokens"], "seconds": r["seconds"], "full_calls": r["full_calls"],
                    "module_calls": r["module_calls"], "texts": runs[s].texts,
                    "speedup": r["tokens_per_s"] / base if base > 0 else 0.0}
        if s in lossless_names():  # their answers must equal standard's
            table[s]["tau"] = r.get("tau")
            table[s]["same_as_standard"] = runs[s].texts == runs["standard"].texts
    record = {
        "model": lm.name,
        "module": lm.module_source,
        "device": device_name(lm.device),
        "dtype": str(lm.base.tok_emb.weight.dtype).removeprefix("torch."),
        "prompts": list(prompts),
        "chat": chat,
        "max_new_tokens": max_new_tokens,
        "strategies": table,
        "speedup": table["recycle"]["speedup"] if "recycle" in table else None,
        "alpha": agreement["alpha"],
        "alpha_positions": agreement["n"],
    }
    if lm.module_source == "random":
        record["note"] = RANDOM_MODULE_NOTE
    return record


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The text on one line, cut at a word boundary to at most `limit` characters (plus an ellipsis)."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0] if " " in flat[:limit] else flat[:limit]
    return cut + " …"


def format_demo(record: dict) -> str:
    """The human report: each prompt with every strategy's answer, then a table of speeds, speed-ups, τ and α."""
    s = record["strategies"]
    names = list(s)
    lines = [f"model: {record['model']}  module: {record['module']}",
             f"device: {record['device']}  dtype: {record['dtype']}  greedy, up to {record['max_new_tokens']} new "
             f"tokens per prompt, warm-up excluded", ""]
    width = max(len(n) for n in names) + 1
    for k, prompt in enumerate(record["prompts"]):
        lines.append(f"[{k + 1}] {prompt}")
        for name in names:
            text = s[name]["texts"][k]
            same = "same_as_standard" in s[name] and text == s["standard"]["texts"][k]
            lines.append(f"    {name:<{width}} {'(the same as standard)' if same else excerpt(text)}")
        lines.append("")
    head = f"{'strategy':<{width}} {'tok/s':>8} {'median':>8} {'tokens':>7} {'seconds':>8} {'speed-up':>9} {'tau':>5}"
    lines += [head, "-" * len(head)]
    for name in names:
        r = s[name]
        tau = f"{r['tau']:>5.2f}" if r.get("tau") is not None else f"{'-':>5}"
        lines.append(f"{name:<{width}} {r['tokens_per_s']:>8.1f} {r['median_tokens_per_s']:>8.1f} {r['new_tokens']:>7} "
                     f"{r['seconds']:>8.2f} {r['speedup']:>8.2f}x {tau}")
    lines.append("")
    if record.get("speedup") is not None:
        lines.append(f"speed-up of recycle over standard: {record['speedup']:.2f}x")
    for name in names:
        if "same_as_standard" in s[name]:
            verdict = "identical to standard's, as they must be" if s[name]["same_as_standard"] else \
                "NOT identical to standard's (a near-tie in low precision, or a bug: please report it)"
            tau = f", {s[name]['tau']:.2f} tokens per full-model call" if s[name]["tau"] is not None else ""
            lines.append(f"{name} (lossless{tau}): answers {verdict}")
    lines.append(f"alpha (the module's greedy token equals the full model's, over the {record['alpha_positions']} "
                 f"positions recycle gives it): {record['alpha']:.3f}")
    if record.get("note"):
        lines.append(f"note: {record['note']}")
    return "\n".join(lines)


def check_module_given(model: str, recycle: str | None) -> None:
    """Fail before any download when the flags can give no module: --recycle none, or a built-in model with none
    shipped. (Other models are checked once loaded: a checkpoint may bring its own.)"""
    if recycle in NO_MODULE or (recycle == "default" and model in MODELS and shipped_module(model) is None):
        raise ValueError(f"the demo needs a recyclable module and none was given; {module_hint(model)}")
