"""Triton's request traces read back: where each request's time went, step by step.

``tritonserver --trace-config level=TIMESTAMPS`` (``ServerConfig.trace_file``) writes a JSON
array of records. One traced request of the ensemble has a record of its own and one per
composing step (``parent_id`` is the ensemble's ``id``); a request's fields may be spread over
several records of the same ``id``. Timestamps are the server's steady clock in ns, the clock
of Python's ``time.monotonic_ns()`` on Linux, so a client on the same machine can match its
requests to the traces by time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError


@dataclass(frozen=True)
class StepTime:
    """One composing step of a traced ensemble request.

    Attributes:
        model: the step's model name.
        queue_ms: time between the step's queue start and its compute start.
        compute_ms: the step's compute (for the python backend: the stub's execute and the
            tensor transfers to and from it).
        refused: Triton refused the request in this step's queue (its queue policy: too many
            waiting, or waited too long); ``queue_ms`` then runs to the request's end.
    """

    model: str
    queue_ms: float
    compute_ms: float
    refused: bool = False


@dataclass(frozen=True)
class RequestTrace:
    """One traced top-level request.

    Attributes:
        model: the model the client called (the ensemble).
        start_ns: the server's ``REQUEST_START``, steady clock.
        total_ms: ``REQUEST_START`` to ``REQUEST_END``.
        steps: the composing steps in the order they started.
    """

    model: str
    start_ns: int
    total_ms: float
    steps: tuple[StepTime, ...]

    @property
    def refused(self) -> bool:
        """Whether a step's queue refused the request (Triton's queue policy)."""
        return any(s.refused for s in self.steps)

    def step_ms(self, model: str) -> float:
        """Queue plus compute of ``model`` (0 when the request did not run it)."""
        return sum(s.queue_ms + s.compute_ms for s in self.steps if s.model == model)


def _merge(records: list[Any], path: Path) -> dict[int, dict[str, Any]]:
    merged: dict[int, dict[str, Any]] = {}
    for i, record in enumerate(records):
        try:
            into = merged.setdefault(int(record["id"]), {"timestamps": {}})
            for key, value in record.items():
                if key == "timestamps":
                    into["timestamps"].update({t["name"]: int(t["ns"]) for t in value})
                else:
                    into[key] = int(value) if key == "parent_id" else value
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise CandgenError(
                f"trace_file: record {i} of {path} is not a Triton trace record ({e!r})"
            ) from e
    return merged


def _span_ms(record: dict[str, Any], first: str, last: str) -> float:
    stamps = record["timestamps"]
    for name in (first, last):
        if name not in stamps:
            raise CandgenError(
                f"trace_file: trace {record.get('id')} ({record.get('model_name', '?')}) has no "
                f"{name} timestamp (was the server stopped before it answered?)"
            )
    return float(stamps[last] - stamps[first]) / 1e6


def _step(step: dict[str, Any], parent: dict[str, Any]) -> StepTime:
    model = str(step.get("model_name", ""))
    stamps = step["timestamps"]
    if "COMPUTE_START" not in stamps and "COMPUTE_END" not in stamps and "QUEUE_START" in stamps:
        # Queued and never run: Triton's queue policy refused it (the request has ended).
        waited = float(parent["timestamps"]["REQUEST_END"] - stamps["QUEUE_START"]) / 1e6
        return StepTime(model=model, queue_ms=max(waited, 0.0), compute_ms=0.0, refused=True)
    return StepTime(
        model=model,
        queue_ms=_span_ms(step, "QUEUE_START", "COMPUTE_START"),
        compute_ms=_span_ms(step, "COMPUTE_START", "COMPUTE_END"),
    )


def trace_parts(path: Path) -> list[Path]:
    """The files of a trace: ``path`` itself where Triton wrote one file, and the parts
    ``<path>.0``, ``<path>.1``, ... it writes with a log frequency, in order."""
    path = Path(path)
    parts = [p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()]
    return ([path] if path.exists() else []) + sorted(parts, key=lambda p: int(p.suffix[1:]))


def read_trace(path: Path) -> list[RequestTrace]:
    """The top-level requests of a Triton trace (``path`` and its parts, ``trace_parts``), each
    with its steps' times, by start.

    Raises:
        CandgenError: the file is missing or is not a Triton trace, or a request or step lacks
            one of the timestamps its times are measured between.
    """
    files = trace_parts(path) or [Path(path)]  # none: the error names the file asked for
    records: list[Any] = []
    for file in files:
        try:
            part = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CandgenError(f"trace_file: cannot read {file}: {e}") from e
        if not isinstance(part, list):
            raise CandgenError(f"trace_file: {file} is not a JSON array of trace records")
        records += part
    merged = _merge(records, path)
    children: dict[int, list[dict[str, Any]]] = {}
    for trace_id, record in merged.items():
        record["id"] = trace_id
        parent = int(record.get("parent_id") or 0)
        if parent:
            children.setdefault(parent, []).append(record)
    traces = []
    for trace_id, record in merged.items():
        if record.get("parent_id"):
            continue
        total_ms = _span_ms(record, "REQUEST_START", "REQUEST_END")
        steps = [
            _step(s, record)
            for s in sorted(
                children.get(trace_id, []), key=lambda r: r["timestamps"].get("QUEUE_START", 0)
            )
        ]
        traces.append(
            RequestTrace(
                model=str(record.get("model_name", "")),
                start_ns=int(record["timestamps"]["REQUEST_START"]),
                total_ms=total_ms,
                steps=tuple(steps),
            )
        )
    return sorted(traces, key=lambda t: t.start_ns)
