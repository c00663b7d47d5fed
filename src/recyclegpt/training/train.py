"""Training: the joint regime (base and recyclable module from scratch, L = L_lm + lam * L_rec), the retrofit regime
(a frozen base, only the module trains on L_rec) and the no-module baseline (the same base, L_lm only).

`train_loop` is the algorithm in one function: AdamW (weight decay on matrices only), linear warm-up then cosine
decay, gradient accumulation, bf16 autocast on CUDA (float32 on the CPU), gradient clipping, periodic evaluation
on held-out text, atomic checkpoints and exact resume. `train_joint` and `retrofit` set it up. Batches depend only
on (seed, step), the schedule only on the step, and the checkpoint holds the weights and the AdamW state, so a
resumed run repeats the uninterrupted one bit for bit (on the CPU; CUDA kernels need not be deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from ..config import ConfigError, ModelConfig, RecycleConfig, _from_dict
from ..loading.checkpoint import (
    load_checkpoint,
    load_module,
    load_trainer_state,
    recover,
    save_checkpoint,
)
from ..loading.tokenizer import Tokenizer
from ..models import RecyclableModule, RecycleModel, Transformer
from .data import ChatExamples, DataError, TextWindows, load_dataset, train_bpe
from .objectives import RecycleTarget, lm_losses, recycle_losses

# fields that may change when a run is resumed; any other difference is an error
_RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "eval_batches", "save_every", "log_every", "log_file",
                                "progress", "device", "token_cache"})


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Steps count optimizer updates; a step sees batch_size * grad_accum sequences."""

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3  # peak, after warm-up
    min_lr: float = 1e-4  # the end of the cosine decay
    warmup: int = 100  # steps of linear warm-up (a run of fewer steps warms up over all of them)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    lam: float = 1.0  # weight of L_rec in the joint regime
    target: RecycleTarget = "data"  # the module's target: data tokens, the base's distribution, or both
    detach_hidden: bool = False  # joint regime: stop L_rec's gradient at h_t (the base then learns from L_lm only)
    feature_weight: float = 0.0  # weight of the EAGLE-style feature regression added to L_rec (training/objectives.py)
    rollout: int = 1  # draft depths trained (1: teacher-forced only; >1: also on rolled-out states; objectives.py)
    rollout_weight: float = 1.0  # weight of the deeper depths' mean loss
    init_module: str | None = None  # retrofit: start from this module checkpoint (fine-tuning) instead of random
    eval_every: int = 100  # steps between evaluations (0: only at the start and the end)
    eval_batches: int = 8  # validation batches of batch_size sequences
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 10  # steps between training-metric records
    val_fraction: float = 0.01  # the tail of the data held out for validation
    seed: int = 0  # initialisation and data order
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast: auto = bf16 on CUDA, none (fp32) on CPU
    log_file: str | None = None  # JSON-lines metrics; default <out_dir>/metrics.jsonl
    progress: bool = True  # a tqdm bar on stderr
    token_cache: str | None = None  # a directory to keep tokenized text corpora in

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_every", "save_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.seq_len < 3:
            raise ConfigError(f"TrainConfig.seq_len must be at least 3 (the module predicts two ahead), "
                              f"got {self.seq_len}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not isinstance(self.rollout, int) or self.rollout < 1:
            raise ConfigError(f"TrainConfig.rollout must be an integer >= 1, got {self.rollout!r}")
        for name in ("weight_decay", "grad_clip", "lam", "feature_weight", "rollout_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.target not in ("data", "distill", "both"):
            raise ConfigError(f"TrainConfig.target must be 'data', 'distill' or 'both', got {self.target!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"TrainConfig.dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"TrainConfig.device: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up from lr/warmup to lr over `warmup` steps (at most `steps`: a short smoke run needs no --warmup
    of its own), then cosine decay to min_lr at the last step."""
    warmup = min(cfg.warmup, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - 1 - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_step(cfg: TrainConfig, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Clip the gradients to cfg.grad_clip (0: no clipping), step and clear them; the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only."""
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _objective(model: RecycleModel | Transformer, idx: torch.Tensor, mask: torch.Tensor | None, cfg: TrainConfig,
               train_base: bool) -> dict[str, torch.Tensor]:
    if isinstance(model, RecycleModel):
        return recycle_losses(model, idx, lam=cfg.lam, loss_mask=mask, target=cfg.target, train_base=train_base,
                              detach_hidden=cfg.detach_hidden, feature_weight=cfg.feature_weight,
                              rollout=cfg.rollout, rollout_weight=cfg.rollout_weight)
    return lm_losses(model, idx, loss_mask=mask)


_EVAL_KEYS = (("lm", "lm_tokens"), ("lm_acc", "lm_tokens"), ("rec", "rec_tokens"), ("rec_acc", "rec_tokens"),
              ("rec_agree", "rec_tokens"), ("feat", "rec_tokens"), ("roll", "roll_tokens"),
              ("roll_agree", "roll_tokens"))


@torch.no_grad()
def evaluate(model: RecycleModel | Transformer, batches: list[tuple[torch.Tensor, torch.Tensor | None]], *,
             cfg: TrainConfig) -> dict[str, float]:
    """Token-weighted validation means: val_lm, val_lm_acc and, with a module, val_rec, val_rec_acc (top-1 against
    the text) and val_rec_agree (top-1 against the base's own prediction one step ahead). Leaves the model in eval
    mode."""
    device = torch.device(cfg.device)
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for idx, mask in batches:
        with _autocast(cfg, device):
            out = _objective(model, idx.to(device), None if mask is None else mask.to(device), cfg, True)
        for key, count_key in _EVAL_KEYS:
            if key in out:
                n = out[count_key].item()
                sums[key] = sums.get(key, 0.0) + out[key].item() * n
                counts[key] = counts.get(key, 0.0) + n
    return {f"val_{k}": sums[k] / max(counts[k], 1.0) for k in sums}


def train_loop(*, cfg: TrainConfig, model: RecycleModel | Transformer, data: TextWindows | ChatExamples,
               out_dir: str | Path, train_base: bool, tokenizer: Tokenizer | None, base_ref: str | None,
               resume: bool) -> list[dict[str, Any]]:
    """Train `model` in place and return the metric records (also written as JSON lines to the log file).

    train_base: the base trains too (joint, baseline); otherwise only model.module does (retrofit) and the base
    must already be frozen. tokenizer, base_ref: what the checkpoints record (see save_checkpoint). resume: load
    the optimizer and loop state from the checkpoint in out_dir (the caller has loaded the weights from it).
    """
    device, out_dir = torch.device(cfg.device), Path(out_dir)
    log_path = Path(cfg.log_file) if cfg.log_file else out_dir / "metrics.jsonl"
    trainable = model if train_base else model.module
    params = [p for p in trainable.parameters() if p.requires_grad]
    # weight decay on matrices (linear maps, embeddings) only; never on norm gains
    opt = make_optimizer(cfg, params)
    step, metrics, elapsed = 0, [], 0.0
    if resume:
        state = load_trainer_state(out_dir, opt)
        changed = sorted(k for k, v in state["config"].items()
                         if k not in _RESUMABLE_CHANGES and cfg.to_dict().get(k) != v)
        if changed:
            raise ConfigError(f"cannot resume {out_dir} with a different {changed}: "
                              f"{ {k: state['config'][k] for k in changed} } were saved")
        step, metrics, elapsed = state["step"], state["metrics"], state["elapsed_s"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))  # a resumed log restarts at its checkpoint

    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    def record(entry: dict[str, Any]) -> None:
        metrics.append(entry)
        with open(log_path, "a") as f:  # opened per record: a checkpoint save may swap the directory under it
            f.write(json.dumps(entry) + "\n")

    def save() -> None:
        last_eval = next((m for m in reversed(metrics) if m["split"] == "val"), None)
        save_checkpoint(out_dir, model, base_ref=base_ref, tokenizer=tokenizer, train_config=cfg.to_dict(),
                        metrics=last_eval, optimizer=opt,
                        trainer_state={"step": step, "config": cfg.to_dict(), "elapsed_s": elapsed + clock(),
                                       "metrics": metrics})

    val = data.val_batches(n_batches=cfg.eval_batches, batch_size=cfg.batch_size)
    if step == 0 and val:
        record({"split": "val", "step": 0, **evaluate(model, val, cfg=cfg), "elapsed_s": 0.0})
    trainable.train()  # in retrofit the frozen base stays in eval mode
    bar = tqdm(total=cfg.steps, initial=step, file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    sums: dict[str, torch.Tensor] = {}  # training metrics summed since the last record, kept on the device
    n_summed = 0
    while step < cfg.steps:
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            idx, mask = data.train_batch(seed=cfg.seed, index=step * cfg.grad_accum + micro,
                                         batch_size=cfg.batch_size)
            idx, mask = idx.to(device), None if mask is None else mask.to(device)
            with _autocast(cfg, device):
                out = _objective(model, idx, mask, cfg, train_base)
            (out["loss"] / cfg.grad_accum).backward()  # each micro-batch weighs the same
            for key in ("loss", "lm", "rec", "rec_acc", "feat"):
                if key in out:
                    sums[key] = sums.get(key, 0.0) + out[key].detach().float()
            n_summed += 1
        grad_norm = optimizer_step(cfg, opt, params)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"split": "train", "step": step, "lr": lr, **{k: v.item() / n_summed for k, v in sums.items()},
                     "grad_norm": grad_norm.item(), "tokens": step * tokens_per_step,
                     "elapsed_s": round(elapsed + clock(), 2)}
            record(entry)
            bar.set_postfix({k: f"{entry[k]:.3f}" for k in ("lm", "rec") if k in entry})
            sums, n_summed = {}, 0
        if val and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            record({"split": "val", "step": step, **evaluate(model, val, cfg=cfg),
                    "elapsed_s": round(elapsed + clock(), 2)})
            trainable.train()
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save()
    bar.close()
    return metrics


def _has_state(out_dir: Path) -> bool:
    return (out_dir / "trainer_state.json").is_file()


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    recover(out_dir)  # a run killed between the two renames of a checkpoint swap: its previous checkpoint is back
    if resume and not _has_state(out_dir):
        raise FileNotFoundError(f"nothing to resume: {out_dir} holds no trainer_state.json")
    if not resume and (out_dir / "recycle.json").exists():
        raise FileExistsError(f"{out_dir} already holds a checkpoint: resume it or choose another directory")


def train_joint(*, cfg: TrainConfig, model_cfg: ModelConfig, rcfg: RecycleConfig | None,
                files: Sequence[str | Path], out_dir: str | Path, tokenizer: Tokenizer | None = None,
                resume: bool = False, bpe_max_bytes: int | None = None,
                ) -> tuple[RecycleModel | Transformer, list[dict[str, Any]]]:
    """Train a base and its recyclable module from scratch on `files` into the checkpoint directory out_dir.

    rcfg=None trains the base alone (the baseline; same initialisation and data order as with a module, since the
    base is initialised first). tokenizer: None trains a byte-level BPE of model_cfg.vocab_size on the text files
    (on their first bpe_max_bytes characters when given). resume: continue the run checkpointed in out_dir.
    Returns the trained model and the metric records.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, resume)
    if resume:
        model, tokenizer, _ = load_checkpoint(out_dir, device=cfg.device)
        base, loaded_rcfg = (model.base, model.module.cfg) if isinstance(model, RecycleModel) else (model, None)
        if base.cfg != model_cfg or loaded_rcfg != rcfg:
            raise ConfigError(f"{out_dir} holds another model than the one asked for (model_cfg, rcfg)")
    else:
        if tokenizer is None:
            if any(Path(f).suffix == ".jsonl" for f in files):
                raise DataError("training a tokenizer needs plain text files; pass a tokenizer for JSONL data")
            tokenizer = train_bpe(files, model_cfg.vocab_size, max_bytes=bpe_max_bytes)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size={model_cfg.vocab_size}")
        torch.manual_seed(cfg.seed)
        model = RecycleModel.build(model_cfg, rcfg) if rcfg is not None else Transformer(model_cfg)
        model.to(cfg.device)
    if cfg.seq_len > model_cfg.context_length:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's context_length={model_cfg.context_length}")
    data = load_dataset(files, tokenizer, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                        cache_dir=cfg.token_cache)
    metrics = train_loop(cfg=cfg, model=model, data=data, out_dir=out_dir, train_base=True, tokenizer=tokenizer,
                         base_ref=None, resume=resume)
    return model, metrics


def _rebuilt(module: RecyclableModule, **changes) -> RecyclableModule:
    """A fresh module with `module`'s config changed by `changes`, on its device and dtype (weights not copied)."""
    rebuilt = RecyclableModule(module.base_cfg, dataclasses.replace(module.cfg, **changes))
    return rebuilt.to(device=module.fc.weight.device, dtype=module.fc.weight.dtype)


def add_taps(module: RecyclableModule, taps: tuple[int, ...]) -> RecyclableModule:
    """A copy of a module trained without taps that also reads the base layers `taps`; the taps' weights start at
    zero, so it computes exactly what `module` does until it trains."""
    grown = _rebuilt(module, taps=tuple(taps))
    missing, unexpected = grown.load_state_dict(module.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("tap_fc.", "tap_norms.")) for k in missing), (missing, unexpected)
    return grown


