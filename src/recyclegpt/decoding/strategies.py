"""The strategy registry: one `Strategy` entry per decoding strategy, which the API, the engines, the bench, the
demo, the differential harness and the CLI all read.

An entry says whether the strategy is lossless and whether it needs the recyclable module, and names its two
implementations: the eager reference loop (`reference`) and the engine's round (`round`, one of `ROUNDS`, which
`engine.Decoder` runs as fixed-shape steps). Adding a strategy is one `register` call plus those implementations;
docs/engine.md ("Adding a strategy") works through an example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..models import RecycleModel, Transformer
from .loops import DecodeResult, recycle, standard
from .speculative import (
    DEFAULT_DRAFT_LEN,
    TreeShape,
    lookup,
    recycle_verified,
    speculative,
    tree,
)

# the engine's rounds (engine.Decoder), each with whether it runs the module: "standard" one token per full call;
# "recycle" the paper's two-token step; "chain" and "tree" the module's drafts, verified by the full model;
# "lookup" a chain drafted by prompt lookup
ROUNDS = {"standard": False, "recycle": True, "chain": True, "tree": True, "lookup": False}
COMMON = ("max_new_tokens", "sampling", "stop_ids", "stream")  # the keywords every decoding loop takes


@dataclass(frozen=True)
class Strategy:
    """One decoding strategy.

    name: what `generate(strategy=)`, `--strategy` and the bench call it.
    lossless: its output is standard decoding's (greedy: token for token; sampling: in distribution); the bench,
        the demo and the differential harness hold its greedy tokens to standard's.
    needs_module: it runs the recyclable module; its reference loop then gets the RecycleModel, else the base
        Transformer.
    reference: the eager reference loop, called as reference(model, prompts, max_new_tokens=, sampling=,
        stop_ids=, stream=, draft_len=, tree_shape=, min_draft_prob=) -> DecodeResult (`common` picks the
        keywords every loop takes).
    round: the engine round that runs it (`ROUNDS`); None: the eager loop only.
    draft_len: a chain's fixed draft length (None: the caller's draft_len).
    """

    name: str
    lossless: bool
    needs_module: bool
    reference: Callable[..., DecodeResult]
    round: str | None = None
    draft_len: int | None = None

    def __post_init__(self) -> None:
        if self.round is not None and self.round not in ROUNDS:
            raise ValueError(f"strategy {self.name!r}: unknown round {self.round!r}; choose one of "
                             f"{', '.join(ROUNDS)} (or None: the eager loop only)")
        if self.round is not None and ROUNDS[self.round] and not self.needs_module:
            raise ValueError(f"strategy {self.name!r}: the {self.round!r} round runs the module (needs_module=True)")


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy, *, replace: bool = False) -> Strategy:
    """Add a strategy (replace: over one of the same name); returns it."""
    if strategy.name in _REGISTRY and not replace:
        raise ValueError(f"strategy {strategy.name!r} is already registered (replace=True replaces it)")
    _REGISTRY[strategy.name] = strategy
    return strategy


def unregister(name: str) -> Strategy:
    """Remove a strategy; returns it."""
    get(name)
    return _REGISTRY.pop(name)


def get(name: str) -> Strategy:
    """The strategy registered as `name`; a ValueError naming the choices for any other."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Every registered strategy, in the order registered."""
    return tuple(_REGISTRY)


def lossless_names() -> tuple[str, ...]:
    """The lossless strategies but standard itself: those whose greedy tokens must equal standard's."""
    return tuple(n for n, s in _REGISTRY.items() if s.lossless and n != "standard")


def common(options: dict) -> dict:
    """The keywords every decoding loop takes (`COMMON`), from a reference loop's options."""
    return {k: options[k] for k in COMMON if k in options}


def reference_decode(model: RecycleModel | Transformer, strategy: str, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, draft_len: int = DEFAULT_DRAFT_LEN, tree_shape: TreeShape = TreeShape(),
                     min_draft_prob: float = 0.0, **kw) -> DecodeResult:
    """`strategy` by its eager reference loop. model: a RecycleModel, or a bare Transformer for a strategy that
    needs no module. kw: sampling, stop_ids, stream. The engines (decoding/engine.py) run the same strategies as
    fixed-shape steps and are tested against these."""
    s = get(strategy)
    if s.needs_module and not isinstance(model, RecycleModel):
        raise ValueError(f"strategy {strategy!r} needs a RecycleModel (a base model with its recyclable module)")
    if not s.needs_module and isinstance(model, RecycleModel):
        model = model.base
    res = s.reference(model, prompts, max_new_tokens=max_new_tokens, draft_len=s.draft_len or draft_len,
                      tree_shape=tree_shape, min_draft_prob=min_draft_prob, **kw)
    res.stats.strategy = s.name
    return res


register(Strategy("standard", lossless=True, needs_module=False, round="standard",
                  reference=lambda model, prompts, **kw: standard(model, prompts, **common(kw))))
register(Strategy("recycle", lossless=False, needs_module=True, round="recycle",
                  reference=lambda model, prompts, **kw: recycle(model, prompts, **common(kw))))
register(Strategy("recycle-verified", lossless=True, needs_module=True, round="chain", draft_len=1,
                  reference=lambda model, prompts, **kw: recycle_verified(
                      model, prompts, min_draft_prob=kw["min_draft_prob"], **common(kw))))
register(Strategy("speculative", lossless=True, needs_module=True, round="chain",
                  reference=lambda model, prompts, **kw: speculative(
                      model, prompts, draft_len=kw["draft_len"], min_draft_prob=kw["min_draft_prob"], **common(kw))))
register(Strategy("tree", lossless=True, needs_module=True, round="tree",
                  reference=lambda model, prompts, **kw: tree(model, prompts, shape=kw["tree_shape"], **common(kw))))
register(Strategy("lookup", lossless=True, needs_module=False, round="lookup",
                  reference=lambda model, prompts, **kw: lookup(model, prompts, draft_len=kw["draft_len"],
                                                                 **common(kw))))
