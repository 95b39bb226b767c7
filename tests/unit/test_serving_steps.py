"""The ensemble's steps as plain functions, its generated Triton configs, and export's checks."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from candgen.cli import main
from candgen.endpoint.export import ExportConfig, ensemble_config, step_config
from candgen.errors import CandgenError, ConfigError
from candgen.index.ann import IndexConfig
from candgen.serving.contract import INPUTS, OUTPUTS
from candgen.serving.diversity import AdCatalog
from candgen.serving.pipeline import UserContext, user_vector
from candgen.serving.steps import (
    STEPS,
    FeaturesStep,
    SelectStep,
    ServingConfig,
    check_query_width,
    context_from,
    context_tensors,
    source_codes,
    write_serving_file,
)


@pytest.mark.parametrize("context", [
    UserContext(history=[5, 9], times=[100.0, 200.0], affinity=[0.25, 0.75]),
    UserContext(history=[], cold_start=True),
    UserContext(history=[3], fallback=True),
    UserContext(history=[4], long_term=[0.5, -0.25], activity=42),
])  # fmt: skip
def test_the_user_context_survives_the_trip_through_tensors(context: UserContext) -> None:
    assert context_from(context_tensors(context)) == context


def test_every_step_input_is_produced_upstream_or_is_a_request_input() -> None:
    available = set(INPUTS)
    for step in STEPS:
        assert set(step.INPUTS) <= available, step.MODEL
        available |= set(step.OUTPUTS)
    assert set(OUTPUTS) <= set(STEPS[-1].OUTPUTS)


def test_the_ensemble_pins_every_step_and_keeps_the_tensor_contract() -> None:
    text = ensemble_config(7)
    assert re.findall(r"model_version: (\d+)", text) == ["7"] * len(STEPS)
    for name in INPUTS:
        assert f'name: "{name}"' in text
    assert 'name: "RECENT_ITEM_IDS" data_type: TYPE_INT64 dims: [ -1 ] optional: true' in text
    assert 'name: "K" data_type: TYPE_INT32 dims: [ 1 ]' in text
    for name in OUTPUTS:
        assert f'name: "{name}"' in text
    assert "max_batch_size: 1" in text  # one user per request; the steps batch requests
    serving = ServingConfig(instances=3, door_instances=5, max_batch_size=8, queue_timeout_ms=40,
                            max_queue_size=5)  # fmt: skip
    features = step_config(STEPS[0], serving)
    assert 'backend: "python"' in features and "count: 5" in features
    assert "version_policy: { all { } }" in features
    assert "max_batch_size: 8" in features
    # A step that shares no work across a batch takes one request at a time, without a batcher
    # (the door admits at most max_inflight requests); the encoder, after the door, batches
    # behind a backstop queue whose timeout, counted from the request's arrival at the
    # ensemble, outlasts the door's and a swap's waits at the later steps.
    generators = step_config(STEPS[2], serving)
    assert "max_batch_size: 1\n" in generators and "count: 3" in generators
    assert "dynamic_batching" not in generators
    # Without an in-flight limit nothing else bounds their queues: the backstop stays.
    assert "max_queue_size: 1000\n" in step_config(STEPS[2], ServingConfig(max_inflight=0))
    encoder = step_config(STEPS[1], serving)
    assert "max_batch_size: 8\n" in encoder and "count: 3" in encoder
    assert "default_timeout_microseconds: 2040000\n" in encoder
    assert "max_queue_size: 1000\n" in encoder
    # Overload: past the queue's bounds a request is rejected, never queued without end.
    assert "timeout_action: REJECT" in features
    assert "default_timeout_microseconds: 40000" in features and "max_queue_size: 5" in features
    # Variable-length inputs batch with others of another length; fixed ones need no flag.
    assert (
        'name: "RECENT_ITEM_IDS" data_type: TYPE_INT64 dims: [ -1 ] optional: true '
        "allow_ragged_batch: true" in features
    )
    assert 'name: "USER_ID" data_type: TYPE_INT64 dims: [ 1 ] }' in features


def test_select_allocates_by_surface_and_passes_the_flags_on(tmp_path: Path) -> None:
    write_serving_file(tmp_path, ServingConfig(max_k=50), IndexConfig(), {})
    AdCatalog.empty().save(tmp_path)  # no advertisers: diversity changes nothing
    step = SelectStep(tmp_path)
    out = step({
        "CANDIDATE_IDS": np.array([11, 12, 13, 12, 21], np.int64),
        "CANDIDATE_SCORES": np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32),
        "CANDIDATE_SOURCES": source_codes(["sequential"] * 3 + ["content", "popularity"]),
        "SCENARIO": np.array([b"home"], object),
        "K": np.array([4], np.int32),
        "CONTEXT_FLAGS": np.array([b"fallback", b"no_context_item"], object),
        "CANDIDATE_FLAGS": np.array([b"unknown_context_item"], object),
    })  # fmt: skip
    assert len(out["AD_IDS"]) == len(set(out["AD_IDS"].tolist())) == 4
    assert set(out["AD_IDS"].tolist()) <= {11, 12, 13, 21}
    assert out["FLAGS"].tolist() == [b"fallback", b"no_context_item", b"unknown_context_item"]
    with pytest.raises(ConfigError, match=r"K: must be in 1\.\.50, got 51"):
        step({"CANDIDATE_IDS": np.zeros(0, np.int64),
              "CANDIDATE_SCORES": np.zeros(0, np.float32),
              "CANDIDATE_SOURCES": np.zeros(0, np.int32), "SCENARIO": np.array([b"home"], object),
              "K": np.array([51], np.int32), "CONTEXT_FLAGS": np.zeros(0, object)})  # fmt: skip


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"feature_server_url": "127.0.0.1:6566"}, "feature_server_url"),
    ({"feature_timeout_s": 0}, "feature_timeout_s"),
    ({"max_k": 0}, "max_k"),
    ({"instances": 0}, "instances"),
    ({"door_instances": 0}, "door_instances"),
    ({"instances": 1.5}, "instances"),
    ({"door_instances": "4"}, "door_instances"),
    ({"query_cache_size": -1}, "query_cache_size"),
    ({"query_encoder_threads": 0}, "query_encoder_threads"),
    ({"weights": {"home": {"sequential": 0.5}}}, "weights.home"),
    ({"weights": {"home": {"sequential": 0.5, "magic": 0.5}}}, "weights.home"),
    ({"weights": {"home": 1.0}}, "weights.home"),
    ({"weights": {"search": {"sequential": "0.5", "content": 0.5}}}, "weights.search"),
    ({"frequency_cap": 0}, "frequency_cap"),
    ({"advertiser_frequency_cap": 2.5}, "advertiser_frequency_cap"),
    ({"delivery_poll_s": -1}, "delivery_poll_s"),
    ({"max_ads_per_advertiser": (3, 3)}, "max_ads_per_advertiser"),
    ({"max_ads_per_advertiser": (0, 3, 3)}, "max_ads_per_advertiser"),
    ({"max_ads_per_advertiser": 3}, "max_ads_per_advertiser"),
    ({"delivery_poll_s": True}, "delivery_poll_s"),
    ({"enforce_constraints": "yes"}, "enforce_constraints"),
    ({"advertiser_window": 0}, "advertiser_window"),
    ({"duplicate_similarity": 1.5}, "duplicate_similarity"),
])  # fmt: skip
def test_bad_serving_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(field)}:"):
        ServingConfig(**kwargs)


def test_export_takes_only_registry_uris() -> None:
    with pytest.raises(ConfigError, match=r"^model_uri:"):
        ExportConfig(model_uri="runs:/abc/model")
    with pytest.raises(ConfigError, match=r"^keep_versions:"):
        ExportConfig(model_uri="models:/m@champion", keep_versions=0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--model-uri", "runs:/x/model"], "model_uri: must be a registry URI"),
    (["--model-uri", "models:/m@champion", "--max-k", "0"], "max_k: must be >= 1"),
    (["--model-uri", "models:/m@champion", "--weights", "/nonexistent.json"],
     "weights: cannot read /nonexistent.json"),
    (["--model-uri", "models:/m@champion", "--kind", "lsh"], "kind"),
])  # fmt: skip
def test_bad_export_arguments_exit_2_naming_the_field(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serving", "export", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_weights_file_with_bad_shares_names_the_surface(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "weights.json"
    bad.write_text('{"home": {"sequential": 0.7, "content": 0.7}}')
    assert main(["serving", "export", "--model-uri", "models:/m@champion", "--weights",
                 str(bad)]) == 2  # fmt: skip
    assert "weights.home: weights must be >= 0 and sum to 1" in capsys.readouterr().err


def test_query_rejects_an_unknown_protocol_before_connecting(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["query", "1", "--protocol", "smtp"])
    assert "--protocol" in capsys.readouterr().err


class _Features:
    """A feature store that knows one user (a stand-in for the Feast feature server)."""

    def lookup(self, service: str, entity: str, key: int) -> dict | None:
        if key != 1:
            return None
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        return {
            "recent_item_ids": [5, 6],
            "recent_timestamps": [1.0, 2.0],
            **{"country": "US", "age_bucket": "25-34", "device": "ios"},
            **{
                "impression_day": today,
                "impressed_ad_ids": [41, 42],
                "ad_impression_counts": [3, 1],
            },
            **{"impressed_advertiser_ids": [7], "advertiser_impression_counts": [10]},
            "hidden_advertiser_ids": [9],
        }


def _request(scenario: bytes, **context: np.ndarray) -> dict[str, np.ndarray]:
    return {"USER_ID": np.array([1], np.int64), "SCENARIO": np.array([scenario], object),
            "K": np.array([10], np.int32), **context}  # fmt: skip


class _Encoder:
    """A query encoder stand-in: the text's length, and the thread it ran on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def encode(self, text: str) -> np.ndarray:
        import threading

        self.seen.append((text, threading.current_thread().name))
        return np.array([len(text), 1.0], np.float32)


