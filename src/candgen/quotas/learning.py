"""Learning the quotas from logged outcomes: an offline fit of each generator's value per slot.

The logged requests of a window are its requests that led to ad clicks, each with the context
the surface logged for it: a search request's query text, a related page's context item, none
on home (``logged_requests``: one per user, surface and context). Their outcomes are the ads the
user then clicked there (a click with an attributed conversion counts as a conversion). Each
request is replayed through the retrieval pipeline as it stood when the window began and as
serving answers it: the user's features as of then (``OfflineFeatures``, point in time from the
offline tables), the query embedded with the MiniLM vectors the features step wrote
(``query_embedding.parquet``; no language model runs here), the query and the context item
passed to the user encoder and to the generators, so ``query`` finds candidates on search and
``item`` on related. Every generator's ranked candidates are kept; a clicked ad is a hit for the
generator
that ranks it first (a copy further down another list adds nothing once slots are shared),
weighted by its label. Hits and slots per (surface, activity bucket, generator, rank band)
give a Beta posterior per cell, shrunk towards the cell's value pooled over contexts. How hard
it is shrunk is estimated from the data (empirical Bayes, ``pooling="empirical"``): per
generator, the prior strength under which the contexts' hits are most likely (beta-binomial
marginal likelihood). Where contexts differ only by sampling noise that strength is large and
every context gets the pooled values; where they really differ it is small and each keeps its
own. (A fixed strength of 20 requests, the first design, let thin contexts of a few dozen
requests follow their noise: on the ablation's marketplace, a split fitted per context on one
window did worse on the next than one split for all.) ``LearnedQuotas`` then gives each request
the K slots of highest value; Thompson sampling draws from the same posteriors.

Refreshing is re-running the fit on the newest window (the pipeline's learn_quotas step); the
table goes into the select step of the exported repository.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from candgen.errors import CandgenError, ConfigError
from candgen.evaluation.metrics import paired_difference
from candgen.serving.contract import surface_context
from candgen.serving.pipeline import (
    USER_SERVICE,
    RetrievalPipeline,
    context_item_vector,
    generate,
    user_context,
    written_ad,
)
from candgen.serving.pipeline import user_vector as encode_user
from candgen.serving.quota import (
    ACTIVITY_BUCKETS,
    GENERATORS,
    RANK_EDGES,
    Candidate,
    LearnedQuotas,
    allocate,
    snake_merge,
)
from candgen.vocab import LONG_TERM_TABLE, QUERY_TABLE, SURFACES

# The offline tables and columns behind what the features step reads (USER_SERVING_SERVICE).
OFFLINE_VIEWS: dict[str, tuple[str, ...]] = {
    "user_short_term": ("recent_item_ids", "recent_timestamps"),
    "user_long_term": ("category_affinity", "engagements_total", "ad_clicks_total"),
    LONG_TERM_TABLE: ("long_term_embedding",),
    "user_profile": ("country", "age_bucket", "device"),
    "user_ad_impressions": (
        "impression_day",
        "impressed_ad_ids",
        "ad_impression_counts",
        "impressed_advertiser_ids",
        "advertiser_impression_counts",
    ),
    "user_hidden_advertisers": ("hidden_advertiser_ids",),
}
AD_LABELS = ("click", "conversion")
POOLING = ("empirical", "fixed")
# Prior strengths (in requests) the empirical fit chooses among: from almost none to far more
# requests than any context holds (full pooling).
STRENGTH_GRID = tuple(float(x) for x in np.geomspace(1.0, 1e6, 61))


@dataclass(frozen=True)
class QuotaLearnConfig:
    """How the quotas are learned (`candgen quotas learn` flags map onto these fields).

    Attributes:
        eval_days: the model's evaluation windows: the fit uses its validation window (the
            days right after its training data), never its test window.
        max_rank: candidates replayed per generator (the deepest slot the quotas can give).
        click_weight: value of a clicked candidate.
        conversion_weight: value of a clicked candidate whose click converted.
        pooling: how strongly each context's values are pulled towards the values pooled over
            contexts: ``empirical`` (estimated from the data, per generator) or ``fixed``
            (``prior_strength``).
        prior_strength: with ``pooling="fixed"``, how many requests' worth of slots at the
            pooled value each context's posterior starts from (0: no pooling).
        max_requests: fit on at most this many logged requests (0: all), sampled with ``seed``.
        seed: the request sample's seed.
    """

    eval_days: int = 1
    max_rank: int = 1_000
    click_weight: float = 1.0
    conversion_weight: float = 4.0
    pooling: str = "empirical"
    prior_strength: float = 20.0
    max_requests: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("eval_days", "max_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("click_weight", "conversion_weight", "prior_strength", "max_requests"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.click_weight + self.conversion_weight <= 0:
            raise ConfigError("conversion_weight", "click_weight + conversion_weight must be > 0")
        if self.pooling not in POOLING:
            raise ConfigError("pooling", f"{self.pooling!r} is not one of {POOLING}")

    @property
    def rank_edges(self) -> tuple[int, ...]:
        return (*(e for e in RANK_EDGES if e < self.max_rank), self.max_rank)


class OfflineFeatures:
    """What the online store would have answered at ``as_of``: each user's newest row of each
    view stamped before it, from the offline feature tables (a feature source for replays)."""

    def __init__(self, features_dir: Path, as_of: pd.Timestamp) -> None:
        self.as_of = as_of
        self.rows: dict[int, dict[str, Any]] = {}
        for view, columns in OFFLINE_VIEWS.items():
            path = Path(features_dir) / f"{view}.parquet"
            if not path.exists():
                continue
            table = pd.read_parquet(path, columns=["user_id", "event_timestamp", *columns])
            table = table[table["event_timestamp"] < as_of].sort_values(
                ["user_id", "event_timestamp"], kind="stable"
            )
            newest = table.groupby("user_id").tail(1)
            for record in newest.to_dict("records"):
                user = int(record.pop("user_id"))
                record.pop("event_timestamp")
                self.rows.setdefault(user, {}).update(record)

    def lookup(self, service: str, entity: str, key: int) -> dict[str, Any] | None:
        if service != USER_SERVICE or entity != "user_id":
            raise CandgenError(f"service: offline replays answer {USER_SERVICE} by user_id only")
        row = self.rows.get(int(key))
        if row is None:
            return None
        return {k: (list(v) if isinstance(v, np.ndarray) else v) for k, v in row.items()}


@dataclass(frozen=True)
class LoggedRequest:
    """One logged request of a window and the ads the user clicked in it (ad -> label).

    Attributes:
        user_id, surface: who asked, where.
        targets: the ads clicked in answer (ad -> ``click`` or ``conversion``).
        query: the search query's text (search; None elsewhere).
        context_item: the item the related page showed (related; None elsewhere).
    """

    user_id: int
    surface: str
    targets: dict[int, str]
    query: str | None = None
    context_item: int | None = None


def logged_requests(data_dir: Path, start: pd.Timestamp, stop: pd.Timestamp) -> list[LoggedRequest]:
    """The window's requests that led to at least one ad click, each with its logged context.

    A request is a user's clicks on one surface under one context: a search query, a related
    page's item, or (home) none; in (user, surface, query, context item) order. The log's
    interactions carry no session id, so two sessions of a user with the same context (two
    home visits, or the same query searched twice) make one request: their replays would be
    the same (features as of the window start, the same context), and only their targets join
    (on the test marketplace, 137 sessions with ad clicks make 132 requests).
    """
    from candgen.data.sequences import marketplace_interactions

    df = marketplace_interactions(Path(data_dir))
    window = df[(df["timestamp"] >= start) & (df["timestamp"] < stop) & df["label"].isin(AD_LABELS)]
    # "" and 0 stand for no context in the grouping keys: item ids are >= 1, and pandas would
    # drop missing keys. They go back to None below.
    keys = window.assign(
        query=window["query"].fillna(""),
        context_item_id=window["context_item_id"].fillna(0).astype("int64"),
    )
    out = []
    for (user, surface, query, item), g in keys.groupby(
        ["user_id", "surface", "query", "context_item_id"], sort=True
    ):
        targets: dict[int, str] = {}
        for ad, label in zip(g["item_id"], g["label"], strict=True):
            if targets.get(int(ad)) != "conversion":  # a conversion outranks a plain click
                targets[int(ad)] = str(label)
        out.append(
            LoggedRequest(
                int(user),
                str(surface),
                targets,
                query=str(query) or None,
                context_item=int(item) or None,
            )
        )
    return out


def query_embeddings(features_dir: Path) -> dict[str, np.ndarray]:
    """The log's queries and their MiniLM embeddings, as the features step wrote them
    (``query_embedding.parquet``): the vectors serving's query encoder gives the same texts.
    Empty when the features were built without text embeddings.

    Raises:
        CandgenError: naming features_dir when the table is missing (features built before
            requests carried a query).
    """
    path = Path(features_dir) / f"{QUERY_TABLE}.parquet"
    if not path.exists():
        raise CandgenError(
            f"features_dir: {features_dir} has no {path.name}, so search requests cannot be "
            "replayed with their query; rebuild it with `candgen features build`"
        )
    table = pd.read_parquet(path, columns=["query", "text_embedding"])
    return {
        str(q): np.asarray(v, dtype=np.float32)
        for q, v in zip(table["query"], table["text_embedding"], strict=True)
    }


@dataclass(frozen=True)
class ReplayedRequest:
    """A logged request replayed: its user's activity and every generator's ranked candidates."""

    request: LoggedRequest
    activity: int
    candidates: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def replay(
    pipeline: RetrievalPipeline,
    requests: Sequence[LoggedRequest],
    max_rank: int,
    progress: bool = True,
    queries: Mapping[str, np.ndarray] | None = None,
) -> list[ReplayedRequest]:
    """Every generator's top ``max_rank`` for each request, asked as serving asks it (the
    pipeline's features source answers as of the window start).

    The surface keeps the context it reads (``surface_context``); the query's embedding comes
    from ``queries`` (``query_embeddings``); a query it lacks is replayed without one, as a
    request whose query was not embedded, and the ``query`` generator finds nothing for it. The
    embedding and the context item go to the user encoder and to ``generate``.
    """
    from tqdm.auto import tqdm

    queries = queries or {}
    out = []
    for req in tqdm(requests, desc="replay logged requests", unit="request", disable=not progress):
        surface = surface_context(req.surface, req.query, req.context_item)
        query = queries.get(surface.query) if surface.query is not None else None
        context = user_context(pipeline.features, req.user_id)
        vector = encode_user(pipeline.retriever, context, req.surface, query, surface.context_item)
        written = written_ad(pipeline.generative, context, req.surface, query, surface.context_item)
        found = generate(
            context,
            vector,
            max_rank,
            pipeline.ad_index,
            pipeline.content,
            pipeline.popularity,
            pipeline.ineligible,
            query,
            context_item_vector(pipeline.retriever, surface.context_item),
            written=written,
        )
        out.append(ReplayedRequest(req, context.activity, found))
    return out


def activity_edges(replayed: Sequence[ReplayedRequest]) -> tuple[int, int, int]:
    """``new`` is activity 0; the other users split into thirds by activity."""
    active = np.array([r.activity for r in replayed if r.activity > 0])
    if len(active) == 0:
        return (1, 1, 1)
    q1, q2 = np.quantile(active, [1 / 3, 2 / 3])
    return (1, max(1, int(np.ceil(q1))), max(1, int(np.ceil(q2))))


def fit(
    replayed: Sequence[ReplayedRequest],
    config: QuotaLearnConfig,
    meta: dict[str, Any] | None = None,
) -> LearnedQuotas:
    """The Beta posteriors per context, generator and rank band (see the module docstring)."""
    if not replayed:
        raise CandgenError(
            "quotas: no logged request with an ad click in the fit window; nothing to learn from"
        )
    edges = config.rank_edges
    weights = {"click": config.click_weight, "conversion": config.conversion_weight}
    act = activity_edges(replayed)
    band_of = np.searchsorted(edges, np.arange(edges[-1]), side="right")
    contexts = [f"{s}/{b}" for s in SURFACES for b in ACTIVITY_BUCKETS]
    shape = (len(contexts), len(GENERATORS), len(edges))
    hits, slots = np.zeros(shape), np.zeros(shape)
    context_key = LearnedQuotas(GENERATORS, edges, act, {}, {}).context_key
    for r in replayed:
        c = contexts.index(context_key(r.request.surface, r.activity))
        lists = {
            g: [ad for ad, _ in r.candidates.get(gen, [])[: edges[-1]]]
            for g, gen in enumerate(GENERATORS)
        }
        for g, ids in lists.items():
            slots[c, g] += np.bincount(band_of[: len(ids)], minlength=len(edges))
        # A target that several generators find counts once, for the one that ranks it first
        # (ties: the generator order): the allocation takes each generator's top slots, so a
        # later copy of it in another list adds nothing, and crediting every copy would overrate
        # generators that mostly repeat the others.
        for ad, label in r.request.targets.items():
            found = [(ids.index(ad), g) for g, ids in lists.items() if ad in ids]
            if found:
                rank, g = min(found)
                hits[c, g, band_of[rank]] += weights[label]
    pooled = hits.sum(0) / np.maximum(slots.sum(0), 1.0)
    widths = np.diff(np.r_[0, edges]).astype(np.float64)
    if config.pooling == "empirical":
        strength = pooling_strength(hits, slots, widths)
    else:
        strength = np.full(len(GENERATORS), config.prior_strength)
    # The prior holds `strength` requests' worth of each band's slots at the pooled value.
    m = strength[:, None] * widths[None, :]
    alpha = m * pooled + hits + 1e-3
    beta = m * np.clip(1.0 - pooled, 0.0, None) + np.clip(slots - hits, 0.0, None) + 1e-3
    fitted = {
        "requests": len(replayed),
        # How many requests each generator found candidates for (query: search requests whose
        # query was embedded; item: related requests whose item the model knows).
        "requests_with_candidates": {
            gen: sum(bool(r.candidates.get(gen)) for r in replayed) for gen in GENERATORS
        },
        "label_weights": weights,
        "pooling": config.pooling,
        "prior_strength": dict(zip(GENERATORS, np.round(strength, 1).tolist(), strict=True)),
        **(meta or {}),
    }
    return LearnedQuotas(
        GENERATORS,
        edges,
        act,
        {c: alpha[i].round(6).tolist() for i, c in enumerate(contexts)},
        {c: beta[i].round(6).tolist() for i, c in enumerate(contexts)},
        fitted,
    )


def pooling_strength(hits: np.ndarray, slots: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Per generator, the prior strength (requests' worth of slots) under which the contexts'
    hits are most likely: the empirical-Bayes estimate of how much contexts really differ.

    Each (context, band) cell's hit rate is taken as a draw from Beta(mu * s, (1 - mu) * s),
    mu the band's rate pooled over contexts and s the strength times the band's width; the
    strength maximises the beta-binomial marginal likelihood of every cell's hits in its slots
    over ``STRENGTH_GRID``. Contexts that differ by sampling noise only give the largest
    strength (the pooled values everywhere); contexts that differ give a small one.

    Args:
        hits: (contexts, generators, bands) label-weighted hits.
        slots: (contexts, generators, bands) candidate slots replayed.
        widths: (bands,) slots per request in each band.

    Returns:
        (generators,) prior strengths.
    """
    from scipy.special import betaln

    grid = np.asarray(STRENGTH_GRID)[:, None]
    out = np.empty(hits.shape[1])
    for g in range(hits.shape[1]):
        h, n = hits[:, g, :], slots[:, g, :]
        seen = n > 0
        mu = np.clip(h.sum(0) / np.maximum(n.sum(0), 1.0), 1e-6, 1.0 - 1e-6)
        h, n = h[seen], n[seen]
        if h.sum() == 0:  # the generator never paid: nothing tells contexts apart
            out[g] = STRENGTH_GRID[-1]
            continue
        mu_cells = np.broadcast_to(mu, seen.shape)[seen]
        s = grid * np.broadcast_to(widths, seen.shape)[seen][None, :]
        a, b = mu_cells * s, (1.0 - mu_cells) * s
        loglik = (betaln(h + a, np.clip(n - h, 0.0, None) + b) - betaln(a, b)).sum(1)
        out[g] = STRENGTH_GRID[int(np.argmax(loglik))]
    return out


