"""Batched steps: what Triton's dynamic batcher hands one execute is answered as each request
alone would be, one bad request fails only itself, and the shared work is done once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from candgen.errors import CandgenError, ConfigError
from candgen.index.ann import IndexConfig
from candgen.serving.admission import InflightLimit, Overloaded
from candgen.serving.diversity import AdCatalog
from candgen.serving.pipeline import UserContext, user_vector, user_vectors
from candgen.serving.steps import (
    EncoderStep,
    FeaturesStep,
    SelectStep,
    ServingConfig,
    context_tensors,
    source_codes,
    write_serving_file,
)
from candgen.serving.triton_model import leave, triton_model
from tests.unit.test_serving_steps import _Encoder, _Features, _request, _unified


class _BatchFeatures(_Features):
    """The one-user store, read a batch at a time (as the feature server client reads)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def lookup_many(self, service: str, entity: str, keys: list[int]) -> list[dict | None]:
        self.calls.append(list(keys))
        return [self.lookup(service, entity, k) for k in keys]


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tolist() == b[name].tolist(), name


def test_a_batch_reads_every_user_once_and_answers_each_as_alone(tmp_path: Path) -> None:
    write_serving_file(tmp_path, ServingConfig(), IndexConfig(), {})
    features = _BatchFeatures()
    step = FeaturesStep(tmp_path, features, _Encoder())
    requests = [
        _request(b"search", QUERY=np.array([b"desk lamp"], object)),
        _request(b"home", K=np.array([0], np.int32)),  # refused: K out of range
        _request(b"related", USER_ID=np.array([2], np.int64)),
        _request(b"search", QUERY=np.array([b"q" * 600], object)),  # refused: QUERY too long
        _request(b"related", CONTEXT_ITEM_ID=np.array([77], np.int64)),
    ]
    answers = step.batch(requests)
    assert features.calls == [[1, 2, 1]]  # one read, for the requests that parsed
    assert isinstance(answers[1], ConfigError) and answers[1].field == "K"
    assert isinstance(answers[3], ConfigError) and answers[3].field == "QUERY"
    alone = FeaturesStep(tmp_path, _Features(), _Encoder())
    for row in (0, 2, 4):
        got = answers[row]
        assert isinstance(got, dict)
        _same(got, alone(requests[row]))


def test_a_failed_batch_read_fails_that_batch_and_the_next_one_is_answered(
    tmp_path: Path,
) -> None:
    class Down(_BatchFeatures):
        def lookup_many(self, service: str, entity: str, keys: list[int]) -> list[dict | None]:
            if not self.calls:
                self.calls.append(list(keys))
                raise RuntimeError("socket closed")  # a bug, not an unreachable store
            return super().lookup_many(service, entity, keys)

    write_serving_file(tmp_path, ServingConfig(), IndexConfig(), {})
    step = FeaturesStep(tmp_path, Down(), _Encoder())
    search = _request(b"search", QUERY=np.array([b"lamp"], object))
    answers = step.batch([search, _request(b"home")])
    assert all(isinstance(a, RuntimeError) for a in answers)
    after = step.batch([search])[0]
    assert isinstance(after, dict) and after["QUERY_EMBEDDING"].tolist() == [4.0, 1.0]


def test_one_encoder_forward_gives_each_request_its_own_vector() -> None:
    model = _unified(query_text_dim=384, context_items=True)
    embedding = np.full(384, 0.05, np.float32)
    batch = [
        (UserContext(history=[5, 6, 404], times=[1.0, 2.0, 3.0]), "search", embedding, None),
        (UserContext(history=[7, 8]), "home", None, None),  # no timestamps
        (UserContext(history=[404]), "home", None, None),  # no item the model knows
        (UserContext(history=[9], times=[5.0]), "related", None, 12),
        (UserContext(history=[1, 2, 3, 4], long_term=[0.1] * 4), "related", None, 999),
    ]
    together = user_vectors(
        model,  # type: ignore[arg-type]
        [c for c, _, _, _ in batch],
        [s for _, s, _, _ in batch],
        [q for _, _, q, _ in batch],
        [i for _, _, _, i in batch],
    )
    for (context, surface, query, item), got in zip(batch, together, strict=True):
        alone = user_vector(model, context, surface, query, item)  # type: ignore[arg-type]
        if alone is None:
            assert got is None
        else:
            assert got is not None and np.allclose(got, alone, atol=1e-5)
    assert together[2] is None


