"""Learned dynamic quotas (issue 6): the value table, the allocation it gives per context, its
fit from logged outcomes (each logged request replayed with its own query or context item,
issue 14), the policies (fixed, learned, snake, overrides), the select step's per-source
counts, and the commands that learn and show them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from candgen.errors import CandgenError, ConfigError
from candgen.index.ann import IndexConfig
from candgen.quotas.learning import (
    COMPARED_POLICIES,
    LoggedRequest,
    OfflineFeatures,
    QuotaLearnConfig,
    ReplayedRequest,
    compare_policies,
    fit,
    fixed_grid,
    logged_requests,
    query_embeddings,
    recall_by_label,
    recall_table,
    replay_window,
    request_recalls,
)
from candgen.serving.diversity import AdCatalog
from candgen.serving.quota import (
    ACTIVITY_BUCKETS,
    GENERATORS,
    QUOTA_FILE,
    LearnedQuotas,
    QuotaPolicy,
    allocate,
    describe,
    snake_merge,
)
from candgen.serving.steps import SelectStep, ServingConfig, source_codes, write_serving_file
from candgen.vocab import QUERY_TABLE, SURFACES

EDGES = (5, 10, 20)
# The hand-made tables below hold the generators that existed before query and item: a table
# fitted then still loads and serves, the new generators getting no slot from it.
TABLE_GENERATORS = ("sequential", "content", "popularity")


def _table(values: dict[str, list[float]], edges: tuple[int, ...] = EDGES) -> LearnedQuotas:
    """A table whose posterior mean for (context, generator) is ``values[context][g]`` in every
    band but halves band by band (diminishing returns), from a strong posterior."""
    alpha, beta = {}, {}
    for surface in SURFACES:
        for bucket in ACTIVITY_BUCKETS:
            key = f"{surface}/{bucket}"
            means = values.get(key, values.get("*", [0.1, 0.1, 0.1]))
            rows = [[m * 0.5**b for b in range(len(edges))] for m in means]
            alpha[key] = [[1000 * v + 1e-3 for v in row] for row in rows]
            beta[key] = [[1000 * (1 - v) + 1e-3 for v in row] for row in rows]
    return LearnedQuotas(TABLE_GENERATORS, edges, (1, 10, 50), alpha, beta)


def _ranked(start: int, n: int) -> list[tuple[int, float]]:
    return [(start + i, 1.0 - i / 100) for i in range(n)]


CANDIDATES = {"sequential": _ranked(100, 30), "content": _ranked(200, 30),
              "popularity": _ranked(300, 30)}  # fmt: skip


def test_the_k_slots_go_to_the_generators_whose_slots_are_worth_most() -> None:
    table = _table({"home/heavy": [0.4, 0.15, 0.06], "search/new": [0.01, 0.3, 0.2]})
    # home/heavy: sequential's bands are worth .4, .2, .1, content's .15, .075, .0375 and
    # popularity's .06, .03, .015; the 40 best slots are all 20 of sequential's, 15 of
    # content's and 5 of popularity's.
    assert table.quotas("home", 80, 40) == {"sequential": 20, "content": 15, "popularity": 5}
    assert table.quotas("search", 0, 40) == {"sequential": 0, "content": 20, "popularity": 20}
    assert table.quotas("home", 80, 5) == {"sequential": 5, "content": 0, "popularity": 0}
    # A generator that found fewer candidates is not offered the slots it cannot fill.
    capped = table.quotas("home", 80, 20, available={"sequential": 3, "content": 30,
                                                     "popularity": 30})  # fmt: skip
    assert capped["sequential"] == 3 and sum(capped.values()) == 20
    assert table.bucket(0) == "new" and table.bucket(9) == "light" and table.bucket(50) == "heavy"
    weights = table.weights("home", 80, 40)
    assert weights == {"sequential": 0.5, "content": 0.375, "popularity": 0.125}


def test_values_never_grow_along_a_generators_ranks() -> None:
    table = _table({})
    key = "home/new"
    rising = [[0.1, 0.3, 0.2]] * 3  # a noisy later band must not be worth more than an earlier one
    alpha = {k: ([[1000 * v for v in r] for r in rising] if k == key else v)
             for k, v in table.alpha.items()}  # fmt: skip
    beta = {k: ([[1000 * (1 - v) for v in r] for r in rising] if k == key else v)
            for k, v in table.beta.items()}  # fmt: skip
    values = LearnedQuotas(TABLE_GENERATORS, EDGES, (1, 10, 50), alpha, beta).band_values("home", 0)
    assert np.allclose(values, 0.1)


def test_thompson_draws_vary_while_the_mean_is_fixed() -> None:
    weak = LearnedQuotas(TABLE_GENERATORS, EDGES, (1, 10, 50),
                         {f"{s}/{b}": [[1.0] * 3] * 3 for s in SURFACES for b in ACTIVITY_BUCKETS},
                         {f"{s}/{b}": [[3.0] * 3] * 3 for s in SURFACES
                          for b in ACTIVITY_BUCKETS})  # fmt: skip
    rng = np.random.default_rng(0)
    draws = {tuple(weak.quotas("home", 5, 20, rng=rng).values()) for _ in range(20)}
    assert len(draws) > 1
    assert len({tuple(weak.quotas("home", 5, 20).values()) for _ in range(5)}) == 1


def test_a_table_survives_the_trip_through_json_and_bad_ones_name_the_field(tmp_path: Path) -> None:
    table = _table({"home/heavy": [0.4, 0.1, 0.02]})
    table.save(tmp_path / QUOTA_FILE)
    again = LearnedQuotas.load(tmp_path / QUOTA_FILE)
    assert again == table
    body = table.to_dict()
    cases = [
        ({**body, "rank_edges": [10, 5, 20]}, r"^rank_edges: need increasing positive ranks"),
        ({**body, "activity_edges": [1, 10]}, r"^activity_edges: need 3 non-decreasing counts"),
        ({**body, "generators": ["bandit"]}, r"^generators: need some of"),
        ({**body, "alpha": {**body["alpha"], "tv/new": body["alpha"]["home/new"]}},
         r"^contexts: 'tv/new' is not <surface>/<activity bucket>"),
        ({**body, "beta": {**body["beta"], "home/new": [[1.0, 2.0]]}},
         r"^beta\.home/new: need 3 x 3 positive values"),
        ({k: v for k, v in body.items() if k != "alpha"}, r"^alpha: missing from the learned"),
    ]  # fmt: skip
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            LearnedQuotas.from_dict(bad)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CandgenError, match=r"^quotas: .*bad\.json is not JSON"):
        LearnedQuotas.load(tmp_path / "bad.json")
    with pytest.raises(CandgenError, match=r"^quotas: .*none\.json does not exist"):
        LearnedQuotas.load(tmp_path / "none.json")


def test_snake_merge_takes_turns_and_skips_duplicates() -> None:
    cands = {"sequential": [(1, 0.9), (2, 0.8)], "content": [(1, 0.7), (3, 0.6)],
             "popularity": [(4, 0.5)]}  # fmt: skip
    out = snake_merge(cands, GENERATORS, 10)
    assert [(c.ad_id, c.source) for c in out] == [
        (1, "sequential"), (3, "content"), (4, "popularity"), (2, "sequential")]  # fmt: skip
    assert [c.ad_id for c in snake_merge(cands, GENERATORS, 2)] == [1, 3]


def test_the_policy_picks_the_shares_and_overrides_win() -> None:
    table = _table({"*": [0.4, 0.1, 0.02]})
    learned = QuotaPolicy("learned", learned=table)
    got = learned.select(CANDIDATES, "home", 80, 20)
    assert len(got) == 20 and {c.source for c in got} <= set(GENERATORS)
    assert sum(c.source == "sequential" for c in got) == table.quotas("home", 80, 20)["sequential"]
    overridden = QuotaPolicy("learned", learned=table,
                             overrides={"home": {"popularity": 1.0}})  # fmt: skip
    assert {c.source for c in overridden.select(CANDIDATES, "home", 80, 20)} == {"popularity"}
    assert overridden.source("home") == "override" and overridden.source("search") == "learned"
    snake = QuotaPolicy("snake").select(CANDIDATES, "home", 0, 9)
    assert [c.source for c in snake[:3]] == [g for g in GENERATORS if g in CANDIDATES]
    with pytest.raises(ConfigError, match=r"^quota_policy: learned needs a learned quota table"):
        QuotaPolicy("learned")
    with pytest.raises(ConfigError, match=r"^quota_policy: 'bandit' is not one of"):
        QuotaPolicy("bandit")
    with pytest.raises(ConfigError, match=r"^quota_overrides: unknown surface\(s\) \['tv'\]"):
        QuotaPolicy(overrides={"tv": {"content": 1.0}})
    with pytest.raises(ConfigError, match=r"^weights\.home: weights must be >= 0 and sum to 1"):
        QuotaPolicy(overrides={"home": {"content": 0.5}})
    with pytest.raises(ConfigError, match=r"^quota_exploration: 'greedy' is not one of"):
        QuotaPolicy(exploration="greedy")
    rows = describe(learned, 20)
    assert len(rows) == len(SURFACES) * len(ACTIVITY_BUCKETS)
    assert all(sum(r["slots"].values()) == 20 for r in rows)


def _select_tensors(scenario: bytes, activity: int, k: int = 20) -> dict[str, np.ndarray]:
    ids, scores, sources = [], [], []
    for gen, cands in CANDIDATES.items():
        for ad, score in cands:
            ids.append(ad)
            scores.append(score)
            sources.append(gen)
    return {"CANDIDATE_IDS": np.array(ids, np.int64),
            "CANDIDATE_SCORES": np.array(scores, np.float32),
            "CANDIDATE_SOURCES": source_codes(sources),
            "SCENARIO": np.array([scenario], object), "K": np.array([k], np.int32),
            "ACTIVITY": np.array([activity], np.int64),
            "CONTEXT_FLAGS": np.zeros(0, object)}  # fmt: skip


def test_the_select_step_serves_the_learned_quotas_and_reports_each_source(tmp_path: Path) -> None:
    table = _table({"home/heavy": [0.4, 0.1, 0.02], "search/new": [0.01, 0.3, 0.2]})
    overrides = {"related": {"content": 0.5, "popularity": 0.5}}
    config = ServingConfig(max_k=50, quota_policy="learned", quota_overrides=overrides)
    write_serving_file(tmp_path, config, IndexConfig(), {})
    AdCatalog.empty().save(tmp_path)  # no advertisers: diversity changes nothing
    table.save(tmp_path / QUOTA_FILE)
    step = SelectStep(tmp_path)
    for scenario, activity in ((b"home", 80), (b"search", 0)):
        out = step(_select_tensors(scenario, activity))
        counts = dict(zip([n.decode() for n in out["SOURCE_NAMES"]],
                          out["SOURCE_COUNTS"].tolist(), strict=True))  # fmt: skip
        sources = [s.decode() for s in out["SOURCES"]]
        assert counts == {g: sources.count(g) for g in GENERATORS}
        # query and item, which the table predates, get nothing
        assert counts == dict.fromkeys(GENERATORS, 0) | table.quotas(
            scenario.decode(), activity, 20
        )
        assert out["QUOTA_POLICY"].tolist() == [b"learned"]
    out = step(_select_tensors(b"related", 0))
    assert out["QUOTA_POLICY"].tolist() == [b"override"]
    assert dict(zip(GENERATORS, out["SOURCE_COUNTS"].tolist(), strict=True)) == {
        "sequential": 0, "content": 10, "query": 0, "item": 0, "popularity": 10,
        "generative": 0}  # fmt: skip
    (tmp_path / QUOTA_FILE).unlink()
    with pytest.raises(ConfigError, match=r"^quota_policy: learned needs a learned quota table"):
        SelectStep(tmp_path)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"quota_policy": "bandit"}, "quota_policy"),
    ({"quota_exploration": "greedy"}, "quota_exploration"),
    ({"quota_overrides": {"tv": {"content": 1.0}}}, "quota_overrides"),
    ({"quota_overrides": {"home": {"content": 0.2}}}, "weights.home"),
])  # fmt: skip
def test_bad_quota_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        ServingConfig(**kwargs)


def _replayed(surface: str, activity: int, hits: dict[str, list[int]], label: str = "click"
              ) -> ReplayedRequest:  # fmt: skip
    """A request whose targets sit at the given ranks of each generator's list."""
    targets = {}
    cands = {g: list(c) for g, c in CANDIDATES.items()}
    for gen, ranks in hits.items():
        for r in ranks:
            targets[cands[gen][r][0]] = label
    return ReplayedRequest(LoggedRequest(1, surface, targets), activity, cands)


