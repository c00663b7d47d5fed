"""Quality evaluation (`recyclegpt eval`): zero-shot multiple choice, last-word prediction, perplexity, and the
module's agreement with the full model, each under standard, recycle or module scoring.

Every score comes from one primitive, `token_logprobs`: teacher-forced log-probabilities of a continuation, one
base forward and (for recycle/module scoring) one module forward per right-padded batch. *Recycle scoring* is the
teacher-forced counterpart of alternating decoding: continuation tokens at even offsets are scored by the full
model, odd offsets by the module (docs/evaluation.md defines it). Dataset formats follow lm-evaluation-harness's
prompts and its context/continuation tokenization, so standard-scoring numbers are comparable with its.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

from ..api import RecycleGPT
from ..loading.tokenizer import Tokenizer
from ..models import RecycleModel, Transformer
from ..training.data import iter_jsonl

SCORINGS = ("standard", "recycle", "module")
MC_FORMATS = ("piqa", "arc", "openbookqa", "boolq", "sciq", "generic")
OFFSET_BUCKETS = ((1, 15), (16, 63), (64, None))  # continuation offsets, for α per position class
HEAD_ROWS = 1024  # LM-head rows per chunk: bounds the (rows, vocab) float32 logits held at once


# -- the scoring primitive ---------------------------------------------------------------------------------------


class TokenScores(NamedTuple):
    """One sequence's continuation tokens s_L .. s_{n-1}, each a tensor of shape (n - L,) on the CPU."""

    logprobs: torch.Tensor  # float32: log p(s_i | s_<i) under the scorer of token i
    greedy: torch.Tensor  # bool: s_i is that scorer's argmax
    by_module: torch.Tensor  # bool: token i was scored by the recyclable module (else by the full model)


def min_context(scoring: str) -> int:
    """Context tokens a sequence needs: the module at position i-2 predicts s_i, so module scoring needs L >= 2."""
    return 2 if scoring == "module" else 1


def module_offsets(scoring: str, n: int) -> torch.Tensor:
    """(n,) bool: which continuation offsets (0 = the first continuation token) the module scores."""
    offsets = torch.arange(n)
    if scoring == "standard":
        return torch.zeros(n, dtype=torch.bool)
    if scoring == "module":
        return torch.ones(n, dtype=torch.bool)
    return offsets % 2 == 1  # recycle: the full model yields offset 0, the module offset 1, and so on


def _parts(model, scoring: str) -> tuple[Transformer, RecycleModel | None]:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    if isinstance(model, RecycleGPT):
        base, pair = model.base, model.model
    elif isinstance(model, RecycleModel):
        base, pair = model.base, model
    elif isinstance(model, Transformer):
        base, pair = model, None
    else:
        raise TypeError(f"expected a RecycleGPT, RecycleModel or Transformer, got {type(model).__name__}")
    if scoring != "standard" and pair is None:
        raise ValueError(f"--scoring {scoring} needs a recyclable module: pass --recycle PATH (a checkpoint from "
                         f"`recyclegpt retrofit`), or --recycle random for an untrained one (a smoke test only)")
    return base, pair


