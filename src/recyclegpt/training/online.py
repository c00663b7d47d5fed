"""Online distillation of the recyclable module: the frozen base writes its own continuations, the module learns
the base's next-step distribution on them, in one process.

The loop alternates two halves. *Generation*: every `steps_per_round` optimizer steps (a round) the base decodes
`gen_batch` prompts with the project's engine (`RecycleGPT.generate`: batched, continuous batching for the greedy
rows on an engine), a `greedy_share` of them greedily and the rest sampled at `temperature`; a `text_share` of the
prompts are natural-text prefixes cut from text files, the rest instruction prompts (chat-templated when the
tokenizer has a template). The sequences (prompt + continuation) enter a rolling buffer of at most `buffer`
sequences, the oldest leaving first. *Training*: each step draws `batch_size` sequences from the buffer and
minimises L_rec (`objectives.recycle_losses`, target `distill` by default): one forward of the frozen base over
prompt + continuation yields h_t and the teacher logits, and the module's prediction for x_{t+2} is scored by
KL(p_base || q_module) at every continuation position.

Every random choice is a pure function of (seed, round) or (seed, step): the prompts of round r, which rows are
greedy, the sampling seed and the training batches. The checkpoint (`save_checkpoint`, atomic) holds the module,
AdamW's state and the stream's state (trainer_state.json: the step, the rounds generated, the instruction prompts
consumed, the token counters, the buffer's sequences, the fixed validation continuations and the torch RNG
states), so a resumed run continues exactly: on the CPU it ends bit-identical to an uninterrupted one.

Validation is a fixed stream of held-out prompts (the tail of the prompt files, prefixes from the tail of the text)
with the base's greedy continuations, computed once and kept in the checkpoint: `val_kl` (the distillation loss),
`val_agree` (the module's top-1 against the base's greedy next-next token at every position) and `alpha`
(`evals.quality.evaluate_agreement` under the recycle schedule, the α that decoding sees).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import ConfigError, RecycleConfig, _from_dict
from ..loading.checkpoint import load_trainer_state, save_checkpoint
from ..loading.tokenizer import Tokenizer
from ..models import RecycleModel, Transformer
from .data import DataError, read_prompts, tokenize_files
from .train import (
    _RESUMABLE_CHANGES,
    TrainConfig,
    _autocast,
    _check_out_dir,
    _objective,
    check_frozen_base_dtype,
    lr_at,
    make_optimizer,
    optimizer_step,
    module_on_frozen_base,
)

# fields of OnlineConfig that a resumed run may change (with those of TrainConfig in train._RESUMABLE_CHANGES)
_ONLINE_RESUMABLE = frozenset({"deadline", "gen_rows", "engine"})
# log fields that depend on the clock or the allocator (everything else repeats exactly on the CPU)
CLOCK_FIELDS = frozenset({"elapsed_s", "gen_s", "train_s", "eval_s", "gen_tok_s", "train_tok_s", "gen_share",
                          "mem_gib", "peak_mem_gib", "reserved_gib"})


@dataclass(frozen=True)
class OnlineConfig:
    """The online half of a run (TrainConfig holds the optimiser, schedule, steps, checkpoints and logging)."""

    gen_batch: int = 256  # prompts decoded per round
    gen_rows: int = 0  # rows decoded at once (0: gen_batch)
    steps_per_round: int = 0  # optimizer steps per round (0: gen_batch / batch_size, each sequence seen about once)
    buffer: int = 512  # sequences kept; the oldest leave first
    max_new_tokens: int = 256  # per continuation
    max_prompt_tokens: int = 512  # longer instruction prompts are skipped
    temperature: float = 1.0  # of the sampled rows
    top_p: float = 1.0  # of the sampled rows
    greedy_share: float = 0.25  # the share of each round's rows decoded greedily
    text_share: float = 0.5  # the share of prompts cut from the text files (the rest: instruction prompts)
    prefix_min: int = 16  # natural-text prefixes have prefix_min..prefix_max tokens
    prefix_max: int = 256
    chat: bool = True  # chat-template the instruction prompts (when the tokenizer has a template)
    val_prompts: int = 32  # held-out prompts of the validation stream (text prefixes in text_share of them)
    val_new_tokens: int = 64  # the base's greedy continuation of each validation prompt
    deadline: float = 0.0  # seconds after which this run saves and ends (0: none)
    engine: str = "auto"  # the decode loop (api.ENGINES)

    def __post_init__(self) -> None:
        for name in ("gen_batch", "buffer", "max_new_tokens", "max_prompt_tokens", "prefix_min", "prefix_max",
                     "val_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("gen_rows", "steps_per_round", "val_prompts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if self.buffer < self.gen_batch:
            raise ConfigError(f"--buffer {self.buffer} must hold at least one round (--gen-batch {self.gen_batch})")
        if self.prefix_min > self.prefix_max:
            raise ConfigError(f"--prefix-min {self.prefix_min} exceeds --prefix-max {self.prefix_max}")
        if self.prefix_max > self.max_prompt_tokens:
            raise ConfigError(f"--prefix-max {self.prefix_max} exceeds --max-prompt-tokens {self.max_prompt_tokens}")
        for name in ("greedy_share", "text_share"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {v!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.deadline) and self.deadline >= 0):
            raise ConfigError(f"--deadline must be a number of seconds >= 0 (0: none), got {self.deadline}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OnlineConfig":
        return _from_dict(cls, d)


@dataclass
class PromptSource:
    """Where prompts come from: instruction prompts (token ids, chat-templated) and a token stream of natural text,
    each split into a training part and a held-out part for validation."""

    prompts: list[list[int]]
    val_prompts: list[list[int]]
    text: np.ndarray | None
    val_text: np.ndarray | None

    @staticmethod
    def check(ocfg: OnlineConfig, prompt_files: Sequence[str | Path], text_files: Sequence[str | Path]) -> None:
        """That the files given are what --text-share asks for."""
        if not prompt_files and not text_files:
            raise DataError("give instruction prompt files (--prompts), text files (--text), or both")
        if not prompt_files and ocfg.text_share < 1:
            raise DataError(f"--text-share {ocfg.text_share} asks for instruction prompts: give --prompts files, "
                            f"or --text-share 1")
        if not text_files and ocfg.text_share > 0:
            raise DataError(f"--text-share {ocfg.text_share} asks for text prefixes: give --text files, or "
                            f"--text-share 0")

    @classmethod
    def build(cls, tokenizer: Tokenizer, ocfg: OnlineConfig, *, prompt_files: Sequence[str | Path],
              text_files: Sequence[str | Path], val_fraction: float, token_cache: str | None = None,
              ) -> "PromptSource":
        cls.check(ocfg, prompt_files, text_files)
        n_val_text = round(ocfg.val_prompts * ocfg.text_share)
        n_val_prompts = ocfg.val_prompts - n_val_text
        prompts: list[list[int]] = []
        if prompt_files:
            chat = ocfg.chat and tokenizer.chat_template is not None
            for f in prompt_files:
                for p in read_prompts(f):
                    text = tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p
                    ids = tokenizer.encode(text)
                    if 0 < len(ids) <= ocfg.max_prompt_tokens:
                        prompts.append(ids)
            if len(prompts) <= n_val_prompts:
                raise DataError(f"{len(prompts)} instruction prompt(s) of at most --max-prompt-tokens "
                                f"{ocfg.max_prompt_tokens} tokens: too few to hold out {n_val_prompts} for "
                                f"validation and train on the rest")
        text = val_text = None
        if text_files:
            stream = tokenize_files(text_files, tokenizer, cache_dir=token_cache).astype(np.int64)
            n_val = max(int(len(stream) * val_fraction), ocfg.prefix_max + 1) if n_val_text else 0
            if len(stream) - n_val < ocfg.prefix_max + 1:
                raise DataError(f"the text files hold {len(stream)} tokens: too few for prefixes of up to "
                                f"--prefix-max {ocfg.prefix_max} tokens (and a held-out tail of {n_val})")
            text, val_text = stream[:len(stream) - n_val], stream[len(stream) - n_val:]
        cut = len(prompts) - n_val_prompts
        source = cls(prompts[:cut], prompts[cut:], text, val_text)
        source._n_val_text = n_val_text
        return source

    def validation(self, ocfg: OnlineConfig) -> list[list[int]]:
        """The fixed validation prompts: the held-out instruction prompts, then prefixes spread evenly over the
        held-out text."""
        out = list(self.val_prompts)
        n = getattr(self, "_n_val_text", 0)
        if n and self.val_text is not None:
            length = min((ocfg.prefix_min + ocfg.prefix_max) // 2, len(self.val_text))
            for s in np.linspace(0, len(self.val_text) - length, n).astype(int):
                out.append(self.val_text[s:s + length].tolist())
        return out

    def round_prompts(self, ocfg: OnlineConfig, seed: int, rnd: int, consumed: int,
                      ) -> tuple[list[list[int]], list[bool], int]:
        """Round `rnd`'s prompts, which of them are decoded greedily, and the instruction prompts consumed after it;
        a pure function of (seed, rnd, consumed). Instruction prompts are visited in a permutation of each epoch."""
        rng = np.random.default_rng([seed, 1, rnd])
        out, greedy = [], []
        for _ in range(ocfg.gen_batch):
            use_text = self.text is not None and (not self.prompts or rng.random() < ocfg.text_share)
            if use_text:
                length = int(rng.integers(ocfg.prefix_min, ocfg.prefix_max + 1))
                start = int(rng.integers(0, len(self.text) - length + 1))
                out.append(self.text[start:start + length].tolist())
            else:
                epoch, i = divmod(consumed, len(self.prompts))
                perm = np.random.default_rng([seed, 2, epoch]).permutation(len(self.prompts))
                out.append(list(self.prompts[int(perm[i])]))
                consumed += 1
            greedy.append(bool(rng.random() < ocfg.greedy_share) or ocfg.temperature == 0)
        return out, greedy, consumed


def _generate(lm, prompts: list[list[int]], greedy: list[bool], ocfg: OnlineConfig, seed: int,
              max_new_tokens: int | None = None) -> list[list[int]]:
    """The base's continuation of each prompt (in order), by continuous batching on an engine (the static one on the
    CPU): greedy and sampled rows in one batch, the sampled ones drawing together (one draw a step) from torch's
    generator seeded `seed * 1_000_003`. The batch has at most gen_rows rows and the cache length that the longest
    allowed prompt needs, so that every round reuses the engine's Decoders and captured graphs. The new tokens stop
    before an end-of-sequence token."""
    from ..decoding.batching import continuous_decode
    from ..decoding.engine import Plan, round_up
    from ..decoding.sampling import SamplingParams

    kind = lm.resolve_engine(ocfg.engine)
    engine = lm.engine("static" if kind == "eager" else kind)
    rows = ocfg.gen_rows or ocfg.gen_batch
    longest_new = max(ocfg.max_new_tokens, ocfg.val_new_tokens)
    max_len = min(round_up(ocfg.max_prompt_tokens + longest_new + Plan.make("standard").span + 2, engine.bucket),
                  lm.base.cfg.context_length)
    stop_ids = lm.tokenizer.eos_ids if lm.tokenizer is not None else ()
    sampled = SamplingParams(temperature=ocfg.temperature, top_p=ocfg.top_p if ocfg.top_p < 1 else None)
    torch.manual_seed(seed * 1_000_003)
    res = continuous_decode(engine, "standard", prompts, max_new_tokens=max_new_tokens or ocfg.max_new_tokens,
                            max_rows=rows, stop_ids=stop_ids, max_len=max_len,
                            row_sampling=[SamplingParams() if g else sampled for g in greedy],
                            prefill_chunk=None)  # no stream waits on these rows: whole prefills cost least
    return [list(toks) for toks in res.tokens]


SORT_BATCHES = 8  # batches whose sequences are drawn together and sorted by length (less padding)


def round_batches(lengths: Sequence[int], seed: int, rnd: int, n_batches: int, batch_size: int
                  ) -> list[np.ndarray]:
    """Round `rnd`'s `n_batches` batches of buffer indices: the buffer in a random order (again as often as the round
    needs), cut into groups of SORT_BATCHES batches, each group sorted by sequence length and split into batches,
    the batches then shuffled. Every sequence is drawn about equally often, and a batch holds sequences of similar
    lengths, so that little of it is padding (random batches of the base's continuations are ~43% padding)."""
    rng = np.random.default_rng([seed, 3, rnd])
    size = min(batch_size, len(lengths))
    need = n_batches * size
    order = np.concatenate([rng.permutation(len(lengths)) for _ in range(-(-need // len(lengths)))])[:need]
    lengths = np.asarray(lengths)
    batches = []
    for g in range(0, need, SORT_BATCHES * size):
        group = order[g:g + SORT_BATCHES * size]
        group = group[np.argsort(lengths[group], kind="stable")]
        batches += [group[b:b + size] for b in range(0, len(group), size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _batch(seqs: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the target mask: the continuation tokens (positions >= the prompt length)."""
    T = max(len(s) for _, s in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (L, s) in enumerate(seqs):
        idx[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, L:len(s)] = True
    return idx, mask


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def _memory(device: torch.device) -> dict[str, float]:
    """On CUDA, the GiB that tensors hold now, at most since the last record, and that the allocator reserves: a run
    whose memory grows round after round shows it here long before it runs out."""
    if device.type != "cuda":
        return {}
    gib = 2 ** 30
    out = {"mem_gib": round(torch.cuda.memory_allocated(device) / gib, 2),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / gib, 2),
           "reserved_gib": round(torch.cuda.memory_reserved(device) / gib, 2)}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def online_retrofit(*, cfg: TrainConfig, ocfg: OnlineConfig, base: Transformer, tokenizer: Tokenizer,
                    rcfg: RecycleConfig, out_dir: str | Path, base_ref: str,
                    prompt_files: Sequence[str | Path] = (), text_files: Sequence[str | Path] = (),
                    resume: bool = False, stop_at_step: int | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> tuple[RecycleModel, list[dict[str, Any]]]:
    """Distil a recyclable module online over a frozen `base` (already on cfg.device, any dtype) into out_dir.

    The run ends at cfg.steps, or earlier at ocfg.deadline seconds or after step `stop_at_step`, always with a
    checkpoint; `resume` continues the run checkpointed in out_dir. Returns the model and the log records (also
    written as JSON lines to the log file). TrainConfig's seq_len, val_fraction (used for the held-out text tail),
    eval_batches and lam are the only fields with other meanings or none here.
    """
    from ..api import EngineOptions, RecycleGPT
    from ..evals.quality import evaluate_agreement

    t_start = clock()
    device, out_dir = torch.device(cfg.device), Path(out_dir)
    PromptSource.check(ocfg, prompt_files, text_files)
    _check_out_dir(out_dir, resume)
    if ocfg.max_prompt_tokens + ocfg.max_new_tokens > base.cfg.context_length:
        raise ConfigError(f"--max-prompt-tokens {ocfg.max_prompt_tokens} + --max-new-tokens {ocfg.max_new_tokens} "
                          f"exceed the base's context of {base.cfg.context_length} tokens")
    check_frozen_base_dtype(cfg, base)
    source = PromptSource.build(tokenizer, ocfg, prompt_files=prompt_files, text_files=text_files,
                                val_fraction=cfg.val_fraction, token_cache=cfg.token_cache)
    module = module_on_frozen_base(cfg, base, rcfg, out_dir, resume)
    model = RecycleModel(base, module)
    # the base alone decodes; its engine keeps the Decoders of every row count a round passes through (the
    # batches grow to a round's rows and shrink as they drain, the prefills take one and eight rows)
    gen_lm = RecycleGPT(base, tokenizer, name=base_ref, engine_options=EngineOptions(max_decoders=16))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    steps_per_round = ocfg.steps_per_round or max(1, ocfg.gen_batch // cfg.batch_size)
    config = {"train": cfg.to_dict(), "online": ocfg.to_dict(),
              "prompts": [str(p) for p in prompt_files], "text": [str(p) for p in text_files]}

    step, rounds, consumed, tok_gen, tok_train, elapsed = 0, 0, 0, 0, 0, 0.0
    metrics: list[dict[str, Any]] = []
    buffer: collections.deque[tuple[int, list[int]]] = collections.deque(maxlen=ocfg.buffer)
    val: list[tuple[int, list[int]]] | None = None
    log_sums: dict[str, float] = {}  # training metrics summed since the last train record, and over how many
    log_n = 0
    if resume:
        state = load_trainer_state(out_dir, opt)
        saved = state["config"]
        changed = sorted([f"train.{k}" for k, v in saved["train"].items()
                          if k not in _RESUMABLE_CHANGES and cfg.to_dict().get(k) != v]
                         + [f"online.{k}" for k, v in saved["online"].items()
                            if k not in _ONLINE_RESUMABLE and ocfg.to_dict().get(k) != v]
                         + [k for k in ("prompts", "text") if saved[k] != config[k]])
        if changed:
            raise ConfigError(f"cannot resume {out_dir} with a different {', '.join(changed)} than was saved")
        step, metrics, elapsed = state["step"], state["metrics"], state["elapsed_s"]
        s = state["stream"]
        rounds, consumed, tok_gen, tok_train = s["rounds"], s["consumed"], s["tokens_generated"], s["tokens_trained"]
        buffer.extend((L, seq) for L, seq in s["buffer"])
        val = [(L, seq) for L, seq in s["val"]]
        _set_rng_state(s["rng"], device)
        log_sums, log_n = s["log_sums"], s["log_n"]
    log_path = Path(cfg.log_file) if cfg.log_file else out_dir / "metrics.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))  # a resumed log restarts at its checkpoint

    def record(entry: dict[str, Any]) -> None:
        metrics.append(entry)
        with open(log_path, "a") as f:  # opened per record: a checkpoint save may swap the directory under it
            f.write(json.dumps(entry) + "\n")

    times = {"gen_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    run_gen, run_train = 0, 0  # this run's tokens, for its throughput

    def now() -> float:
        return round(elapsed + clock() - t_start, 2)

    if val is None:  # the fixed validation stream: held-out prompts and the base's greedy continuations
        t = clock()
        vp = source.validation(ocfg)
        conts = _generate(gen_lm, vp, [True] * len(vp), ocfg, cfg.seed, max_new_tokens=ocfg.val_new_tokens)
        val = [(len(p), p + c) for p, c in zip(vp, conts) if len(c) >= 2]
        times["eval_s"] += clock() - t

    def evaluate() -> dict[str, float]:
        t = clock()
        if not val:
            return {}
        module.eval()
        sums = {"rec": 0.0, "rec_agree": 0.0, "n": 0.0}
        with torch.no_grad():
            for s in range(0, len(val), cfg.batch_size):
                idx, mask = _batch(val[s:s + cfg.batch_size])
                with _autocast(cfg, device):
                    out = _objective(model, idx.to(device), mask.to(device), cfg, False)
                n = out["rec_tokens"].item()
                sums["rec"] += out["rec"].item() * n
                sums["rec_agree"] += out["rec_agree"].item() * n
                sums["n"] += n
            with _autocast(cfg, device):
                alpha = evaluate_agreement(RecycleGPT(base, tokenizer, module=module),
                                           [seq[:L] for L, seq in val], max_new_tokens=ocfg.val_new_tokens,
                                           continuations=[seq[L:] for L, seq in val], batch_size=cfg.batch_size)
        module.train()
        times["eval_s"] += clock() - t
        n = max(sums["n"], 1.0)
        return {"val_kl" if cfg.target == "distill" else "val_rec": sums["rec"] / n,
                "val_agree": sums["rec_agree"] / n, "alpha": alpha["alpha"], "alpha_n": alpha["n"]}

    def save() -> None:
        last_eval = next((m for m in reversed(metrics) if m["split"] == "val"), None)
        stream = {"rounds": rounds, "consumed": consumed, "tokens_generated": tok_gen, "tokens_trained": tok_train,
                  "buffer": [[L, seq] for L, seq in buffer], "val": [[L, seq] for L, seq in val],
                  "rng": _rng_state(device), "log_sums": {k: v.item() for k, v in sums.items()}, "log_n": n_summed}
        save_checkpoint(out_dir, model, base_ref=base_ref, tokenizer=None, train_config=config, metrics=last_eval,
                        optimizer=opt, trainer_state={"step": step, "config": config, "elapsed_s": now(),
                                                      "metrics": metrics, "stream": stream})

    def split() -> dict[str, float]:
        total = max(sum(times.values()), 1e-9)
        return {"gen_tok_s": round(run_gen / max(times["gen_s"], 1e-9), 1),
                "train_tok_s": round(run_train / max(times["train_s"], 1e-9), 1),
                "gen_share": round(times["gen_s"] / total, 3), **{k: round(v, 2) for k, v in times.items()}}

    if step == 0:
        record({"split": "val", "step": 0, **evaluate(), "elapsed_s": now()})
    module.train()
    bar = tqdm(total=cfg.steps, initial=step, file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True)
    # kept on the device between records; float32 values restored exactly from a checkpoint's JSON
    sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in log_sums.items()}
    n_summed, reason = log_n, "steps"
    plan: tuple[int, list[np.ndarray]] | None = None
    while step < cfg.steps:
        if ocfg.deadline and clock() - t_start >= ocfg.deadline:
            reason = "deadline"
            break
        if stop_at_step is not None and step >= stop_at_step:
            reason = "stop"
            break
        if step // steps_per_round >= rounds:  # this round's sequences are not generated yet
            t = clock()
            prompts, greedy, consumed = source.round_prompts(ocfg, cfg.seed, rounds, consumed)
            conts = _generate(gen_lm, prompts, greedy, ocfg, cfg.seed * 65_537 + rounds)
            new = [(len(p), p + c) for p, c in zip(prompts, conts) if len(c) >= 1 and len(p) + len(c) >= 3]
            buffer.extend(new)
            n_new = sum(len(s) - L for L, s in new)
            tok_gen += n_new
            run_gen += n_new
            rounds += 1
            _sync(device)
            times["gen_s"] += clock() - t
        t = clock()
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        rnd = step // steps_per_round
        if plan is None or plan[0] != rnd:  # this round's batches: a pure function of (seed, round, the buffer)
            plan = (rnd, round_batches([len(seq) for _, seq in buffer], cfg.seed, rnd,
                                       steps_per_round * cfg.grad_accum, cfg.batch_size))
        for micro in range(cfg.grad_accum):
            pick = plan[1][(step % steps_per_round) * cfg.grad_accum + micro]
            idx, mask = _batch([buffer[int(i)] for i in pick])
            with _autocast(cfg, device):
                out = _objective(model, idx.to(device), mask.to(device), cfg, False)
            (out["loss"] / cfg.grad_accum).backward()
            for key in ("loss", "rec", "rec_agree", "feat", "roll"):
                if key in out:
                    sums[key] = sums.get(key, 0.0) + out[key].detach().float()
            n = int(mask[:, 2:].sum())
            tok_train += n
            run_train += n
            n_summed += 1
        grad_norm = optimizer_step(cfg, opt, params)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"split": "train", "step": step, "lr": lr, **{k: v.item() / n_summed for k, v in sums.items()},
                     "grad_norm": grad_norm.item(), "rounds": rounds, "tokens_generated": tok_gen,
                     "tokens_trained": tok_train, **_memory(device)}
            _sync(device)
            times["train_s"] += clock() - t
            t = clock()
            record({**entry, **split(), "elapsed_s": now()})
            bar.set_postfix({"rec": f"{entry['rec']:.3f}"})
            sums, n_summed = {}, 0
        _sync(device)
        times["train_s"] += clock() - t
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            record({"split": "val", "step": step, **evaluate(), "elapsed_s": now()})
        if (cfg.save_every and step % cfg.save_every == 0) and step != cfg.steps:
            save()
    bar.close()
    last_eval = next((m for m in reversed(metrics) if m["split"] == "val"), {})
    record({"split": "run", "step": step, "end": reason, "tokens_generated": tok_gen, "tokens_trained": tok_train,
            "run_tokens_generated": run_gen, "run_tokens_trained": run_train,
            **{k: last_eval[k] for k in ("val_kl", "val_rec", "val_agree", "alpha") if k in last_eval},
            **split(), "elapsed_s": now()})
    save()
    return model, metrics