def test_the_fit_learns_which_generator_pays_in_which_context() -> None:
    rows = ([_replayed("home", 80, {"sequential": [0, 1, 2, 3]}) for _ in range(30)]
            + [_replayed("search", 80, {"content": [0, 2]}) for _ in range(30)]
            + [_replayed("search", 80, {"popularity": [0]}, "conversion") for _ in range(30)]
            + [_replayed("home", 2, {}) for _ in range(5)])  # fmt: skip
    config = QuotaLearnConfig(max_rank=30, conversion_weight=4.0)
    table = fit(rows, config, {"window": ["a", "b"]})
    assert table.rank_edges == (5, 10, 20, 30)
    assert table.fitted["requests"] == len(rows) and table.fitted["window"] == ["a", "b"]
    home = table.band_values("home", 80)
    search = table.band_values("search", 80)
    seq, content, pop = (GENERATORS.index(g) for g in ("sequential", "content", "popularity"))
    assert home[seq, 0] > home[content, 0] and search[content, 0] > search[seq, 0]
    # A conversion is worth four clicks: popularity's one conversion in half the search requests
    # beats content's two clicks in the other half.
    assert search[pop, 0] > search[content, 0]
    # A context never seen borrows the pooled value (empirical Bayes), not zero.
    assert table.band_values("related", 80)[seq, 0] > 0
    # The learned quotas beat any one fixed split on a set where contexts differ: home needs
    # sequential's first four slots, search popularity's first.
    test = [*rows[:30], *rows[60:90]]
    result = compare_policies(rows, test, table, [4])
    assert result["learned"]["ads.recall@4"] > result["best fixed"]["ads.recall@4"]
    assert result["learned"]["ads.recall@4"] >= result["best fixed on test"]["ads.recall@4"]
    # A split chosen per context finds the same structure, which no one split can.
    per_context = result["best fixed per context"]["ads.recall@4"]
    assert per_context > result["best fixed"]["ads.recall@4"]
    lead = result["learned"]["ads.vs_best_fixed@4"]
    assert lead["mean"] == pytest.approx(result["learned"]["ads.recall@4"]
                                         - result["best fixed"]["ads.recall@4"])  # fmt: skip
    assert lead["low"] > 0 and lead["wins"] > 0 and lead["n"] == len(test)
    with pytest.raises(CandgenError, match=r"^quotas: no logged request with an ad click"):
        fit([], config)


