"""Reading Triton's request traces back into per-step times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from candgen.endpoint.trace import read_trace, trace_parts
from candgen.errors import CandgenError


def _stamps(**ns: int) -> list[dict[str, object]]:
    return [{"name": name, "ns": value} for name, value in ns.items()]


def _write(tmp_path: Path, records: list[dict[str, object]]) -> Path:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(records))
    return path


def test_an_ensemble_request_gets_its_steps_in_order_from_split_records(tmp_path: Path) -> None:
    ms = 1_000_000
    records: list[dict[str, object]] = [
        {"id": 1, "model_name": "retrieve", "model_version": 1},
        {"id": 1, "timestamps": _stamps(REQUEST_START=0, QUEUE_START=0)},
        {"id": 1, "timestamps": _stamps(REQUEST_END=10 * ms)},
        # The second step is written first: steps are ordered by when they were queued.
        {"id": 3, "model_name": "b", "parent_id": 1},
        {"id": 3, "timestamps": _stamps(QUEUE_START=5 * ms, COMPUTE_START=6 * ms)},
        {"id": 3, "timestamps": _stamps(COMPUTE_END=9 * ms)},
        {"id": 2, "model_name": "a", "parent_id": 1},
        {"id": 2, "timestamps": _stamps(QUEUE_START=ms, COMPUTE_START=ms, COMPUTE_END=4 * ms)},
        # A second top-level request that started earlier comes first.
        {"id": 4, "model_name": "retrieve", "parent_id": 0},
        {"id": 4, "timestamps": _stamps(REQUEST_START=-5 * ms, REQUEST_END=-3 * ms)},
    ]
    first, second = read_trace(_write(tmp_path, records))
    assert (first.start_ns, first.total_ms, first.steps) == (-5 * ms, 2.0, ())
    assert second.model == "retrieve" and second.total_ms == 10.0
    assert [(s.model, s.queue_ms, s.compute_ms) for s in second.steps] == [
        ("a", 0.0, 3.0),
        ("b", 1.0, 3.0),
    ]
    assert second.step_ms("b") == 4.0 and second.step_ms("missing") == 0.0


def test_a_request_refused_in_a_queue_is_read_as_refused(tmp_path: Path) -> None:
    ms = 1_000_000
    records: list[dict[str, object]] = [
        {"id": 1, "model_name": "retrieve", "timestamps": _stamps(REQUEST_START=0,
                                                                 REQUEST_END=7 * ms)},
        {"id": 2, "model_name": "a", "parent_id": 1, "timestamps": _stamps(QUEUE_START=ms)},
        {"id": 3, "model_name": "retrieve", "timestamps": _stamps(REQUEST_START=9 * ms,
                                                                 REQUEST_END=12 * ms)},
        {"id": 4, "model_name": "a", "parent_id": 3,
         "timestamps": _stamps(QUEUE_START=9 * ms, COMPUTE_START=10 * ms, COMPUTE_END=11 * ms)},
    ]  # fmt: skip
    refused, answered = read_trace(_write(tmp_path, records))
    assert refused.refused and not answered.refused
    assert [(s.model, s.queue_ms, s.compute_ms, s.refused) for s in refused.steps] == [
        ("a", 6.0, 0.0, True)
    ]
    assert answered.steps[0].refused is False and answered.step_ms("a") == 2.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", r"^trace_file: cannot read"),
        ('{"id": 1}', r"^trace_file: .* is not a JSON array"),
        ('[{"id": 1}, 7]', r"^trace_file: record 1 of .* is not a Triton trace record"),
        ('[{"id": "x"}]', r"^trace_file: record 0 of .* is not a Triton trace record"),
        ('[{"id": 1, "timestamps": [{"ns": 5}]}]', r"^trace_file: record 0 of "),
        # A step cut short (the server stopped before it answered) is not read as 0 ms.
        (
            '[{"id": 1, "timestamps": [{"name": "REQUEST_START", "ns": 0}, '
            '{"name": "REQUEST_END", "ns": 9}]}, {"id": 2, "parent_id": 1, "model_name": "a", '
            '"timestamps": [{"name": "QUEUE_START", "ns": 1}, '
            '{"name": "COMPUTE_START", "ns": 2}]}]',
            r"^trace_file: trace 2 \(a\) has no COMPUTE_END timestamp",
        ),
        ('[{"id": 1, "timestamps": [{"name": "REQUEST_START", "ns": 0}]}]', r"no REQUEST_END"),
    ],
)
def test_a_file_that_is_not_a_trace_is_a_clear_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "trace.json"
    path.write_text(content)
    with pytest.raises(CandgenError, match=message):
        read_trace(path)


def test_a_missing_trace_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CandgenError, match=r"^trace_file: cannot read"):
        read_trace(tmp_path / "absent.json")


def test_the_parts_of_a_trace_are_read_together_in_order(tmp_path: Path) -> None:
    ms = 1_000_000
    (tmp_path / "trace.json.1").write_text(json.dumps([
        {"id": 2, "model_name": "m", "timestamps": _stamps(REQUEST_START=5 * ms,
                                                          REQUEST_END=6 * ms)},
        {"id": 1, "timestamps": _stamps(REQUEST_END=3 * ms)},  # the rest of a part-0 request
    ]))  # fmt: skip
    (tmp_path / "trace.json.0").write_text(
        json.dumps([{"id": 1, "model_name": "m", "timestamps": _stamps(REQUEST_START=0)}])
    )
    (tmp_path / "trace.json.bak").write_text("not a part")
    path = tmp_path / "trace.json"
    assert [p.name for p in trace_parts(path)] == ["trace.json.0", "trace.json.1"]
    assert [(t.start_ns, t.total_ms) for t in read_trace(path)] == [(0, 3.0), (5 * ms, 1.0)]