def test_a_request_that_breaks_the_encoder_batch_fails_alone() -> None:
    step = EncoderStep.__new__(EncoderStep)  # the model without an exported folder
    step.retriever = _unified()  # type: ignore[assignment]
    step.generative = None  # a version without a generative generator

    def request(context: UserContext) -> dict[str, np.ndarray]:
        return context_tensors(context) | {
            "SCENARIO": np.array([b"home"], object),
            "QUERY_EMBEDDING": np.zeros(0, np.float32),
            "CONTEXT_ITEM": np.zeros(0, np.int64),
        }

    good = [request(UserContext(history=[5, 6], times=[1.0, 2.0])), request(UserContext([7]))]
    broken = request(UserContext(history=[5, 6], times=[1.0, 2.0]))
    broken["HISTORY_TIMES"] = np.array([1.0], np.float64)  # one time for two items
    answers = step.batch([good[0], broken, good[1]])
    assert isinstance(answers[1], Exception)
    for row, tensors in ((0, good[0]), (2, good[1])):
        got, alone = answers[row], step(tensors)
        assert isinstance(got, dict)
        assert np.allclose(got["USER_VECTOR"], alone["USER_VECTOR"], atol=1e-5)


class _PbUtils:
    """What the shell uses of ``triton_python_backend_utils``."""

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message: str, code: str | None = None) -> None:
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name: str, value: np.ndarray) -> None:
            self.name, self.value = name, value

        def as_numpy(self) -> np.ndarray:
            return self.value

    class InferenceResponse:
        def __init__(self, output_tensors: list[Any], error: Any = None) -> None:
            self.outputs = {t.name: t.value for t in output_tensors}
            self.error = error

    class Logger:
        @staticmethod
        def log_error(message: str) -> None:
            pass

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, Any], name: str) -> Any:
        return request.get(name)


def test_the_shell_answers_every_request_of_a_batch_with_its_own_batch_row(
    tmp_path: Path,
) -> None:
    write_serving_file(tmp_path, ServingConfig(max_k=50), IndexConfig(), {})
    AdCatalog.empty().save(tmp_path)
    model = triton_model("candgen_select", _PbUtils)()
    model.step = SelectStep(tmp_path)

    def request(ids: list[int], k: int, rows: int = 1) -> dict[str, Any]:
        tensors = {
            "CANDIDATE_IDS": np.array(ids, np.int64),
            "CANDIDATE_SCORES": np.linspace(1, 0, len(ids)).astype(np.float32),
            "CANDIDATE_SOURCES": source_codes(["sequential"] * len(ids)),
            "SCENARIO": np.array([b"home"], object),
            "K": np.array([k], np.int32),
        }
        return {n: _PbUtils.Tensor(n, np.stack([v] * rows)) for n, v in tensors.items()}

    responses = model.execute(
        [request([11, 12, 13], 2), request([21, 22], 2, rows=2), request([31], 5), request([1], 0)]
    )
    assert len(responses) == 4
    first, two_users, third, bad_k = responses
    assert first.error is None and first.outputs["AD_IDS"].tolist() == [[11, 12]]
    assert third.error is None and third.outputs["AD_IDS"].tolist() == [[31]]
    assert two_users.error.code == "INVALID_ARG"
    assert two_users.error.message.startswith("CANDIDATE_IDS: one request carries one user")
    assert bad_k.error.code == "INVALID_ARG" and bad_k.error.message.startswith("K: ")