Selector = Callable[[ReplayedRequest, int], list[Candidate]]


RECALL_LABELS = ("click", "conversion", "ads")


def request_recalls(
    replayed: Sequence[ReplayedRequest], select: Selector, k: int
) -> dict[str, np.ndarray]:
    """Per label (``click``, ``conversion``, ``ads``: both), each request's recall at ``k`` under
    the allocation ``select``; NaN where the request holds no target of that label."""
    out = {label: np.full(len(replayed), np.nan) for label in RECALL_LABELS}
    for i, r in enumerate(replayed):
        chosen = {c.ad_id for c in select(r, k)}
        for label in RECALL_LABELS:
            wanted = [a for a, lab in r.request.targets.items() if label in ("ads", lab)]
            if wanted:
                out[label][i] = sum(a in chosen for a in wanted) / len(wanted)
    return out


def recall_by_label(
    replayed: Sequence[ReplayedRequest], select: Selector, ks: Sequence[int]
) -> dict[str, float]:
    """Mean recall per request of each ad label at each K, for one allocation ``select``:
    ``click.recall@100``, ``conversion.recall@100`` and ``ads.recall@100`` (both labels)."""
    out: dict[str, float] = {}
    for k in ks:
        out.update(_mean_recalls(request_recalls(replayed, select, k), k))
    return out