def test_the_features_step_passes_on_the_context_its_surface_reads(tmp_path: Path) -> None:
    write_serving_file(tmp_path, ServingConfig(), IndexConfig(), {})
    encoder = _Encoder()
    step = FeaturesStep(tmp_path, _Features(), encoder)
    query = {"QUERY": np.array([b" running shoes "], object)}
    item = {"CONTEXT_ITEM_ID": np.array([77], np.int64)}
    search = step(_request(b"search", **query, **item))
    # The query is embedded (trimmed), beside the lookup, on the step's encoder thread.
    assert search["QUERY_EMBEDDING"].tolist() == [13.0, 1.0]
    assert encoder.seen and encoder.seen[0][0] == "running shoes"
    assert encoder.seen[0][1].startswith("query-encoder")
    assert search["CONTEXT_ITEM"].size == 0
    assert search["CONTEXT_FLAGS"].tolist() == [b"context_item_ignored"]
    assert search["HISTORY_IDS"].tolist() == [5, 6]
    # what eligibility reads: the profile, today's capped ad, hidden and capped advertisers
    assert search["AUDIENCE"].tolist() == [b"US", b"25-34", b"ios"]
    assert search["BLOCKED_AD_IDS"].tolist() == [41]
    assert search["BLOCKED_ADVERTISER_IDS"].tolist() == [7, 9]
    related = step(_request(b"related", **item))
    assert related["CONTEXT_ITEM"].tolist() == [77] and related["QUERY_EMBEDDING"].size == 0
    assert related["CONTEXT_FLAGS"].size == 0
    bare = step(_request(b"search"))
    assert bare["QUERY_EMBEDDING"].size == 0 and bare["CONTEXT_FLAGS"].tolist() == [b"no_query"]
    assert len(encoder.seen) == 1  # only the search with a query was embedded
    cold = step(_request(b"related") | {"USER_ID": np.array([2], np.int64)})
    # an unknown user has no profile either: only untargeted campaigns reach them, and it says so
    assert cold["CONTEXT_FLAGS"].tolist() == [b"cold_start", b"no_profile", b"no_context_item"]
    with pytest.raises(ConfigError, match=r"^QUERY: at most 512 UTF-8 bytes"):
        step(_request(b"search", QUERY=np.array([b"q" * 600], object)))


