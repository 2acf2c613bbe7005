"""Mixture recipes: what each `data.sources` entry contributes to a run (pure functions of the
sources, their epoch sizes and the run's length; no I/O, no config objects).

A source has either a `weight` (relative to the other weighted sources) or a token budget
`tokens` (the tokens it supplies over the run). Budgets are taken first; the run's remaining
tokens are shared by the weighted sources in proportion to their weights. The loader then
draws each sample's source with these fractions (data/loader.py), so the figures below are
expectations: a source's realised share differs by the draws' binomial noise, ~sqrt(n) samples.

`max_epochs` caps how often a source may be repeated: a run that would go through a source
more often is refused before it starts (`check`), naming the source and the figures.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


class MixtureError(ValueError):
    """A recipe that cannot be planned for this run (the message names the source)."""


@dataclass(frozen=True)
class Spec:
    """One source as the recipe gives it."""

    path: str
    weight: float = 1.0
    tokens: int | None = None  # token budget over the run; overrides weight
    max_epochs: float | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.path)) or self.path


@dataclass(frozen=True)
class Share:
    """What one source contributes to a run of `run_samples` samples (expected values)."""

    spec: Spec
    fraction: float  # of the run's samples (the loader's sampling weight)
    samples_per_epoch: int  # train samples the loader yields per epoch (all ranks)
    run_samples: int

    @property
    def samples(self) -> float:
        return self.fraction * self.run_samples

    @property
    def epochs(self) -> float:
        return self.samples / self.samples_per_epoch if self.samples_per_epoch else math.inf

    @property
    def first_epoch_ends(self) -> float:
        """The run sample at which this source's first epoch is used up (inf if never drawn)."""
        return self.samples_per_epoch / self.fraction if self.fraction > 0 else math.inf


def fractions(specs: list[Spec], run_tokens: int) -> list[float]:
    """Each source's share of the run's samples: budgets first, the rest by weight."""
    budget = sum(s.tokens for s in specs if s.tokens is not None)
    if budget > run_tokens:
        raise MixtureError(
            f"the token budgets add up to {budget:,} tokens, more than the run's {run_tokens:,} "
            "(train.steps x global batch x seq_len): lower them or train longer"
        )
    weighted = [s for s in specs if s.tokens is None]
    total_weight = sum(s.weight for s in weighted)
    rest = run_tokens - budget
    if rest > 0 and total_weight <= 0:
        raise MixtureError(
            f"the token budgets add up to {budget:,} of the run's {run_tokens:,} tokens and no source "
            "with a weight takes the rest: give one source a weight instead of tokens, or match the budgets"
        )
    return [
        s.tokens / run_tokens if s.tokens is not None else rest / run_tokens * s.weight / total_weight
        for s in specs
    ]


def plan(specs: list[Spec], samples_per_epoch: list[int], run_samples: int, seq_len: int) -> list[Share]:
    """The shares of a run of `run_samples` samples of `seq_len` tokens."""
    shares = fractions(specs, run_samples * seq_len)
    return [Share(s, f, n, run_samples) for s, f, n in zip(specs, shares, samples_per_epoch, strict=True)]


def check(shares: list[Share]) -> None:
    """Refuse a run that repeats a source more often than its max_epochs."""
    for share in shares:
        cap = share.spec.max_epochs
        if cap is not None and share.epochs > cap:
            raise MixtureError(
                f"data.sources {share.spec.label}: the run would go through it {share.epochs:.2f} times, "
                f"more than its max_epochs={cap:g} ({share.samples_per_epoch:,} samples per epoch, "
                f"{share.samples:,.0f} drawn): lower its weight or tokens, add data, or raise max_epochs"
            )


def table(shares: list[Share], seq_len: int, samples_per_step: int) -> str:
    """The recipe as a table: per source its fraction, tokens, epochs and when its first epoch
    ends; then which source runs out first."""
    header = f"{'source':<24} {'fraction':>8} {'tokens':>16} {'epoch samples':>14} {'epochs':>8} {'max':>6}"
    lines = [header]
    for share in shares:
        cap = "-" if share.spec.max_epochs is None else f"{share.spec.max_epochs:g}"
        lines.append(
            f"{share.spec.label:<24} {share.fraction:>8.4f} {share.samples * seq_len:>16,.0f} "
            f"{share.samples_per_epoch:>14,} {share.epochs:>8.3f} {cap:>6}"
        )
    first = min(shares, key=lambda s: s.first_epoch_ends)
    step = first.first_epoch_ends / samples_per_step
    run_steps = shares[0].run_samples / samples_per_step
    if step <= run_steps:
        lines.append(
            f"runs out first: {first.spec.label} "
            f"(its first epoch ends at step ~{step:,.0f} of {run_steps:,.0f})"
        )
    else:
        lines.append(
            f"no source runs out during the run ({first.spec.label} would first, at step ~{step:,.0f})"
        )
    return "\n".join(lines)
