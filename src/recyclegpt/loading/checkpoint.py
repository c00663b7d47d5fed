"""The RecycleGPT checkpoint: a directory of JSON and safetensors files, written atomically.

    recycle.json         {"format": "recyclegpt-checkpoint", "version": 1,
                          "base": {"ref": NAME_OR_PATH, "config": {...}}      a base loaded from elsewhere, or
                                  {"config": {...}, "weights": "base.safetensors"}   a base trained here,
                          "recycle": RecycleConfig dict, or null for a plain base (the no-module baseline),
                          "tokenizer": "own" (the files below) or null (the base ref's tokenizer),
                          "train": TrainConfig dict (optional), "metrics": {...} (optional)}
    module.safetensors   the RecyclableModule's state dict (absent when "recycle" is null)
    base.safetensors     the base's state dict, only for a base trained here; a tied LM head is not stored
    tokenizer.json, tokenizer_meta.json       when "tokenizer" is "own" (see Tokenizer.save)
    trainer_state.json, optimizer.safetensors  training state for exact resume (optional)
    metrics.jsonl        the training log; the trainer appends to it live, and a save carries it over

For a ref'd base, "config" records the shape the module was trained against, so that loading the module over a
different base fails clearly instead of silently. A save writes a sibling temporary directory, fsyncs it and swaps
it in with two renames (the previous checkpoint goes to `.NAME.old` for the instant between them and is restored
from there if a crash hits that instant). Everything is safetensors or JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..config import ConfigError, ModelConfig, RecycleConfig
from ..models import RecyclableModule, RecycleModel, Transformer
from .tokenizer import Tokenizer

FORMAT = "recyclegpt-checkpoint"
VERSION = 1
CHECKPOINT_FILES = frozenset({
    "recycle.json", "module.safetensors", "base.safetensors", "tokenizer.json", "tokenizer_meta.json",
    "trainer_state.json", "optimizer.safetensors", "metrics.jsonl",
})
CARRIED_FILES = ("metrics.jsonl",)  # kept from the previous version of the directory on each save
# the base fields that fix the module's tensor shapes or the meaning of its inputs and outputs
_MODULE_COMPAT_FIELDS = ("d_model", "vocab_size", "n_head", "n_kv_head", "d_ff")

BaseLoader = Callable[[str], tuple[Transformer, Tokenizer]]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, of another format, or does not fit the model given."""


# -- atomic directory writes -----------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(path: Path) -> tuple[Path, Path]:
    return path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"


def recover(path: str | Path) -> bool:
    """Finish a save that crashed between its two renames: put the previous checkpoint back. True when it did."""
    path = Path(path)
    _, old = _siblings(path)
    if not path.exists() and old.is_dir():
        os.rename(old, path)
        return True
    return False