def _mean_recalls(recalls: dict[str, np.ndarray], k: int) -> dict[str, float]:
    """``request_recalls``' arrays as each label's mean over the requests that hold it."""
    out: dict[str, float] = {}
    for label, values in recalls.items():
        values = values[~np.isnan(values)]
        out[f"{label}.recall@{k}"] = float(values.mean()) if len(values) else 0.0
        out[f"{label}.requests"] = float(len(values))
    return out


# The fixed splits' grid step. Tenths of the slots among five generators are 1,001 splits (three
# generators made 66), each allocated for every request of both windows at every K. Measured on
# the test marketplace (45 fit and 33 test requests, K = 50, 100, 200, max rank 200, two shared
# cores): 117 s in tenths as first written, 53 s with one recall table per window, 8 s in
# fifths (126 splits). The ablation's windows hold about 1,100 requests each: by the same rate
# about 4 min in fifths, half an hour in tenths (five generators; six, the generative one among
# them, double the fifths: 252 splits). The learned table and the hand-set weights are
# bound to no grid; `--fixed-step 0.1` still gives tenths where the time is there.
FIXED_STEP = 0.2


def fixed_grid(
    step: float = FIXED_STEP, generators: Sequence[str] = GENERATORS
) -> list[dict[str, float]]:
    """Every split of the slots among ``generators`` in multiples of ``step``."""
    n = round(1 / step)
    if n < 1 or not np.isclose(n * step, 1.0):
        raise ConfigError("fixed_step", f"must divide 1 into whole parts, got {step}")
    return [
        {g: round(i * step, 6) for g, i in zip(generators, parts, strict=True)}
        for parts in itertools.product(range(n + 1), repeat=len(generators))
        if sum(parts) == n
    ]