@pytest.mark.parametrize(("field", "value"), [
    ("max_batch_size", 0),
    ("max_batch_size", 2.5),
    ("batch_delay_us", -1),
    ("max_queue_size", 0),
    ("queue_timeout_ms", 0),
    ("queue_timeout_ms", True),
    ("max_inflight", -1),
])  # fmt: skip
def test_bad_batch_and_queue_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: must be an integer in"):
        ServingConfig(**{field: value})  # type: ignore[arg-type]


def test_the_inflight_limit_is_shared_and_a_lost_slot_expires(tmp_path: Path) -> None:
    path = tmp_path / "slots"
    door, exit_ = InflightLimit(path, 3), InflightLimit(path, 3)  # two processes' views
    first = door.admit(2)
    assert [a.slot for a in first if a] == [0, 1]
    second = door.admit(2)
    assert second[0] is not None and second[0].slot == 2 and second[1] is None  # the limit holds
    exit_.release([first[1]])  # type: ignore[list-item]  # the last step lets one out
    assert door.in_flight() == 2
    again = door.admit(1)[0]
    assert again is not None and again.slot == 1
    exit_.release([first[1]])  # type: ignore[list-item]  # a stale holder frees nothing now
    assert door.in_flight() == 3
    lapsed = InflightLimit(path, 3, lease_s=0.0)  # every slot older than its lease is free
    assert [a.slot for a in lapsed.admit(3) if a] == [0, 1, 2]
    with pytest.raises(CandgenError, match=r"^max_inflight: .* holds 3 slots, not 5"):
        InflightLimit(path, 5)  # never resized under the processes that map it


def test_past_the_limit_the_door_refuses_and_a_request_leaves_after_select_or_an_error(
    tmp_path: Path,
) -> None:
    write_serving_file(tmp_path, ServingConfig(max_inflight=2), IndexConfig(), {})
    AdCatalog.empty().save(tmp_path)
    limit = InflightLimit(tmp_path / "slots", 2)
    features = FeaturesStep(tmp_path, _BatchFeatures(), _Encoder())
    select = SelectStep(tmp_path)
    features.admission = select.admission = limit
    answers = features.batch([_request(b"home"), _request(b"home"), _request(b"home")])
    assert [a["ADMISSION"][0] for a in answers[:2]] == [0, 1]  # type: ignore[index]
    assert isinstance(answers[2], Overloaded) and "max_inflight" in str(answers[2])
    bad = features.batch([_request(b"home", K=np.array([0], np.int32))])[0]
    assert isinstance(bad, ConfigError)  # refused on its input: it took no slot
    leaving = {
        "CANDIDATE_IDS": np.array([11], np.int64),
        "CANDIDATE_SCORES": np.array([1.0], np.float32),
        "CANDIDATE_SOURCES": source_codes(["popularity"]),
        "SCENARIO": np.array([b"home"], object),
        "K": np.array([3], np.int32),
    }
    first, second = (leaving | {"ADMISSION": a["ADMISSION"]} for a in answers[:2])  # type: ignore[index]
    # An earlier step's error lets its request out; the select step lets every request out.
    leave(select, [first], [CandgenError("the generators step failed")], last=False)
    assert limit.in_flight() == 1
    leave(select, [second], select.batch([second]), last=True)
    assert limit.in_flight() == 0
    leave(select, [second], select.batch([second]), last=False)  # answered, not last: stays
    assert limit.in_flight() == 0


def test_one_users_unreadable_row_fails_only_that_request(tmp_path: Path) -> None:
    class Broken(_BatchFeatures):
        def lookup(self, service: str, entity: str, key: int) -> dict | None:
            row = super().lookup(service, entity, 1)
            return row if key == 1 else {**(row or {}), "recent_timestamps": ["soon"]}

    write_serving_file(tmp_path, ServingConfig(), IndexConfig(), {})
    step = FeaturesStep(tmp_path, Broken(), _Encoder())
    good, broken = step.batch([_request(b"home"), _request(b"home", USER_ID=np.array([5]))])
    assert isinstance(good, dict) and isinstance(broken, ValueError)