class _DownFeatures:
    """A feature store whose first lookup fails (the feature server went away)."""

    def __init__(self) -> None:
        self.calls = 0

    def lookup(self, service: str, entity: str, key: int) -> dict | None:
        self.calls += 1
        if self.calls == 1:
            raise CandgenError("feature server: connection refused")
        return None


def test_a_failed_lookup_beside_a_pending_query_fails_that_request_only(tmp_path: Path) -> None:
    write_serving_file(tmp_path, ServingConfig(), IndexConfig(), {})
    step = FeaturesStep(tmp_path, _DownFeatures(), _Encoder())
    query = {"QUERY": np.array([b"lamp"], object)}
    with pytest.raises(CandgenError, match="connection refused"):
        step(_request(b"search", **query))
    after = step(_request(b"search", QUERY=np.array([b"desk lamp"], object)))
    assert after["QUERY_EMBEDDING"].tolist() == [9.0, 1.0]


def test_a_model_must_read_the_query_encoders_width() -> None:
    check_query_width(0, 384, "all-MiniLM-L6-v2")  # a model that reads no query text
    check_query_width(384, 384, "all-MiniLM-L6-v2")
    with pytest.raises(CandgenError, match=r"model reads 64-d .* all-MiniLM-L6-v2 gives 384-d"):
        check_query_width(64, 384, "all-MiniLM-L6-v2")