def recall_table(
    rows: Sequence[ReplayedRequest], splits: Sequence[dict[str, float]], k: int
) -> dict[str, np.ndarray]:
    """Per label, each fixed split's recall at ``k`` on each request: (splits, requests), NaN
    where the request holds no target of the label (``request_recalls`` of each split).

    A request none of whose targets any generator lists within its first ``k + generators``
    ranks scores 0 under every split without being allocated: ``allocate`` reads a generator's
    list only up to the ads taken so far (its own, and the others' it skips as duplicates), at
    most K plus one per generator in its last round."""
    out = {label: np.full((len(splits), len(rows)), np.nan) for label in RECALL_LABELS}
    depth = k + len(GENERATORS)
    reachable = []
    for i, r in enumerate(rows):
        listed = {ad for cands in r.candidates.values() for ad, _ in cands[:depth]}
        if listed & set(r.request.targets):
            reachable.append(i)
        for label in RECALL_LABELS:
            if any(label in ("ads", lab) for lab in r.request.targets.values()):
                out[label][:, i] = 0.0
    picked = [rows[i] for i in reachable]
    for s, split in enumerate(splits):
        got = request_recalls(picked, _fixed(split), k)
        for label in RECALL_LABELS:
            out[label][s, reachable] = got[label]
    return out