@torch.inference_mode()
def token_logprobs(model: RecycleGPT | RecycleModel | Transformer, sequences: Sequence[Sequence[int]],
                   context_lengths: Sequence[int], scoring: str = "standard", *,
                   batch_size: int = 16) -> list[TokenScores]:
    """Teacher-forced scores of each sequence's continuation s_L .. s_{n-1} (L = its context length).

    scoring: "standard" scores every token with the full model (logits at i-1); "module" with the module (at
    position i-2, from h_{i-2} and s_{i-1}); "recycle" alternates as decoding does: the full model at even offsets
    i - L, the module at odd ones. Sequences are sorted by length and run in right-padded batches of `batch_size`:
    causal attention never lets padding reach a real position, so no cache and no mask are needed. With
    `recycle_vocab` "draft" the module scores over its draft vocabulary, as `recycle` then decodes: a token outside
    it gets log-probability -inf from the module (so the perplexity is infinite) and is never its argmax.
    """
    base, pair = _parts(model, scoring)
    outside = None  # (V,) bool: the tokens the module may not yield
    if pair is not None and scoring != "standard" and pair.recycles_over_draft:
        outside = torch.ones(base.cfg.vocab_size, dtype=torch.bool, device=base.tok_emb.weight.device)
        outside[pair.module.draft_ids] = False
    if len(sequences) != len(context_lengths):
        raise ValueError(f"{len(sequences)} sequences but {len(context_lengths)} context lengths")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    need, limit, vocab = min_context(scoring), base.cfg.context_length, base.cfg.vocab_size
    for k, (seq, L) in enumerate(zip(sequences, context_lengths)):
        if not need <= L < len(seq):
            raise ValueError(f"sequence {k}: context length {L} of {len(seq)} tokens; {scoring} scoring needs at "
                             f"least {need} context token(s) and one continuation token")
        if len(seq) > limit:
            raise ValueError(f"sequence {k} has {len(seq)} tokens, more than the model's context of {limit}")
        if not all(0 <= int(t) < vocab for t in seq):
            raise ValueError(f"sequence {k} has token ids outside the vocabulary [0, {vocab})")

    device = base.tok_emb.weight.device
    order = sorted(range(len(sequences)), key=lambda k: -len(sequences[k]))
    out: list[TokenScores | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = len(sequences[chunk[0]])
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, k in enumerate(chunk):
            ids[b, :len(sequences[k])] = torch.as_tensor(list(sequences[k]), dtype=torch.long)
        ids = ids.to(device)
        full = base(ids, num_logits=1, taps=() if pair is None else pair.taps)
        hidden, rec_hidden = full.hidden, None  # h_t (B, T, d), pre-norm
        if scoring != "standard":
            next_tokens = torch.cat((ids[:, 1:], torch.zeros_like(ids[:, :1])), dim=1)  # s_{t+1}; the last is padding
            # the module's logits are the base's head over its output hidden (RecycleModel.recycle), so only the
            # rows that score a token go through the head below
            # (B, T, d): predicts s_{t+2}
            rec_hidden = pair.recycle(pair.state(full), next_tokens, num_logits=1).hidden

        rows, pos, use_mod = [], [], []
        for b, k in enumerate(chunk):
            n, L = len(sequences[k]), context_lengths[k]
            rows.append(torch.full((n - L,), b))
            pos.append(torch.arange(L, n))
            use_mod.append(module_offsets(scoring, n - L))
        rows, pos, use_mod = torch.cat(rows).to(device), torch.cat(pos).to(device), torch.cat(use_mod).to(device)
        states = hidden[rows, pos - 1]  # (N, d): the full model at i-1 predicts s_i
        if rec_hidden is not None:
            states = torch.where(use_mod[:, None], rec_hidden[rows, (pos - 2).clamp(min=0)], states)
        targets = ids[rows, pos]
        lp, greedy = [], []
        for s in range(0, len(targets), HEAD_ROWS):
            logits = base.head(states[s:s + HEAD_ROWS]).float()  # (n, V)
            if outside is not None:
                logits.masked_fill_(use_mod[s:s + HEAD_ROWS, None] & outside, float("-inf"))
            tgt = targets[s:s + HEAD_ROWS]
            lp.append(torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None])[:, 0])
            greedy.append(logits.argmax(-1) == tgt)
        lp, greedy, use_mod = torch.cat(lp).cpu(), torch.cat(greedy).cpu(), use_mod.cpu()

        at = 0
        for k in chunk:
            n = len(sequences[k]) - context_lengths[k]
            out[k] = TokenScores(lp[at:at + n], greedy[at:at + n], use_mod[at:at + n])
            at += n
    return out


