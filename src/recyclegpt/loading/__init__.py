"""Loading models: `load` is the one entry point, for a built-in name, a GGUF file, a Hugging Face folder or a
RecycleGPT checkpoint directory, with the recyclable module that goes with it. The readers behind it: `weights`
(GGUF and Hugging Face folders, the built-in models' converted copies), `checkpoint` (RecycleGPT checkpoints),
`registry` (built-in models and shipped modules) and `tokenizer`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RecycleConfig
from ..models import RecyclableModule, RecycleModel, Transformer
from ..models.quantize import check_quantize, quantize_models
from . import checkpoint, registry, weights
from .tokenizer import Tokenizer

NO_MODULE = (None, "none")  # the `recycle` values that load no module


@dataclass
class Loaded:
    """What `load` gives: the base model, its tokenizer, the recyclable module (or None) and where the module came
    from (a checkpoint directory's path, "random", or None)."""

    base: Transformer
    tokenizer: Tokenizer
    module: RecyclableModule | None
    module_source: str | None


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a RecycleGPT checkpoint directory (it holds recycle.json)."""
    return (Path(path) / "recycle.json").is_file()


def load_base(name_or_path: str | Path, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """A base model for inference (eval mode, on `device`, default the CPU; in `dtype`, default float32) and its
    tokenizer: a built-in name, a .gguf file, a Hugging Face folder, or a RecycleGPT checkpoint directory (whose
    base is taken; its module, if any, is left out)."""
    loaded = load(name_or_path, recycle=None, device=device or "cpu", dtype=dtype or torch.float32)
    return loaded.base, loaded.tokenizer


def load(model: str | Path, *, recycle: str | Path | None = "default", device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32, random_module: RecycleConfig = RecycleConfig(), seed: int = 0,
         quantize: str | None = None) -> Loaded:
    """Load `model` (a built-in name, a .gguf file, a Hugging Face folder or a RecycleGPT checkpoint directory) with
    a recyclable module, on `device` in `dtype`.

    recycle: "default" is a checkpoint's own module when `model` is a checkpoint that has one, else the module
        shipped with the package for built-in `model` (registry.shipped_module), else none; a RecycleGPT
        checkpoint directory puts its module on this base, as does a shipped module's name
        (registry.shipped_modules: `<model>-<variant>`); "random" an untrained module shaped by `random_module`
        and `seed` (speed measurements only); None or "none" loads no module.
    quantize: "int8" gives the base's and the module's products weight-only int8 forms (models.quantize; the CPU
        only, checked before anything loads); None keeps the float weights alone.
    """
    check_quantize(quantize, device)
    loaded = _load(model, recycle=recycle, device=device, dtype=dtype, random_module=random_module, seed=seed)
    quantize_models(quantize, loaded.base, loaded.module)
    return loaded


def _load(model: str | Path, *, recycle: str | Path | None, device: torch.device | str, dtype: torch.dtype,
          random_module: RecycleConfig, seed: int) -> Loaded:
    if is_checkpoint(model):
        def base_loader(ref: str) -> tuple[Transformer, Tokenizer]:
            try:
                return load_base(ref, device=device, dtype=dtype)
            except (weights.LoadError, checkpoint.CheckpointError, FileNotFoundError) as e:
                raise checkpoint.CheckpointError(f"{model} is a module over the base {ref!r}, which does not load: "
                                                 f"{e}") from None

        loaded, tokenizer, _ = checkpoint.load_checkpoint(model, base_loader=base_loader, device=device, dtype=dtype)
        if isinstance(loaded, RecycleModel) and recycle == "default":
            return Loaded(loaded.base.eval(), tokenizer, loaded.module.eval(), str(model))
        base = (loaded.base if isinstance(loaded, RecycleModel) else loaded).eval()
    else:
        base, tokenizer = weights.build_base(model, device=device, dtype=dtype)
    if recycle == "default":  # (a checkpoint with a module of its own returned above)
        recycle = registry.shipped_module(str(model))
    if recycle in NO_MODULE:
        return Loaded(base, tokenizer, None, None)
    if recycle == "random":
        torch.manual_seed(seed)
        module = RecyclableModule(base.cfg, random_module).to(device=device, dtype=dtype).eval()
        return Loaded(base, tokenizer, module, "random")
    if not Path(recycle).exists():  # a shipped module's name, else the path that is missing
        recycle = registry.shipped_module_named(str(recycle)) or recycle
    if not Path(recycle).exists():
        names = list(registry.shipped_modules(str(model)))
        raise FileNotFoundError(f"recyclable module checkpoint {recycle!r} does not exist (give a directory "
                                f"written by `recyclegpt retrofit` or `recyclegpt train`, "
                                f"{'a shipped module (' + ', '.join(names) + '), ' if names else ''}"
                                f"'default', 'random' or 'none')")
    if not is_checkpoint(recycle):
        raise checkpoint.CheckpointError(f"{recycle} is not a recyclable module checkpoint (it holds no recycle.json): "
                                         f"give a directory written by `recyclegpt retrofit` or `recyclegpt train`, "
                                         f"or 'default', 'random' or 'none'")
    module = checkpoint.load_module(recycle, base).to(device=device, dtype=dtype).eval()
    return Loaded(base, tokenizer, module, str(recycle))