def _noisy_requests(rng: np.random.Generator, rates: dict[str, float], n: int) -> list:
    """``n`` requests per surface; on each, sequential's first slot holds the target with the
    surface's probability in ``rates``, else popularity's first slot does."""
    return [_replayed(surface, 80, {"sequential": [0]} if rng.random() < rate
                      else {"popularity": [0]})
            for surface, rate in rates.items() for _ in range(n)]  # fmt: skip


def test_the_pooling_strength_follows_how_much_contexts_really_differ() -> None:
    rng = np.random.default_rng(3)
    seq = GENERATORS.index("sequential")
    # The same truth on every surface: the contexts differ by sampling noise only, so they are
    # pooled (the strength dwarfs the 60 requests each holds) and get the same values.
    alike = fit(_noisy_requests(rng, {"home": 0.5, "search": 0.5, "related": 0.5}, 60),
                QuotaLearnConfig(max_rank=30))  # fmt: skip
    assert alike.fitted["pooling"] == "empirical"
    assert alike.fitted["prior_strength"]["sequential"] >= 1_000
    home, search = alike.band_values("home", 80), alike.band_values("search", 80)
    assert abs(home[seq, 0] - search[seq, 0]) < 0.01
    # Really different surfaces: little pooling, and each keeps its own value, where a fixed
    # strength of 1,000 requests would have flattened them.
    apart_rows = _noisy_requests(rng, {"home": 0.9, "search": 0.1, "related": 0.5}, 60)
    apart = fit(apart_rows, QuotaLearnConfig(max_rank=30))
    assert apart.fitted["prior_strength"]["sequential"] < 100
    assert apart.band_values("home", 80)[seq, 0] > 2 * apart.band_values("search", 80)[seq, 0]
    flat = fit(apart_rows, QuotaLearnConfig(max_rank=30, pooling="fixed", prior_strength=1e3))
    home, search = flat.band_values("home", 80), flat.band_values("search", 80)
    assert home[seq, 0] < 1.5 * search[seq, 0]


