"""The recyclable module (`RecyclableModule`) and the pair of a base model and its module (`RecycleModel`).

The module is a small stack of the base's decoder blocks fed the base's hidden state s_t and the embedding of the
token x_{t+1}; its output goes through the base's final norm and LM head to predict x_{t+2}. Its "eagle3" layout
(`RecycleConfig.layout`, `Eagle3Block`) computes EAGLE-3's draft layer instead, which `recyclegpt.export` writes
for vLLM and SGLang.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import KernelConfig, ModelConfig, RecycleConfig
from ..decoding import topk
from ..decoding.topk import top_k
from ..kernels import draft_head as triton_draft_head
from .transformer import (
    MLP,
    Attention,
    Block,
    KVCache,
    Linear,
    ModelOutput,
    RMSNorm,
    Tables,
    Transformer,
    Tree,
    init_weights,
    linear,
    run_blocks,
    use_draft_head_kernel,
)


def _in_place(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """`new` written into `old` where their shape, device and dtype agree (captured CUDA graphs keep reading `old`),
    else `new` itself."""
    if old is not None and old.shape == new.shape and old.device == new.device and old.dtype == new.dtype:
        return old.copy_(new)
    return new


class Eagle3Block(nn.Module):
    """EAGLE-3's first draft layer, as vLLM's `LlamaDecoderLayer` of vllm/model_executor/models/llama_eagle3.py
    computes it at layer_idx 0 (and SGLang's python/sglang/srt/models/llama_eagle3.py): its input x (B, T, 2d) is
    concat(s_t, emb(x_{t+1})); the attention's Q, K and V read concat(emb_norm(emb), hidden_norm(s_t)) (2d wide;
    `input_layernorm` and `hidden_norm` there), its output adds to s_t itself (the residual, `norm_before_residual`
    false), and the MLP follows as in `Block`. Output (B, T, d). It keeps the torch operators on every device: the
    fused Triton products (`use_fused_linear`) assume a d-wide input normed by `attn_norm`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.emb_norm = RMSNorm(d, cfg.norm_eps)
        self.hidden_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(cfg)
        for name in ("wq", "wk", "wv"):  # Q, K and V read 2d features
            setattr(self.attn, name, Linear(2 * d, getattr(self.attn, name).out_features, bias=False))
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, layer, input_pos, kv_end, keep=None, kernels=KernelConfig()):
        """As `Block.forward`, for x = concat(s_t, emb(x_{t+1})) (B, T, 2d)."""
        state, emb = x.chunk(2, dim=-1)
        a = self.attn(torch.cat((self.emb_norm(emb), self.hidden_norm(state)), dim=-1), rope, mask, cache, layer,
                      input_pos, kv_end, kernels)
        if keep is not None:
            state, a = state[:, state.shape[1] - keep:], a[:, a.shape[1] - keep:]
        h = state + a
        return h + self.mlp(self.mlp_norm(h), kernels)


