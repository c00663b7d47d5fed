"""The `recyclegpt` command: one entry point, one subcommand per job, each a thin layer over the Python API.

    recyclegpt demo                   a few chat prompts, `standard`, `recycle`, `speculative`: texts, speed-ups, τ, α
    recyclegpt generate PROMPT        decode with any strategy (standard, recycle, the lossless ones)
    recyclegpt bench                  strategies side by side on the same prompts (llama.cpp too), table + JSON
    recyclegpt suite [NAME]           the named prompt suites; one of them written as JSONL (--out)
    recyclegpt train                  joint training from scratch on text files
    recyclegpt retrofit               train a recyclable module on a frozen base
    recyclegpt distill-train          train it online on the base's own continuations (generate, then learn, looped)
    recyclegpt distill                the base model's responses to a prompt file, as JSONL (self-distillation data)
    recyclegpt eval mc|lastword|ppl|agreement    quality: standard vs recycle scoring, the module's agreement α
    recyclegpt lm-eval ARGS...        lm-evaluation-harness with the `recyclegpt` model (docs/quality.md)
    recyclegpt serve                  an OpenAI-compatible HTTP server (docs/serving.md)
    recyclegpt export --format F OUT  the module as an EAGLE-3 draft model for vLLM or SGLang (docs/export.md)

Errors the user can fix (bad values, missing files, corrupt checkpoints) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import json
import logging
import os
import sys
from pathlib import Path

import torch

from ..api import (
    DEFAULT_MODEL,
    ENGINES,
    RecycleGPT,
    default_device,
    default_dtype,
    module_hint,
)
from ..config import RecycleConfig
from ..decoding.batching import DRAFT_ROWS
from ..decoding.strategies import get as get_strategy
from ..decoding.strategies import names as strategy_names
from ..loading.checkpoint import CheckpointError
from ..loading.registry import RegistryError
from ..training.train import TrainConfig
from .options import (
    Parser,
    add_command,
    add_compile_mode,
    add_draft_args,
    add_model_args,
    add_prefill_chunk,
    apply_threads,
    check_args,
    draft_options,
    engine_options,
    load_model,
    parse_dtype,
    prefill_chunk,
)


class UsageError(Exception):
    """A problem with the user's input, reported as one line."""


# -- generate ----------------------------------------------------------------------------------------------------


def chosen_strategy(args) -> str:
    """--strategy, with --tree turning speculative into its tree variant."""
    if args.tree:
        if args.strategy not in ("speculative", "tree"):
            raise UsageError(f"--tree drafts a tree for --strategy speculative, not for {args.strategy!r}")
        return "tree"
    return args.strategy


def cmd_generate(args) -> None:
    """Generate text from PROMPT with the chosen strategy; --json prints a JSON record as the last line."""
    args.strategy = chosen_strategy(args)
    check_prompt_text(args.prompt)
    draft = draft_options(args)
    lm = load_model(args)
    if args.recycle == "random" and get_strategy(args.strategy).needs_module:
        print("note: --recycle random is an untrained module; its tokens are noise (speed measurements only)",
              file=sys.stderr)
    stream = None
    if not args.json and not args.no_stream:
        stream = _text_streamer(lm)
    out = lm.generate(args.prompt, strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      chat=args.chat, stream=stream, engine=args.engine, **draft)
    if args.json:
        print(json.dumps(out.to_dict(), ensure_ascii=False))
        return
    if stream is None:
        print(out.text[0])
    else:
        print()
    st = out.stats
    tau = f", {st.tau:.2f} tokens per verification" if st.tau is not None else ""
    print(f"[{out.strategy}] {st.new_tokens} tokens in {st.seconds:.2f}s ({st.tokens_per_s:.1f} tok/s), "
          f"full calls {st.full_calls}, module calls {st.module_calls}{tau}", file=sys.stderr)


def check_prompt_text(prompt: str) -> None:
    """A prompt given on the command line: not blank, and text (a byte that is not UTF-8 arrives as a lone
    surrogate, which no tokenizer takes)."""
    if not prompt.strip():
        raise UsageError("the prompt is empty: give a non-empty text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"the prompt is not UTF-8 text (a stray byte at character {e.start + 1}): pass it in "
                         f"UTF-8") from None


def _text_streamer(lm: RecycleGPT):
    """Print the new text of row 0 as tokens arrive (decoding the whole tail keeps multi-byte characters whole)."""
    ids: list[int] = []
    printed = 0

    def on_tokens(step: list[list[int]]) -> None:
        nonlocal printed
        ids.extend(step[0])
        text = lm.tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
            return
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)

    return on_tokens


