"""Command-line pieces shared by the subcommands: how a subcommand is declared, and the model options of those
that load a model (generate, bench, distill, eval, demo, serve), --threads and --quantize among them."""

from __future__ import annotations

import argparse

import torch

from ..api import (
    DEFAULT_DRAFT_LEN,
    DEFAULT_KV_BUCKET,
    DEFAULT_MODEL,
    EngineOptions,
    RecycleGPT,
)
from ..config import KernelConfig, RecycleConfig
from ..decoding.batching import PREFILL_CHUNK
from ..decoding.speculative import TreeShape
from ..models import RECYCLE_VOCABS
from ..models.quantize import QUANTIZE

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (an unknown choice, a missing or malformed value) are one line on stderr, exit
    status 2, as the subcommands' own errors are: the usage block is for --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_command(sub, name: str, fn) -> argparse.ArgumentParser:
    """A subcommand of argparse subparsers `sub` that runs fn(args); its help is fn's docstring."""
    p = sub.add_parser(name, help=fn.__doc__.splitlines()[0], description=fn.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=fn)
    return p


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return DTYPES[name]


def add_model_args(p: argparse.ArgumentParser, *, runs: bool = True) -> None:
    """--model, --recycle, --recycle-layers, --recycle-vocab, --device, --dtype; runs: also --threads and
    --quantize (the subcommands that run the model: all but export)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name, .gguf file, Hugging Face folder or RecycleGPT checkpoint "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--recycle", default="default",
                   help="recyclable module: 'default' (a checkpoint --model's own, else the one shipped for a "
                        "built-in --model, if any), a checkpoint directory, another shipped module by name "
                        "(<model>-<variant>), 'random' (untrained; speed measurements only) or 'none' "
                        "(default: default)")
    p.add_argument("--recycle-layers", type=int, default=1, help="layers of a --recycle random module (default 1)")
    p.add_argument("--recycle-vocab", default="full", choices=RECYCLE_VOCABS,
                   help="the tokens `recycle` may take from the module: full (the whole LM head) or draft (the "
                        "module's draft vocabulary: a cheaper head, slightly lower α; docs/engine.md) (default: full)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    if runs:
        add_threads_arg(p)
        p.add_argument("--quantize", default=None, choices=QUANTIZE,
                       help="int8: weight-only int8 products on the CPU (per-channel scales, bfloat16 activations; "
                            "faster decoding, a slightly different model; docs/cpu.md) (default: the float weights)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads: torch.set_num_threads(N) before the model loads, and bench's llama_cpp row's "
                        "n_threads (default: torch's own count, OMP_NUM_THREADS when set, else the CPU's cores: "
                        f"{torch.get_num_threads()} here)")


def apply_threads(args: argparse.Namespace) -> None:
    """torch.set_num_threads(--threads), where the subcommand has the option and it is given (checked >= 1 by
    check_args first); the thread count then holds for the whole process, server worker threads included."""
    n = getattr(args, "threads", None)
    if n is not None:
        torch.set_num_threads(n)


def check_device(name: str) -> torch.device:
    """The torch.device --device names, or a ValueError that says why it cannot run here (checked before loading)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {name}: {why}; use --device cpu (or leave --device out)")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif device.type == "meta":
        raise ValueError("--device meta holds no data and cannot run a model: use cpu, cuda or cuda:N")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError):
            raise ValueError(f"--device {name}: this torch cannot use {device.type} devices here; use cpu or "
                             f"cuda") from None
    return device


# option -> (lowest value, highest value or None, whether the highest is excluded); an option at None is unset
_RANGES = {
    "max_new_tokens": (1, None, False), "batch_size": (1, None, False), "limit": (1, None, False),
    "draft_len": (1, None, False), "threads": (1, None, False), "recycle_layers": (1, None, False),
    "max_prompt_tokens": (1, None, False), "max_length": (3, None, False), "stride": (1, None, False),
    "vocab_size": (1, None, False), "bpe_max_bytes": (1, None, False), "top_k": (1, None, False),
    "temperature": (0.0, None, False), "top_p": (0.0, 1.0, False), "min_draft_prob": (0.0, 1.0, True),
    "seed": (-(2 ** 63), 2 ** 64, True),
}


def check_args(args: argparse.Namespace) -> None:
    """Range checks of the numeric options and --device of whichever subcommand `args` is, before anything is loaded
    or written: a ValueError naming the option, the allowed range and the value given."""
    for name, (low, high, high_open) in _RANGES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + name.replace("_", "-")
        if name in ("draft_len", "min_draft_prob"):  # also named as generate() and the decoding errors name them
            flag += f" ({name})"
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if name == "top_p" and not 0 < value <= 1:
            raise ValueError(f"{flag} must be in (0, 1], got {value}")
        if name == "seed" and not low <= value < high:
            raise ValueError(f"{flag} must fit in 64 bits (from -2**63 to 2**64 - 1), got {value}")
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
        if high is not None and (value >= high if high_open else value > high):
            raise ValueError(f"{flag} must be below {high}, got {value}" if high_open
                             else f"{flag} must be at most {high}, got {value}")
    if getattr(args, "device", None) is not None:
        check_device(args.device)


