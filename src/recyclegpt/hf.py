"""Recycle decoding inside Hugging Face transformers' `generate`: `generate` here is a callable for its
`custom_generate` argument, so that a transformers causal LM decodes with a `RecyclableModule`:

    out = hf_model.generate(input_ids, max_new_tokens=64, custom_generate=recyclegpt.hf.generate, module=module)

transformers (5.x: `GenerationMixin.generate` in transformers/generation/utils.py) prepares the inputs, the
generation config, the logits processors and the stopping criteria as for its own decoding, then calls
`generate(model, input_ids, logits_processor=..., stopping_criteria=..., generation_config=..., **model_kwargs)`.
The callable's own keyword arguments (`module`, `strategy`, `draft_len`, ...: every parameter that transformers'
`_sample` does not have) are taken out of `generate`'s keyword arguments and passed on to it.

The HF model plays the base. Its pre-norm last hidden state h_t is read with a forward hook on the input of its
final norm (`model.model.norm`; the norm's output for a module trained on the post-norm state, and forward hooks on
the decoder layers the module taps, if any). The module keeps its own static `KVCache` (`module.new_cache`) and its
output goes through the HF model's final norm and LM head, as in `RecycleModel`.

Strategies (`strategy=`):
- "speculative" (default, lossless): the module drafts `draft_len` tokens in a chain, rolling on its own output
  state; the HF model verifies them in one call, with its own logits processors applied at every position, and the
  rejected tail is cropped from its cache. Greedy (`do_sample=False`): the accepted prefix plus the HF model's own
  token, so the output is token for token what transformers' greedy `generate` gives; sampling: the
  speculative-sampling rule (`decoding.verify.verify_chain`), so the output is distributed as transformers' sampling.
  A batch commits the same number of tokens on every row (the fewest any unfinished row accepted).
- "recycle-verified": "speculative" with one drafted token (the paper's schedule, the recycled token checked).
- "recycle" (lossy): the paper's schedule, as `decoding.loops.recycle`: each full call after the prompt runs on
  [x_p, x̂_{p+1}] and yields x_{p+2}; the module then yields x̂_{p+3}, unchecked. Two tokens per full call.

Tokens are appended one at a time and the stopping criteria checked after each, as transformers' `_sample` does,
so eos and max_length stop exactly where it stops, and rows that finished get the pad token.

transformers is optional: it is imported inside the functions, with a clear error when it is missing.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from .decoding.loops import DecodeStats
from .decoding.sampling import SamplingParams, draw
from .decoding.speculative import DEFAULT_DRAFT_LEN, check_draft_len
from .decoding.verify import accepted_prefix, verify_chain
from .models import KVCache, RecyclableModule

STRATEGIES = ("speculative", "recycle-verified", "recycle")
# model keyword arguments that transformers' generate prepares for a decoder-only LM and that this loop replaces
# with its own (the mask and positions of every call follow from the left padding; the cache is cropped here)
_HANDLED_MODEL_KWARGS = ("attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep")
# the sampling parameters under which verify_chain reads already-processed scores: softmax(scores), as `_sample` does
_PROCESSED = SamplingParams(temperature=1.0)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("recyclegpt.hf needs transformers: pip install transformers") from e
    return transformers


class _Capture:
    """Forward hooks on the HF model that record, during its full calls only (`armed`), what the module reads: the
    final norm's input (pre-norm h_t) or output (post-norm), and the outputs of the tapped decoder layers."""

    def __init__(self, model, module: RecyclableModule) -> None:
        inner = getattr(model, "model", None)
        norm = getattr(inner, "norm", None)
        if norm is None:
            raise ValueError(f"{type(model).__name__} has no final norm at model.model.norm: recycle decoding reads "
                             f"the base's last hidden state there (a LLaMA-family causal LM)")
        self.module, self.armed = module, False
        self.hidden: torch.Tensor | None = None
        self.taps: dict[int, torch.Tensor] = {}
        pre = module.cfg.hidden == "pre_norm"
        self.handles = [norm.register_forward_hook(
            lambda mod, args, out: self._keep("hidden", args[0] if pre else out))]
        layers = getattr(inner, "layers", None)
        for i in module.cfg.taps:
            if layers is None or i >= len(layers):
                raise ValueError(f"the module taps base layer {i}; {type(model).__name__} has "
                                 f"{0 if layers is None else len(layers)} decoder layers")
            self.handles.append(layers[i].register_forward_hook(
                lambda mod, args, out, i=i: self._keep(i, out[0] if isinstance(out, tuple) else out)))

    def _keep(self, key, value: torch.Tensor) -> None:
        if not self.armed:  # e.g. the module's own output going through the final norm
            return
        if key == "hidden":
            self.hidden = value
        else:
            self.taps[key] = value

    def state(self) -> torch.Tensor:
        """The module's input state s_t (B, T, d) for the positions of the last full call (RecycleModel.state)."""
        if self.hidden is None:
            raise RuntimeError("the final norm's hook saw no call: the model did not run its final norm")
        h = self.hidden
        if self.module.cfg.taps:
            h = self.module.fuse(h, torch.cat([self.taps[i] for i in self.module.cfg.taps], dim=-1))
        self.hidden, self.taps = None, {}
        return h

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Recycler:
    """One `generate` call: the HF model (`full`) and the module (`module_call`, `logits`, `draft_logits`) on their
    caches, the logits processors (`process`), and the emitted sequence with the stopping criteria (`emit`)."""

    def __init__(self, model, module: RecyclableModule, input_ids: torch.Tensor, logits_processor,
                 stopping_criteria, generation_config, model_kwargs: dict, draft_len: int, draft_vocab: bool,
                 generator: torch.Generator | None, stats: DecodeStats) -> None:
        transformers = _transformers()
        self.model, self.module, self.gc = model, module, generation_config
        self.lp, self.sc = logits_processor, stopping_criteria
        self.greedy = not generation_config.do_sample
        self.gen, self.stats = generator, stats
        self.device = input_ids.device
        B = input_ids.shape[0]
        self.pad = _left_padding(model_kwargs.get("attention_mask"), input_ids)
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("recycle decoding starts from an empty cache; a prefilled `cache` is not supported")
        if cache is None or not getattr(cache, "is_croppable", True):  # verification crops rejected drafts
            cache = transformers.DynamicCache(config=model.config)
        self.cache = cache
        p = module.fc.weight
        self.mdtype = p.dtype
        # module slots go up to the last position plus a chain of drafts
        self.mcache: KVCache = module.new_cache(B, generation_config.max_length + draft_len + 1, device=self.device,
                                                dtype=p.dtype)
        self.norm, self.head = model.model.norm, model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        ids = getattr(module, "draft_ids", None)
        self.draft_ids = ids.to(self.device) if ids is not None and draft_vocab else None
        if self.draft_ids is not None:  # the LM head's rows of the draft vocabulary, copied once per call
            self.draft_weight = self.head.weight.detach().index_select(0, self.draft_ids)
            bias = getattr(self.head, "bias", None)
            self.draft_bias = bias.detach().index_select(0, self.draft_ids) if bias is not None else None
        self.capture = _Capture(model, module)
        # the emitted sequence, as `_sample` builds it: finished rows get the pad token when eos can stop them
        self.ids = input_ids
        self.unfinished = torch.ones(B, dtype=torch.bool, device=self.device)
        self.eos_stops = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        self.pad_token = generation_config._pad_token_tensor
        if self.eos_stops and self.pad_token is None:
            raise ValueError("an eos stopping criterion needs a pad_token_id for the rows that finish first")
        self.want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
        self.want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
        self.scores: tuple[torch.Tensor, ...] = ()
        self.raw_logits: tuple[torch.Tensor, ...] = ()

    # -- the two models ------------------------------------------------------------------------------------------

    def full(self, tokens: torch.Tensor, start: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The HF model on `tokens` (B, n) at slots start..start+n-1, its cache holding slots 0..start-1. Returns its
        logits at the last `keep` positions (B, keep, V) in float32 and the module's input state at all n (B, n, d)."""
        n = tokens.shape[1]
        slots = torch.arange(start, start + n, device=self.device)
        if self.pad is None:  # no padding: no mask, as transformers' generate drops an all-ones mask
            mask, positions = None, slots[None]
        else:  # left padding: a row's positions count from its first token (`_prepare_position_ids_for_generation`)
            mask = (torch.arange(start + n, device=self.device)[None] >= self.pad[:, None]).long()
            positions = (slots[None] - self.pad[:, None]).clamp(min=0)
        self.capture.armed = True
        try:
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self.cache,
                             use_cache=True, logits_to_keep=keep)
        finally:
            self.capture.armed = False
        self.stats.full_calls += 1
        return out.logits.float(), self.capture.state()

    def module_call(self, state: torch.Tensor, next_tokens: torch.Tensor, start: int) -> torch.Tensor:
        """The module on (s_t, x_{t+1}) at slots t = start..start+n-1 (state (B, n, d), next_tokens (B, n)); every
        slot goes to its cache. Returns its output at the last slot (B, 1, d), which predicts x_{start+n+1}."""
        n = next_tokens.shape[1]
        out = self.module(state.to(self.mdtype), self.embed(next_tokens).to(self.mdtype),
                          input_pos=torch.arange(start, start + n, device=self.device), cache=self.mcache,
                          pad=self.pad, kv_end=start + n, outputs=1)
        self.stats.module_calls += 1
        return out.to(self.norm.weight.dtype)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """The module's output (B, 1, d) through the HF model's final norm and LM head: logits (B, V) in float32."""
        return self.head(self.norm(out))[:, -1].float()

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """As `logits`, over the module's draft vocabulary when it has one (every other token -inf: never drafted,
        draft probability 0), as `RecycleModel.draft_logits`."""
        if self.draft_ids is None:
            return self.logits(out)
        small = F.linear(self.norm(out)[:, -1], self.draft_weight, self.draft_bias).float()
        full = small.new_full((small.shape[0], self.head.weight.shape[0]), float("-inf"))
        return full.index_copy_(-1, self.draft_ids, small)

    # -- tokens --------------------------------------------------------------------------------------------------

    def process(self, logits: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
        """The logits processors on logits (B, n, V) whose position j follows the emitted sequence and then
        after[:, :j] (B, >= n-1): the scores (B, n, V) that `_sample` would compute after those prefixes."""
        if len(self.lp) == 0:
            return logits
        return torch.stack([self.process_next(logits[:, j], None if after is None else after[:, :j])
                            for j in range(logits.shape[1])], dim=1)

    def process_next(self, logits: torch.Tensor, after: torch.Tensor | None) -> torch.Tensor:
        """The logits processors on logits (B, V) for the token after the emitted sequence and then `after` (B, j)."""
        if len(self.lp) == 0:
            return logits
        prefix = self.ids if after is None or after.shape[1] == 0 else torch.cat((self.ids, after), dim=1)
        return self.lp(prefix, logits.clone())

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) scores -> (B,) tokens: the argmax when greedy, else a draw from softmax(scores)."""
        return scores.argmax(-1) if self.greedy else draw(scores.softmax(-1), self.gen)

    def emit(self, tokens: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor) -> bool:
        """Append tokens (B, n) one at a time (scores, logits (B, n, V) for the outputs), checking the stopping
        criteria after each as `_sample` does. Returns True when every row has finished (later tokens dropped)."""
        for j in range(tokens.shape[1]):
            token = tokens[:, j]
            if self.eos_stops:
                token = torch.where(self.unfinished, token, self.pad_token)
            self.ids = torch.cat((self.ids, token[:, None]), dim=1)
            self.stats.new_tokens += int(self.unfinished.sum())
            if self.want_scores:
                self.scores += (scores[:, j],)
            if self.want_logits:
                self.raw_logits += (logits[:, j],)
            self.unfinished &= ~self.sc(self.ids, self.scores if self.want_scores else None)
            if not bool(self.unfinished.any()):  # the host sync of each token, as `_sample`'s stop check
                return True
        return False

    # -- strategies ----------------------------------------------------------------------------------------------

    def speculative(self, draft_len: int, min_draft_prob: float) -> None:
        """Chains of up to draft_len drafts verified by the HF model (decoding.speculative.chain's round, with the HF
        model's cache cropped to the committed tokens after each verification)."""
        self.stats.accept_hist = [0] * (draft_len + 1)
        prompt = self.ids
        L = prompt.shape[1]
        logits, state = self.full(prompt, 0, keep=1)
        scores = self.process(logits)
        pending = self.select(scores[:, -1])  # x_L
        if self.emit(pending[:, None], scores, logits):
            return
        # the module's catch-up inputs: (h_t, x_{t+1}) at slots start..p-1, p the pending token's slot
        p, start, next_tokens = L, 0, torch.cat((prompt[:, 1:], pending[:, None]), dim=1)
        while True:
            # 1. catch-up on the newly committed slots; its output drafts x_{p+1}
            out = self.module_call(state, next_tokens, start)
            # 2. draft up to k tokens, each step rolling the module on its own output at slot p + j
            k = min(draft_len, self.gc.max_length - self.ids.shape[1] - 1)  # no draft past the token budget
            drafts, probs = [], []
            for j in range(k):
                draft_scores = self.process_next(self.draft_logits(out), torch.stack(drafts, 1) if drafts else None)
                q = None if self.greedy else draft_scores.softmax(-1)
                # adaptive length: stop where the module's most likely token is unlikely on every row (reads q only)
                if min_draft_prob > 0.0 and float((q if q is not None else draft_scores.softmax(-1))
                                                  .amax(-1).max()) < min_draft_prob:
                    break
                drafts.append(draft_scores.argmax(-1) if q is None else draw(q, self.gen))
                probs.append(q)
                if j < k - 1:
                    out = self.module_call(out, drafts[-1][:, None], p + j)
            draft = torch.stack(drafts, 1) if drafts else pending.new_empty((pending.shape[0], 0))
            n = draft.shape[1]
            # 3. verify [x_p, drafts] in one call: the HF model's logits at each, processed with its prefix
            logits, verified_state = self.full(torch.cat((pending[:, None], draft), dim=1), p, keep=n + 1)
            scores = self.process(logits, draft)
            if self.greedy:
                tokens = scores.argmax(-1)  # (B, n+1): the HF model's own token at each position
                accepted = accepted_prefix(draft == tokens[:, :n])
            else:
                accepted, tokens = verify_chain(draft, torch.stack(probs, 1) if probs else None, scores, _PROCESSED,
                                                self.gen)
            # 4. commit the same number on every row: the fewest that an unfinished row accepted
            m = int(accepted.masked_fill(~self.unfinished, n).min())
            self.stats.accept_hist[m] += 1
            self.cache.crop(-(n - m))  # keep x_p and the m accepted drafts
            if self.emit(tokens[:, :m + 1], scores, logits):
                return
            start, p = p, p + m + 1
            state, next_tokens, pending = verified_state[:, :m + 1], tokens[:, :m + 1], tokens[:, m]

    def recycle(self) -> None:
        """The paper's lossy schedule (decoding.loops.recycle): full call on [x_p, x̂_{p+1}] -> x_{p+2}; the module
        on the same two slots -> x̂_{p+3}; p += 2."""
        prompt = self.ids
        L = prompt.shape[1]
        logits, state = self.full(prompt, 0, keep=1)
        scores = self.process(logits)
        x_next = self.select(scores[:, -1])  # x_L
        if self.emit(x_next[:, None], scores, logits):
            return
        out = self.module_call(state, torch.cat((prompt[:, 1:], x_next[:, None]), dim=1), 0)
        logits = self.logits(out)[:, None]
        scores = self.process(logits)
        x_rec = self.select(scores[:, -1])  # x̂_{L+1}
        if self.emit(x_rec[:, None], scores, logits):
            return
        p = L
        while True:
            logits, state = self.full(torch.stack((x_next, x_rec), dim=1), p, keep=1)
            scores = self.process(logits)
            x_next = self.select(scores[:, -1])  # x_{p+2}
            if self.emit(x_next[:, None], scores, logits):
                return
            out = self.module_call(state, torch.stack((x_rec, x_next), dim=1), p)
            logits = self.logits(out)[:, None]
            scores = self.process(logits)
            x_rec = self.select(scores[:, -1])  # x̂_{p+3}
            p += 2
            if self.emit(x_rec[:, None], scores, logits):
                return


def _left_padding(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Each row's left padding (B,) from a 2D attention mask (None: no padding); a clear error for any other mask."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"the attention mask {tuple(attention_mask.shape)} does not match the input ids "
                         f"{tuple(input_ids.shape)}")
    L = input_ids.shape[1]
    pad = L - attention_mask.long().sum(1)
    left = torch.arange(L, device=attention_mask.device)[None] >= pad[:, None]
    if not torch.equal(attention_mask.bool(), left):
        raise ValueError("recycle decoding needs left padding (a mask of zeros, then ones, per row); "
                         "set tokenizer.padding_side = 'left'")
    if bool((pad >= L).any()):
        raise ValueError("a row of the batch has no tokens (its attention mask is all zeros)")
    return pad if bool(pad.any()) else None


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None, generation_config=None,
             module: RecyclableModule | None = None, strategy: str = "speculative",
             draft_len: int = DEFAULT_DRAFT_LEN, min_draft_prob: float = 0.0, draft_vocab: bool = True,
             generator: torch.Generator | None = None, stats: DecodeStats | None = None, **model_kwargs: Any):
    """Decode with a recyclable module inside transformers' `generate`: pass this function as `custom_generate` and
    the module (and the options below) as keyword arguments of `model.generate`.

    module: the `RecyclableModule` trained for this base (e.g. `recyclegpt.loading.load(...).module`), on the
        model's device; its width must be the model's hidden size.
    strategy: "speculative" (lossless, the default), "recycle-verified" (lossless, one draft a call) or "recycle"
        (the paper's lossy schedule).
    draft_len: drafts per verification ("speculative"). min_draft_prob: stop a chain where the module's most likely
        token has a draft probability below this on every row (0: always draft `draft_len`).
    draft_vocab: draft over the module's draft vocabulary, if it has one ("speculative" and "recycle-verified";
        "recycle" takes the module's tokens over the full head, as the project's `recycle` does by default).
    generator: the torch.Generator for sampling (None: torch's global generator, so `torch.manual_seed` before
        `generate` makes a sampled output reproducible).
    stats: a `DecodeStats` to fill with the full and module calls, the new tokens (of unfinished rows), the
        seconds and, for the lossless strategies, the histogram of accepted drafts (`accept_hist`, `tau`).

    Greedy (`do_sample=False`) or sampling (`do_sample=True`, with the usual temperature/top-k/top-p processors);
    beam search is not supported. Returns the sequences (B, L + new) as transformers' greedy and sampling
    `generate` do, or a `GenerateDecoderOnlyOutput` with them (and `scores`, `logits` when asked for) under
    `return_dict_in_generate=True`.
    """
    transformers = _transformers()
    if module is None:
        raise ValueError("recyclegpt.hf.generate needs the recyclable module: model.generate(..., "
                         "custom_generate=recyclegpt.hf.generate, module=module)")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    draft_len = 1 if strategy == "recycle-verified" else check_draft_len(draft_len)
    if not 0.0 <= min_draft_prob < 1.0:
        raise ValueError(f"min_draft_prob must be in [0, 1), got {min_draft_prob!r}")
    if model.config.is_encoder_decoder:
        raise ValueError("recycle decoding runs decoder-only causal LMs")
    gc = generation_config if generation_config is not None else model.generation_config
    if getattr(gc, "num_beams", 1) > 1:
        raise ValueError("recycle decoding does not do beam search (num_beams must be 1)")
    if module.base_cfg.d_model != model.config.hidden_size:
        raise ValueError(f"the module is {module.base_cfg.d_model} wide, the model's hidden size is "
                         f"{model.config.hidden_size}: it was trained for another base")
    if module.fc.weight.device != input_ids.device:
        raise ValueError(f"the module is on {module.fc.weight.device}, the inputs on {input_ids.device}: "
                         f"move it with module.to(model.device)")
    unknown = sorted(k for k, v in model_kwargs.items() if k not in _HANDLED_MODEL_KWARGS and v is not None)
    if unknown:
        raise ValueError(f"recycle decoding does not pass these model arguments on: {', '.join(unknown)}")
    stats = stats if stats is not None else DecodeStats(strategy)
    run = _Recycler(model, module, input_ids, logits_processor or transformers.LogitsProcessorList(),
                    stopping_criteria or transformers.StoppingCriteriaList(), gc, model_kwargs, draft_len,
                    draft_vocab, generator, stats)
    t0 = time.perf_counter()
    try:
        if strategy == "recycle":
            run.recycle()
        else:
            run.speculative(draft_len, min_draft_prob)
    finally:
        run.capture.remove()
    stats.seconds = time.perf_counter() - t0
    if gc.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=run.ids, scores=run.scores if run.want_scores else None,
                                         logits=run.raw_logits if run.want_logits else None, cache=run.cache)
    return run.ids