# -- bench -------------------------------------------------------------------------------------------------------


def cmd_bench(args) -> None:
    """Run strategies greedily on the same prompts in one process, side by side; print a table (and JSON)."""
    from ..evals.speed import (
        BASELINES,
        BUILTIN_PROMPTS,
        RANDOM_NOTE,
        format_table,
        random_model,
        random_prompts,
        run_bench,
    )
    from ..training.data import read_prompt_records

    strategies = tuple(s for s in args.strategies.split(",") if s)
    known = strategy_names() + BASELINES
    for s in strategies:
        if s not in known:
            raise UsageError(f"unknown strategy {s!r}; choose from {', '.join(known)}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.draft_rows < 0:
        raise UsageError(f"--draft-rows must be >= 0, got {args.draft_rows}")
    chunk = prefill_chunk(args)
    if args.check_prompts < 1:
        raise UsageError(f"--check-prompts must be >= 1 (bench reports no speed it has not checked), got "
                         f"{args.check_prompts}")
    categories = None
    draft = draft_options(args)
    try:
        engines = engine_options(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.shape:
        from ..models.quantize import check_quantize, quantize_models

        device = torch.device(args.device) if args.device else default_device()
        check_quantize(args.quantize, device)
        lm = random_model(args.shape, module_layers=args.recycle_layers, device=device,
                          dtype=parse_dtype(args.dtype) or default_dtype(device), engine_options=engines)
        quantize_models(args.quantize, lm.model)
        prompts = random_prompts(args.limit or 20, lm.base.cfg.vocab_size)
    else:
        if args.suite and args.prompts:
            raise UsageError("give --suite or --prompts, not both")
        if args.suite:
            from ..evals.suites import load_suite

            try:
                records = load_suite(args.suite, args.data, per_category=args.limit)
            except (ValueError, FileNotFoundError) as e:
                raise UsageError(str(e)) from None
            categories, prompts = [c for c, _ in records], [p for _, p in records]
        elif args.prompts:
            per_file = [read_prompt_records(f, limit=args.limit) for f in args.prompts]
            prompts = [p for recs in per_file for _, p in recs]
            if all(c is not None for recs in per_file for c, _ in recs):  # the records name their categories
                categories = [c for recs in per_file for c, _ in recs]
            elif len(args.prompts) > 1:  # each file is a category: tok/s, speed-up and tau also per file
                stems = [Path(f).stem for f in args.prompts]
                if len(set(stems)) < len(stems):
                    raise UsageError(f"--prompts files need distinct names to label their categories: {stems}")
                categories = [stem for stem, recs in zip(stems, per_file) for _ in recs]
        else:
            prompts = BUILTIN_PROMPTS[: args.limit]
        lm = load_model(args)
        _check_prompt_lengths(lm, prompts, chat=not args.no_chat, max_new_tokens=args.max_new_tokens)
    needs = [s for s in strategies if s in strategy_names() and get_strategy(s).needs_module]
    if needs and lm.model is None:
        raise UsageError(f"bench runs {', '.join(needs)} but no recyclable module is loaded; {module_hint(lm.name)}; "
                         f"or run --strategies standard")
    try:
        lm.resolve_engine(args.engine)
        report = run_bench(lm, prompts, strategies=strategies, max_new_tokens=args.max_new_tokens,
                           chat=not args.no_chat, ignore_eos=not args.stop_at_eos, batch_size=args.batch_size,
                           engine=args.engine, alpha=not args.no_alpha, draft_len=draft["draft_len"],
                           min_draft_prob=draft["min_draft_prob"],
                           tree_shape=tuple(draft["tree_shape"]),
                           # per category needs one prompt a call: a batch mixes categories
                           categories=categories if args.batch_size == 1 else None,
                           check_prompts=args.check_prompts, continuous=args.continuous, draft_rows=args.draft_rows,
                           prefill_chunk=chunk,
                           threads=torch.get_num_threads(),
                           log=lambda line: print(f"bench: {line}", file=sys.stderr, flush=True))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.compile_mode:
        report["compile_mode"] = args.compile_mode
    if args.compile_steps:
        report["compile_steps"] = True
    if not args.compile_prefill:
        report["compile_prefill"] = False
    if args.kv_bucket is not None:
        report["kv_bucket"] = args.kv_bucket
    if not args.triton_kernels:
        report["triton_kernels"] = False
    if args.shape:
        report["shape"], report["note"] = args.shape, RANDOM_NOTE
    elif lm.module_source == "random":
        report["note"] = "random module weights: speed only"
    print(format_table(report))
    if report.get("note"):
        print(report["note"])
    if args.chart:
        from ..evals.chart import write_chart

        try:
            print(f"chart: {write_chart(report, args.chart)}")
        except ImportError as e:  # the table and JSON still stand; the chart can be drawn later from the JSON
            print(f"chart not written: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))


def _check_prompt_lengths(lm: RecycleGPT, prompts: list[str], *, chat: bool, max_new_tokens: int) -> None:
    """Every prompt and its max_new_tokens fit the model's context (checked before the bench's warm-up starts)."""
    chat = chat and lm.tokenizer.chat_template is not None
    context = lm.base.cfg.context_length
    for i, p in enumerate(prompts, 1):
        n = len(lm.encode(p, chat=chat))
        if n + max_new_tokens > context:
            raise UsageError(f"prompt {i} has {n} tokens; with --max-new-tokens {max_new_tokens} it exceeds the "
                             f"model's context of {context} tokens: shorten it or lower --max-new-tokens")


# -- distill -----------------------------------------------------------------------------------------------------


def cmd_suite(args) -> None:
    """List the named prompt suites, or write one as JSONL ({category, prompt} per line) for `bench --prompts`."""
    from ..evals.suites import SUITES, load_suite

    if args.name is None:
        for name, what in SUITES.items():
            print(f"{name:<20} {what}")
        return
    try:
        records = load_suite(args.name, args.data, per_category=args.limit)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    lines = "".join(json.dumps({"category": c, "prompt": p}) + "\n" for c, p in records)
    if args.out is None:
        sys.stdout.write(lines)
        return
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(lines, encoding="utf-8")
    os.replace(tmp, out)
    cats = dict.fromkeys(c for c, _ in records)
    print(f"{out}: {len(records)} prompts in {len(cats)} categories ({', '.join(cats)})")


def cmd_distill(args) -> None:
    """Write the base model's chat-templated responses to a prompt file as JSONL {"prompt", "response"}.

    Records go to OUT.partial as they are made; the file is renamed to OUT at the end. --resume continues a
    .partial file; an existing OUT is never overwritten without --force.
    """
    from ..training.data import read_prompts

    out, partial = Path(args.out), Path(args.out + ".partial")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: give the path of a JSONL file to write")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist; create it first")
    prompts = read_prompts(args.prompts, limit=args.limit)
    done: set[str] = set()
    if partial.exists():
        if not args.resume:
            raise UsageError(f"{partial} exists from an earlier run: pass --resume to continue it, or remove it")
        with partial.open(encoding="utf-8") as f:
            done = {json.loads(line)["prompt"] for line in f if line.strip()}
    todo = [p for p in prompts if p not in done]
    lm = load_model(args)
    try:
        lm.resolve_engine(args.engine)
    except ValueError as e:
        raise UsageError(str(e)) from None
    chat = lm.tokenizer.chat_template is not None and not args.no_chat
    context = lm.base.cfg.context_length
    limit = args.max_prompt_tokens or context - args.max_new_tokens
    if limit < 1 or limit + args.max_new_tokens > context:
        given = f" + --max-prompt-tokens {args.max_prompt_tokens}" if args.max_prompt_tokens else ""
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}{given} leaves no room in the model's context of "
                         f"{context} tokens: lower --max-new-tokens{' or --max-prompt-tokens' if given else ''}")
    lengths = {p: len(lm.encode(p, chat=chat)) for p in todo}
    skipped = [p for p in todo if lengths[p] > limit]
    if skipped:
        print(f"skipping {len(skipped)} prompt(s) longer than {limit} tokens", file=sys.stderr)
    order = sorted((p for p in todo if lengths[p] <= limit), key=lengths.get)  # similar lengths: less padding
    from tqdm import tqdm

    with partial.open("a", encoding="utf-8") as f, tqdm(total=len(order), desc="distill", file=sys.stderr) as bar:
        for i in range(0, len(order), args.batch_size):
            chunk = order[i:i + args.batch_size]
            for prompt, text, ids in _responses(lm, chunk, args, seed=args.seed + i, chat=chat):
                record = {"prompt": prompt, "response": text, "model": lm.name, "response_tokens": len(ids)}
                if not chat:  # a plain continuation: retrofit encodes it without the chat template
                    record["chat"] = False
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    os.replace(partial, out)
    print(f"wrote {len(done) + len(order)} records to {out}", file=sys.stderr)


