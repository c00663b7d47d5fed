"""RecycleGPT models in lm-evaluation-harness: the `recyclegpt` model (`RecycleGPTLM`) and the offline task folder.

Importing this module registers `RecycleGPTLM` with lm-eval as `recyclegpt` (it needs the `lm-eval` extra:
`pip install 'recyclegpt[lm-eval]'`). Its model arguments:

    model=NAME|PATH     what `--model` of the other commands takes (default smollm2-135m-instruct)
    recycle=...         the module, as `--recycle` (default: default; none: no module)
    scoring=standard|recycle|module   who scores each continuation token (docs/evaluation.md; default standard)
    batch_size=N        sequences per forward (default 16; lm-eval's --batch_size when model_args has none)
    device=, dtype=     as `--device`, `--dtype` (default: cuda if available; bf16 on CUDA, fp32 on the CPU)
    recycle_vocab=full|draft, recycle_layers=N   as `--recycle-vocab`, `--recycle-layers`
    strategy=NAME       the decoding strategy of generate_until (default standard)
    max_gen_toks=N      new tokens of generate_until when the task gives none (default 256)

Log-likelihoods are `quality.token_logprobs` over pairs tokenized by `quality.encode_pair` and cut by
`quality.fit`: the very scoring of `recyclegpt eval`, so the two report the same numbers on the same items.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import lm_eval.models  # noqa: F401  (registers the harness's own models; its registry skips them once not empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..api import DEFAULT_MODEL, RecycleGPT, module_hint
from ..decoding import strategies
from .quality import SCORINGS, encode_pair, fit, min_context, token_logprobs

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK_NAMES = ("recyclegpt_arc_easy", "recyclegpt_arc_challenge", "recyclegpt_boolq", "recyclegpt_openbookqa",
              "recyclegpt_piqa", "recyclegpt_sciq")
DATA_DIR_LINE = "data_dir: ../shared/data"  # the packaged YAMLs' data folder, relative to the working directory
DEFAULT_BATCH_SIZE = 16
CHUNK_BATCHES = 16  # batches per token_logprobs call: the progress bar's step


def write_tasks(data_dir: str | Path, out: str | Path) -> Path:
    """Copy the packaged task folder to `out` with its data folder set to `data_dir` (made absolute); returns out.

    The packaged YAMLs read `../shared/data` relative to the working directory (the repository root's view of the
    shared data folder); the copy reads `data_dir` from anywhere. `out/recyclegpt_tasks` is then an lm-eval
    include path (`--include_path`, `TaskManager(include_path=...)`).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if not (data_dir / "eval").is_dir():
        raise FileNotFoundError(f"{data_dir} has no eval/ folder: the recyclegpt_* tasks read "
                                f"DIR/eval/{{arc,boolq,openbookqa,piqa,sciq}}/ (the shared data folder)")
    dest = Path(out) / "recyclegpt_tasks"
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(TASKS_DIR.iterdir()):
        if src.suffix == ".yaml":
            text = src.read_text(encoding="utf-8")
            if DATA_DIR_LINE in text:
                # a JSON string is a YAML string: any path, quoted
                text = text.replace(DATA_DIR_LINE, "data_dir: " + json.dumps(str(data_dir)))
            (dest / src.name).write_text(text, encoding="utf-8")
        elif src.suffix == ".py":
            shutil.copyfile(src, dest / src.name)
    return dest


def _int_arg(name: str, value, default: int) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        if value is not None:
            log.warning("recyclegpt: %s=%s is not supported; using %d", name, value, default)
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


