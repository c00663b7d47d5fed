"""Sampling as pure functions: (logits, params, generator) -> probabilities or tokens.

Every decoding path (the full model's tokens and the module's alike) goes through these, so that draft and target
distributions are computed identically. Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A torch.Generator seeded with `seed` (None when greedy or unseeded: the global RNG is used)."""
        if self.greedy or self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. No host synchronisation."""
    if params.greedy:
        return logits.argmax(-1)
    return draw(logits_to_probs(logits, params), generator)


class RowSampling:
    """Sampling with settings of each row's own (a continuous batch's requests): rows[i] is (SamplingParams,
    generator) for a row that samples, None (or greedy settings) for one that takes the argmax. A row with a
    generator draws from it exactly as it does alone (one (1, V) draw per token); the rows without one draw from
    torch's global generator, those of equal settings in one draw."""

    greedy = False

    def __init__(self, rows: list[tuple[SamplingParams, torch.Generator | None] | None]) -> None:
        groups: dict[SamplingParams, list[int]] = {}
        self.own = []  # (row, settings, generator) of the rows with a generator of their own
        for i, row in enumerate(rows):
            if row is None or row[0].greedy:
                continue
            if row[1] is None:
                groups.setdefault(row[0], []).append(i)
            else:
                self.own.append((i, *row))
        self.groups = [(params, torch.tensor(idx)) for params, idx in groups.items()]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for i, params, gen in self.own:
            tokens[i:i + 1] = sample(logits[i:i + 1], params, gen)
        if self.groups and self.groups[0][1].device != logits.device:  # once per device
            self.groups = [(params, idx.to(logits.device)) for params, idx in self.groups]
        for params, idx in self.groups:
            tokens[idx] = sample(logits[idx], params, None)
        return tokens


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) probabilities -> (...) token ids, one independent draw per row. No host synchronisation.

    Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. is distributed as p (a multinomial would sync).
    """
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)