def _responses(lm: RecycleGPT, prompts: list[str], args, *, seed: int, chat: bool) -> list[tuple[str, str, list[int]]]:
    """(prompt, response, ids) for a batch; a batch that runs out of GPU memory is split in halves and retried.

    Long prompts in a large batch can exceed the card's memory where the rest of the file fits; halving keeps the
    run going (and writing) instead of losing it. A single prompt that does not fit is an error.
    """
    try:
        gen = lm.generate(prompts, strategy="standard", max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=seed, chat=chat,
                          engine=args.engine)
    except torch.cuda.OutOfMemoryError:
        if len(prompts) == 1:
            raise UsageError("out of GPU memory on a single prompt: lower --max-prompt-tokens or --max-new-tokens")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(prompts) // 2
        print(f"out of GPU memory at batch {len(prompts)}: retrying as {half} + {len(prompts) - half}",
              file=sys.stderr)
        return (_responses(lm, prompts[:half], args, seed=seed, chat=chat)
                + _responses(lm, prompts[half:], args, seed=seed + half, chat=chat))
    return list(zip(prompts, gen.text, gen.token_ids))


# -- train / retrofit --------------------------------------------------------------------------------------------


def _add_config_args(p: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (), defaults: dict | None = None):
    """One --flag per dataclass field; the type comes from the default value."""
    group = p.add_argument_group(f"{cls.__name__} (see its docstring)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction)
        else:
            kind = type(default) if default is not None else str
            group.add_argument(flag, dest=f.name, default=default, type=kind, help=f"default: {default}")


def _config_from_args(cls, args, **overrides):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names} | overrides)