@register_model("recyclegpt")
class RecycleGPTLM(LM):
    """lm-eval's LM over a RecycleGPT model: loglikelihood and loglikelihood_rolling under standard, recycle or
    module scoring (quality.token_logprobs), generate_until through RecycleGPT.generate (greedy `strategy`)."""

    def __init__(self, model: str | RecycleGPT = DEFAULT_MODEL, recycle: str | None = "default",
                 scoring: str = "standard", batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 device: str | None = None, dtype: str | None = None, recycle_vocab: str = "full",
                 recycle_layers: int = 1, strategy: str = "standard", max_gen_toks: int = 256,
                 max_batch_size: int | None = None, quantize: str | None = None) -> None:
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        if strategy not in strategies.names():
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(strategies.names())}")
        self.scoring, self.strategy = scoring, strategy
        self.batch_size = _int_arg("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 256)
        if isinstance(model, RecycleGPT):
            self.lm = model
        else:
            from ..cli.options import load_model

            self.lm = load_model(argparse.Namespace(
                model=str(model), recycle="none" if recycle is None else str(recycle), device=device, dtype=dtype,
                recycle_layers=int(recycle_layers), recycle_vocab=recycle_vocab, quantize=quantize))
        if self.lm.tokenizer is None:
            raise ValueError("lm-eval passes text: the model needs a tokenizer")
        if (scoring != "standard" or strategies.get(strategy).needs_module) and self.lm.model is None:
            what = f"scoring={scoring}" if scoring != "standard" else f"strategy={strategy}"
            raise ValueError(f"{what} needs a recyclable module and none is loaded; {module_hint(self.lm.name)} "
                             f"(model_args recycle=PATH|NAME)")
        self._device = self.lm.device

    # lm-eval's --batch_size and --device reach the model next to --model_args; the model arguments win, and the
    # CLI's default device (cuda:0) falls back to the CPU where there is no CUDA.

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> RecycleGPTLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> RecycleGPTLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        dev = extra.get("device")
        if dev is not None and str(dev).startswith("cuda") and not torch.cuda.is_available():
            del extra["device"]
        known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(arg_dict) - set(known))
        if unknown:
            raise ValueError(f"unknown model argument(s) {', '.join(unknown)} for recyclegpt; it takes "
                             f"{', '.join(known)}")
        return cls(**(extra | dict(arg_dict)))

    # -- what the harness asks -------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def max_length(self) -> int:
        return self.lm.base.cfg.context_length

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.lm.name}'s tokenizer has no chat template (drop --apply_chat_template)")
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _prefix_id(self) -> int:
        tok = self.tokenizer
        prefix = tok.bos_id if tok.bos_id is not None else next(iter(tok.eos_ids), None)
        if prefix is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition a text's first token on")
        return prefix

    def _score(self, sequences: Sequence[list[int]], context_lengths: Sequence[int], *, desc: str,
               disable_tqdm: bool) -> list:
        """quality.token_logprobs, in chunks of CHUNK_BATCHES batches (longest first) for a progress bar."""
        order = sorted(range(len(sequences)), key=lambda k: -len(sequences[k]))
        out: list = [None] * len(sequences)
        step = self.batch_size * CHUNK_BATCHES
        with tqdm(total=len(order), desc=desc, disable=disable_tqdm or self.rank != 0) as bar:
            for s in range(0, len(order), step):
                chunk = order[s:s + step]
                scores = token_logprobs(self.lm, [sequences[k] for k in chunk], [context_lengths[k] for k in chunk],
                                        self.scoring, batch_size=self.batch_size)
                for k, sc in zip(chunk, scores):
                    out[k] = sc
                bar.update(len(chunk))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether every continuation token is its scorer's argmax) per request."""
        need, limit = min_context(self.scoring), self.max_length
        seqs, ctx_lens = [], []
        for req in requests:
            context, continuation = req.args
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            ctx = fit(ctx, cont, limit, need)
            seqs.append(ctx + cont)
            ctx_lens.append(len(ctx))
        scores = self._score(seqs, ctx_lens, desc=f"loglikelihood [{self.scoring}]", disable_tqdm=disable_tqdm)
        out = []
        for req, sc in zip(requests, scores):
            res = (float(sc.logprobs.sum()), bool(sc.greedy.all()))
            self.cache_hook.add_partial("loglikelihood", req.args, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each whole text, every token scored once: the harness's rolling windows of the model's
        context (the first conditioned on the BOS, else EOS, token), each window scored by token_logprobs."""
        if self.scoring == "module":
            raise ValueError("scoring=module needs two context tokens before every scored token, but a rolling "
                             "log-likelihood scores a text's first token after the BOS token alone: use standard "
                             "or recycle scoring (or `recyclegpt eval ppl --scoring module`)")
        prefix = self._prefix_id()
        seqs, ctx_lens, owner = [], [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            ids = self.tokenizer.encode(text, add_bos=False)
            # windows of at most context_length tokens in all: max_seq_len inputs plus the last scored token
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=prefix, max_seq_len=self.max_length - 1, context_len=1)):
                seqs.append(ctx + cont)
                ctx_lens.append(len(ctx))
                owner.append(r)
        scores = self._score(seqs, ctx_lens, desc=f"loglikelihood_rolling [{self.scoring}]",
                             disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, sc in zip(owner, scores):
            totals[r] += float(sc.logprobs.sum())
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context with RecycleGPT.generate (`strategy`, greedy unless the task samples) up to
        max_gen_toks new tokens or EOS, then cut the text at the first of the `until` strings."""
        groups: dict[tuple, list[int]] = {}  # requests with the same generation settings decode as batches
        prepared, ignored = [], set()
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _int_arg("max_gen_toks", kwargs.pop("max_gen_toks", None), self.max_gen_toks)
            temperature = kwargs.pop("temperature", None)
            sample = kwargs.pop("do_sample", None)
            if sample is None:  # as transformers' generate: a positive temperature alone asks for sampling
                sample = bool(temperature)
            sampling = (float(1.0 if temperature is None else temperature) if sample else 0.0,
                        kwargs.pop("top_k", None), kwargs.pop("top_p", None), kwargs.pop("seed", None))
            if kwargs and not ignored:
                ignored.update(kwargs)
                log.warning("recyclegpt: generation arguments %s are not supported and are ignored", sorted(kwargs))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's context of "
                                 f"{self.max_length}")
            ids = self.tokenizer.encode(context) if context else [self._prefix_id()]
            ids = ids[-(self.max_length - max_new):]  # keep the end of a long context, as the harness does
            prepared.append((ids, until))
            groups.setdefault((max_new, sampling), []).append(i)
        texts: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc=f"generate_until [{self.strategy}]",
                  disable=disable_tqdm or self.rank != 0) as bar:
            for (max_new, (temperature, top_k, top_p, seed)), members in groups.items():
                members.sort(key=lambda i: -len(prepared[i][0]))  # similar lengths together: less padding
                for s in range(0, len(members), self.batch_size):
                    chunk = members[s:s + self.batch_size]
                    gen = self.lm.generate([prepared[i][0] for i in chunk], strategy=self.strategy,
                                           max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                                           top_p=top_p, seed=seed)
                    for i, text in zip(chunk, gen.text):
                        texts[i] = _cut(text, prepared[i][1])
                        self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
                    bar.update(len(chunk))
        return texts


def _cut(text: str, until: Iterable[str]) -> str:
    """The text before the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