def add_draft_vocab(module: RecyclableModule, ids: Sequence[int] | torch.Tensor) -> RecyclableModule:
    """A copy of `module` that drafts over the token ids `ids` only (RecycleConfig.draft_vocab); same weights."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    V = module.base_cfg.vocab_size
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != ids.numel():
        raise ValueError(f"draft vocabulary: need distinct token ids in [0, {V}), got {ids.numel()} ids")
    grown = _rebuilt(module, draft_vocab=ids.numel())
    state = {k: v for k, v in module.state_dict().items() if k != "draft_ids"}
    grown.load_state_dict(state | {"draft_ids": ids.sort().values.to(module.fc.weight.device)})
    return grown


def check_frozen_base_dtype(cfg: TrainConfig, base: Transformer) -> None:
    """A 16-bit frozen base runs only under bf16 autocast."""
    autocast = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.device(cfg.device).type == "cuda")
    if base.tok_emb.weight.dtype != torch.float32 and not autocast:
        raise ConfigError(f"a {base.tok_emb.weight.dtype} base needs bf16 autocast (dtype 'bfloat16', or 'auto' "
                          f"on CUDA), or convert the base to float32")


def module_on_frozen_base(cfg: TrainConfig, base: Transformer, rcfg: RecycleConfig, out_dir: Path, resume: bool, *,
                          log: Callable[[str], None] | None = None) -> RecyclableModule:
    """Freeze `base` in place and give the float32 module to train over it: the checkpoint's (resume), the
    --init-module's (gaining rcfg's taps when it has none), else a new one of `rcfg`. log: notes on --init-module."""
    log = log or (lambda line: None)
    base.requires_grad_(False)
    base.eval()
    if resume:
        return load_module(out_dir, base, dtype=torch.float32)
    if cfg.init_module:
        if not Path(cfg.init_module).exists():
            raise FileNotFoundError(f"--init-module {cfg.init_module!r} does not exist (give a module checkpoint "
                                    f"directory)")
        module = load_module(cfg.init_module, base, dtype=torch.float32).to(cfg.device)
        if rcfg.taps and not module.cfg.taps:
            module = add_taps(module, rcfg.taps)
            log(f"--init-module gains taps {rcfg.taps}, their weights starting at zero")
        if module.cfg != rcfg:
            log(f"--init-module has its own architecture {module.cfg}; the other module options are ignored")
        return module
    torch.manual_seed(cfg.seed)
    return RecyclableModule(base.cfg, rcfg).to(cfg.device)


def retrofit(*, cfg: TrainConfig, base: Transformer, tokenizer: Tokenizer, rcfg: RecycleConfig,
             files: Sequence[str | Path], out_dir: str | Path, base_ref: str,
             resume: bool = False) -> tuple[RecycleModel, list[dict[str, Any]]]:
    """Train a recyclable module over a frozen `base` (already on cfg.device, any dtype) into out_dir.

    Only the module's parameters train (kept in float32); the base is frozen in place (requires_grad False, eval
    mode) and runs under no_grad. A bf16 base needs autocast: dtype "auto" on CUDA, or "bfloat16". The checkpoint
    records base_ref (the name or path the base was loaded from) instead of the base's weights.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, resume)
    if cfg.seq_len > base.cfg.context_length:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the base's context_length={base.cfg.context_length}")
    check_frozen_base_dtype(cfg, base)
    model = RecycleModel(base, module_on_frozen_base(cfg, base, rcfg, out_dir, resume, log=lambda line: print(
        f"retrofit: {line}", file=sys.stderr)))
    data = load_dataset(files, tokenizer, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                        cache_dir=cfg.token_cache)
    metrics = train_loop(cfg=cfg, model=model, data=data, out_dir=out_dir, train_base=False, tokenizer=None,
                         base_ref=base_ref, resume=resume)
    return model, metrics