def _fixed(split: dict[str, float]) -> Selector:
    return lambda r, k: allocate(r.candidates, split, k)


def _best_split(table: dict[str, np.ndarray], columns: np.ndarray | slice) -> int:
    """The split with the highest conversion recall over ``columns``' requests, then ads recall
    (the first such in grid order); a label no request holds counts as recall 0."""

    def means(label: str) -> np.ndarray:
        values = table[label][:, columns]
        held = ~np.isnan(values[0])
        return values[:, held].mean(1) if held.any() else np.zeros(len(values))

    conversion, ads = means("conversion"), means("ads")
    return max(range(len(conversion)), key=lambda s: (conversion[s], ads[s]))


# What ``compare_policies`` reports, in this order (the hand-set weights only where given).
COMPARED_POLICIES = (
    "learned",
    "best fixed",
    "best fixed per context",
    "best fixed on test",
    "snake merge",
    "hand-set per surface",
)


def compare_policies(
    fit_set: Sequence[ReplayedRequest],
    test_set: Sequence[ReplayedRequest],
    learned: LearnedQuotas,
    ks: Sequence[int],
    hand_set: dict[str, dict[str, float]] | None = None,
    step: float = FIXED_STEP,
) -> dict[str, dict[str, Any]]:
    """Recall by label on ``test_set`` at each K for: the learned quotas; the best fixed split
    (one split for every request, chosen per K by conversion recall on ``fit_set``, as the
    learned values were fitted there); the best fixed split of each context (chosen the same way
    on that context's requests alone); the fixed split that is best on ``test_set`` itself (an
    upper bound no fixed split can beat); snake merge; and ``hand_set`` per-surface weights.
    Fixed splits are the grid of ``step`` over every generator that found candidates in either
    window (``fixed_grid``). The learned policy's entry also holds, per label and K,
    its paired difference from the best fixed split (``conversion.vs_best_fixed@100``: mean,
    95% bootstrap interval, requests won and lost;
    ``candgen.evaluation.metrics.paired_difference``)."""

    def learned_select(r: ReplayedRequest, k: int) -> list[Candidate]:
        available = {g: len(c) for g, c in r.candidates.items()}
        weights = learned.weights(r.request.surface, r.activity, k, available)
        return allocate(r.candidates, weights, k)

    def snake(r: ReplayedRequest, k: int) -> list[Candidate]:
        return snake_merge(r.candidates, GENERATORS, k)

    # Splits among the generators that found anything: a version without a generative model
    # (or a window without searches) is not charged a grid six generators wide.
    found = [g for g in GENERATORS if any(r.candidates.get(g) for r in (*fit_set, *test_set))]
    grid = fixed_grid(step, found or GENERATORS)
    contexts: dict[str, list[int]] = {}
    for i, r in enumerate(fit_set):
        contexts.setdefault(learned.context_key(r.request.surface, r.activity), []).append(i)
    out: dict[str, dict[str, Any]] = {name: {} for name in COMPARED_POLICIES[:-1]}
    for k in ks:
        # Each split is allocated once per request of each window; the choices below only
        # average the table over different requests.
        fit_table = recall_table(fit_set, grid, k)
        best_fit = grid[_best_split(fit_table, slice(None))]
        best_test = grid[_best_split(recall_table(test_set, grid, k), slice(None))]
        # The same choice made in each context alone: what per-context values amount to when
        # nothing is pooled (a context the fit window lacks gets the overall best split).
        per_context = {
            key: grid[_best_split(fit_table, np.array(cols))] for key, cols in contexts.items()
        }

        def contextual(
            r: ReplayedRequest,
            k: int,
            per_context: dict[str, dict[str, float]] = per_context,
            best_fit: dict[str, float] = best_fit,
        ) -> list[Candidate]:
            split = per_context.get(learned.context_key(r.request.surface, r.activity), best_fit)
            return allocate(r.candidates, split, k)

        ours = request_recalls(test_set, learned_select, k)
        theirs = request_recalls(test_set, _fixed(best_fit), k)
        rows = {
            "learned": _mean_recalls(ours, k),
            "best fixed": _mean_recalls(theirs, k),
            "best fixed per context": recall_by_label(test_set, contextual, [k]),
            "best fixed on test": recall_by_label(test_set, _fixed(best_test), [k]),
            "snake merge": recall_by_label(test_set, snake, [k]),
        }
        if hand_set is not None:
            rows["hand-set per surface"] = recall_by_label(
                test_set, lambda r, k: allocate(r.candidates, hand_set[r.request.surface], k), [k]
            )
        for name, metrics in rows.items():
            out.setdefault(name, {}).update(metrics)
        out["best fixed"][f"split@{k}"] = best_fit
        for label in RECALL_LABELS:
            out["learned"][f"{label}.vs_best_fixed@{k}"] = paired_difference(
                ours[label], theirs[label]
            )
        out["best fixed on test"][f"split@{k}"] = best_test
    return out


