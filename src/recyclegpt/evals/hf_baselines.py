"""Hugging Face `transformers` baselines for the decoding benchmark, built from the project's own weights.

`to_hf_llama(base)` copies a `Transformer` into a `transformers.LlamaForCausalLM` in memory (same device and
dtype; no files, no download). The project's rotary embedding already uses HF's rotate-half layout, so Q and K are
copied as they are. `HFBaseline(base, mode)` then runs greedy `model.generate` on one prompt (batch 1) for exactly
`max_new_tokens` tokens (no eos is configured, so nothing stops early) in one of three modes:

- "eager": the default dynamic KV cache, no compilation.
- "compiled": a static KV cache (`cache_implementation="static"`) and `torch.compile` of the decode forward, the way
  the installed transformers does it (see `HFBaseline.config_note` for what actually ran).
- "prompt_lookup": HF's n-gram prompt lookup decoding (`prompt_lookup_num_tokens=10`), lossless for greedy.

transformers is optional: it is imported inside the functions, with a clear error when it is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models import Transformer

MODES = ("eager", "compiled", "prompt_lookup")
PROMPT_LOOKUP_NUM_TOKENS = 10


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the Hugging Face baselines need transformers: pip install transformers") from e
    return transformers


def _major(version: str) -> int:
    return int(version.split(".")[0])


def to_hf_llama(base: Transformer):
    """A `transformers.LlamaForCausalLM` (eval mode, no grads) with `base`'s config and a copy of its weights.

    bos/eos/pad ids are left unset, so `generate` never stops before its token budget.
    """
    transformers = _transformers()
    cfg = base.cfg
    p = base.tok_emb.weight
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.context_length,
        # transformers 4.x keeps rope_theta as an attribute; 5.x moves this keyword into rope_parameters
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    if theta is None or float(theta) != float(cfg.rope_theta) or rope.get("rope_type", "default") != "default":
        raise RuntimeError(f"transformers {transformers.__version__} did not take rope_theta={cfg.rope_theta} "
                           f"(got rope {rope or theta!r})")
    # build under the target dtype (the rotary inv_freq stays float32, as in from_pretrained), then move
    dtype_kw = "dtype" if _major(transformers.__version__) >= 5 else "torch_dtype"
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", **{dtype_kw: p.dtype})
    sd = {"model.embed_tokens.weight": base.tok_emb.weight, "model.norm.weight": base.norm.weight,
          "lm_head.weight": base.lm_head.weight}
    for i, blk in enumerate(base.layers):
        pre = f"model.layers.{i}."
        sd.update({
            pre + "self_attn.q_proj.weight": blk.attn.wq.weight, pre + "self_attn.k_proj.weight": blk.attn.wk.weight,
            pre + "self_attn.v_proj.weight": blk.attn.wv.weight, pre + "self_attn.o_proj.weight": blk.attn.wo.weight,
            pre + "mlp.gate_proj.weight": blk.mlp.w1.weight, pre + "mlp.up_proj.weight": blk.mlp.w3.weight,
            pre + "mlp.down_proj.weight": blk.mlp.w2.weight,
            pre + "input_layernorm.weight": blk.attn_norm.weight,
            pre + "post_attention_layernorm.weight": blk.mlp_norm.weight,
        })
    expected = set(model.state_dict())
    sd = {k: v.detach() for k, v in sd.items() if k in expected}  # a tied lm_head may be absent from the keys
    missing = expected - set(sd) - {k for k in expected if k.endswith("rotary_emb.inv_freq")}
    if missing:
        raise RuntimeError(f"to_hf_llama: no weights for {sorted(missing)}")
    model.load_state_dict(sd, strict=False)
    if cfg.tie_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        model.tie_weights()
    return model.to(device=p.device).eval().requires_grad_(False)


@dataclass
class HFRun:
    """One `generate` call, timed from just before the call to its return (CUDA synchronised at both ends).

    tokens: the new tokens. seconds: wall time of the call, prefill included (tokens/s = len(tokens) / seconds).
    ttft_s: time to the first new token. step_s: time between successive streamer deliveries after the first token,
    one per decode step (a prompt-lookup step may deliver several tokens: step_tokens says how many).
    peak_mem_mb: torch.cuda.max_memory_allocated during the call, in MiB (None on CPU).
    """

    tokens: list[int]
    seconds: float
    ttft_s: float
    step_s: list[float]
    peak_mem_mb: float | None
    step_tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


_STREAMER_CLASS = None


def _timing_streamer():
    """A `BaseStreamer` that records perf_counter() and the token count of every put (the first put is the prompt)."""
    global _STREAMER_CLASS
    if _STREAMER_CLASS is None:
        from transformers.generation.streamers import BaseStreamer

        class TimingStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.counts: list[int] = []

            def put(self, value) -> None:
                self.times.append(time.perf_counter())
                self.counts.append(value.numel())

            def end(self) -> None:
                pass

        _STREAMER_CLASS = TimingStreamer
    return _STREAMER_CLASS()


class HFBaseline:
    """Greedy `generate` of a HF copy of `base` in one of `MODES`; `generate(ids, n)` returns an `HFRun`.

    "compiled" uses transformers' own static-cache compilation: where transformers has `CompileConfig` (>= 4.48,
    5.x) `generate` compiles the decode forward itself from `compile_config` (on CPU only when told to, which this
    class does); older versions get the documented `model.forward = torch.compile(..., fullgraph=True)`. The
    compile happens in untimed warm-up calls made here (`compile_seconds`); if it fails, the mode falls back to the
    static cache without compile. `config_note` says which configuration runs. HF keeps the largest static cache
    it has made and makes a larger one (and recompiles) when a call needs more: give `max_cache_len` = the longest
    prompt + max_new_tokens of a benchmark, and the warm-up makes a cache of that size, so no call recompiles.
    `compile_backend` other than "inductor" (e.g. "eager", a callable) is for tests.
    """

    def __init__(self, base: Transformer, mode: str = "eager", *, compile_mode: str = "reduce-overhead",
                 compile_backend: str | Callable = "inductor", max_cache_len: int | None = None,
                 warmup_tokens: int = 4) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown HF baseline mode {mode!r}; expected one of {MODES}")
        transformers = _transformers()
        self.mode = mode
        self.model = to_hf_llama(base)
        self.device = self.model.device
        self.vocab_size = base.cfg.vocab_size
        self.compile_seconds: float | None = None  # the compiling warm-up call ("compiled" mode)
        gc = self.model.generation_config
        gc.do_sample, gc.num_beams = False, 1
        gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = None
        if mode == "eager":
            self.config_note = "dynamic cache, no compile"
        elif mode == "prompt_lookup":
            gc.prompt_lookup_num_tokens = PROMPT_LOOKUP_NUM_TOKENS
            # transformers 4.x's prompt lookup needs an eos id (it crops candidates at eos): one past the vocabulary,
            # which the model never produces, so nothing stops early and no token is suppressed
            gc.eos_token_id = gc.pad_token_id = base.cfg.vocab_size
            self.config_note = f"dynamic cache, prompt_lookup_num_tokens={PROMPT_LOOKUP_NUM_TOKENS}"
        else:
            if max_cache_len is not None and not warmup_tokens < max_cache_len <= base.cfg.context_length:
                raise ValueError(f"max_cache_len must be in ({warmup_tokens}, {base.cfg.context_length}], "
                                 f"got {max_cache_len}")
            gc.cache_implementation = "static"
            if max_cache_len is not None and hasattr(gc, "max_cache_len"):
                gc.max_cache_len = max_cache_len
            self.config_note = self._setup_compile(transformers, compile_backend, compile_mode, max_cache_len,
                                                   warmup_tokens)

    def _setup_compile(self, transformers, backend: str | Callable, mode: str, max_cache_len: int | None,
                       warmup_tokens: int) -> str:
        """Arrange the compile, run one untimed warm-up call that compiles, and describe what runs."""
        inductor = backend == "inductor"
        mode_kw = {"mode": mode if inductor else None}  # only inductor takes a mode
        what = f"static cache + torch.compile(mode={mode})" if inductor else \
            f"static cache + torch.compile(backend={getattr(backend, '__name__', backend)})"
        if hasattr(transformers, "CompileConfig"):  # transformers >= 4.48: generate compiles the decode forward
            cc = transformers.CompileConfig(backend=backend, **mode_kw)
            if self.device.type not in ("cuda", "xpu"):
                cc._compile_all_devices = True  # else generate compiles only on accelerators
            self.model.generation_config.compile_config = cc
            undo = lambda: setattr(self.model.generation_config, "disable_compile", True)  # noqa: E731
        else:  # older: the documented manual way, which also compiles the prefill (once per prompt length)
            eager_forward = self.model.forward
            self.model.forward = torch.compile(eager_forward, backend=backend, fullgraph=True, **mode_kw)
            undo = lambda: setattr(self.model, "forward", eager_forward)  # noqa: E731
            what += " of model.forward"
        if max_cache_len is not None and hasattr(self.model.generation_config, "max_cache_len"):
            what += f", max_cache_len={max_cache_len}"
        # the warm-up sizes HF's static cache (it keeps the largest so far) to max_cache_len; a second prompt length
        # makes a compiled prefill (older transformers) dynamic in the prompt length, so later prompts reuse it
        prompt_len = 8 if max_cache_len is None else max_cache_len - warmup_tokens
        t0 = time.perf_counter()
        try:
            for n in dict.fromkeys((prompt_len, max(1, prompt_len - 1))):
                self.generate([1 + i % (self.vocab_size - 1) for i in range(n)], warmup_tokens)
        except Exception as e:  # e.g. no C++ compiler for inductor, an op the backend cannot handle
            torch._dynamo.reset()
            undo()
            reason = " ".join([line.strip() for line in str(e).splitlines() if line.strip()][:2])[:160]
            return f"static cache, compile failed: {type(e).__name__}: {reason}"
        self.compile_seconds = time.perf_counter() - t0
        if hasattr(transformers, "CompileConfig") and not hasattr(self.model, "_compiled_call"):
            return "static cache, not compiled (generate's auto-compile criteria were not met)"
        return what

    def generate(self, ids: list[int], max_new_tokens: int) -> HFRun:
        """Greedy-decode exactly max_new_tokens tokens after `ids` (one prompt); time it through a streamer."""
        if not ids:
            raise ValueError("empty prompt")
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        attention_mask = torch.ones_like(input_ids)
        streamer = _timing_streamer()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  streamer=streamer)
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        tokens = out[0, input_ids.shape[1]:].tolist()[:max_new_tokens]  # 4.x prompt lookup may overshoot
        if len(tokens) != max_new_tokens:
            raise RuntimeError(f"HF generate returned {len(tokens)} new tokens, expected {max_new_tokens}")
        times = streamer.times  # [prompt, first token, step 2, ...]
        if len(times) < 2:
            raise RuntimeError("HF generate streamed no new tokens")
        step_tokens, left = [], max_new_tokens
        for n in streamer.counts[1:]:
            step_tokens.append(min(n, left))
            left -= step_tokens[-1]
        return HFRun(
            tokens=tokens, seconds=seconds, ttft_s=times[1] - t0,
            step_s=[b - a for a, b in zip(times[1:], times[2:])],
            peak_mem_mb=torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None,
            step_tokens=step_tokens,
        )