class RecyclableModule(nn.Module):
    """At position t: concat(s_t, emb(x_{t+1})) (B, T, 2d) -> Linear -> decoder blocks -> (B, T, d).

    s_t is the state the module reads (RecycleModel.state): h_t, pre- or post-norm (RecycleConfig.hidden), plus the
    fused taps if any (`fuse`). The caller applies the base's head to the output, which then predicts x_{t+2}.
    Positions and cache slots are those of h_t.

    The "eagle3" layout (RecycleConfig.layout) is EAGLE-3's draft instead: s_t = fc(concat of the three taps)
    (`fuse`, 3d -> d; vLLM's `combine_hidden_states`), and concat(s_t, emb(x_{t+1})) goes to an `Eagle3Block`, then
    n_layer - 1 standard blocks. Its `fc` and layers are what `recyclegpt.export` writes.
    """

    def __init__(self, base_cfg: ModelConfig, cfg: RecycleConfig) -> None:
        super().__init__()
        self.base_cfg, self.cfg = base_cfg, cfg
        d = base_cfg.d_model
        if cfg.taps and cfg.taps[-1] >= base_cfg.n_layer:
            raise ValueError(f"RecycleConfig.taps {cfg.taps} names a layer past the base's {base_cfg.n_layer}")
        if cfg.layout == "eagle3":
            if cfg.taps[-1] >= base_cfg.n_layer - 1:
                raise ValueError(f"the eagle3 layout cannot tap the base's last layer ({base_cfg.n_layer - 1}; taps "
                                 f"{cfg.taps}): EAGLE-3 engines read a layer's output as the next layer's input")
            self.fc = Linear(len(cfg.taps) * d, d, bias=False)
            self.layers = nn.ModuleList([Eagle3Block(base_cfg), *(Block(base_cfg) for _ in range(cfg.n_layer - 1))])
            init_weights(self, cfg.n_layer)
        else:
            self.norm_h = RMSNorm(d, base_cfg.norm_eps) if cfg.input_norm else nn.Identity()
            self.norm_e = RMSNorm(d, base_cfg.norm_eps) if cfg.input_norm else nn.Identity()
            self.fc = Linear(2 * d, d, bias=False)
            self.layers = nn.ModuleList(Block(base_cfg) for _ in range(cfg.n_layer))  # distinct instances
            if cfg.taps:
                self.tap_norms = nn.ModuleList(RMSNorm(d, base_cfg.norm_eps) for _ in cfg.taps)
                self.tap_fc = Linear(len(cfg.taps) * d, d, bias=False)
            init_weights(self, cfg.n_layer)
            if cfg.taps:
                nn.init.zeros_(self.tap_fc.weight)  # starts as the module without taps
        if cfg.draft_vocab:
            if cfg.draft_vocab > base_cfg.vocab_size:
                raise ValueError(f"RecycleConfig.draft_vocab {cfg.draft_vocab} exceeds the vocabulary "
                                 f"({base_cfg.vocab_size})")
            self.register_buffer("draft_ids", torch.arange(cfg.draft_vocab))  # saved with the weights

    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        p = self.fc.weight
        return KVCache(self.cfg.n_layer, batch, self.base_cfg.n_kv_head, max_len, self.base_cfg.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype)

    def fuse(self, hidden: torch.Tensor, taps: torch.Tensor, kernels: KernelConfig = KernelConfig()) -> torch.Tensor:
        """h_t (B, T, d) and the tapped layers' outputs (B, T, k*d) -> the state s_t (B, T, d). The eagle3 layout
        reads the taps alone: s_t = fc(taps)."""
        if self.cfg.layout == "eagle3":
            return self.fc(taps, kernels)
        parts = taps.split(self.base_cfg.d_model, dim=-1)
        return hidden + self.tap_fc(torch.cat([norm(t) for norm, t in zip(self.tap_norms, parts)], dim=-1), kernels)

    def forward(self, state: torch.Tensor, tok_emb: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, pad: torch.Tensor | None = None,
                kv_end: int | None = None, tree: Tree | None = None, outputs: int | None = None,
                tables: Tables | None = None, kernels: KernelConfig = KernelConfig()) -> torch.Tensor:
        """outputs: the output at the last `outputs` positions only (B, outputs, d), every position's keys and values
        still cached (`run_blocks`' keep); None: all. tables: as `Transformer.forward`'s. kernels: the fused kernels
        its blocks take (RecycleModel passes the base's)."""
        if self.cfg.layout == "eagle3":  # the first block (Eagle3Block) takes both halves
            x = torch.cat((state, tok_emb), dim=-1)
        else:
            x = self.fc(torch.cat((self.norm_h(state), self.norm_e(tok_emb)), dim=-1), kernels)
        return run_blocks(self.layers, x, self.base_cfg, input_pos=input_pos, cache=cache, pad=pad, kv_end=kv_end,
                          tree=tree, keep=outputs, tables=tables, kernels=kernels)[0]


# what `recycle` may take from the module (RecycleModel.recycle_vocab): the full head, or the draft vocabulary
RECYCLE_VOCABS = ("full", "draft")


