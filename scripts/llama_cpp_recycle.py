"""The base model in llama.cpp, the recyclable module in torch beside it: `recycle` and verified chains on the same
GGUF file as llama.cpp's plain decoding, timed interleaved prompt by prompt in one process. A prototype: the
library's strategies run the base in torch.

    python scripts/llama_cpp_recycle.py [--limit 8] [--max-new-tokens 64] [--threads 2]
                                        [--rows llama_cpp,lean,recycle/draft@int8,verified@int8,spec2@int8]

What llama.cpp gives. A context made with embeddings on and pooling NONE returns, for every output row of a
`llama_decode`, both the logits (`llama_get_logits_ith`) and the last layer's state (`llama_get_embeddings_ith`):
the state after the final RMSNorm (`result_norm`), post = pre / rms(pre) * w. The module RMS-normalises its input
itself (`input_norm`), so post / w (of rms 1) reads as the pre-norm state h_t up to the norm's eps. With
embeddings on, llama.cpp makes every token of a batch an output (it overrides the batch's flags), so a prompt's
prefill computes the LM head at every position, and a pair [x_p, x̂_{p+1}] yields the logits at p too: the full
model's own choice at the recycled token's position, which gives α (and the verification) for free. Logits are
the same bits with embeddings on or off. (llama-cpp-python's `Llama` takes `embedding=True`, singular; an
unknown keyword such as `embeddings=` is swallowed silently and the states come back NULL.)

Batch invariance. Without flash attention llama.cpp's logits for a token depend on how many tokens share its
decode (measured: 22 of 80 rows of 2-token decodes, 74 of 160 rows of 4-token decodes differ from one-token
decodes, by up to 0.7 in a logit), so a verified chain would part from one-token decoding at near-ties. With
flash attention (`flash_attn=True`) every row was the same bits in that test (0 of 600), and decodes are faster
(1 token 10.8 ms against 11.8, 2 tokens 15.1 against 17.3, 2 threads): the module rows and `lean` use it.

Rows (each from an empty cache; greedy, exactly --max-new-tokens tokens, EOS ignored); a module row names the
module's products after @: fp32, or int8 (the project's weight-only int8, LM head and draft head included):
  llama_cpp      the project's baseline row (evals/llama_cpp_baseline.py: Llama.eval, one token per decode)
  llama_cpp_fa   the same with llama.cpp's flash attention
  lean           one-token decoding through llama_decode directly (no Llama.eval bookkeeping), flash attention
                 on as in the module rows; the reference of the token-equality column
  recycle/full   the paper's schedule: llama_decode of the pair [x_p, x̂_{p+1}] (logits and states at both), then
                 the module on slots p, p+1 (its own torch KV cache) picks x̂_{p+3} over the full head
  recycle/draft  the same, the module's token over its draft vocabulary (`--recycle-vocab draft`)
  verified       `recycle-verified`: the module's one draft checked by the next pair decode (lossless)
  specK          `speculative` with K module drafts in a chain, verified in one llama_decode of K+1 tokens;
                 the rejected positions are removed from llama.cpp's KV cache (llama_memory_seq_rm)

α: the share of the module's tokens equal to llama.cpp's greedy token at that position (read from the pair
decode's logits at slot p); for verified rows, the share of drafts accepted.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch

from recyclegpt.api import RecycleGPT
from recyclegpt.evals.llama_cpp_baseline import KV_PAD, LlamaCppBaseline, gguf_of, require_llama_cpp
from recyclegpt.evals.speed import BUILTIN_PROMPTS, StrategyRun


class LlamaCppContext:
    """A llama.cpp context on the GGUF file driven through `llama_decode` with the caller's positions, one sequence.

    embeddings: every decoded token is an output with its logits and its final-norm state; off: the last token's
    logits only. flash_attn: llama.cpp's fused attention, under which a token's logits and state are the same bits
    whether it is decoded alone or with others in one batch (without it they part at a few rows in ten: the
    verified rows would not reproduce one-token decoding exactly)."""

    def __init__(self, gguf, *, n_threads: int, n_ctx: int, embeddings: bool, flash_attn: bool = True) -> None:
        L = self.L = require_llama_cpp()
        self.llm = L.Llama(str(gguf), n_gpu_layers=0, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                           embedding=embeddings, pooling_type=L.LLAMA_POOLING_TYPE_NONE, flash_attn=flash_attn,
                           verbose=False)
        self.ctx, self.embeddings = self.llm.ctx, embeddings
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab, self.n_embd = self.llm.n_vocab(), self.llm.n_embd()
        self.batch = L.llama_batch_init(n_ctx, 0, 1)
        for i in range(n_ctx):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0

    def reset(self) -> None:
        self.L.llama_memory_clear(self.mem, True)

    def decode(self, tokens: list[int], pos: int) -> None:
        """tokens at positions pos, pos+1, ...; the last one an output (all of them with embeddings on)."""
        b, n = self.batch, len(tokens)
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos + i
            b.logits[i] = 1 if self.embeddings or i == n - 1 else 0
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, i: int) -> np.ndarray:
        """The logits (V,) of the last decode's token i (an output; -1: the last output), a view into llama.cpp's
        buffer."""
        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def argmax(self, i: int) -> int:
        return int(self.logits(i).argmax())

    def states(self, n: int) -> np.ndarray:
        """The final-norm states (n, d) of the last decode's first n outputs (a copy)."""
        return np.stack([np.ctypeslib.as_array(self.L.llama_get_embeddings_ith(self.ctx, i), shape=(self.n_embd,))
                         for i in range(n)])

    def drop_from(self, pos: int) -> None:
        """Remove the cached positions >= pos."""
        if not self.L.llama_memory_seq_rm(self.mem, 0, pos, -1):
            raise RuntimeError(f"llama_memory_seq_rm from {pos} failed")

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.llm.close()