# -- tokenization (lm-evaluation-harness's convention) -----------------------------------------------------------


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, as lm-evaluation-harness makes them.

    Trailing whitespace of the context moves to the continuation ("Answer: " + "x" scores " x"); the pair is
    encoded whole and split after the context's own token count, so the continuation's first token is the one the
    model would produce after the context. An empty context is the BOS (else EOS) token alone.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context:
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + continuation)[len(ctx):]
    else:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else next(iter(tokenizer.eos_ids), None)
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token to condition on; this tokenizer has neither")
        ctx, cont = [prefix], tokenizer.encode(continuation, add_bos=False)
    if not cont:
        raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
    return ctx, cont


def fit(context: list[int], continuation: list[int], max_len: int, need: int) -> list[int]:
    """Drop context tokens from the left until context + continuation fits `max_len` (as the harness does)."""
    if len(context) < need:
        raise ValueError(f"a context of {len(context)} token(s) is too short: this scoring needs {need} (module "
                         f"scoring reads two tokens before the first one it scores)")
    keep = min(len(context), max_len - len(continuation))
    if keep < need:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                         f"{max_len} with {need} context token(s)")
    return context[len(context) - keep:]


# -- dataset files -----------------------------------------------------------------------------------------------


@dataclass
class MCItem:
    context: str
    choices: list[str]  # continuations, each with the leading space that separates it from the context
    gold: int

    def norm_length(self, j: int) -> int:
        """acc_norm's divisor: the choice's length in characters, the separating space not counted (the harness)."""
        c = self.choices[j]
        return len(c[1:] if c.startswith(" ") else c)


def _check_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line, where = "path:line"; a clear error for a bad line."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    for count, (where, rec) in enumerate(iter_jsonl(path), 1):
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield where, rec
        if limit is not None and count >= limit:
            return


def _str(rec: dict, key: str, where: str, *, empty_ok: bool = False) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not (empty_ok or v.strip()):
        raise ValueError(f"{where}: field {key!r} must be a {'' if empty_ok else 'non-empty '}string, got {v!r}")
    return v


def _labelled_choices(rec: dict, where: str) -> tuple[list[str], list[str]]:
    ch = rec.get("choices")
    if not (isinstance(ch, dict) and isinstance(ch.get("text"), list) and isinstance(ch.get("label"), list)
            and len(ch["text"]) == len(ch["label"]) and all(isinstance(t, str) for t in ch["text"])):
        raise ValueError(f"{where}: field 'choices' must be {{\"text\": [str], \"label\": [str]}} of equal lengths")
    return ch["text"], [str(x) for x in ch["label"]]


def _answer_index(labels: list[str], rec: dict, where: str) -> int:
    key = rec.get("answerKey")
    if not isinstance(key, str) or key.strip() not in labels:
        raise ValueError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return labels.index(key.strip())


def _arc(rec: dict, where: str) -> MCItem:
    texts, labels = _labelled_choices(rec, where)
    gold = rec["gold"] if "gold" in rec else _answer_index(labels, rec, where)
    return MCItem(f"Question: {_str(rec, 'question', where)}\nAnswer:", [" " + t for t in texts], gold)


def _openbookqa(rec: dict, where: str) -> MCItem:
    texts, labels = _labelled_choices(rec, where)
    return MCItem(_str(rec, "question_stem", where), [" " + t for t in texts], _answer_index(labels, rec, where))


def _boolq(rec: dict, where: str) -> MCItem:
    answer = rec.get("answer", rec.get("label"))
    if not isinstance(answer, (bool, int)) or int(answer) not in (0, 1):
        raise ValueError(f"{where}: field 'answer' must be true/false (or 'label' 0/1), got {answer!r}")
    context = f"{_str(rec, 'passage', where)}\nQuestion: {_str(rec, 'question', where)}?\nAnswer:"
    return MCItem(context, [" no", " yes"], int(answer))


