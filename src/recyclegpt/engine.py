"""The decoding engine: static-shape decode steps, captured as CUDA graphs, with no host sync inside the loop.

`decoding.py` holds the reference strategies: one eager forward per step, a host sync per step (the stop check).
Here the same strategies run as fixed-shape *steps* over preallocated caches:

- `standard` step: the full model on 1 token per row, then the next token.
- `recycle` step: the full model on the pair [x_p, x̂_{p+1}], its token x_{p+2}, the module on the same two slots,
  its token x̂_{p+3} (the paper's schedule, two tokens per full call; decoding.recycle documents the slots).

Every step reads and writes only device tensors that live as long as the `Decoder` (token and position buffers,
the caches, an output buffer), so a step can be captured once as a CUDA graph and replayed: one launch instead of
~1,300 kernel launches from Python (docs/engine.md counts them). Attention reads the cache up to a *bucket*
boundary (a multiple of `bucket` slots) through the position mask, so one graph serves every position inside its
bucket; graphs are captured lazily, per step kind and bucket. Greedy steps select the token inside the graph;
sampling selects it eagerly from the graph's logits (a few kernels), with the same `sampling.sample`.

The host learns the tokens every `check_every` steps (one sync), when it also checks stop tokens and budgets;
the steps already launched past a stop are wasted work, never wrong output. On the CPU the same steps run eagerly
(graphs=False): the test oracle of the captured path, and of batched against per-prompt decoding.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from .decoding import Collector, DecodeResult, DecodeStats, PromptBatch, StreamFn, _sync, check_budget
from .model import KVCache, RecycleModel, Transformer
from .sampling import SamplingParams, sample

STEP_TOKENS = {"standard": 1, "recycle": 2}


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Decoder:
    """Static buffers and (optionally) captured steps for one model, batch size and cache length.

    Reuse one Decoder across calls with the same batch size (the graphs stay captured); a call whose prompt plus
    budget does not fit `max_len` needs a larger Decoder (`Engine` keeps one per shape).
    """

    def __init__(self, model: Transformer | RecycleModel, batch_size: int, max_len: int, *, graphs: bool = False,
                 bucket: int = 256, compile: bool = False) -> None:
        self.rmodel = model if isinstance(model, RecycleModel) else None
        self.base: Transformer = model.base if self.rmodel is not None else model
        p = self.base.tok_emb.weight
        self.device, self.B = p.device, batch_size
        if graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use graphs=False on the CPU")
        self.graphs_enabled, self.bucket = graphs, bucket
        self.max_len = round_up(max_len, bucket)
        cfg = self.base.cfg
        if self.max_len > cfg.context_length:
            self.max_len = cfg.context_length
        self.cache: KVCache = self.base.new_cache(batch_size, self.max_len)
        self.mcache: KVCache | None = (self.rmodel.module.new_cache(batch_size, self.max_len)
                                       if self.rmodel is not None else None)
        dev, long = self.device, torch.long
        self.pos = torch.zeros(1, dtype=long, device=dev)  # slot of the step's first input token
        self.n = torch.zeros(1, dtype=long, device=dev)  # tokens written to `out` per row
        self.pad = torch.zeros(batch_size, dtype=long, device=dev)
        self.x_next = torch.zeros(batch_size, 1, dtype=long, device=dev)  # the full model's latest token
        self.x_rec = torch.zeros(batch_size, 1, dtype=long, device=dev)  # the module's latest token (recycle)
        self.x_new = torch.zeros(batch_size, dtype=long, device=dev)  # a sampled x_{p+2}, staged for the module
        self.out = torch.zeros(batch_size, self.max_len + 2, dtype=long, device=dev)
        self.logits = torch.zeros(batch_size, cfg.vocab_size, dtype=p.dtype, device=dev)
        self.hidden2 = torch.zeros(batch_size, 2, cfg.d_model, dtype=p.dtype, device=dev)
        self.offsets = torch.arange(2, dtype=long, device=dev)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._base_fwd, self._recycle_fwd = self.base.forward, (self.rmodel.recycle if self.rmodel else None)
        if compile:  # inductor fuses the element-wise chains; the graphs then hold far fewer kernels
            self._base_fwd = torch.compile(self._base_fwd, dynamic=False)
            if self.rmodel is not None:
                self._recycle_fwd = torch.compile(self._recycle_fwd, dynamic=False)

    # -- the steps: device tensors in, device tensors out ----------------------------------------------------------

    def _emit(self, tokens: torch.Tensor) -> None:
        """Append tokens (B, k) to `out` at column n, and advance n."""
        k = tokens.shape[1]
        self.out.index_copy_(1, self.n + self.offsets[:k], tokens)
        self.n.add_(k)

    def _standard_forward(self, kv_end: int) -> None:
        out = self._base_fwd(self.x_next, input_pos=self.pos, cache=self.cache, pad=self.pad, kv_end=kv_end,
                             num_logits=1)
        self.logits.copy_(out.logits[:, -1])

    def _standard_select(self, token: torch.Tensor) -> None:
        self.x_next.copy_(token[:, None])
        self._emit(self.x_next)
        self.pos.add_(1)

    def _standard_greedy(self, kv_end: int) -> None:
        self._standard_forward(kv_end)
        self._standard_select(self.logits.argmax(-1))

    def _full_pair(self, kv_end: int) -> None:
        """The full model on [x_p, x̂_{p+1}]: logits at slot p+1 (for x_{p+2}) and both hidden states."""
        pair = torch.cat((self.x_next, self.x_rec), dim=1)
        out = self._base_fwd(pair, input_pos=self.pos + self.offsets, cache=self.cache, pad=self.pad,
                             kv_end=kv_end, num_logits=1)
        self.logits.copy_(out.logits[:, -1])
        self.hidden2.copy_(out.hidden)

    def _module_pair(self, kv_end: int, x_new: torch.Tensor) -> None:
        """Given x_{p+2} (B,): the module on slots p, p+1; its logits (for x̂_{p+3}) into `logits`."""
        rec = self._recycle_fwd(self.hidden2, torch.cat((self.x_rec, x_new[:, None]), dim=1),
                                input_pos=self.pos + self.offsets, cache=self.mcache, pad=self.pad, kv_end=kv_end,
                                num_logits=1)
        self.x_next.copy_(x_new[:, None])
        self._emit(self.x_next)
        self.logits.copy_(rec.logits[:, -1])

    def _module_select(self, token: torch.Tensor) -> None:
        self.x_rec.copy_(token[:, None])
        self._emit(self.x_rec)
        self.pos.add_(2)

    def _recycle_greedy(self, kv_end: int) -> None:
        self._full_pair(kv_end)
        self._module_pair(kv_end, self.logits.argmax(-1))
        self._module_select(self.logits.argmax(-1))

    # -- graph capture ---------------------------------------------------------------------------------------------

    def _run(self, key: tuple, fn: Callable[[], None]) -> None:
        """Run fn once: eagerly, or by replaying its CUDA graph (captured on first use)."""
        if not self.graphs_enabled:
            fn()
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(fn)
            self._graphs[key] = graph
        graph.replay()

    def _capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # warm up on a side stream (kernels pick their algorithms, allocator pools settle), then undo the warm-up's
        # effect on the small state; its cache and `out` writes are rewritten identically by the real step
        small = (self.pos, self.n, self.x_next, self.x_rec, self.logits, self.hidden2)
        state = [t.clone() for t in small]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for t, s in zip(small, state):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        return graph

    def _kv_end(self, pos_after: int) -> int:
        return min(self.max_len, round_up(pos_after, self.bucket))

    # -- one call --------------------------------------------------------------------------------------------------

    def prefill(self, strategy: str, batch: PromptBatch, sampling: SamplingParams, gen) -> None:
        """Run the prompt through the base (and the module); `out` gets x_L, and for recycle x̂_{L+1}."""
        L = batch.length
        self.pad.copy_(batch.pad if batch.pad is not None else torch.zeros_like(self.pad))
        slots = torch.arange(L, device=self.device)
        full = self.base(batch.ids, input_pos=slots, cache=self.cache, pad=self.pad, kv_end=L, num_logits=1)
        first = sample(full.logits[:, -1], sampling, gen)
        self.x_next.copy_(first[:, None])
        self.n.zero_()
        self._emit(self.x_next)
        self.pos.fill_(L)
        if strategy == "standard":
            return
        next_tokens = torch.cat((batch.ids[:, 1:], first[:, None]), dim=1)
        rec = self.rmodel.recycle(full.hidden, next_tokens, input_pos=slots, cache=self.mcache, pad=self.pad,
                                  kv_end=L, num_logits=1)
        second = sample(rec.logits[:, -1], sampling, gen)
        self.x_rec.copy_(second[:, None])
        self._emit(self.x_rec)

    def step(self, strategy: str, pos: int, sampling: SamplingParams, gen) -> None:
        """One decode step from host-known slot `pos` (the device keeps its own copy in self.pos)."""
        kv_end = self._kv_end(pos + STEP_TOKENS[strategy])
        if strategy == "standard":
            if sampling.greedy:
                self._run(("standard", kv_end), lambda: self._standard_greedy(kv_end))
            else:
                self._run(("standard_fwd", kv_end), lambda: self._standard_forward(kv_end))
                self._standard_select(sample(self.logits, sampling, gen))
        elif sampling.greedy:
            self._run(("recycle", kv_end), lambda: self._recycle_greedy(kv_end))
        else:
            self._run(("full_pair", kv_end), lambda: self._full_pair(kv_end))
            # a graph reads its inputs from fixed addresses: stage the eagerly sampled token in a persistent buffer
            self.x_new.copy_(sample(self.logits, sampling, gen))
            self._run(("module_pair", kv_end), lambda: self._module_pair(kv_end, self.x_new))
            self._module_select(sample(self.logits, sampling, gen))

    def decode(self, strategy: str, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
               stream: StreamFn | None = None, check_every: int = 8) -> DecodeResult:
        if strategy not in STEP_TOKENS:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STEP_TOKENS)}")
        if strategy == "recycle" and self.rmodel is None:
            raise ValueError("strategy 'recycle' needs a Decoder built on a RecycleModel")
        if len(prompts) != self.B:
            raise ValueError(f"this Decoder decodes batches of {self.B} prompts, got {len(prompts)}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
        batch = PromptBatch.build(prompts, vocab_size=self.base.cfg.vocab_size, device=self.device)
        need = check_budget(self.base, batch, max_new_tokens, extra_slots=2)
        if need > self.max_len:
            raise ValueError(f"prompt ({batch.length} tokens) + max_new_tokens ({max_new_tokens}) needs {need} cache "
                             f"slots; this Decoder has {self.max_len}")
        per_step = STEP_TOKENS[strategy]
        gen = sampling.generator(self.device)
        stats = DecodeStats(strategy)
        out = Collector(self.B, max_new_tokens, stop_ids, stream)
        step_seconds: list[float] = []  # per decode step: CUDA events on the GPU (no sync), host clock on CPU
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            _sync(self.device)
            t0 = time.perf_counter()
            self.prefill(strategy, batch, sampling, gen)
            stats.full_calls = 1
            stats.module_calls = 1 if strategy == "recycle" else 0
            first = 2 if strategy == "recycle" else 1
            if strategy == "recycle":  # x_L and x̂_{L+1} are known; emit the first alone for a true TTFT
                done = out.emit(self.out[:, :1])
                stats.prefill_seconds = time.perf_counter() - t0
                done = done or out.emit(self.out[:, 1:2])
            else:
                done = out.emit(self.out[:, :1])
                stats.prefill_seconds = time.perf_counter() - t0
            read = first
            pos = batch.length
            events = []  # on the GPU, one event after each step: timings without a sync per step
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            last = time.perf_counter()
            while not done:
                # enough steps for the row furthest from its budget, at most check_every before looking again
                steps = min(check_every, -(-out.remaining() // per_step))
                for _ in range(steps):
                    self.step(strategy, pos, sampling, gen)
                    pos += per_step
                    stats.full_calls += 1
                    stats.module_calls += strategy == "recycle"
                    if cuda:
                        events.append(torch.cuda.Event(enable_timing=True))
                        events[-1].record()
                    else:
                        now = time.perf_counter()
                        step_seconds.append(now - last)
                        last = now
                written = read + steps * per_step
                new = self.out[:, read:written].cpu()  # the one sync: `steps` steps' tokens in one copy
                read = written
                for j in range(0, new.shape[1], per_step):
                    done = out.emit(new[:, j:j + per_step])
                    if done:
                        break
            _sync(self.device)
            stats.seconds = time.perf_counter() - t0
        if cuda:
            step_seconds.extend(a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:]))
        stats.new_tokens = sum(len(t) for t in out.tokens)
        if step_seconds:
            stats.step_ms = 1000 * statistics.median(step_seconds)
        return DecodeResult(out.tokens, stats, out.finished)


class Engine:
    """Decoders by batch size and cache length for one model, so that captured graphs are reused across calls."""

    def __init__(self, model: Transformer | RecycleModel, *, graphs: bool | None = None, bucket: int = 256,
                 compile: bool = False) -> None:
        base = model.base if isinstance(model, RecycleModel) else model
        self.model = model
        self.graphs = base.tok_emb.weight.device.type == "cuda" if graphs is None else graphs
        self.bucket, self.compile = bucket, compile
        self._decoders: dict[tuple[int, int], Decoder] = {}

    def decoder(self, batch_size: int, need: int) -> Decoder:
        """A Decoder for `batch_size` rows with at least `need` cache slots (the smallest cached one that fits)."""
        fits = [k for k in self._decoders if k[0] == batch_size and k[1] >= need]
        if fits:
            return self._decoders[min(fits, key=lambda k: k[1])]
        dec = Decoder(self.model, batch_size, need, graphs=self.graphs, bucket=self.bucket, compile=self.compile)
        self._decoders[(batch_size, dec.max_len)] = dec
        return dec

    def decode(self, strategy: str, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **kw) -> DecodeResult:
        longest = max((len(p) for p in prompts), default=0)
        # leave headroom so that the next, slightly longer prompt reuses this Decoder and its graphs
        need = round_up(longest + max_new_tokens + 2, self.bucket)
        base = self.model.base if isinstance(self.model, RecycleModel) else self.model
        need = min(need, base.cfg.context_length)
        return self.decoder(len(prompts), need).decode(strategy, prompts, max_new_tokens=max_new_tokens, **kw)