def test_recall_by_label_counts_each_label_over_its_own_requests() -> None:
    rows = [_replayed("home", 1, {"sequential": [0], "content": [0]}),
            _replayed("home", 1, {"popularity": [25]}, "conversion")]  # fmt: skip
    only_seq = recall_by_label(rows, lambda r, k: snake_merge(
        {"sequential": r.candidates["sequential"]}, GENERATORS, k), [10])  # fmt: skip
    assert only_seq["click.recall@10"] == 0.5 and only_seq["click.requests"] == 1
    assert only_seq["conversion.recall@10"] == 0.0 and only_seq["ads.requests"] == 2


def test_offline_features_answer_as_of_a_past_time(features_dir: Path) -> None:
    short = pd.read_parquet(features_dir / "user_short_term.parquet")
    user = int(short["user_id"].value_counts().index[0])
    mine = short[short["user_id"] == user].sort_values("event_timestamp")
    as_of = mine["event_timestamp"].iloc[2]
    got = OfflineFeatures(features_dir, as_of).lookup("user_serving_v3", "user_id", user)
    assert got["recent_item_ids"] == list(mine["recent_item_ids"].iloc[1])  # the row before
    profile = pd.read_parquet(features_dir / "user_profile.parquet").set_index("user_id")
    assert got["country"] == profile.loc[user, "country"]  # what targeting reads
    # Before the user's first snapshot the store knew none of their history (only the
    # profile, from sign-up).
    before = OfflineFeatures(features_dir, mine["event_timestamp"].iloc[0])
    assert "recent_item_ids" not in before.lookup("user_serving_v3", "user_id", user)
    latest = OfflineFeatures(features_dir, pd.Timestamp("2100-01-01", tz="UTC"))
    assert latest.lookup("user_serving_v3", "user_id", user)["recent_item_ids"] == list(
        mine["recent_item_ids"].iloc[-1])  # fmt: skip
    assert latest.lookup("user_serving_v3", "user_id", 987_654_321) is None
    with pytest.raises(CandgenError, match=r"^service: offline replays answer user_serving_v3"):
        latest.lookup("user_features_v1", "user_id", user)