def assemble_pipeline(
    model_path: Path,
    features_dir: Path,
    as_of: pd.Timestamp,
    index_dir: Path | None = None,
    generative_path: Path | None = None,
    depth: int = 0,
) -> RetrievalPipeline:
    """The retrieval pipeline of a trained model (``model.pt``) with its generators as they
    stood at ``as_of``: features, delivery state and popularity from the offline tables as of
    then. The sequential index is the one built for the model (``index_dir``) or exact search
    over the model's ad embeddings. With ``generative_path`` (a generative ``model.pt`` of the
    same data) the generative generator writes ``depth`` ads per request (default: serving's)."""
    from candgen.data.synth import AD_ID_OFFSET
    from candgen.endpoint.export import ad_side
    from candgen.index.ann import INDEX_FILE, AdIndex, IndexConfig, ad_rows
    from candgen.models.factory import load_model
    from candgen.models.retriever import Retriever
    from candgen.serving.generators import PacingPopularity

    model, saved = load_model(Path(model_path))
    retriever = Retriever(model, saved.item_ids, max_len=saved.model.max_len)
    if index_dir is not None:
        ad_index = AdIndex.load(Path(index_dir) / INDEX_FILE)
    else:
        ids, vectors = ad_rows(saved.item_ids, retriever.item_table.numpy(), AD_ID_OFFSET)
        ad_index = AdIndex.build(ids, vectors, IndexConfig(kind="flat"))
    content, delivery, _ = ad_side(Path(features_dir), as_of)
    generative = None
    if generative_path is not None:
        from candgen.serving.generative import GenerativeAds
        from candgen.serving.steps import ServingConfig

        depth = depth or ServingConfig().generative_depth
        generative = GenerativeAds.load(Path(generative_path), content.text.ids, depth)
    return RetrievalPipeline(
        retriever=retriever,
        ad_index=ad_index,
        content=content,
        popularity=PacingPopularity(
            delivery["ad_ids"],
            delivery["clicks"],
            delivery["impressions"],
            delivery["budget_left_fraction"],
        ),
        features=OfflineFeatures(Path(features_dir), as_of),
        ineligible=frozenset(delivery["ineligible"].tolist()),
        generative=generative,
    )