def _sciq(rec: dict, where: str) -> MCItem:
    support = _str(rec, "support", where, empty_ok=True).lstrip()
    context = f"{support}\nQuestion: {_str(rec, 'question', where)}\nAnswer:"
    answers = [_str(rec, k, where) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    return MCItem(context, [" " + a for a in answers], 3)


def _generic(rec: dict, where: str) -> MCItem:
    choices = rec.get("choices")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: field 'choices' must be a list of at least two strings")
    return MCItem(_str(rec, "context", where, empty_ok=True), choices, rec.get("gold"))


def _piqa_labels(path: Path) -> list[int]:
    """PIQA keeps the answers of X.jsonl in X-labels.lst beside it, one 0/1 per line."""
    labels_path = path.with_name(path.stem + "-labels.lst")
    if not labels_path.is_file():
        raise FileNotFoundError(f"PIQA labels {str(labels_path)!r} not found beside {str(path)!r} (the answers of "
                                f"X.jsonl live in X-labels.lst; PIQA's test split has none)")
    lines = [s.strip() for s in labels_path.read_text(encoding="utf-8").splitlines() if s.strip()]
    bad = next((n for n, s in enumerate(lines, 1) if s not in ("0", "1")), None)
    if bad is not None:
        raise ValueError(f"{labels_path}:{bad}: expected 0 or 1, got {lines[bad - 1]!r}")
    with path.open(encoding="utf-8") as f:
        n_items = sum(1 for line in f if line.strip())
    if n_items != len(lines):
        raise ValueError(f"{labels_path} has {len(lines)} labels for the {n_items} items of {path}")
    return [int(s) for s in lines]


PARSERS = {"arc": _arc, "openbookqa": _openbookqa, "boolq": _boolq, "sciq": _sciq, "generic": _generic}


def load_mc(path: str | Path, fmt: str, *, limit: int | None = None) -> list[MCItem]:
    """Multiple-choice items from a dataset file in one of MC_FORMATS (docs/evaluation.md has the schemas)."""
    if fmt not in MC_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(MC_FORMATS)}")
    path = _check_file(path, f"{fmt} data")
    labels = _piqa_labels(path) if fmt == "piqa" else None
    items = []
    for k, (where, rec) in enumerate(read_jsonl(path, limit)):
        if fmt == "piqa":
            item = MCItem(f"Question: {_str(rec, 'goal', where)}\nAnswer:",
                          [" " + _str(rec, "sol1", where), " " + _str(rec, "sol2", where)], labels[k])
        else:
            item = PARSERS[fmt](rec, where)
        g = item.gold
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < len(item.choices):
            raise ValueError(f"{where}: gold {g!r} is out of range for {len(item.choices)} choices")
        if any(item.norm_length(j) == 0 for j in range(len(item.choices))):
            raise ValueError(f"{where}: a choice is empty")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items found")
    return items


