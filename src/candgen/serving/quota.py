"""Dynamic quota allocation across candidate generators, with dedup.

Each surface gives every generator a weight. A request for K ads first gives each generator
``weight * K`` slots (largest remainder, so the slots sum to K); slots a generator cannot fill
(it found fewer eligible ads) pass to the others in proportion to their weights, until K are
filled or every generator is exhausted. An ad found by several generators is kept once, credited
to the generator with the larger weight, and that generator's slot is refilled from its next
candidate. Fewer than K results come back when fewer eligible ads exist; there is never padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from candgen.errors import ConfigError

GENERATORS = ("sequential", "content", "popularity")
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    # The home feed follows the user's history; search leans on content (the query's topic
    # shows up in the short-term sequence and in ad text); related items mix both.
    "home": {"sequential": 0.6, "content": 0.25, "popularity": 0.15},
    "search": {"sequential": 0.4, "content": 0.45, "popularity": 0.15},
    "related": {"sequential": 0.5, "content": 0.35, "popularity": 0.15},
}


@dataclass(frozen=True)
class QuotaConfig:
    """Per-surface generator weights (each surface's weights are positive and sum to 1)."""

    weights: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        for surface, w in self.weights.items():
            if not isinstance(w, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in w.values()
            ):
                raise ConfigError(f"weights.{surface}", f"must map generator -> share, got {w!r}")
            unknown = set(w) - set(GENERATORS)
            if unknown:
                raise ConfigError(f"weights.{surface}", f"unknown generator(s) {sorted(unknown)}; "
                                  f"expected some of {GENERATORS}")  # fmt: skip
            if any(v < 0 for v in w.values()) or not np.isclose(sum(w.values()), 1.0):
                raise ConfigError(f"weights.{surface}",
                                  f"weights must be >= 0 and sum to 1, got {w}")  # fmt: skip

    def for_surface(self, surface: str) -> dict[str, float]:
        if surface not in self.weights:
            raise ConfigError("scenario", f"unknown surface {surface!r}; expected one of "
                              f"{sorted(self.weights)}")  # fmt: skip
        return self.weights[surface]


@dataclass(frozen=True)
class Candidate:
    ad_id: int
    score: float
    source: str


def initial_quotas(weights: dict[str, float], k: int) -> dict[str, int]:
    """``weight * k`` slots per generator, rounded by largest remainder to sum to ``k``."""
    names = [g for g, w in weights.items() if w > 0]
    raw = np.array([weights[g] * k for g in names])
    base = np.floor(raw).astype(int)
    order = np.argsort(-(raw - base), kind="stable")
    base[order[: k - int(base.sum())]] += 1
    return dict(zip(names, base.tolist(), strict=True))


def allocate(
    candidates: dict[str, list[tuple[int, float]]], weights: dict[str, float], k: int
) -> list[Candidate]:
    """Picks up to ``k`` ads from the generators' ranked lists (best first in each list).

    Args:
        candidates: generator -> its eligible candidates as (ad id, score), best first.
        weights: generator -> share of the slots (a surface's weights).
        k: how many ads to return.

    Returns:
        The chosen ads, grouped by generator in descending weight, each group best first.
    """
    if k <= 0:
        raise ConfigError("k", f"must be > 0, got {k}")
    order = sorted((g for g in weights if weights[g] > 0), key=lambda g: -weights[g])
    cursor = dict.fromkeys(order, 0)
    taken: dict[str, list[Candidate]] = {g: [] for g in order}
    seen: set[int] = set()

    def take(gen: str, slots: int) -> int:
        got = 0
        items = candidates.get(gen, [])
        while got < slots and cursor[gen] < len(items):
            ad, score = items[cursor[gen]]
            cursor[gen] += 1
            if ad in seen:
                continue
            seen.add(ad)
            taken[gen].append(Candidate(int(ad), float(score), gen))
            got += 1
        return got

    quotas = initial_quotas({g: weights[g] for g in order}, k)
    for gen in order:
        take(gen, quotas[gen])
    # Hand unfilled slots to the generators that still have candidates, by weight.
    while (missing := k - sum(len(v) for v in taken.values())) > 0:
        open_gens = [g for g in order if cursor[g] < len(candidates.get(g, []))]
        if not open_gens:
            break
        share = initial_quotas({g: weights[g] for g in open_gens}, missing)
        if sum(take(g, max(share[g], 1)) for g in open_gens) == 0:
            break
    out = [c for g in order for c in taken[g]]
    return out[:k]