def _add_module_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recycle-layers", type=int, default=RecycleConfig.n_layer, help="decoder layers in the module")
    p.add_argument("--hidden", choices=("pre_norm", "post_norm"), default=RecycleConfig.hidden,
                   help="which h_t the module reads")
    p.add_argument("--input-norm", default=RecycleConfig.input_norm, action=argparse.BooleanOptionalAction,
                   help="RMS-normalise h_t and the token embedding before the module's linear map")
    p.add_argument("--taps", type=_layer_list, default=RecycleConfig.taps, metavar="I,J,...",
                   help="base layers (0-based) whose outputs the module also reads, EAGLE-3 style (default: none); "
                        "with --init-module, a module trained without taps gains them")
    p.add_argument("--layout", choices=("recycle", "eagle3"), default=RecycleConfig.layout,
                   help="the module's form: recycle (default) or eagle3, EAGLE-3's draft layer over three --taps, "
                        "which `recyclegpt export` writes for vLLM and SGLang (docs/export.md)")


def _module_config(args) -> RecycleConfig:
    return RecycleConfig(n_layer=args.recycle_layers, hidden=args.hidden, input_norm=args.input_norm,
                         taps=args.taps, layout=args.layout)


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 2,15,27, got {text!r}")


def _expand(files: list[str]) -> list[str]:
    out = []
    for f in files:
        matches = sorted(glob.glob(f)) if any(c in f for c in "*?[") else [f]
        if not matches:
            raise UsageError(f"no files match {f!r}")
        out += matches
    return out


def cmd_train(args) -> None:
    """Joint training from scratch (base + module, L = L_lm + λ·L_rec) on plain-text files.

    The tokenizer is a byte-level BPE of --vocab-size trained on the files, unless --tokenizer names a model
    whose tokenizer to use. --no-module trains the same base without the module (the baseline).
    """
    from ..config import PRESETS
    from ..training.train import train_joint

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    model_cfg = PRESETS[args.preset]
    tokenizer = None
    if args.tokenizer:
        from ..loading import load_base

        _, tokenizer = load_base(args.tokenizer, device="meta")
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    elif args.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=args.vocab_size)
    cfg = _config_from_args(TrainConfig, args, device=args.device or str(default_device()))
    rcfg = None if args.no_module else _module_config(args)
    _, metrics = train_joint(cfg=cfg, model_cfg=model_cfg, rcfg=rcfg, files=_expand(args.files), out_dir=args.out,
                             tokenizer=tokenizer, resume=args.resume, bpe_max_bytes=args.bpe_max_bytes)
    print(json.dumps(metrics[-1] if metrics else {}))