class RecycleModel(nn.Module):
    """A base LM plus its recyclable module, which shares the base's embedding, final norm and LM head."""

    def __init__(self, base: Transformer, module: RecyclableModule) -> None:
        super().__init__()
        if module.base_cfg.d_model != base.cfg.d_model:
            raise ValueError(f"recyclable module width {module.base_cfg.d_model} does not match the base model's "
                             f"d_model {base.cfg.d_model}")
        self.base, self.module = base, module
        self.use_draft_vocab = True  # draft over the module's draft vocabulary, if it has one
        self.recycle_vocab = "full"  # `recycle`'s own tokens: over the full head, or its draft vocabulary ("draft")
        self.register_buffer("draft_weight", None, persistent=False)  # its LM head rows: refresh_draft_head
        self.register_module("draft_int8", None)  # their int8 form, where the LM head has one (quantize_int8_)
        self._draft_key: tuple | None = None  # what draft_weight was copied from

    @classmethod
    def build(cls, cfg: ModelConfig, rcfg: RecycleConfig) -> "RecycleModel":
        return cls(Transformer(cfg), RecyclableModule(cfg, rcfg))

    @property
    def kernels(self) -> KernelConfig:
        """Which fused kernels inference takes: the base's (`Transformer.kernels`), for the module's calls too (set
        it before decoding: captured graphs and compiled steps keep the paths they were made with)."""
        return self.base.kernels

    @kernels.setter
    def kernels(self, value: KernelConfig) -> None:
        self.base.kernels = value

    def refresh_draft_head(self) -> None:
        """Copy the LM head's rows of the draft vocabulary into `draft_weight` (None without one, or with
        use_draft_vocab off), and the rows of its int8 form into `draft_int8` (None where it has none). Decoding
        calls this before it drafts; in place when the shape holds, so that captured CUDA graphs stay valid."""
        ids = getattr(self.module, "draft_ids", None)
        if ids is None or not self.use_draft_vocab:
            self.draft_weight, self.draft_int8, self._draft_key = None, None, None
            return
        head, int8 = self.base.lm_head.weight, self.base.lm_head.int8
        key = (head.data_ptr(), head._version, head.dtype, ids.data_ptr(), ids._version,
               None if int8 is None else int8.values.data_ptr())
        if self.draft_weight is not None and key == self._draft_key:
            return  # still a copy of the current rows: nothing to redo
        rows = head.detach().index_select(0, ids.to(head.device))
        self._draft_key = key
        self.draft_weight = _in_place(self.draft_weight, rows)
        self.draft_int8 = None if int8 is None else int8.select(ids)

    def _draft_head(self, out: torch.Tensor) -> torch.Tensor:
        """The logits (..., N) of the draft vocabulary's N tokens from the module's output `out` (..., d)."""
        return linear(self.base.norm(out), self.draft_weight, self.kernels, self.draft_int8)

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """The module's logits (..., V) for drafting from its output `out`: over the draft vocabulary when
        `draft_weight` is set (every other token -inf, so it is never drafted and its draft probability is 0),
        else the full head."""
        if self.draft_weight is None:
            return self.base.head(out)
        small = self._draft_head(out)
        full = small.new_full((*small.shape[:-1], self.base.cfg.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.module.draft_ids, small)

    @property
    def recycle_vocab(self) -> str:
        """Which tokens the lossy `recycle` schedule may take from the module: "full" (the whole LM head, as the
        paper does) or "draft" (its draft vocabulary only: a head a third the size for one of every two tokens,
        and the module can no longer yield a token outside it; docs/engine.md has both sides of the trade). The
        lossless strategies are not affected: they draft over the draft vocabulary whenever `use_draft_vocab`."""
        return self._recycle_vocab

    @recycle_vocab.setter
    def recycle_vocab(self, value: str) -> None:
        if value not in RECYCLE_VOCABS:
            raise ValueError(f"recycle_vocab must be one of {', '.join(RECYCLE_VOCABS)}, got {value!r}")
        if value == "draft" and getattr(self.module, "draft_ids", None) is None:
            raise ValueError("recycle_vocab 'draft' needs a module with a draft vocabulary (RecycleConfig.draft_vocab;"
                             " scripts/draft_vocab.py adds one); this module has none")
        self._recycle_vocab = value

    @property
    def recycles_over_draft(self) -> bool:
        """`recycle` takes the module's tokens over the draft vocabulary (recycle_vocab "draft", and the draft
        head in use: `use_draft_vocab`)."""
        return self._recycle_vocab == "draft" and self.use_draft_vocab

    def draft_argmax(self, out: torch.Tensor) -> torch.Tensor:
        """The module's greedy token ids (...,) over the draft vocabulary from its output `out` (..., d), with
        `draft_weight` set: the index `draft_logits(out).argmax(-1)` gives, without the V-wide logits (the draft
        ids are sorted, so the first of equal maxima is the same token)."""
        return self.module.draft_ids[topk.argmax(self._draft_head(out), cuda_path=self.kernels.cuda_paths_on_cpu)]

    def module_argmax(self, out: torch.Tensor) -> torch.Tensor:
        """`recycle`'s greedy token ids (...,) from the module's output `out` (..., d): over the full head, or over
        the draft vocabulary when `recycles_over_draft` (then `draft_weight` must be set: refresh_draft_head). Every
        greedy recycle path takes its module tokens here, so they are the same whichever runs them."""
        if self.recycles_over_draft:
            return self.draft_argmax(out)
        return topk.argmax(self.base.head(out), cuda_path=self.kernels.cuda_paths_on_cpu)

    def draft_top(self, out: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely draft tokens from the module's output `out` (..., d): (log-probabilities (..., k) in
        float32, token ids (..., k)), most likely first. With a draft vocabulary the search runs over its N logits
        directly, not over V with the rest -inf as `draft_logits` gives them: the same values, with no V-wide fill
        and copy, and a third of the reductions (N = V/3 for the shipped module)."""
        w = self.base.lm_head.weight if self.draft_weight is None else self.draft_weight
        if use_draft_head_kernel(out, k, self.kernels):  # norm, head and a first selection in one kernel
            logp, ids = triton_draft_head.head_top_k(out, self.base.norm.weight, self.base.norm.eps, w, k)
        else:
            logits = self.base.head(out) if self.draft_weight is None else self._draft_head(out)
            values, ids = top_k(logits, k, cuda_path=self.kernels.cuda_paths_on_cpu)
            logp = values.float() - torch.logsumexp(logits.float(), -1, keepdim=True)
        return logp, (ids if self.draft_weight is None else self.module.draft_ids[ids])

    @property
    def taps(self) -> tuple[int, ...]:
        """The base layers the module reads besides the last: pass them to the base's forward (`taps=`)."""
        return self.module.cfg.taps

    def state(self, out: ModelOutput) -> torch.Tensor:
        """The state s_t (B, T, d) the module reads, from a base output computed with `taps=self.taps`."""
        h = self.base.norm(out.hidden) if self.module.cfg.hidden == "post_norm" else out.hidden
        if not self.taps:
            return h
        if out.taps is None:
            raise ValueError(f"this module reads base layers {self.taps}: call the base with taps=model.taps")
        return self.module.fuse(h, out.taps, self.kernels)

    def recycle(self, state: torch.Tensor, next_tokens: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, pad: torch.Tensor | None = None, kv_end: int | None = None,
                num_logits: int | None = None, tree: Tree | None = None, draft: bool = False,
                outputs: int | None = None, tables: Tables | None = None) -> ModelOutput:
        """state (B, T, d): s_t at positions t (`state`); next_tokens (B, T): x_{t+1}. draft: logits for drafting
        (`draft_logits`: over the draft vocabulary, if any) instead of the full head's. outputs: the module's output
        (and so `hidden`) at the last `outputs` positions only, at least num_logits; the module's last layer then
        runs its products on those rows alone, while its attention still caches every position (decoding, which
        reads the last output only); None: all. tables: the cached call's slots, rotary tables and mask
        (`call_tables`), e.g. those of the full call on the same slots.

        Returns logits for x_{t+2} and the module's output hidden. That output plays the role of s_{t+1} (both go
        through the head to predict x_{t+2}), so a multi-step drafter feeds it back as the next step's `state`, as
        it is (EAGLE-3 feeds its draft's output in place of the fused features the same way).
        """
        if outputs is not None and num_logits is not None and num_logits > outputs:
            raise ValueError(f"num_logits={num_logits} needs at least as many outputs, got outputs={outputs}")
        out = self.module(state, self.base.tok_emb(next_tokens), input_pos=input_pos, cache=cache, pad=pad,
                          kv_end=kv_end, tree=tree, outputs=outputs, tables=tables, kernels=self.base.kernels)
        last = out if num_logits is None else out[:, out.shape[1] - num_logits:]
        return ModelOutput(self.draft_logits(last) if draft else self.base.head(last), out)