def load_lastword(path: str | Path, *, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, " last_word") pairs from JSONL {"text"}: the text split at its last space, as LAMBADA is."""
    path = _check_file(path, "lastword data")
    pairs = []
    for where, rec in read_jsonl(path, limit):
        text = _str(rec, "text", where).rstrip()
        if " " not in text.strip():
            raise ValueError(f"{where}: the text needs at least two words")
        context, word = text.rsplit(" ", 1)
        pairs.append((context, " " + word))
    if not pairs:
        raise ValueError(f"{path}: no items found")
    return pairs


# -- the evaluations ---------------------------------------------------------------------------------------------


def evaluate_mc(lm: RecycleGPT, items: Sequence[MCItem], *, scoring: str = "standard",
                batch_size: int = 16) -> dict:
    """Zero-shot multiple choice: the choice with the highest log-likelihood given the context.

    accuracy ranks by the summed log-probability of each choice's tokens; accuracy_norm by that sum divided by the
    choice's length in characters (the harness's acc_norm).
    """
    need, limit = min_context(scoring), lm.base.cfg.context_length
    seqs, ctx_lens = [], []
    for item in items:
        for choice in item.choices:
            ctx, cont = encode_pair(lm.tokenizer, item.context, choice)
            ctx = fit(ctx, cont, limit, need)
            seqs.append(ctx + cont)
            ctx_lens.append(len(ctx))
    scores = iter(token_logprobs(lm, seqs, ctx_lens, scoring, batch_size=batch_size))
    correct = correct_norm = 0
    for item in items:
        ll = [float(next(scores).logprobs.sum()) for _ in item.choices]
        norm = [x / item.norm_length(j) for j, x in enumerate(ll)]
        correct += ll.index(max(ll)) == item.gold
        correct_norm += norm.index(max(norm)) == item.gold
    n = len(items)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n}


def evaluate_lastword(lm: RecycleGPT, pairs: Sequence[tuple[str, str]], *, scoring: str = "standard",
                      batch_size: int = 16) -> dict:
    """LAMBADA-style: the last word given the text before it.

    accuracy: every token of the word is the scorer's argmax (teacher-forced), so greedy decoding yields the word.
    perplexity: exp of the mean negative log-likelihood of a whole word (the harness's per-word perplexity);
    token_perplexity: the same per token of the words.
    """
    need, limit = min_context(scoring), lm.base.cfg.context_length
    seqs, ctx_lens = [], []
    for context, word in pairs:
        ctx, cont = encode_pair(lm.tokenizer, context, word)
        ctx = fit(ctx, cont, limit, need)
        seqs.append(ctx + cont)
        ctx_lens.append(len(ctx))
    scores = token_logprobs(lm, seqs, ctx_lens, scoring, batch_size=batch_size)
    nll = [-float(s.logprobs.sum()) for s in scores]
    n_tokens = sum(len(s.logprobs) for s in scores)
    return {"accuracy": sum(bool(s.greedy.all()) for s in scores) / len(scores),
            "perplexity": math.exp(sum(nll) / len(nll)), "token_perplexity": math.exp(sum(nll) / n_tokens),
            "n": len(scores), "n_tokens": n_tokens}


def perplexity_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, context) windows over a token stream: each scores tokens [begin + context, end).

    Windows of `max_length` tokens start every `stride` tokens; each scores only the tokens no earlier window
    scored, with the rest of the window as context. The first two tokens are context only, under every scoring,
    so that all three score the same tokens (module scoring needs two).
    """
    if max_length < 3:
        raise ValueError(f"--max-length must be >= 3, got {max_length}")
    if not 1 <= stride <= max_length - 2:
        raise ValueError(f"--stride must be in [1, max_length - 2] = [1, {max_length - 2}] so that every window "
                         f"keeps two context tokens, got {stride}")
    if n_tokens < 3:
        raise ValueError(f"the text has {n_tokens} tokens; perplexity needs at least 3")
    windows, begin, scored_to = [], 0, 2
    while True:
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, scored_to - begin))
        scored_to = end
        if end == n_tokens:
            return windows
        begin += stride


def evaluate_ppl(lm: RecycleGPT, text: str, *, scoring: str = "standard", max_length: int | None = None,
                 stride: int | None = None, batch_size: int = 1) -> dict:
    """Token-level perplexity of a whole text, with strided windows (perplexity_windows)."""
    ids = lm.tokenizer.encode(text)
    max_length = max_length or lm.base.cfg.context_length
    if max_length > lm.base.cfg.context_length:
        raise ValueError(f"--max-length {max_length} exceeds the model's context of {lm.base.cfg.context_length}")
    stride = stride or max_length // 2
    windows = perplexity_windows(len(ids), max_length, stride)
    scores = token_logprobs(lm, [ids[b:e] for b, e, _ in windows], [c for _, _, c in windows], scoring,
                            batch_size=batch_size)
    nll = -sum(float(s.logprobs.sum()) for s in scores)
    n = sum(len(s.logprobs) for s in scores)
    return {"perplexity": math.exp(nll / n), "n_tokens": n, "windows": len(windows), "max_length": max_length,
            "stride": stride}