def windows(data_dir: Path, eval_days: int) -> tuple[pd.Timestamp, pd.Timestamp, pd.Timestamp]:
    """(validation start, test start, end) of a marketplace split by ``eval_days``, as
    ``candgen.data.sequences.load_marketplace`` splits it."""
    from candgen.data.sequences import marketplace_interactions

    end = marketplace_interactions(Path(data_dir))["timestamp"].max().normalize()
    end = end + pd.Timedelta(days=1)
    test_start = end - pd.Timedelta(days=eval_days)
    return test_start - pd.Timedelta(days=eval_days), test_start, end


def replay_window(
    model_path: Path,
    data_dir: Path,
    features_dir: Path,
    config: QuotaLearnConfig,
    window: str = "valid",
    index_dir: Path | None = None,
    progress: bool = True,
    generative_path: Path | None = None,
) -> list[ReplayedRequest]:
    """The logged requests of the model's ``valid`` or ``test`` window, each with its logged
    query or context item, replayed through its pipeline as it stood when the window began
    (with ``generative_path``'s generator among its generators)."""
    valid_start, test_start, end = windows(data_dir, config.eval_days)
    if window not in ("valid", "test"):
        raise ConfigError("window", f"must be 'valid' or 'test', got {window!r}")
    queries = query_embeddings(features_dir)
    start, stop = (valid_start, test_start) if window == "valid" else (test_start, end)
    requests = logged_requests(data_dir, start, stop)
    if config.max_requests and len(requests) > config.max_requests:
        pick = np.random.default_rng(config.seed).choice(
            len(requests), config.max_requests, replace=False
        )
        requests = [requests[i] for i in sorted(pick)]
    # The generative generator writes twice the deepest rank replayed: the window's
    # ineligible ads and the user's history are dropped after it writes.
    pipeline = assemble_pipeline(
        model_path, features_dir, start, index_dir, generative_path, 2 * config.max_rank
    )
    return replay(pipeline, requests, config.max_rank, progress, queries)


def learn_quotas(
    model_path: Path,
    data_dir: Path,
    features_dir: Path,
    config: QuotaLearnConfig = QuotaLearnConfig(),
    index_dir: Path | None = None,
    progress: bool = True,
    generative_path: Path | None = None,
) -> LearnedQuotas:
    """Fits the quotas on the logged outcomes of the model's validation window (with
    ``generative_path``, the generative generator's slots too)."""
    t0 = time.perf_counter()
    replayed = replay_window(
        model_path, data_dir, features_dir, config, "valid", index_dir, progress, generative_path
    )
    valid_start, test_start, _ = windows(data_dir, config.eval_days)
    meta = {
        "window": [valid_start.isoformat(), test_start.isoformat()],
        "model": str(model_path),
        **({"generative": str(generative_path)} if generative_path is not None else {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return fit(replayed, config, meta)