def _window(marketplace) -> tuple[pd.DataFrame, pd.Timestamp, pd.Timestamp]:  # type: ignore[no-untyped-def]
    events = pd.read_parquet(marketplace.out_dir / "events")
    start = events["event_ts"].min().normalize() + pd.Timedelta(days=3)
    return events, start, start + pd.Timedelta(days=4)


def test_logged_requests_hold_the_windows_ad_clicks_per_user_surface_and_context(
    marketplace,
) -> None:  # type: ignore[no-untyped-def]
    events, start, stop = _window(marketplace)
    requests = logged_requests(marketplace.out_dir, start, stop)
    assert requests == logged_requests(marketplace.out_dir, start, stop)  # deterministic
    clicks = events[(events["event_type"] == "click") & (events["event_ts"] >= start)
                    & (events["event_ts"] < stop)]  # fmt: skip
    clicks = clicks.assign(query=clicks["query"].fillna(""),
                           context_item_id=clicks["context_item_id"].fillna(0))  # fmt: skip
    keys = ["user_id", "surface", "query", "context_item_id"]
    assert sum(len(r.targets) for r in requests) == len(clicks.drop_duplicates([*keys, "ad_id"]))
    converted = set(events.loc[events["event_type"] == "conversion", "caused_by_event_id"])
    seen = set()
    for r in requests:
        # each request carries the context its surface logged, and only that
        assert (r.query is not None) == (r.surface == "search")
        assert r.context_item is None or r.surface == "related"
        key = (r.user_id, r.surface, r.query or "", r.context_item or 0)
        assert key not in seen
        seen.add(key)
        mine = clicks[(clicks[keys] == key).all(axis=1)]
        assert set(r.targets) == set(mine["ad_id"])
        for ad, label in r.targets.items():
            ids = set(mine.loc[mine["ad_id"] == ad, "event_id"])
            assert (label == "conversion") == bool(ids & converted)
    assert [(r.user_id, r.surface, r.query or "", r.context_item or 0) for r in requests] == sorted(
        seen
    )
    related = [r for r in requests if r.surface == "related"]
    assert related and sum(r.context_item is not None for r in related) > 0.9 * len(related)
    # one user's two searches are two requests, each with its own query
    searches = pd.Series([r.user_id for r in requests if r.surface == "search"])
    assert searches.duplicated().any()


