"""Admission control for the ``retrieve`` ensemble: at most ``ServingConfig.max_inflight``
requests inside it at once, the rest refused at the door.

Triton's queue policy can bound a batched step's queue, but a request refused at a later step has
already cost the earlier ones their work: under overload the features and encoder steps then ran
whole batches that the generators step could not take in time, and the answers per second fell
tenfold (docs/benchmarks/serving_notes.md, section 9). So the features step, the first, admits a
request only while fewer than ``max_inflight`` are in flight; the select step, the last, lets it
out, and so does the step that answers it with an error. The steps are separate processes: the
in-flight set is a small array of slots in a shared file, each holding its request's admission
time (the monotonic clock, the same in every process), updated under a file lock. A request
carries its ``Admission`` (slot and time), so that only its own holder frees a slot; a slot held
longer than ``LEASE_S`` (a request lost on its way) is free again.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from candgen.errors import CandgenError

LEASE_S = 2.0  # a slot not released by then belonged to a request that failed on its way


class Overloaded(CandgenError):
    """The request was refused for lack of capacity (answered UNAVAILABLE: retry later)."""


class Admission(NamedTuple):
    """A request's place in the ensemble: its slot and when it got it (monotonic ns)."""

    slot: int
    since_ns: int


def slots_file(version: str, limit: int) -> Path:
    """The in-flight slots of one server's ``version``: every step process of a tritonserver is
    its child, so the parent's pid names what they share (and nothing another server has); the
    limit is in the name, so a file is never resized under a process that maps it."""
    return Path(tempfile.gettempdir()) / f"candgen-inflight-{os.getppid()}-v{version}-n{limit}"


class InflightLimit:
    """At most ``limit`` admitted requests at a time, across processes.

    Args:
        path: the shared slots file (created at its size if absent or empty).
        limit: how many requests may be in flight.
        lease_s: after this long an unreleased slot is taken to be free.

    Raises:
        CandgenError: the file exists with another size (another limit's).
    """

    def __init__(self, path: Path, limit: int, lease_s: float = LEASE_S) -> None:
        self.path = Path(path)
        self.limit = limit
        self.lease_ns = int(lease_s * 1e9)
        with _Lock(self.path) as fd:
            size = os.fstat(fd).st_size
            if size == 0:
                os.ftruncate(fd, 8 * limit)
            elif size != 8 * limit:
                raise CandgenError(
                    f"max_inflight: {self.path} holds {size // 8} slots, not {limit}"
                )
        self._slots = np.memmap(self.path, np.int64, "r+", shape=(limit,))

    def _free(self, now: int) -> np.ndarray:
        held = self._slots
        free: np.ndarray = (held == 0) | (held <= now - self.lease_ns) | (held > now)
        return free

    def admit(self, n: int) -> list[Admission | None]:
        """An admission for each of ``n`` requests, None for those refused (no slot free)."""
        now = time.monotonic_ns()
        with _Lock(self.path):
            taken = np.flatnonzero(self._free(now))[:n].tolist()
            self._slots[taken] = now
        admitted: list[Admission | None] = [Admission(s, now) for s in taken]
        return admitted + [None] * (n - len(taken))

    def release(self, admissions: list[Admission]) -> None:
        """Frees the slots these requests hold (one that another request holds since, after
        its lease ran out, is left alone)."""
        mine = [a for a in admissions if 0 <= a.slot < self.limit]
        if mine:
            with _Lock(self.path):
                for a in mine:
                    if self._slots[a.slot] == a.since_ns:
                        self._slots[a.slot] = 0

    def in_flight(self) -> int:
        return int(np.count_nonzero(~self._free(time.monotonic_ns())))


def admission_tensor(admission: Admission | None) -> np.ndarray:
    """The ``ADMISSION`` tensor a request carries through the steps ([-1, 0]: not admitted)."""
    a = admission or Admission(-1, 0)
    return np.asarray([a.slot, a.since_ns], dtype=np.int64)


def admission_of(value: np.ndarray | None) -> Admission | None:
    """What ``admission_tensor`` wrote (None for none, or a malformed tensor)."""
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    if flat.size != 2 or flat[0] < 0:
        return None
    return Admission(int(flat[0]), int(flat[1]))


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