def _write_dir_atomically(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} exists and is not a directory")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in CHECKPOINT_FILES)
        if foreign:
            raise CheckpointError(f"refusing to replace {path}: it is not a RecycleGPT checkpoint directory "
                                  f"(it holds {foreign[:5]})")
    tmp, old = _siblings(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed while writing
    tmp.mkdir()
    try:
        write(tmp)
        for name in CARRIED_FILES:
            if (path / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(path / name, tmp / name)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# -- reading with clear errors ---------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an incomplete checkpoint: copy the whole directory again)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an incomplete checkpoint: copy the whole directory again)")
    try:
        tensors = safetensors.torch.load_file(str(path))
        with safetensors.safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises SafetensorError or OSError on truncated or garbled files
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return tensors, metadata


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # a copy: weights may be views into fused matrices (model.fuse_projections), which safetensors refuses
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                              f"shape (file vs model) {wrong[:5]}")
    module.load_state_dict(tensors)


def read_meta(path: str | Path) -> dict[str, Any]:
    """recycle.json of a checkpoint, checked for format and version."""
    path = Path(path)
    recover(path)
    meta = _read_json(path / "recycle.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'recycle.json'}: not a RecycleGPT checkpoint (format is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path / 'recycle.json'}: checkpoint version {meta.get('version')} is not supported "
                              f"(this code reads version {VERSION})")
    if not isinstance(meta.get("base"), dict) or "config" not in meta["base"]:
        raise CheckpointError(f"{path / 'recycle.json'}: 'base' must hold the base model's config")
    return meta


# -- save ------------------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, model: RecycleModel | Transformer, *, base_ref: str | None = None,
                    tokenizer: Tokenizer | None = None, train_config: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None, trainer_state: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write `model` as a checkpoint directory at `path`, atomically replacing any previous checkpoint there.

    base_ref: where the base comes from (a built-in name or a path); its weights are then not stored. Without it,
        the base's weights are stored and `tokenizer` is required (a trained-here base has no other tokenizer).
    tokenizer: stored in the directory ("own"); None means the base ref's tokenizer.
    trainer_state, optimizer: training state for resume (see `load_trainer_state`).
    """
    path = Path(path)
    base = model.base if isinstance(model, RecycleModel) else model
    if base_ref is None and tokenizer is None:
        raise CheckpointError("a checkpoint that stores its base's weights must store its tokenizer too")
    if (trainer_state is None) != (optimizer is None):
        raise CheckpointError("trainer_state and optimizer are saved together or not at all")
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if base_ref is not None:
        meta["base"] = {"ref": str(base_ref), "config": base.cfg.to_dict()}
    else:
        meta["base"] = {"config": base.cfg.to_dict(), "weights": "base.safetensors"}
    meta["recycle"] = model.module.cfg.to_dict() if isinstance(model, RecycleModel) else None
    meta["tokenizer"] = "own" if tokenizer is not None else None
    if train_config is not None:
        meta["train"] = train_config
    if metrics is not None:
        meta["metrics"] = metrics

    def write(d: Path) -> None:
        if isinstance(model, RecycleModel):
            safetensors.torch.save_file(_state(model.module), str(d / "module.safetensors"))
        if base_ref is None:
            state = _state(base)
            if base.cfg.tie_embeddings:
                del state["lm_head.weight"]  # the same tensor as tok_emb.weight; re-tied on load
            safetensors.torch.save_file(state, str(d / "base.safetensors"))
        if tokenizer is not None:
            tokenizer.save(d)
        if optimizer is not None:
            tensors, param_groups = _flatten_optimizer(optimizer)
            safetensors.torch.save_file(tensors, str(d / "optimizer.safetensors"),
                                        metadata={"param_groups": json.dumps(param_groups)})
            (d / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (d / "recycle.json").write_text(json.dumps(meta, indent=2))  # written last: a directory without it is junk

    _write_dir_atomically(path, write)
    return path


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state as flat tensors "state.{param}.{key}" plus its param groups as JSON-ready dicts."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{pid}.{key}"] = t.detach().cpu().contiguous()
    groups = []
    for group in sd["param_groups"]:
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = g["lr"].item()
        groups.append(g)
    return tensors, groups


# -- load ------------------------------------------------------------------------------------------------------


def _check_base_fits(meta: dict[str, Any], base: Transformer, path: Path) -> None:
    recorded = meta["base"]["config"]
    diffs = [f"{k}={recorded.get(k)} (module) vs {getattr(base.cfg, k)} (base)" for k in _MODULE_COMPAT_FIELDS
             if recorded.get(k) != getattr(base.cfg, k)]
    if diffs:
        raise CheckpointError(f"the recyclable module in {path} was trained for another base model: "
                              + ", ".join(diffs))


def load_module(path: str | Path, base: Transformer, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> RecyclableModule:
    """The recyclable module of checkpoint `path`, for use over `base` (on the base's device and dtype unless given).

    Raises CheckpointError when the checkpoint has no module or the module does not fit the base's shape or vocab.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("recycle") is None:
        raise CheckpointError(f"{path} holds a plain base model, without a recyclable module: give a checkpoint "
                              f"that has one, or --recycle none")
    _check_base_fits(meta, base, path)
    try:
        rcfg = RecycleConfig.from_dict(meta["recycle"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / 'recycle.json'}: bad 'recycle' config ({e})") from None
    tensors, _ = _read_tensors(path / "module.safetensors")
    module = RecyclableModule(base.cfg, rcfg)
    _load_state(module, tensors, path / "module.safetensors")
    if rcfg.draft_vocab:
        ids = tensors["draft_ids"]
        if (ids.is_floating_point() or ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= base.cfg.vocab_size)
                or not bool((ids[1:] > ids[:-1]).all())):
            raise CheckpointError(f"{path / 'module.safetensors'}: draft_ids must be increasing integer token ids "
                                  f"below {base.cfg.vocab_size}")
    p = base.tok_emb.weight
    return module.to(device=device or p.device, dtype=dtype or p.dtype)


def load_checkpoint(path: str | Path, *, base_loader: BaseLoader | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    ) -> tuple[RecycleModel | Transformer, Tokenizer, dict[str, Any]]:
    """(model, tokenizer, recycle.json) of checkpoint `path`.

    The model is a RecycleModel, or a Transformer when the checkpoint has no module. A ref'd base comes from
    `base_loader(ref) -> (Transformer, Tokenizer)`. dtype: cast the model to it (default: as stored, or as loaded).
    """
    path = Path(path)
    meta = read_meta(path)
    base_meta = meta["base"]
    ref_tokenizer = None
    if "weights" in base_meta:
        try:
            cfg = ModelConfig.from_dict(base_meta["config"])
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{path / 'recycle.json'}: bad base config ({e})") from None
        tensors, _ = _read_tensors(path / base_meta["weights"])
        base = Transformer(cfg)
        if cfg.tie_embeddings:
            tensors["lm_head.weight"] = tensors.get("tok_emb.weight")
            if tensors["lm_head.weight"] is None:
                raise CheckpointError(f"{path / base_meta['weights']}: missing tok_emb.weight")
        _load_state(base, tensors, path / base_meta["weights"])
    elif "ref" in base_meta:
        if base_loader is None:
            raise CheckpointError(f"{path} is a module over the base {base_meta['ref']!r}: pass base_loader")
        base, ref_tokenizer = base_loader(base_meta["ref"])
    else:
        raise CheckpointError(f"{path / 'recycle.json'}: 'base' needs 'weights' or 'ref'")
    base = base.to(device=device, dtype=dtype)

    if meta.get("tokenizer") == "own":
        try:
            tokenizer = Tokenizer.load(path)
        except Exception as e:  # tokenizers raises a bare Exception on a garbled tokenizer.json
            raise CheckpointError(f"{path}: cannot read tokenizer.json / tokenizer_meta.json ({e}); copy the whole "
                                  f"directory again") from None
    elif ref_tokenizer is not None:
        tokenizer = ref_tokenizer
    else:
        raise CheckpointError(f"{path / 'recycle.json'}: no tokenizer stored and no base ref to take one from")

    if meta.get("recycle") is None:
        return base, tokenizer, meta
    return RecycleModel(base, load_module(path, base)), tokenizer, meta


def load_trainer_state(path: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore `optimizer` (built over the same parameters, in the same order) and return trainer_state.json."""
    path = Path(path)
    state = _read_json(path / "trainer_state.json")
    tensors, metadata = _read_tensors(path / "optimizer.safetensors")
    try:
        groups = json.loads(metadata["param_groups"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: bad param_groups metadata ({e})") from None
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: saved for other parameters "
                              f"({[len(g['params']) for g in groups]} per group, the model has "
                              f"{[len(g['params']) for g in current]})")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        opt_state.setdefault(int(pid), {})[key] = t
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return state