@pytest.fixture(scope="module")
def unified_model(
    marketplace, features_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:  # type: ignore[no-untyped-def]
    """A unified model trained one epoch on the small marketplace (it reads the query and the
    context item)."""
    from candgen.training.config import TrainConfig
    from candgen.training.trainer import train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="marketplace", model="unified", data_dir=str(marketplace.out_dir),
                      features_dir=str(features_dir), epochs=1, eval_days=2, max_len=20,
                      progress=False, track=False, out_dir=str(out)))  # fmt: skip
    return out / "model.pt"


def _rank_of_hit(r: ReplayedRequest, generator: str) -> int | None:
    """Where ``generator`` ranks the request's best-placed target, if it finds one first (the
    fit credits a target to the generator that ranks it first)."""
    lists = {g: [ad for ad, _ in r.candidates.get(g, [])] for g in GENERATORS}
    ranks = []
    for ad in r.request.targets:
        found = [(ids.index(ad), GENERATORS.index(g)) for g, ids in lists.items() if ad in ids]
        if found and GENERATORS[min(found)[1]] == generator:
            ranks.append(min(found)[0])
    return min(ranks, default=None)


def test_each_request_is_replayed_with_its_query_or_context_item(
    marketplace,
    features_dir: Path,
    unified_model: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = QuotaLearnConfig(eval_days=2, max_rank=100)
    replayed = replay_window(unified_model, marketplace.out_dir, features_dir, config,
                             progress=False)  # fmt: skip
    by_surface = {s: [r for r in replayed if r.request.surface == s] for s in SURFACES}
    assert all(by_surface.values())
    # search: the query generator answers every request, from the query's own MiniLM vector
    # (the features' table) against the ads' text; two queries, two lists
    assert all(r.candidates.get("query") for r in by_surface["search"])
    assert len({tuple(r.candidates["query"][:5]) for r in by_surface["search"]}) > 1
    vectors = query_embeddings(features_dir)
    ads = pd.read_parquet(features_dir / "ad_attributes.parquet",
                          columns=["ad_id", "text_embedding"]).set_index("ad_id")  # fmt: skip
    for r in by_surface["search"][:5]:
        got = r.candidates["query"][:5]
        cosine = [float(ads.loc[ad, "text_embedding"] @ vectors[r.request.query]) for ad, _ in got]
        assert np.allclose([score for _, score in got], cosine, atol=1e-4)
    # related: the item generator answers every request whose item the model knows
    with_item = [r for r in by_surface["related"] if r.request.context_item is not None]
    assert sum(bool(r.candidates.get("item")) for r in with_item) > 0.9 * len(with_item)
    # home carries no context: neither runs
    assert not any(r.candidates.get(g) for r in by_surface["home"] for g in ("query", "item"))
    assert not any(r.candidates.get("query") for r in by_surface["related"])
    assert not any(r.candidates.get("item") for r in by_surface["search"])

    # The fit now credits both where they hit: on this log the query's list holds the clicked
    # ad first in many searches, the item's in a few related pages (where no other generator
    # ranks it higher). Unpooled, a band's posterior holds exactly the hits replayed in it.
    raw = QuotaLearnConfig(max_rank=100, pooling="fixed", prior_strength=0.0)
    table = fit(replayed, raw)
    assert table.fitted["requests_with_candidates"]["query"] == len(by_surface["search"])
    assert table.fitted["requests_with_candidates"]["item"] == sum(
        bool(r.candidates.get("item")) for r in replayed)  # fmt: skip
    for surface, gen in (("search", "query"), ("related", "item")):
        g = GENERATORS.index(gen)
        hits = [
            (r, rank) for r in by_surface[surface] if (rank := _rank_of_hit(r, gen)) is not None
        ]
        assert hits, f"no {gen} hit on {surface}"
        for r, rank in hits:
            key = table.context_key(surface, r.activity)
            band = int(np.searchsorted(table.rank_edges, rank, side="right"))
            alpha, beta = table.alpha[key][g][band], table.beta[key][g][band]
            assert alpha >= 1.0 and alpha / (alpha + beta) > 1e-3
    # Served values (pooled, monotone in rank): the query's first slots on search are worth
    # several percent; without their context (the old replay) the same requests left query
    # and item at about zero.
    blind = [ReplayedRequest(r.request, r.activity,
                             {g: c for g, c in r.candidates.items() if g not in ("query", "item")})
             for r in replayed]  # fmt: skip
    activity = by_surface["search"][0].activity
    query = GENERATORS.index("query")
    served = fit(replayed, config).band_values("search", activity)[query, 0]
    before = fit(blind, config).band_values("search", activity)[query, 0]
    assert served > 0.01 and before < 1e-6


def test_a_features_dir_without_the_query_table_is_named(
    features_dir: Path, tmp_path: Path
) -> None:
    vectors = query_embeddings(features_dir)
    assert vectors and all(v.shape == (384,) for v in vectors.values())
    assert all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-3 for v in vectors.values())
    with pytest.raises(CandgenError, match=rf"^features_dir: .* has no {QUERY_TABLE}\.parquet"):
        query_embeddings(tmp_path)