class Timer:
    """Emitted tokens and the clock after each emit group (one decode step apart)."""

    def __init__(self, n: int) -> None:
        self.n, self.tokens, self.t0 = n, [], time.perf_counter()
        self.times: list[float] = []

    def emit(self, *toks: int) -> bool:
        self.tokens.extend(toks[:self.n - len(self.tokens)])
        self.times.append(time.perf_counter())
        return len(self.tokens) >= self.n

    def step_ms(self, every: int = 1, first: int = 0) -> float:
        t = self.times[first::every]
        return 1000 * statistics.median(b - a for a, b in itertools.pairwise(t)) if len(t) > 1 else 0.0


class Module:
    """The recyclable module of a loaded RecycleGPT (float32, or int8 products) with its own KV cache."""

    def __init__(self, lm: RecycleGPT, n_ctx: int) -> None:
        self.model = lm.model
        self.base = self.model.base
        # post / w has rms 1 whatever the scale of h: the module's own RMSNorm reads it as it reads h
        self.inv_w = 1.0 / self.base.norm.weight.detach().float()
        self.cache = self.model.module.new_cache(1, n_ctx)  # slots are written by position, masked by kv_end
        self.model.refresh_draft_head()

    def state(self, e: np.ndarray) -> torch.Tensor:
        """llama.cpp's final-norm states (T, d) -> the module's input states (1, T, d)."""
        return (torch.from_numpy(e) * self.inv_w)[None]

    def __call__(self, state: torch.Tensor, tokens: list[int], pos: int) -> torch.Tensor:
        """The module on slots pos.. (inputs (h_t, x_{t+1})); its output at the last slot (1, 1, d)."""
        T = state.shape[1]
        return self.model.module(state, self.base.tok_emb(torch.tensor([tokens])),
                                 input_pos=torch.arange(pos, pos + T), cache=self.cache, kv_end=pos + T, outputs=1,
                                 kernels=self.base.kernels)


