"""Dynamic quota allocation across candidate generators, with dedup.

A request for K ads gives each generator a share of the K slots. Where the shares come from is
the quota policy (``QuotaPolicy``):

- ``fixed``: each surface gives every generator a hand-set weight (``QuotaConfig``);
- ``learned``: each generator's expected value per slot, by rank band, for the request's context
  (surface x user-activity bucket), learned from logged outcomes (``LearnedQuotas``, fitted by
  ``candgen.quotas.learning``); the K slots go to the highest-valued ones, so a generator
  gets more slots where its candidates are worth more;
- ``snake``: round-robin over the generators' ranked lists (snake merge), the usual baseline.

Per-surface ``overrides`` take precedence over any policy. Given shares, ``allocate`` first
gives each generator ``share * K`` slots (largest remainder, so the slots sum to K); slots a
generator cannot fill (it found fewer eligible ads) pass to the others in proportion to their
shares, until K are filled or every generator is exhausted. An ad found by several generators is
kept once, credited to the generator with the larger share, and that generator's slot is
refilled from its next candidate. An optional ``admit`` callback (e.g.
``candgen.serving.diversity.Diversifier.admit``, the per-advertiser cap) may refuse an ad not yet
taken: it is skipped like a duplicate and the slot refilled the same way. Fewer than K results
come back when fewer eligible ads exist; there is never padding.

numpy only: the select step runs it inside the Triton runtime.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from candgen.errors import CandgenError, ConfigError
from candgen.vocab import SURFACES

# query: the search query's text embedding against the ads' text (search only); item: the
# related page's item against the ad index (related only). Each finds nothing without its context.
# generative: the ads a generative model writes (a version with one; its slots are learned).
GENERATORS = ("sequential", "content", "query", "item", "popularity", "generative")
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    # The home feed follows the user's history. Search follows the query first, then the user;
    # related follows the item on the page first. A search without a query (or a related page
    # without an item) hands the context generator's slots to the others (``allocate``). The
    # generative generator gets slots from a learned table (or an override), not by hand.
    "home": {"sequential": 0.6, "content": 0.25, "query": 0.0, "item": 0.0, "popularity": 0.15,
             "generative": 0.0},
    "search": {"sequential": 0.25, "content": 0.2, "query": 0.4, "item": 0.0, "popularity": 0.15,
               "generative": 0.0},
    "related": {"sequential": 0.3, "content": 0.2, "query": 0.0, "item": 0.35, "popularity": 0.15,
                "generative": 0.0},
}  # fmt: skip


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
                raise ConfigError(
                    f"weights.{surface}",
                    f"unknown generator(s) {sorted(unknown)}; expected some of {GENERATORS}",
                )
            if any(v < 0 for v in w.values()) or not np.isclose(sum(w.values()), 1.0):
                raise ConfigError(
                    f"weights.{surface}", f"weights must be >= 0 and sum to 1, got {w}"
                )

    def for_surface(self, surface: str) -> dict[str, float]:
        if surface not in self.weights:
            raise ConfigError(
                "scenario", f"unknown surface {surface!r}; expected one of {sorted(self.weights)}"
            )
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
    candidates: dict[str, list[tuple[int, float]]],
    weights: dict[str, float],
    k: int,
    *,
    admit: Callable[[int], bool] | None = None,
) -> list[Candidate]:
    """Picks up to ``k`` ads from the generators' ranked lists (best first in each list).

    Args:
        candidates: generator -> its eligible candidates as (ad id, score), best first.
        weights: generator -> share of the slots (a surface's weights).
        k: how many ads to return.
        admit: asked about an ad not already taken just before taking it: True takes it (so
            the callback may record it), False skips it and the generator moves on.

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
            if ad in seen or (admit is not None and not admit(int(ad))):
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


def snake_merge(
    candidates: dict[str, list[tuple[int, float]]],
    order: Sequence[str],
    k: int,
    *,
    admit: Callable[[int], bool] | None = None,
) -> list[Candidate]:
    """Round-robin over the generators' ranked lists in ``order`` (snake merge), skipping ads
    already taken (or refused by ``admit``, as in ``allocate``), until ``k`` ads are taken or
    every list is exhausted."""
    if k <= 0:
        raise ConfigError("k", f"must be > 0, got {k}")
    cursor = dict.fromkeys(order, 0)
    seen: set[int] = set()
    out: list[Candidate] = []
    while len(out) < k:
        moved = False
        for gen in order:
            items = candidates.get(gen, [])
            # admit records what it accepts, so it is asked only once the ad would be taken.
            while cursor[gen] < len(items) and len(out) < k:
                ad, score = items[cursor[gen]]
                cursor[gen] += 1
                if ad in seen or (admit is not None and not admit(int(ad))):
                    continue
                seen.add(int(ad))
                out.append(Candidate(int(ad), float(score), gen))
                moved = True
                break
        if not moved:
            break
    return out


QUOTA_FILE = "quotas.json"
RANK_EDGES = (5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1_000)
ACTIVITY_BUCKETS = ("new", "light", "regular", "heavy")


@dataclass(frozen=True)
class LearnedQuotas:
    """Each generator's expected value per slot, by rank band, per context (surface x activity).

    A Beta posterior per (context, generator, rank band) over "the candidate in this slot turned
    into a logged outcome" (weighted by label: a conversion counts more than a click). Values are
    made non-increasing along the ranks of each generator (a later slot of a list is never
    worth more than an earlier one), so taking the K best slots gives each generator a prefix.

    A table fitted before a generator existed lacks it: that generator is worth nothing there
    (it gets no slot), and the table loads as it was.

    Attributes:
        generators: the generators, in tie-break order (some of ``GENERATORS``).
        rank_edges: band b holds ranks ``[rank_edges[b-1], rank_edges[b])`` (0-based; band 0
            starts at rank 0); ranks beyond the last edge are worth 0.
        activity_edges: a user with activity below ``activity_edges[0]`` is ``new``, below
            ``activity_edges[1]`` ``light``, below ``activity_edges[2]`` ``regular``, else
            ``heavy`` (activity = lifetime engagements and ad clicks, plus real-time items).
        alpha, beta: ``"<surface>/<bucket>"`` -> (generators x bands) Beta parameters.
        fitted: what the values were fitted on (window, requests, label weights...).
    """

    generators: tuple[str, ...]
    rank_edges: tuple[int, ...]
    activity_edges: tuple[int, int, int]
    alpha: dict[str, list[list[float]]]
    beta: dict[str, list[list[float]]]
    fitted: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.generators) - set(GENERATORS)
        if not self.generators or unknown:
            raise ConfigError("generators", f"need some of {GENERATORS}, got {self.generators}")
        edges = list(self.rank_edges)
        if not edges or edges[0] <= 0 or edges != sorted(set(edges)):
            raise ConfigError("rank_edges", f"need increasing positive ranks, got {edges}")
        act = list(self.activity_edges)
        if len(act) != len(ACTIVITY_BUCKETS) - 1 or act != sorted(act) or act[0] < 1:
            raise ConfigError(
                "activity_edges",
                f"need {len(ACTIVITY_BUCKETS) - 1} non-decreasing counts >= 1, got {act}",
            )
        shape = (len(self.generators), len(edges))
        for key in {*self.alpha, *self.beta}:
            surface, _, bucket = key.partition("/")
            if surface not in SURFACES or bucket not in ACTIVITY_BUCKETS:
                raise ConfigError(
                    "contexts",
                    f"{key!r} is not <surface>/<activity bucket> of "
                    f"{SURFACES} and {ACTIVITY_BUCKETS}",
                )
            for name, table in (("alpha", self.alpha), ("beta", self.beta)):
                values = np.asarray(table.get(key, []), dtype=np.float64)
                if values.shape != shape or not (values > 0).all():
                    raise ConfigError(
                        f"{name}.{key}",
                        f"need {shape[0]} x {shape[1]} positive values, got shape {values.shape}",
                    )

    def bucket(self, activity: int) -> str:
        return ACTIVITY_BUCKETS[int(np.searchsorted(self.activity_edges, activity, "right"))]

    def context_key(self, surface: str, activity: int) -> str:
        """``"<surface>/<activity bucket>"``, whether or not the table holds it."""
        return f"{surface}/{self.bucket(activity)}"

    def context(self, surface: str, activity: int) -> str:
        key = self.context_key(surface, activity)
        if key not in self.alpha:
            raise ConfigError("scenario", f"the learned quotas hold no context {key!r}")
        return key

    def band_values(
        self, surface: str, activity: int, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """(generators, bands) expected value per slot: the posterior mean, or with ``rng`` a
        Thompson-sampling draw; non-increasing along each generator's bands."""
        key = self.context(surface, activity)
        a, b = np.asarray(self.alpha[key]), np.asarray(self.beta[key])
        values = rng.beta(a, b) if rng is not None else a / (a + b)
        return np.minimum.accumulate(values, axis=1)

    def quotas(
        self,
        surface: str,
        activity: int,
        k: int,
        available: Mapping[str, int] | None = None,
        rng: np.random.Generator | None = None,
    ) -> dict[str, int]:
        """Slots per generator: the ``k`` slots of highest value (a generator's slots beyond
        ``available[g]`` candidates are not offered)."""
        if k <= 0:
            raise ConfigError("k", f"must be > 0, got {k}")
        values = self.band_values(surface, activity, rng)
        starts = (0, *self.rank_edges[:-1])
        offers = []
        for g, gen in enumerate(self.generators):
            cap = self.rank_edges[-1] if available is None else int(available.get(gen, 0))
            for band, (lo, hi) in enumerate(zip(starts, self.rank_edges, strict=True)):
                width = min(hi, cap) - lo
                if width > 0:
                    offers.append((-values[g, band], g, band, width))
        out = dict.fromkeys(self.generators, 0)
        left = k
        for _, g, _, width in sorted(offers):
            take = min(width, left)
            out[self.generators[g]] += take
            left -= take
            if left == 0:
                break
        return out

    def weights(
        self,
        surface: str,
        activity: int,
        k: int,
        available: Mapping[str, int] | None = None,
        rng: np.random.Generator | None = None,
    ) -> dict[str, float]:
        """The quotas as shares of ``k`` (what ``allocate`` takes)."""
        quotas = self.quotas(surface, activity, k, available, rng)
        total = sum(quotas.values())
        if total == 0:
            return {g: 1.0 / len(self.generators) for g in self.generators}
        return {g: n / total for g, n in quotas.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "generators": list(self.generators),
            "rank_edges": list(self.rank_edges),
            "activity_edges": list(self.activity_edges),
            "alpha": self.alpha,
            "beta": self.beta,
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> LearnedQuotas:
        missing = {"generators", "rank_edges", "activity_edges", "alpha", "beta"} - set(body)
        if missing:
            raise ConfigError(sorted(missing)[0], "missing from the learned quota table")
        return cls(
            tuple(body["generators"]),
            tuple(body["rank_edges"]),
            tuple(body["activity_edges"]),
            dict(body["alpha"]),
            dict(body["beta"]),
            dict(body.get("fitted", {})),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> LearnedQuotas:
        path = Path(path)
        if not path.exists():
            raise CandgenError(f"quotas: {path} does not exist (candgen quotas learn writes it)")
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CandgenError(f"quotas: {path} is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise CandgenError(f"quotas: {path} must hold a JSON object")
        return cls.from_dict(body)


POLICIES = ("fixed", "learned", "snake")
EXPLORATION = ("mean", "thompson")


@dataclass(frozen=True)
class QuotaPolicy:
    """How the select step shares K among the generators for one request.

    Args:
        policy: ``fixed`` (per-surface weights), ``learned`` (the learned table) or ``snake``.
        fixed: the per-surface weights of the fixed policy.
        overrides: surface -> generator -> share, used for that surface whatever the policy.
        learned: the learned table (required by the learned policy).
        exploration: with the learned policy, ``mean`` (posterior means: the same request
            always gets the same quotas) or ``thompson`` (a Thompson-sampling draw per request).
    """

    policy: str = "fixed"
    fixed: QuotaConfig = field(default_factory=QuotaConfig)
    overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    learned: LearnedQuotas | None = None
    exploration: str = "mean"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError("quota_policy", f"{self.policy!r} is not one of {POLICIES}")
        if self.exploration not in EXPLORATION:
            raise ConfigError(
                "quota_exploration", f"{self.exploration!r} is not one of {EXPLORATION}"
            )
        if self.policy == "learned" and self.learned is None:
            raise ConfigError(
                "quota_policy",
                f"learned needs a learned quota table ({QUOTA_FILE}; candgen quotas learn)",
            )
        unknown = set(self.overrides) - set(SURFACES)
        if unknown:
            raise ConfigError("quota_overrides", f"unknown surface(s) {sorted(unknown)}")
        QuotaConfig({f"{s}": w for s, w in self.overrides.items()})  # validates the shares

    def source(self, surface: str) -> str:
        """Where this surface's quotas come from: ``override``, or the policy's name."""
        return "override" if surface in self.overrides else self.policy

    def select(
        self,
        candidates: dict[str, list[tuple[int, float]]],
        surface: str,
        activity: int,
        k: int,
        rng: np.random.Generator | None = None,
        *,
        admit: Callable[[int], bool] | None = None,
    ) -> list[Candidate]:
        """Up to ``k`` ads from the generators' ranked lists for one request (``admit`` as in
        ``allocate``)."""
        source = self.source(surface)
        if source == "override":
            return allocate(candidates, self.overrides[surface], k, admit=admit)
        if source == "snake":
            return snake_merge(candidates, GENERATORS, k, admit=admit)
        if source == "learned":
            assert self.learned is not None
            draw = rng if self.exploration == "thompson" else None
            available = {g: len(c) for g, c in candidates.items()}
            weights = self.learned.weights(surface, activity, k, available, draw)
            return allocate(candidates, weights, k, admit=admit)
        return allocate(candidates, self.fixed.for_surface(surface), k, admit=admit)


def source_counts(chosen: Sequence[Candidate]) -> dict[str, int]:
    """How many of the chosen ads each generator contributed, in GENERATORS order."""
    counts = dict.fromkeys(GENERATORS, 0)
    for c in chosen:
        counts[c.source] = counts.get(c.source, 0) + 1
    return counts


def describe(policy: QuotaPolicy, k: int = 100) -> list[dict[str, Any]]:
    """Per context, where its quotas come from and the slots each generator gets at ``k`` (for
    a learned table, also the expected value of each generator's first slot)."""
    rows = []
    buckets = ACTIVITY_BUCKETS if policy.learned is not None else ("any",)
    for surface in SURFACES:
        for bucket in buckets:
            source = policy.source(surface)
            row: dict[str, Any] = {"surface": surface, "activity": bucket, "source": source}
            if source == "learned":
                assert policy.learned is not None
                activity = _bucket_example(policy.learned, bucket)
                row["slots"] = policy.learned.quotas(surface, activity, k)
                values = policy.learned.band_values(surface, activity)[:, 0]
                row["first_slot_value"] = dict(
                    zip(policy.learned.generators, np.round(values, 5).tolist(), strict=True)
                )
            elif source == "snake":
                row["slots"] = {g: k // len(GENERATORS) for g in GENERATORS}
            else:
                weights = (
                    policy.overrides[surface]
                    if source == "override"
                    else policy.fixed.for_surface(surface)
                )
                row["slots"] = initial_quotas(weights, k)
            rows.append(row)
    return rows


def _bucket_example(learned: LearnedQuotas, bucket: str) -> int:
    """An activity count that falls in ``bucket``."""
    lower = (0, *learned.activity_edges)
    return int(lower[ACTIVITY_BUCKETS.index(bucket)])