def _generative_ads(ads: np.ndarray, first_id: int = 1, dense_weight: float = 0.0) -> Any:
    """A random-weight generative model over 40 items, ids ``first_id``.. (IDs: two tokens of
    8, unique)."""
    import torch

    from candgen.models.generative import GenerativeRetriever
    from candgen.models.retriever import Retriever
    from candgen.models.sequential import HSTU
    from candgen.serving.generative import GenerativeAds

    rows = np.arange(1, 41)
    ids = torch.from_numpy(np.stack([np.r_[0, rows // 8], np.r_[0, rows % 8]], 1))
    torch.manual_seed(0)
    encoder = HSTU(40, dim=16, max_len=8, num_blocks=1, dropout=0.0)
    model = GenerativeRetriever(encoder, ids, (8, 8), dropout=0.0, beam_width=10,
                                dense_weight=dense_weight)  # fmt: skip
    items = np.r_[0, rows - 1 + first_id]
    with pytest.raises(ConfigError, match=r"^model: a generative model retrieves by beam"):
        Retriever(model, items, max_len=8)  # a dense use of it is refused
    return GenerativeAds(Retriever(model, items, max_len=8, states_only=True), ads, 10)


def test_generative_ads_are_written_by_their_own_ids_and_a_dense_head_orders_them() -> None:
    import torch

    ads = np.arange(1020, 1040)  # rows 21..40 of a model whose items are 1000..1039
    generative = _generative_ads(ads, first_id=1000, dense_weight=1.0)
    state = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    written, none = generative.write([state, None])
    assert none is None and written is not None
    found, scores = written
    assert len(found) == 10 and set(found.tolist()) <= set(ads.tolist())
    rows = torch.from_numpy(found - 999)
    dense = generative.model.raw_item_embeddings(rows) @ torch.from_numpy(state)
    assert np.allclose(scores, dense.detach().numpy(), atol=1e-5)
    assert (np.diff(scores) <= 1e-6).all()


def test_the_encoder_step_writes_the_generative_ads_and_answers_without_them_on_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    step = EncoderStep.__new__(EncoderStep)
    step.retriever = _unified()  # type: ignore[assignment]
    ads = np.arange(21, 41)
    step.generative = _generative_ads(ads)

    def request(history: list[int]) -> dict[str, np.ndarray]:
        return context_tensors(UserContext(history=history)) | {
            "SCENARIO": np.array([b"home"], object),
            "QUERY_EMBEDDING": np.zeros(0, np.float32),
            "CONTEXT_ITEM": np.zeros(0, np.int64),
        }

    answers = step.batch([request([5, 6]), request([404])])  # the second: nothing known
    first, unknown = answers
    assert isinstance(first, dict) and isinstance(unknown, dict)
    assert len(first["GENERATED_IDS"]) == 10 == len(first["GENERATED_SCORES"])
    assert set(first["GENERATED_IDS"].tolist()) <= set(ads.tolist())
    assert (
        first["GENERATED_IDS"].dtype == np.int64 and first["GENERATED_SCORES"].dtype == np.float32
    )
    assert unknown["GENERATED_IDS"].size == 0 == unknown["USER_VECTOR"].size
    with pytest.raises(ConfigError, match=r"^ad_ids: the generative model knows none of the 2"):
        _generative_ads(np.array([500, 501]))

    def broken(states: object) -> object:
        raise RuntimeError("beam search ran out of memory")

    step.generative.write = broken  # type: ignore[method-assign]
    again = step.batch([request([5, 6])])[0]
    assert isinstance(again, dict) and again["GENERATED_IDS"].size == 0
    assert np.allclose(again["USER_VECTOR"], first["USER_VECTOR"], atol=1e-6)
    assert "generative generator failed" in caplog.text