class Rows:
    """The decoding loops on one plain context and one embeddings context (both with flash attention)."""

    def __init__(self, gguf, *, n_threads: int, n_ctx: int) -> None:
        self.plain = LlamaCppContext(gguf, n_threads=n_threads, n_ctx=n_ctx, embeddings=False)
        self.emb = LlamaCppContext(gguf, n_threads=n_threads, n_ctx=n_ctx, embeddings=True)

    def lean(self, ids: list[int], n: int):
        c = self.plain
        c.reset()
        out = Timer(n)
        c.decode(ids, 0)
        x = c.argmax(-1)
        done, p = out.emit(x), len(ids)
        while not done:
            c.decode([x], p)
            x = c.argmax(-1)
            p += 1
            done = out.emit(x)
        return out, out.step_ms(first=1), None

    @torch.inference_mode()
    def recycle(self, m: Module, ids: list[int], n: int, vocab: str):
        c, model = self.emb, m.model
        model.recycle_vocab = vocab
        c.reset()
        out = Timer(n)
        L = len(ids)
        c.decode(ids, 0)  # every position an output: its logits and its state
        x = c.argmax(L - 1)
        if out.emit(x):
            return out, 0.0, None
        g = m(m.state(c.states(L)), ids[1:] + [x], 0)
        xr = int(model.module_argmax(g[:, -1]))
        hits = total = 0
        done, p = out.emit(xr), L
        while not done:
            c.decode([x, xr], p)  # [x_p, x̂_{p+1}] at p, p+1
            hits += c.argmax(0) == xr  # llama.cpp's own token at p+1
            total += 1
            x = c.argmax(1)  # x_{p+2}
            if out.emit(x):
                break
            g = m(m.state(c.states(2)), [xr, x], p)
            xr = int(model.module_argmax(g[:, -1]))  # x̂_{p+3}
            p += 2
            done = out.emit(xr)
        return out, out.step_ms(every=2, first=1), (hits, total)

    @torch.inference_mode()
    def chain(self, m: Module, ids: list[int], n: int, K: int):
        """Greedy verified chains of K module drafts (speculative.chain with ModuleDrafter, on llama.cpp)."""
        c, model = self.emb, m.model
        c.reset()
        out = Timer(n)
        L = len(ids)
        c.decode(ids, 0)
        x = c.argmax(L - 1)
        done = out.emit(x)
        state, nxt, start, p = m.state(c.states(L)), ids[1:] + [x], 0, L
        hits = total = 0
        while not done:
            g = m(state, nxt, start)  # catch-up on the committed slots start..p-1
            drafts = []
            for j in range(K):
                drafts.append(int(model.draft_argmax(g[:, -1])))
                if j < K - 1:  # roll on at slot p + j, fed its own output
                    g = m(g, drafts[-1:], p + j)
            c.decode([x] + drafts, p)
            a = 0
            while a < K and c.argmax(a) == drafts[a]:
                a += 1
            x = c.argmax(a)
            hits, total = hits + a, total + K
            if a < K:
                c.drop_from(p + a + 1)  # the rejected drafts' cells
            emitted = drafts[:a] + [x]
            state, nxt, start, p = m.state(c.states(a + 1)), emitted, p, p + a + 1
            done = out.emit(*emitted)
        return out, out.step_ms(first=1), (hits, total)

    def close(self) -> None:
        self.plain.close()
        self.emb.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", default="llama_cpp,llama_cpp_fa,lean,recycle/full@int8,recycle/draft@int8,"
                                      "recycle/full@fp32,recycle/draft@fp32,verified@int8,spec2@int8,spec3@int8",
                    help="comma-separated; a module row names its module's products after @ (fp32 or int8)")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.max_new_tokens
    names = args.rows.split(",")
    quants = sorted({r.split("@")[1] for r in names if "@" in r})
    lms = {q: RecycleGPT.from_pretrained(args.model, device="cpu", quantize=None if q == "fp32" else q) for q in quants}
    lm = lms[quants[0]] if quants else RecycleGPT.from_pretrained(args.model, device="cpu")
    ids = [lm.encode(p, chat=True) for p in BUILTIN_PROMPTS[:args.limit]]
    gguf = gguf_of(lm.name)
    n_ctx = -(-(max(map(len, ids)) + n + 8) // KV_PAD) * KV_PAD
    mods = {q: Module(v, n_ctx) for q, v in lms.items()}
    rows = Rows(gguf, n_threads=args.threads, n_ctx=n_ctx)
    bases = {"llama_cpp": LlamaCppBaseline(gguf, n_threads=args.threads, n_ctx=n_ctx),
             "llama_cpp_fa": LlamaCppBaseline(gguf, n_threads=args.threads, n_ctx=n_ctx, flash_attn=True)}

    def run(name: str, prompt: list[int]):
        if name in bases:
            g = bases[name].generate(prompt, n)
            return g.tokens, g.seconds, g.ttft_s, 1000 * statistics.median(g.step_s), None
        kind, _, q = name.partition("@")
        if kind == "lean":
            t, step, acc = rows.lean(prompt, n)
        elif kind.startswith("recycle/"):
            t, step, acc = rows.recycle(mods[q], prompt, n, kind.split("/")[1])
        elif kind == "verified":
            t, step, acc = rows.chain(mods[q], prompt, n, 1)
        elif kind.startswith("spec"):
            t, step, acc = rows.chain(mods[q], prompt, n, int(kind[4:]))
        else:
            raise ValueError(f"unknown row {name!r}")
        return t.tokens, t.times[-1] - t.t0, t.times[0] - t.t0, step, acc

    for name in names:  # warm-up
        run(name, ids[0])
    runs = {r: StrategyRun(r) for r in names}
    acc = {r: [0, 0] for r in names}
    for i, prompt in enumerate(ids):
        order = names[i % len(names):] + names[:i % len(names)]  # rotated, so no row always runs first
        for name in order:
            toks, secs, ttft, step, a = run(name, prompt)
            runs[name].record(len(toks), secs, ttft, step, None)
            runs[name].outputs.append(toks)
            if a is not None:
                acc[name][0] += a[0]
                acc[name][1] += a[1]
    ref_name = "lean" if "lean" in names else names[0]
    ref_out = runs[ref_name].outputs
    tps = {r: runs[r].summary()["tokens_per_s"] for r in names}
    plain = [r for r in ("llama_cpp", "llama_cpp_fa", "lean") if r in names]
    best = max(plain, key=tps.get) if plain else None
    print(f"{lm.name}, {args.limit} prompts x {n} tokens, greedy, {args.threads} threads, llama-cpp-python "
          f"{bases['llama_cpp'].version}, torch {torch.__version__}; module rows: llama.cpp with flash attention "
          f"+ the module in torch (@fp32 / @int8 products)")
    print(f"{'row':<20}{'tok/s':>7}{'median':>8}{'ttft ms':>9}{'step ms':>9}{'vs ' + (best or '-'):>16}"
          f"{'alpha':>8}  tokens = {ref_name}")
    for name in names:
        m = runs[name].summary()
        same = sum(a == b for a, b in zip(runs[name].outputs, ref_out))
        first = [next((j for j, (u, v) in enumerate(zip(a, b)) if u != v), None)
                 for a, b in zip(runs[name].outputs, ref_out)]
        parts = [j for j in first if j is not None]
        a = f"{acc[name][0] / acc[name][1]:8.3f}" if acc[name][1] else f"{'-':>8}"
        vs = f"{m['tokens_per_s'] / tps[best]:15.2f}x" if best else f"{'-':>16}"
        print(f"{name:<20}{m['tokens_per_s']:7.1f}{m['median_tokens_per_s']:8.1f}{m['ttft_ms']:9.2f}"
              f"{m['step_ms']:9.2f}{vs}{a}  {same}/{len(ids)}"
              + (f" (first difference at token {min(parts)})" if parts else ""))
    rows.close()
    for b in bases.values():
        b.close()


if __name__ == "__main__":
    main()