def load_model(args: argparse.Namespace) -> RecycleGPT:
    """The RecycleGPT that the flags of `add_model_args` describe."""
    lm = RecycleGPT.from_pretrained(args.model, recycle=args.recycle, device=args.device,
                                    dtype=parse_dtype(args.dtype),
                                    random_module=RecycleConfig(n_layer=args.recycle_layers),
                                    engine_options=engine_options(args), quantize=getattr(args, "quantize", None))
    vocab = getattr(args, "recycle_vocab", "full")
    if vocab != "full":
        if lm.model is None:
            raise ValueError(f"--recycle-vocab {vocab} needs a recyclable module; this run loads none")
        lm.model.recycle_vocab = vocab
    return lm


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # inductor modes that run inside the engine's own graphs


def add_prefill_chunk(p: argparse.ArgumentParser, lead: str) -> None:
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                   help=f"{lead} prompt longer than N tokens that joins while others decode is prefilled N tokens at "
                        f"a time, one chunk each time they get tokens, so that they keep streaming (default "
                        f"{PREFILL_CHUNK}; 0: whole; on a GPU a multiple of 64)")


def prefill_chunk(args: argparse.Namespace) -> int | None:
    """--prefill-chunk as ContinuousBatch takes it: None for 0; a one-line error below 0."""
    if args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be at least 0 (0: prompts prefilled whole), got {args.prefill_chunk}")
    return args.prefill_chunk or None


def add_compile_mode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="inductor's mode for --engine compiled (default: default); max-autotune-no-cudagraphs "
                        "times candidate matmul kernels for every shape once (minutes of compiling)")
    p.add_argument("--compile-steps", action="store_true",
                   help="with --engine compiled: compile each greedy step and verified round whole, so that its "
                        "token selection and bookkeeping fuse with the forwards (longer compiles)")
    p.add_argument("--no-compile-prefill", dest="compile_prefill", action="store_false",
                   help="with --engine compiled: leave the prompt's forwards uncompiled (shorter compiles, a slower "
                        "first token)")
    p.add_argument("--kv-bucket", type=int, default=None, metavar="SLOTS",
                   help="engines static, graphs and compiled: attention reads the cache up to the next multiple of "
                        f"this many slots (default {DEFAULT_KV_BUCKET}); every bucket is a graph (and a compile) of "
                        "its own, so a larger one means fewer compiles and a little more attention work")
    p.add_argument("--no-triton-kernels", dest="triton_kernels", action="store_false",
                   help="run the torch operators (cuBLAS, SDPA) where the fused Triton kernels would run on CUDA, "
                        "for comparisons")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The EngineOptions of add_compile_mode's --compile-mode, --compile-steps, --no-compile-prefill (they need
    --engine compiled), --kv-bucket and --no-triton-kernels; the defaults for a subcommand without them."""
    mode, steps = getattr(args, "compile_mode", None), getattr(args, "compile_steps", False)
    prefill = getattr(args, "compile_prefill", True)
    if (mode is not None or steps or not prefill) and args.engine != "compiled":
        flag = ("--compile-mode" if mode is not None else "--compile-steps" if steps else "--no-compile-prefill")
        raise ValueError(f"{flag} applies to --engine compiled, not {args.engine!r}")
    bucket = getattr(args, "kv_bucket", None)
    if bucket is not None and bucket < 16:
        raise ValueError(f"--kv-bucket must be at least 16 slots, got {bucket}")
    kernels = KernelConfig() if getattr(args, "triton_kernels", True) else KernelConfig.torch_only()
    return EngineOptions(kv_bucket=DEFAULT_KV_BUCKET if bucket is None else bucket, compile_mode=mode,
                         compile_steps=steps, compile_prefill=prefill, kernels=kernels)


def add_draft_args(p: argparse.ArgumentParser, *, tree_flag: bool = True) -> None:
    """The options of the lossless strategies (decoding/speculative.py); tree_flag: also --tree (generate)."""
    t = TreeShape()
    p.add_argument("--draft-len", type=int, default=DEFAULT_DRAFT_LEN,
                   help=f"speculative, lookup: tokens drafted per full call (default {DEFAULT_DRAFT_LEN})")
    if tree_flag:
        p.add_argument("--tree", action="store_true",
                       help="speculative with a draft tree instead of a chain (the same as --strategy tree)")
    p.add_argument("--min-draft-prob", type=float, default=None, metavar="P",
                   help="speculative, recycle-verified: stop a draft where the module's top probability is below P "
                        "(adaptive draft length; eager loop only; default: the measured value on the CPU, 0 on GPUs)")
    p.add_argument("--tree-depth", type=int, default=t.depth, help=f"tree: levels drafted (default {t.depth})")
    p.add_argument("--tree-topk", type=int, default=t.topk,
                   help=f"tree: children per expanded node and nodes expanded per level (default {t.topk})")
    p.add_argument("--tree-nodes", type=int, default=t.nodes,
                   help=f"tree: drafted nodes the full model verifies per call (default {t.nodes})")
    p.add_argument("--tree-lookup", type=int, default=t.lookup,
                   help="tree: also verify this many tokens found by prompt lookup (the tokens after the latest "
                        "earlier occurrence of the text's last 1-3 tokens), up to the depth; lower --tree-nodes by as "
                        f"many to keep the verification's size (default {t.lookup})")


def draft_options(args: argparse.Namespace) -> dict:
    """generate()'s keyword arguments from the flags of `add_draft_args`."""
    return {"draft_len": args.draft_len, "min_draft_prob": args.min_draft_prob,
            "tree_shape": TreeShape(args.tree_depth, args.tree_topk, args.tree_nodes, args.tree_lookup).check()}