def _unified(**kw: object) -> object:
    import torch

    from candgen.models.retriever import Retriever
    from candgen.models.unified import UnifiedHSTU

    torch.manual_seed(0)
    model = UnifiedHSTU(num_items=40, dim=16, max_len=8, num_blocks=1, dropout=0.0,
                        time_buckets=0, **kw)  # type: ignore[arg-type]  # fmt: skip
    with torch.no_grad():
        model.mixture.scenario.weight.normal_()
    return Retriever(model, np.concatenate([[0], np.arange(1, 41)]), max_len=8)


def test_the_encoder_passes_the_context_only_to_a_model_that_reads_it() -> None:
    user = UserContext(history=[5, 6, 404], times=[1.0, 2.0, 3.0])
    embedding = np.full(384, 0.05, np.float32)
    plain = _unified()
    bare = user_vector(plain, user, "search")  # type: ignore[arg-type]
    given = user_vector(plain, user, "search", embedding, 9)  # type: ignore[arg-type]
    assert bare is not None and np.array_equal(bare, given)  # a model that reads none
    reads = _unified(query_text_dim=384, context_items=True)
    search = [user_vector(reads, user, "search", q) for q in (None, embedding)]  # type: ignore[arg-type]
    assert not np.allclose(search[0], search[1])
    related = [user_vector(reads, user, "related", None, i) for i in (None, 9, 404)]  # type: ignore[arg-type]
    assert not np.allclose(related[0], related[1])
    # An item the model does not know is not passed: the answer is the one without an item.
    assert np.array_equal(related[0], related[2])


def test_the_generators_search_their_text_index_with_the_versions_search_settings(
    tmp_path: Path,
) -> None:
    from candgen.endpoint.export import stage_generators
    from candgen.index.ann import INDEX_FILE, AdIndex, IndexConfig
    from candgen.serving.eligibility import AdTable, DeliveryState, save_eligibility
    from candgen.serving.generators import ContentGenerator
    from candgen.serving.steps import Generators

    rng = np.random.default_rng(0)
    ads = 1_000_000_000 + np.arange(1, 401, dtype=np.int64)
    vectors = rng.standard_normal((len(ads), 8)).astype(np.float32)
    AdIndex.build(ads, vectors, IndexConfig(kind="flat")).save(tmp_path / INDEX_FILE)
    text = rng.standard_normal((len(ads), 16)).astype(np.float32)
    built = IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=8, refine="none")
    content = ContentGenerator(ads, text, np.zeros(len(ads), np.int64), 1, built)
    delivery = {"ad_ids": ads, "impressions": np.ones(len(ads)), "clicks": np.ones(len(ads)),
                "budget_left_fraction": np.ones(len(ads)), "ineligible": ads[:0]}  # fmt: skip
    stage_generators(tmp_path, content, delivery)
    campaigns = np.array([7], np.int64)
    save_eligibility(
        tmp_path,
        AdTable(ads, np.full(len(ads), 7), np.ones(len(ads), np.int64), ads[:0]),
        DeliveryState(campaigns, np.zeros(1, np.int64), np.ones(1, bool), np.ones(1, np.float32)),
    )
    served = IndexConfig(kind="flat", nprobe=3, ef_search=77, refine_factor=5)
    loaded = Generators.load(tmp_path, served)
    text_index = loaded.content.index
    assert text_index.kind == "ivfpq"  # its own kind, the version's way of searching it
    assert (text_index.config.nprobe, text_index.config.ef_search) == (3, 77)
    assert text_index.config.refine_factor == 5 and text_index.config.device == "cpu"


def test_the_generators_step_reads_the_written_ads_only_with_their_scores() -> None:
    from candgen.serving.steps import written_of

    assert written_of({}) is None
    assert written_of({"GENERATED_IDS": np.zeros(0, np.int64)}) is None  # none written
    ids, scores = np.array([5, 9], np.int64), np.array([-0.1, -0.4], np.float32)
    got = written_of({"GENERATED_IDS": ids, "GENERATED_SCORES": scores})
    assert got is not None and got[0].tolist() == [5, 9] and np.allclose(got[1], scores)
    with pytest.raises(ConfigError, match=r"^GENERATED_SCORES: needs one score per"):
        written_of({"GENERATED_IDS": ids, "GENERATED_SCORES": scores[:1]})