def _bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}-{hi}" if hi is not None else f"{lo}+"


def _bucket(offset: int) -> str:
    """The offset class of a compared position; offset 0 (module scoring only) is a class of its own."""
    for lo, hi in OFFSET_BUCKETS:
        if offset >= lo and (hi is None or offset <= hi):
            return _bucket_label(lo, hi)
    return "0"


def evaluate_agreement(lm: RecycleGPT, prompts: Sequence[list[int]], *, max_new_tokens: int,
                       scoring: str = "recycle", batch_size: int = 8,
                       continuations: Sequence[Sequence[int]] | None = None) -> dict:
    """α: how often the module's greedy token equals the full model's, where alternating decoding uses the module.

    The full model decodes each prompt greedily (decoding.standard, stopping at EOS), unless `continuations` gives
    its greedy output already (as `bench` does with `standard`'s; each is cut before its first EOS and to
    max_new_tokens); one teacher-forced pass over prompt + continuation then gives the module's prediction at every
    position. Compared positions are those the
    scoring gives the module (recycle: offsets 1, 3, 5, ...; module: every offset); under standard scoring the
    full model's odd offsets are compared with its own cached decoding (a consistency check: α = 1).
    """
    from ..decoding.loops import standard

    _parts(lm, scoring)
    conts: list[list[int]] = []
    if continuations is not None:
        if len(continuations) != len(prompts):
            raise ValueError(f"{len(continuations)} continuations for {len(prompts)} prompts")
        eos = set(lm.tokenizer.eos_ids)
        for c in continuations:
            c = list(c)[:max_new_tokens]
            conts.append(c[:next((i for i, t in enumerate(c) if t in eos), len(c))])
    else:
        for s in range(0, len(prompts), batch_size):
            conts += standard(lm.base, prompts[s:s + batch_size], max_new_tokens=max_new_tokens,
                              stop_ids=lm.tokenizer.eos_ids).tokens
    kept = [(p, c) for p, c in zip(prompts, conts) if len(c) >= 2]  # offset 1 is the first the module yields
    scores = token_logprobs(lm, [p + c for p, c in kept], [len(p) for p, _ in kept], scoring, batch_size=batch_size)
    space = {}
    hits: dict[str, list[int]] = {}  # class -> [agreements, compared]
    for (_, cont), sc in zip(kept, scores):
        compared = sc.by_module if scoring != "standard" else module_offsets("recycle", len(cont))
        for off in torch.nonzero(compared)[:, 0].tolist():
            tok = cont[off]
            if tok not in space:
                space[tok] = lm.tokenizer.decode([tok])[:1].isspace()
            agree = int(sc.greedy[off])
            for key in ("all", "offset " + _bucket(off), "leading_space" if space[tok] else "no_leading_space"):
                h = hits.setdefault(key, [0, 0])
                h[0] += agree
                h[1] += 1
    total = hits.get("all", [0, 0])
    if total[1] == 0:
        raise ValueError("no position to compare: every continuation was shorter than two tokens (raise "
                         "--max-new-tokens, or use prompts the model answers at more length)")

    def alpha(keys) -> dict:
        return {k.split(" ")[-1]: {"alpha": hits[k][0] / hits[k][1], "n": hits[k][1]} for k in keys if k in hits}

    buckets = ["offset 0"] + ["offset " + _bucket_label(lo, hi) for lo, hi in OFFSET_BUCKETS]
    return {"alpha": total[0] / total[1], "n": total[1], "prompts": len(prompts),
            "alpha_by_offset": alpha(buckets), "alpha_by_leading_space": alpha(["leading_space", "no_leading_space"]),
            "new_tokens": sum(len(c) for c in conts)}
