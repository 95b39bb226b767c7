"""Admission control for the ``retrieve`` ensemble: at most ``ServingConfig.max_inflight``
requests inside it at once, the rest refused at the door.

Triton's queue policy bounds each step's queue, but a request refused at a later step has
already cost the earlier ones their work: under overload the features and encoder steps then ran
whole batches that the generators step could not take in time, and the answers per second fell
tenfold (docs/benchmarks/serving_notes.md, section 9). So the features step, the first, admits a
request only while fewer than ``max_inflight`` are in flight, and the select step, the last,
releases it. The steps are separate processes: the in-flight set is a small array of slots in a
shared file, each holding its request's admission time, updated under a file lock. A request that
fails between the two steps never releases its slot; a slot older than ``LEASE_S`` is free again.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from candgen.errors import CandgenError

LEASE_S = 2.0  # a slot not released by then belonged to a request that failed on its way


class Overloaded(CandgenError):
    """The request was refused for lack of capacity (answered UNAVAILABLE: retry later)."""


def slots_file(version: str) -> Path:
    """The in-flight slots of one server's ``version``: every step process of a tritonserver is
    its child, so the parent's pid names what they share (and nothing another server has)."""
    return Path(tempfile.gettempdir()) / f"candgen-inflight-{os.getppid()}-v{version}"


class InflightLimit:
    """At most ``limit`` admitted requests at a time, across processes.

    Args:
        path: the shared slots file (created at the right size if absent).
        limit: how many requests may be in flight.
        lease_s: after this long an unreleased slot is taken to be free.
    """

    def __init__(self, path: Path, limit: int, lease_s: float = LEASE_S) -> None:
        self.path = Path(path)
        self.limit = limit
        self.lease_s = lease_s
        with self._locked() as fd:
            if os.fstat(fd).st_size != 8 * limit:
                os.ftruncate(fd, 8 * limit)
        self._slots = np.memmap(self.path, np.float64, "r+", shape=(limit,))

    def _locked(self) -> _Lock:
        return _Lock(self.path)

    def admit(self, n: int) -> list[int | None]:
        """A slot for each of ``n`` requests, None for those refused (none was free)."""
        now = time.time()
        with self._locked():
            free = np.flatnonzero(self._slots <= now - self.lease_s).tolist()
            taken = free[:n]
            self._slots[taken] = now
        return [*taken, *[None] * (n - len(taken))]

    def release(self, slots: list[int]) -> None:
        """Frees the slots of requests that left the ensemble (unknown slots are ignored)."""
        valid = [s for s in slots if 0 <= s < self.limit]
        if valid:
            with self._locked():
                self._slots[valid] = 0.0

    def in_flight(self) -> int:
        now = time.time()
        return int(np.count_nonzero(self._slots > now - self.lease_s))


class _Lock:
    """An exclusive lock on the slots file (``fcntl.flock``), yielding its descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self.fd

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
