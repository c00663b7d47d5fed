"""Decoding strategies, each one function that reads top to bottom, built from shared primitives.

- `standard`: one full-model call per new token.
- `recycle`: the paper's alternating schedule; every full-model call after the prefill yields two tokens.

Both take token-id prompts (a batch of any lengths, left-padded internally), run under inference mode, and return
a `DecodeResult`: the new tokens of each row (stop token excluded) and a `DecodeStats`. They never print; an
optional `stream` callback receives each step's new tokens per row.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..models import RecycleModel, Transformer, prefill_attention
from .sampling import SamplingParams, sample

StreamFn = Callable[[list[list[int]]], None]


@dataclass
class DecodeStats:
    strategy: str
    new_tokens: int = 0  # summed over the batch; stop tokens are not counted
    full_calls: int = 0  # full-model forwards, the prefill included
    module_calls: int = 0  # recyclable-module forwards, its prefill included
    seconds: float = 0.0  # wall time of the whole call, prefill included
    prefill_seconds: float = 0.0  # time to the first token
    step_ms: float = 0.0  # median time of one decode step after the first token (recycle: full + module call)
    # verified strategies only (None otherwise): accept_hist[k] counts the full-model verification calls that
    # accepted k drafted tokens; tau is the mean number of tokens each such call emitted (accepted + 1)
    accept_hist: list[int] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tau(self) -> float | None:
        return None if self.accept_hist is None else tau_of(self.accept_hist)

    def to_dict(self) -> dict:
        d = {**asdict(self), "tokens_per_s": self.tokens_per_s}
        if self.accept_hist is None:
            del d["accept_hist"]
        else:
            d["tau"] = self.tau
        return d


def tau_of(accept_hist: Sequence[int]) -> float:
    """Mean tokens emitted per verifying full call, from the histogram of accepted draft lengths (k accepted: k + 1
    tokens); 0 when there was no verifying call."""
    calls = sum(accept_hist)
    return sum((k + 1) * c for k, c in enumerate(accept_hist)) / calls if calls else 0.0


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # per row, the new tokens, up to and excluding the stop token
    stats: DecodeStats
    finished: list[bool] = field(default_factory=list)  # per row: stopped on a stop token (else hit the budget)


# -- shared primitives -------------------------------------------------------------------------------------------


@dataclass
class PromptBatch:
    """Prompts left-padded to a common length L, so that every row's next token sits in slot L."""

    ids: torch.Tensor  # (B, L)
    pad: torch.Tensor | None  # (B,) left padding of each row, None when all rows have the same length

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], *, vocab_size: int, device: torch.device) -> "PromptBatch":
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (a non-empty text)")
            bad = [t for t in p if not 0 <= int(t) < vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        L = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        pads = [L - len(p) for p in prompts]
        pad = _to(torch.tensor(pads), device) if any(pads) else None
        return cls(_to(ids, device), pad)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def padded_to(self, length: int) -> "PromptBatch":
        """The same prompts left-padded to `length` tokens (more padding per row; the same positions)."""
        extra = length - self.length
        if extra <= 0:
            return self
        pad = self.pad if self.pad is not None else torch.zeros(self.ids.shape[0], dtype=torch.long,
                                                                device=self.ids.device)
        return PromptBatch(torch.nn.functional.pad(self.ids, (extra, 0)), pad + extra)


def check_budget(model: Transformer, batch: PromptBatch, max_new_tokens: int, extra_slots: int = 0) -> int:
    """The cache length for this call; a clear error when the prompt plus the new tokens exceed the context."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    need = batch.length + max_new_tokens + extra_slots
    if batch.length >= model.cfg.context_length:
        raise ValueError(f"the prompt has {batch.length} tokens, the model's context is "
                         f"{model.cfg.context_length}: shorten the prompt")
    if need > model.cfg.context_length:
        raise ValueError(f"prompt ({batch.length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context length {model.cfg.context_length}; lower --max-new-tokens to at most "
                         f"{model.cfg.context_length - batch.length - extra_slots}")
    return need


class Collector:
    """Gathers emitted tokens per row on the host, stopping rows at a stop token or the token budget."""

    def __init__(self, batch_size: int, max_new_tokens: int, stop_ids: Sequence[int], stream: StreamFn | None):
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.finished = [False] * batch_size
        self.max_new_tokens, self.stop_ids, self.stream = max_new_tokens, set(stop_ids), stream
        self.times: list[float] = []  # host clock after each emit (each follows a sync)

    def emit(self, new: torch.Tensor) -> bool:
        """new (B, k): the next k tokens of every row. Returns True when every row is done."""
        step: list[list[int]] = []
        for row, toks in enumerate(new.tolist()):  # the one host sync of a decode step
            out = []
            for t in toks:
                if self.finished[row] or len(self.tokens[row]) + len(out) >= self.max_new_tokens:
                    break
                if t in self.stop_ids:
                    self.finished[row] = True
                    break
                out.append(t)
            self.tokens[row].extend(out)
            step.append(out)
        if self.stream is not None:
            self.stream(step)
        self.times.append(time.perf_counter())
        return self.done

    def step_ms(self, every: int = 1, first: int = 0) -> float:
        """Median milliseconds between the emits first, first + every, ... (one decode step apart)."""
        t = self.times[first::every]
        return 1000 * statistics.median(b - a for a, b in zip(t, t[1:])) if len(t) > 1 else 0.0

    @property
    def done(self) -> bool:
        return all(f or len(t) >= self.max_new_tokens for f, t in zip(self.finished, self.tokens))

    def remaining(self) -> int:
        """Tokens still wanted by the row furthest from its budget."""
        return max((self.max_new_tokens - len(t) for f, t in zip(self.finished, self.tokens) if not f), default=0)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: to a GPU through pinned memory without waiting for the work queued there (a
    continuous batch's join would otherwise stall its running steps)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slots(start: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)


# -- strategies --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def standard(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
             stream: StreamFn | None = None) -> DecodeResult:
    """One full-model call per token: prefill the prompt, then feed back each sampled token."""
    device = model.tok_emb.weight.device
    batch = PromptBatch.build(prompts, vocab_size=model.cfg.vocab_size, device=device)
    cache = model.new_cache(len(prompts), check_budget(model, batch, max_new_tokens))
    gen = sampling.generator(device)
    stats, out = DecodeStats("standard"), Collector(len(prompts), max_new_tokens, stop_ids, stream)
    _sync(device)
    t0 = time.perf_counter()

    pos = batch.length
    with prefill_attention():
        logits = model(batch.ids, input_pos=_slots(0, pos, device), cache=cache, pad=batch.pad, kv_end=pos,
                       num_logits=1).logits
    token = sample(logits[:, -1], sampling, gen)  # (B,)
    stats.full_calls += 1
    done = out.emit(token[:, None])
    stats.prefill_seconds = time.perf_counter() - t0
    while not done:
        logits = model(token[:, None], input_pos=_slots(pos, 1, device), cache=cache, pad=batch.pad,
                       kv_end=pos + 1).logits
        token = sample(logits[:, -1], sampling, gen)
        stats.full_calls += 1
        pos += 1
        done = out.emit(token[:, None])

    _sync(device)
    stats.seconds = time.perf_counter() - t0
    stats.new_tokens = sum(len(t) for t in out.tokens)
    stats.step_ms = out.step_ms()
    return DecodeResult(out.tokens, stats, out.finished)


@torch.inference_mode()
def recycle(model: RecycleModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
            stream: StreamFn | None = None) -> DecodeResult:
    """The paper's alternating schedule (lossy: the module's tokens are never checked).

    With the prompt in slots 0..L-1 and p = L:
      1. full call on the prompt           -> hidden h_0..h_{L-1}; x_L sampled from the logits at slot L-1
      2. module call on slots 0..L-1       -> input (h_t, x_{t+1}) at each slot t; x̂_{L+1} from its output at L-1
      3. full call on [x_p, x̂_{p+1}] at slots p, p+1
                                           -> h_p, h_{p+1}; x_{p+2} from the logits at slot p+1
                                              (its logits at slot p, the full model's own view of x_{p+1}, are
                                              not computed: the recycled token is taken as it is)
      4. module call on slots p, p+1       -> inputs (h_p, x̂_{p+1}) and (h_{p+1}, x_{p+2}); x̂_{p+3} from slot p+1
      5. p += 2; repeat from 3.
    So each full call after the prefill yields two tokens, and both KV caches hold every slot: the base's from the
    two-token calls, the module's from step 4, which also feeds it the slot whose token it produced itself.
    The call stops as soon as every row has its tokens or a stop token, so no model runs for a token nobody wants.
    With `model.recycle_vocab` "draft" the module's tokens come from its draft vocabulary only (`draft_logits`).
    """
    base = model.base
    draft = model.recycles_over_draft
    if draft:
        model.refresh_draft_head()
    device = base.tok_emb.weight.device
    batch = PromptBatch.build(prompts, vocab_size=base.cfg.vocab_size, device=device)
    max_len = check_budget(base, batch, max_new_tokens, extra_slots=1)
    base_cache, module_cache = base.new_cache(len(prompts), max_len), model.module.new_cache(len(prompts), max_len)
    gen = sampling.generator(device)
    stats, out = DecodeStats("recycle"), Collector(len(prompts), max_new_tokens, stop_ids, stream)
    _sync(device)
    t0 = time.perf_counter()

    # 1-2: prefill both models
    p = batch.length
    with prefill_attention():
        full = base(batch.ids, input_pos=_slots(0, p, device), cache=base_cache, pad=batch.pad, kv_end=p,
                    num_logits=1, taps=model.taps)
    x_next = sample(full.logits[:, -1], sampling, gen)  # x_p, (B,)
    stats.full_calls += 1
    if out.emit(x_next[:, None]):
        return _finish(stats, out, device, t0, prefill=True)
    stats.prefill_seconds = time.perf_counter() - t0
    next_tokens = torch.cat((batch.ids[:, 1:], x_next[:, None]), dim=1)  # x_{t+1} for t = 0..p-1
    rec = model.recycle(model.state(full), next_tokens, input_pos=_slots(0, p, device), cache=module_cache,
                        pad=batch.pad, kv_end=p, num_logits=1, draft=draft, outputs=1)
    x_rec = sample(rec.logits[:, -1], sampling, gen)  # x̂_{p+1}
    stats.module_calls += 1
    if out.emit(x_rec[:, None]):
        return _finish(stats, out, device, t0)

    while True:
        # 3: the full model on the pair; only the last slot's logits are needed
        pair = torch.stack((x_next, x_rec), dim=1)  # (B, 2): [x_p, x̂_{p+1}]
        full = base(pair, input_pos=_slots(p, 2, device), cache=base_cache, pad=batch.pad, kv_end=p + 2,
                    num_logits=1, taps=model.taps)
        x_next = sample(full.logits[:, -1], sampling, gen)  # x_{p+2}
        stats.full_calls += 1
        if out.emit(x_next[:, None]):
            break
        # 4: the module on the same two slots
        rec = model.recycle(model.state(full), torch.stack((x_rec, x_next), dim=1), input_pos=_slots(p, 2, device),
                            cache=module_cache, pad=batch.pad, kv_end=p + 2, num_logits=1, draft=draft, outputs=1)
        x_rec = sample(rec.logits[:, -1], sampling, gen)  # x̂_{p+3}
        stats.module_calls += 1
        p += 2
        if out.emit(x_rec[:, None]):
            break
    return _finish(stats, out, device, t0)


def _finish(stats: DecodeStats, out: Collector, device: torch.device, t0: float, prefill: bool = False) -> DecodeResult:
    _sync(device)
    stats.seconds = time.perf_counter() - t0
    if prefill:
        stats.prefill_seconds = stats.seconds
    stats.new_tokens = sum(len(t) for t in out.tokens)
    stats.step_ms = out.step_ms(every=2, first=1)  # the module's emits close each step
    return DecodeResult(out.tokens, stats, out.finished)