def cmd_retrofit(args) -> None:
    """Train a recyclable module on a frozen base, on text files or prompt→response JSONL.

    Only the module trains (L_rec); the checkpoint in --out holds the module and a reference to --model.
    --target data learns the data's tokens, distill the base's own next-token distribution, both the sum.
    """
    from ..loading import load_base
    from ..training.train import retrofit

    device = torch.device(args.device or str(default_device()))
    base_dtype = parse_dtype(args.base_dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = _config_from_args(TrainConfig, args, device=str(device))  # checked before the base is loaded
    files = _expand(args.files)
    base, tokenizer = load_base(args.model, device=device, dtype=base_dtype)
    _, metrics = retrofit(cfg=cfg, base=base, tokenizer=tokenizer, rcfg=_module_config(args),
                          files=files, out_dir=args.out, base_ref=args.model, resume=args.resume)
    print(json.dumps(metrics[-1] if metrics else {}))


def cmd_distill_train(args) -> None:
    """Train a recyclable module online: the frozen base writes continuations, the module learns its distribution.

One process loops: the base decodes a round of --gen-batch prompts (instruction prompts from --prompts files and
natural-text prefixes cut from --text files, --text-share of them; --greedy-share decoded greedily, the rest sampled
at --temperature) into a rolling buffer of --buffer sequences, then the module trains --steps-per-round steps on
batches from it against the base's full next-step distribution (--target distill: KL at every continuation
position; the teacher logits and h_t come from one forward of the base). A checkpoint every --save-every steps
holds the module, AdamW and the stream's state; --resume continues exactly. --deadline SECONDS ends the run with a
checkpoint. The log (JSON lines, <out>/metrics.jsonl) records tokens generated and trained, KL and α on a fixed
held-out validation stream, and both halves' throughput and time split (docs/training.md).
"""
    from ..loading import load_base
    from ..loading.registry import shipped_module_named
    from ..training.online import OnlineConfig, online_retrofit

    device = torch.device(args.device or str(default_device()))
    base_dtype = parse_dtype(args.base_dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.init_module and not Path(args.init_module).exists() and shipped_module_named(args.init_module):
        args.init_module = str(shipped_module_named(args.init_module))  # a shipped module by name
    cfg = _config_from_args(TrainConfig, args, device=str(device))  # checked before the base is loaded
    ocfg = _config_from_args(OnlineConfig, args)
    if ocfg.engine not in ENGINES:
        raise UsageError(f"unknown --engine {ocfg.engine!r}; choose one of {', '.join(ENGINES)}")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after must be >= 1, got {args.stop_after}")
    prompts = _expand(args.prompts or [])
    text = _expand(args.text or [])
    if not prompts and not text:
        raise UsageError("give instruction prompt files (--prompts), text files (--text), or both")
    base, tokenizer = load_base(args.model, device=device, dtype=base_dtype)
    _, metrics = online_retrofit(cfg=cfg, ocfg=ocfg, base=base, tokenizer=tokenizer, rcfg=_module_config(args),
                                 out_dir=args.out, base_ref=args.model, prompt_files=prompts, text_files=text,
                                 resume=args.resume, stop_at_step=args.stop_after)
    print(json.dumps(metrics[-1] if metrics else {}))


def cmd_export(args) -> None:
    """Write the recyclable module as an EAGLE-3 draft model for vLLM or SGLang (docs/export.md).

OUT gets config.json and model.safetensors. The module must have the eagle3 layout (retrofit --layout eagle3
--taps A,B,C); serve the draft with vLLM's --speculative-config '{"method": "eagle3", "model": "OUT"}' or SGLang's
--speculative-algorithm EAGLE3 --speculative-draft-model-path OUT."""
    from ..export import DTYPES, default_verifier, export_eagle3

    lm = load_model(args)
    if lm.model is None:
        raise UsageError(f"no recyclable module is loaded, so there is nothing to export; {module_hint(args.model)}")
    out = export_eagle3(lm.model, args.out, fmt=args.format, style=args.config_style, vocab=args.vocab,
                        verifier=args.verifier or default_verifier(args.model),
                        speculative_tokens=args.speculative_tokens, embed=args.embed,
                        dtype=DTYPES[args.export_dtype], force=args.force)
    print(out)


# -- serve -------------------------------------------------------------------------------------------------------


def cmd_serve(args) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions; docs/serving.md).

Requests run in arrival order; greedy requests of one strategy decode together by continuous batching, up to
--max-batch at once, each joining as soon as it fits; unseeded sampled requests of the same settings too, drawing
from one generator; seeded ones of standard and recycle, each from its own (a seeded one of a verified strategy
runs alone)."""
    try:
        import uvicorn

        from ..serving import ServerConfig, create_app
    except ImportError as e:
        raise UsageError(f"serve needs fastapi and uvicorn: pip install 'recyclegpt[serve]' ({e})") from None
    if args.max_queue < 1:
        raise UsageError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.draft_rows < 0:
        raise UsageError(f"--draft-rows must be at least 0, got {args.draft_rows}")
    chunk = prefill_chunk(args)
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    lm = load_model(args)
    strategy = args.strategy
    if strategy is not None and get_strategy(strategy).needs_module and lm.model is None:
        raise UsageError(f"--strategy {strategy} needs a recyclable module and none is loaded; "
                         f"{module_hint(args.model)}")
    if strategy == "recycle" or (strategy is not None and args.recycle == "random"
                                 and get_strategy(strategy).needs_module):
        print(f"note: --strategy {strategy} is lossy or uses an untrained module; answers differ from standard "
              f"decoding", file=sys.stderr)
    api_key = args.api_key if args.api_key is not None else os.environ.get("RECYCLEGPT_API_KEY") or None
    app = create_app(lm, ServerConfig(model_name=args.served_model_name or args.model, strategy=strategy,
                                      engine=args.engine, max_model_len=args.max_model_len, api_key=api_key,
                                      max_queue=args.max_queue, max_batch=args.max_batch,
                                      draft_rows=args.draft_rows, prefill_chunk=chunk,
                                      warmup=False if args.no_warmup else None))
    server = app.state.server
    # the server's own messages (start-up warm-up, failed requests) beside uvicorn's, in its format
    logging.basicConfig(format="%(levelname)s:     %(message)s", level=args.log_level.upper())
    print(f"serving {server.model_name} (strategy {server.strategy}, context {server.context}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


# -- parser ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="recyclegpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn):
        return add_command(sub, name, fn)

    from .demo import add_demo_args, cmd_demo

    add_demo_args(add("demo", cmd_demo))

    g = add("generate", cmd_generate)
    g.add_argument("prompt", help="the prompt text")
    add_model_args(g)
    g.add_argument("--strategy", choices=strategy_names(), default="standard",
                   help="standard: the full model for every token; recycle: the paper's alternating schedule (lossy); "
                        "recycle-verified, speculative, tree, lookup: lossless, standard's output exactly "
                        "(default: standard)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="new tokens at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    g.add_argument("--top-p", type=float, default=None,
                   help="sample among the likeliest tokens whose probabilities sum to p (default: 1, all)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: unseeded)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON record as the last line")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it is generated")
    g.add_argument("--engine", default="auto", choices=ENGINES,
                   help="decode loop (default auto: CUDA graphs on a GPU, eager on CPU; compiled: torch.compile, "
                        "on the CPU after a minute or two of compiling); the tokens are the same")
    add_compile_mode(g)
    add_draft_args(g)

    b = add("bench", cmd_bench)
    add_model_args(b)
    b.add_argument("--prompts", action="append", default=None,
                   help="JSONL with a 'prompt' field per line (default: built-in set); repeat for several files, "
                        "which are then also reported per file (category)")
    b.add_argument("--suite", default=None,
                   help="a named prompt suite (`recyclegpt suite` lists them: short instructions, 13 mixed task kinds "
                        "with long prompts among them, 1-4k-token contexts), built from the data folder --data; "
                        "reported per category")
    b.add_argument("--data", default=None,
                   help="the data folder the suites are built from (default: $RECYCLEGPT_DATA, else ../shared/data)")
    b.add_argument("--limit", type=int, default=None,
                   help="use the first N prompts (of each file; with --suite, N per category)")
    b.add_argument("--check-prompts", type=int, default=4,
                   help="prompts (shortest, longest and between) decoded again by the eager reference loop and "
                        "compared with the run's tokens; a difference stops the bench (default 4)")
    b.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    b.add_argument("--strategies", default="standard,recycle",
                   help=f"comma-separated, from {', '.join(strategy_names())}, hf_eager, hf_compiled, "
                        "hf_prompt_lookup (transformers' generate on a copy of the same weights), llama_cpp "
                        "(llama.cpp on the same GGUF file, --threads threads; pip install 'recyclegpt[llama-cpp]') "
                        "(default standard,recycle)")
    add_draft_args(b, tree_flag=False)
    b.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default 1)")
    b.add_argument("--continuous", action="store_true",
                   help="decode all prompts by continuous batching, --batch-size at a time, each joining as another "
                        "ends (a server's steady load), instead of fixed batches that wait for their longest row")
    b.add_argument("--draft-rows", type=int, default=DRAFT_ROWS, metavar="N",
                   help=f"with --continuous: the verified strategies draft while at most N rows are live, as the "
                        f"server does (default {DRAFT_ROWS}; 0: never)")
    add_prefill_chunk(b, "with --continuous: a")
    b.add_argument("--engine", default="auto", choices=ENGINES,
                   help="decode loop of the project's strategies (default auto: CUDA graphs on a GPU, eager on CPU)")
    add_compile_mode(b)
    b.add_argument("--shape", default=None, choices=("1.3b", "7b"),
                   help="a paper-scale model with random weights instead of --model (speed only); the module has "
                        "--recycle-layers layers; prompts are random token ids")
    b.add_argument("--no-alpha", action="store_true", help="skip the module's agreement α on the prompts")
    b.add_argument("--chart", default=None, help="also write a PNG bar chart of tokens/s here (needs matplotlib)")
    b.add_argument("--no-chat", action="store_true", help="do not chat-template the prompts")
    b.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: always max-new-tokens)")
    b.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")

    su = add("suite", cmd_suite)
    su.add_argument("name", nargs="?", default=None, help="the suite to write (none: list them)")
    su.add_argument("--data", default=None,
                    help="the data folder the suites are built from (default: $RECYCLEGPT_DATA, else ../shared/data)")
    su.add_argument("--limit", type=int, default=None, help="prompts per category (default: the suite's)")
    su.add_argument("--out", default=None, help="write the JSONL here (default: standard output)")
    su.add_argument("--force", action="store_true", help="overwrite --out")

    d = add("distill", cmd_distill)
    add_model_args(d)
    d.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    d.add_argument("--out", required=True, help="output JSONL: {prompt, response, model, response_tokens}")
    d.add_argument("--limit", type=int, default=None, help="the first N prompts (default: all)")
    d.add_argument("--max-new-tokens", type=int, default=256, help="response tokens at most (default 256)")
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1, all)")
    d.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    d.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    d.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="skip longer prompts (default: the context length minus --max-new-tokens)")
    d.add_argument("--no-chat", action="store_true",
                   help="continue the prompts as plain text instead of answering them in the chat template (plain "
                        "continuations; new instructions for scripts/self_instruct_prompts.py); records get "
                        "\"chat\": false and retrofit encodes them as plain text")
    d.add_argument("--engine", default="auto", choices=ENGINES,
                   help="decode loop (default auto: CUDA graphs on a GPU, eager on CPU; compiled: torch.compile, "
                        "on the CPU after a minute or two of compiling); the tokens are the same")
    d.add_argument("--resume", action="store_true", help="continue OUT.partial from an interrupted run")
    d.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    t = add("train", cmd_train)
    t.add_argument("files", nargs="+", help="plain-text files (globs allowed)")
    t.add_argument("--out", required=True, help="checkpoint directory")
    t.add_argument("--preset", default="gutenberg-small", help="the base's shape (recyclegpt.config.PRESETS)")
    t.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: the preset's)")
    t.add_argument("--tokenizer", default=None, help="use this model's tokenizer instead of training a BPE")
    t.add_argument("--bpe-max-bytes", type=int, default=None, help="train the BPE on the first N characters")
    t.add_argument("--no-module", action="store_true", help="train the base alone (the baseline)")
    t.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    _add_module_args(t)
    _add_config_args(t, TrainConfig, skip=("device",))
    t.add_argument("--device", default=None, help="default: cuda if available")

    sv = add("serve", cmd_serve)
    add_model_args(sv)
    sv.add_argument("--strategy", choices=strategy_names(), default=None,
                    help="the default strategy of requests (a request may pick another with "
                         "\"recyclegpt\": {\"strategy\": ...}); default: recycle-verified with a module, else "
                         "standard (both lossless; the lossy recycle only when asked)")
    sv.add_argument("--engine", default="auto", choices=ENGINES,
                    help="decode loop (default auto: CUDA graphs on a GPU, eager on CPU; compiled: torch.compile, "
                        "on the CPU after a minute or two of compiling); the tokens are the same")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--served-model-name", default=None,
                    help="the name clients pass as \"model\" (default: --model)")
    sv.add_argument("--max-model-len", type=int, default=None,
                    help="limit prompt + completion tokens to N (default: the model's context length)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $RECYCLEGPT_API_KEY, else none)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests that may wait behind the running ones; more get 503 (default 64)")
    sv.add_argument("--max-batch", type=int, default=8,
                    help="greedy requests of one strategy decode together by continuous batching, up to this many "
                         "at once (default 8; 1: one request at a time)")
    sv.add_argument("--draft-rows", type=int, default=DRAFT_ROWS, metavar="N",
                    help="the verified strategies draft while at most N requests decode together; with more, their "
                         "rounds verify the full model's next token alone, with the same answers (every row keeps "
                         f"the tokens of the row that accepted fewest, so drafts pay less as rows grow; default "
                         f"{DRAFT_ROWS}; --max-batch or more: always draft)")
    add_prefill_chunk(sv, "a")
    sv.add_argument("--no-warmup", action="store_true",
                    help="skip the start-up pass that captures the batch engine's CUDA graphs for every batch size "
                         "before the port opens (a few seconds; on the CPU there is nothing to capture)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="uvicorn's log level (default info)")

    from .evaluate import add_eval_parser
    from .harness import add_lm_eval_parser

    add_eval_parser(sub)
    add_lm_eval_parser(sub)

    r = add("retrofit", cmd_retrofit)
    r.add_argument("files", nargs="+", help="text files, prompt→response JSONL, or both (text then joins as windows of "
                   "--seq-len tokens; validation stays on the JSONL); globs allowed")
    r.add_argument("--model", default=DEFAULT_MODEL, help="the frozen base (name or path)")
    r.add_argument("--out", required=True, help="checkpoint directory for the module")
    r.add_argument("--base-dtype", default=None, help="the frozen base's dtype (default: bf16 on CUDA, else fp32)")
    r.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    _add_module_args(r)
    _add_config_args(r, TrainConfig, skip=("device", "lam", "detach_hidden"))
    r.add_argument("--device", default=None, help="default: cuda if available")

    dt = add("distill-train", cmd_distill_train)
    dt.add_argument("--prompts", nargs="+", default=None, metavar="FILE",
                    help="instruction prompt files (JSONL with a 'prompt' field per line; globs allowed)")
    dt.add_argument("--text", nargs="+", default=None, metavar="FILE",
                    help="plain-text files that natural-text prefixes are cut from (globs allowed)")
    dt.add_argument("--model", default=DEFAULT_MODEL, help="the frozen base (name or path)")
    dt.add_argument("--out", required=True, help="checkpoint directory for the module")
    dt.add_argument("--base-dtype", default=None, help="the frozen base's dtype (default: bf16 on CUDA, else fp32)")
    dt.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    dt.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="end this run after step STEP with a checkpoint, as --deadline does")
    _add_module_args(dt)
    _add_config_args(dt, TrainConfig, skip=("device", "lam", "detach_hidden", "seq_len", "eval_batches"),
                     defaults={"target": "distill", "eval_every": 200, "save_every": 200})
    from ..training.online import OnlineConfig

    _add_config_args(dt, OnlineConfig)
    dt.add_argument("--device", default=None, help="default: cuda if available")

    ex = add("export", cmd_export)
    ex.add_argument("out", help="output directory (config.json, model.safetensors)")
    ex.add_argument("--format", required=True, choices=("vllm-eagle3", "sglang-eagle3"),
                    help="vllm-eagle3: vLLM's EAGLE-3 draft; sglang-eagle3: SGLang's (one module layer)")
    add_model_args(ex, runs=False)
    ex.add_argument("--config-style", default=None, choices=("speculators", "plain"),
                    help="vllm-eagle3's config.json: speculators (default) or plain (LlamaForCausalLMEagle3, what "
                         "sglang-eagle3 writes)")
    ex.add_argument("--vocab", default="draft", choices=("draft", "full"),
                    help="the draft's LM head: the module's draft vocabulary with its d2t/t2d tables (default, "
                         "where it has one) or the full vocabulary")
    ex.add_argument("--verifier", default=None,
                    help="the base's Hugging Face id or path, recorded in a speculators config (default: from "
                         "--model, e.g. HuggingFaceTB/SmolLM2-135M-Instruct for the built-in SmolLM2)")
    ex.add_argument("--speculative-tokens", type=int, default=3,
                    help="a speculators config's proposal length (default 3)")
    ex.add_argument("--export-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="the weights' dtype in model.safetensors (default bfloat16)")
    ex.add_argument("--no-embed", dest="embed", action="store_false",
                    help="leave the token embedding out (the engines then take the base's)")
    ex.add_argument("--force", action="store_true", help="replace config.json and model.safetensors in OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)  # numeric ranges and --device, before anything is loaded or written
        apply_threads(args)  # --threads: before any torch work
        args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, CheckpointError, RegistryError) as e:
        print(f"recyclegpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's, not the arguments': a full disk, a file it may not write
        where = f" ({e.filename})" if e.filename else ""
        hint = "; free some space and run again (--resume continues a training run from its last checkpoint)" \
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"recyclegpt {args.command}: error: {e.strerror or e}{where}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