def test_bad_learning_settings_name_the_field() -> None:
    cases = [
        ({"eval_days": 0}, "eval_days"),
        ({"max_rank": 0}, "max_rank"),
        ({"conversion_weight": -1.0}, "conversion_weight"),
        ({"click_weight": 0.0, "conversion_weight": 0.0}, "conversion_weight"),
        ({"pooling": "hierarchical"}, "pooling"),
        ({"prior_strength": -1.0}, "prior_strength"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ConfigError, match=rf"^{field}: "):
            QuotaLearnConfig(**kwargs)


def test_the_quota_commands_learn_show_and_reject_bad_input(
    marketplace,
    features_dir: Path,
    unified_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    from candgen.cli import main

    out = tmp_path / "quotas.json"
    learn = [
        "quotas",
        "learn",
        "--model",
        str(unified_model),
        "--data",
        str(marketplace.out_dir),
        "--features-dir",
        str(features_dir),
        "--eval-days",
        "2",
    ]
    assert main([*learn, "--max-rank", "100", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = LearnedQuotas.load(out)
    assert summary["requests"] == table.fitted["requests"] > 0
    assert table.rank_edges[-1] == 100
    assert main(["quotas", "show", str(out), "-k", "50"]) == 0
    shown = capsys.readouterr().out
    assert "quota policy learned; slots of K=50 per context" in shown
    assert shown.count("learned") == len(SURFACES) * len(ACTIVITY_BUCKETS) + 1
    assert main(["quotas", "learn", "--model", str(unified_model),
                 "--max-rank", "0", "--out", str(out)]) == 2  # fmt: skip
    assert "max_rank: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["quotas", "show"]) == 2
    assert "table: give a learned table or --model-repository" in capsys.readouterr().err
    assert main(["quotas", "show", str(out), "-k", "0"]) == 2
    assert "k: must be >= 1" in capsys.readouterr().err

    # compare: every policy over the generators that found ads (no generative model given),
    # on requests replayed with their context
    result = tmp_path / "compare.json"
    compare = [*learn[:1], "compare", *learn[2:], "-k", "20", "50", "--max-rank", "50"]
    assert main([*compare, "--out", str(result), "--quiet"]) == 0
    capsys.readouterr()
    got = json.loads(result.read_text())
    assert got["fit_requests"] == summary["requests"] and got["test_requests"] > 0
    policies = got["policies"]
    assert list(policies) == list(COMPARED_POLICIES)  # every one, in the declared order
    for name, metrics in policies.items():
        assert 0.0 <= metrics["ads.recall@50"] <= 1.0, name
    for k in (20, 50):
        split = policies["best fixed"][f"split@{k}"]
        assert list(split) == [g for g in GENERATORS if g != "generative"]
        assert sum(split.values()) == pytest.approx(1.0)
        assert all(round(v * 5) == pytest.approx(v * 5) for v in split.values())  # fifths
    assert main([*compare, "--fixed-step", "0.3"]) == 2
    assert "fixed_step: must divide 1 into whole parts" in capsys.readouterr().err


def test_the_default_policy_serves_the_learned_table_where_there_is_one(tmp_path: Path) -> None:
    config = ServingConfig(max_k=50)
    assert config.quota_policy == "auto"
    write_serving_file(tmp_path, config, IndexConfig(), {})
    AdCatalog.empty().save(tmp_path)  # no advertisers: diversity changes nothing
    assert SelectStep(tmp_path)(_select_tensors(b"home", 80))["QUOTA_POLICY"].tolist() == [b"fixed"]
    _table({"*": [0.4, 0.1, 0.02]}).save(tmp_path / QUOTA_FILE)
    out = SelectStep(tmp_path)(_select_tensors(b"home", 80))
    assert out["QUOTA_POLICY"].tolist() == [b"learned"]
    assert config.effective_policy(True) == "learned" and config.effective_policy(False) == "fixed"


def test_a_target_two_generators_find_counts_for_the_one_that_ranks_it_first() -> None:
    # content repeats sequential's list one rank lower: its slots find nothing new.
    seq = _ranked(100, 30)
    cands = {"sequential": seq, "content": [(500, 1.0), *seq[:29]], "popularity": _ranked(300, 30)}
    rows = [ReplayedRequest(LoggedRequest(1, "home", {100: "click", 101: "click"}), 80, cands)
            for _ in range(40)]  # fmt: skip
    table = fit(rows, QuotaLearnConfig(max_rank=30, pooling="fixed", prior_strength=0.0))
    values = table.band_values("home", 80)
    seq_i, content_i = GENERATORS.index("sequential"), GENERATORS.index("content")
    assert values[seq_i, 0] == pytest.approx(2 / 5, abs=1e-3)  # 2 hits in 5 slots
    assert values[content_i, 0] == pytest.approx(0.0, abs=1e-3)
    # (offered only the generators that found candidates, as serving does: query and item had
    # none here, and a generator never seen holds no evidence either way)
    available = {g: len(c) for g, c in cands.items()}
    assert table.quotas("home", 80, 5, available)["sequential"] == 5


def test_the_recall_table_equals_each_splits_own_allocation() -> None:
    """The comparison scores every fixed split from one table per window; it must be what
    allocating each split for each request gives, requests it skips (no target within reach)
    included."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(40):
        # overlapping lists (the dedup at work), some empty (a context the surface lacks)
        cands = {g: [(int(a), 1.0 - j / 100) for j, a in
                     enumerate(rng.choice(120, rng.integers(0, 40), replace=False))]
                 for g in GENERATORS}  # fmt: skip
        targets = {int(a): ("conversion" if rng.random() < 0.3 else "click")
                   for a in rng.choice(160, rng.integers(1, 4), replace=False)}  # fmt: skip
        rows.append(ReplayedRequest(LoggedRequest(i, "home", targets), 1, cands))
    grid = fixed_grid(0.25)
    for k in (5, 12, 30):
        table = recall_table(rows, grid, k)
        for s, split in enumerate(grid):
            want = request_recalls(rows, lambda r, k, w=split: allocate(r.candidates, w, k), k)
            for label, values in want.items():
                np.testing.assert_array_equal(table[label][s], values)
    with pytest.raises(ConfigError, match=r"^fixed_step: must divide 1 into whole parts"):
        fixed_grid(0.3)
    five = GENERATORS[:5]  # every generator but the generative one
    assert len(fixed_grid(generators=five)) == 126 and len(fixed_grid(0.1, five)) == 1001
    assert len(fixed_grid()) == 252
