"""Catalogue updates while serving: new ads into the ads index, expired ads out, no rebuild.

A producer (the catalogue's change feed) writes update files into a folder that the serving
process polls (``ServingConfig.ad_updates_dir``): ``<sequence>.npz`` holding ``add_ids`` with
their ``add_vectors`` (the model's embedding of each new ad) and ``expire_ids``, written under a
temporary name and renamed, so that a reader never sees half a file. Each file is applied once,
in name order (zero-padded sequence numbers sort as numbers), a few thousand ads at a time
under the index's lock: a search waits for at most one such step, never fails, and sees every
ad of a step or none of it. A shard applies only the ads of its own id residue.

A file that cannot be read or applied is logged and set aside (renamed ``*.rejected``) so that
the files after it still apply; the index is never left with part of a step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from candgen.errors import CandgenError, DataFormatError
from candgen.index.ann import AdIndex

log = logging.getLogger(__name__)

UPDATE_SUFFIX = ".npz"
APPLY_STEP = 5_000  # ads added (or expired) per hold of the index's lock


@dataclass(frozen=True)
class AdUpdate:
    """One file of catalogue changes.

    Attributes:
        add_ids: (n,) new ads' ids.
        add_vectors: (n, dim) their embeddings.
        expire_ids: (m,) ads no longer served.
    """

    add_ids: np.ndarray
    add_vectors: np.ndarray
    expire_ids: np.ndarray

    def only(self, keep: Callable[[np.ndarray], np.ndarray]) -> AdUpdate:
        """The part of the update whose ids ``keep`` (ids -> mask) lets through (a shard's)."""
        add = keep(self.add_ids)
        return AdUpdate(
            self.add_ids[add], self.add_vectors[add], self.expire_ids[keep(self.expire_ids)]
        )


def write_update(
    folder: Path,
    sequence: int,
    add_ids: np.ndarray,
    add_vectors: np.ndarray,
    expire_ids: np.ndarray,
) -> Path:
    """Writes update ``sequence`` into ``folder`` (atomically: a temporary name, then renamed);
    returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sequence:012d}{UPDATE_SUFFIX}"
    partial = folder / f".{path.name}.partial"
    with partial.open("wb") as f:
        np.savez(
            f,
            add_ids=np.asarray(add_ids, np.int64),
            add_vectors=np.asarray(add_vectors, np.float32),
            expire_ids=np.asarray(expire_ids, np.int64),
        )
    partial.rename(path)
    return path


def read_update(path: Path, dim: int) -> AdUpdate:
    """Reads and checks one update file.

    Raises:
        DataFormatError: naming the file and the array at fault.
    """
    try:
        arrays = np.load(path)
        found = {name: arrays[name] for name in ("add_ids", "add_vectors", "expire_ids")}
    except (OSError, ValueError, KeyError) as e:
        raise DataFormatError(str(path), None, f"not an update file: {e}") from None
    ids, vectors, expire = found["add_ids"], found["add_vectors"], found["expire_ids"]
    for name, arr in (("add_ids", ids), ("expire_ids", expire)):
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise DataFormatError(str(path), None, f"{name}: need a 1-d integer array")
    if vectors.shape != (len(ids), dim) or not np.isfinite(vectors).all():
        raise DataFormatError(
            str(path),
            None,
            f"add_vectors: need ({len(ids)}, {dim}) finite floats, got {vectors.dtype} "
            f"{vectors.shape}",
        )
    return AdUpdate(ids.astype(np.int64), vectors.astype(np.float32), expire.astype(np.int64))


def apply_update(index: AdIndex, update: AdUpdate, lock: threading.Lock) -> dict[str, int]:
    """Expires, then adds, ``APPLY_STEP`` ads per hold of ``lock`` (the one searches take).

    An id the index holds already, or held once (an expired ad stays in IVF's lists and HNSW's
    graph until a rebuild), is skipped and counted: a changed ad comes back under a new id."""
    removed = 0
    expire = np.unique(update.expire_ids)
    for lo in range(0, len(expire), APPLY_STEP):
        with lock:
            removed += index.remove(expire[lo : lo + APPLY_STEP].tolist())
    ids, vectors = update.add_ids, update.add_vectors
    if len(ids):
        _, first = np.unique(ids, return_index=True)  # a file that repeats an id: its first
        fresh = np.zeros(len(ids), bool)
        fresh[first] = True
        fresh &= index.position_of(ids) < 0
        ids, vectors = ids[fresh], vectors[fresh]
    for lo in range(0, len(ids), APPLY_STEP):
        with lock:
            index.add(ids[lo : lo + APPLY_STEP], vectors[lo : lo + APPLY_STEP])
    return {"added": len(ids), "expired": removed, "skipped": len(update.add_ids) - len(ids)}


class UpdateWatcher:
    """Applies the update files of ``folder`` to an index as they appear.

    Args:
        folder: where the update files arrive.
        index: the ads index.
        lock: what every search of ``index`` holds.
        poll_s: seconds between looks at the folder.
        keep: which ids this index serves (a shard's residue); None: all.
    """

    def __init__(
        self,
        folder: Path,
        index: AdIndex,
        lock: threading.Lock,
        poll_s: float,
        keep: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.folder, self.index, self.lock, self.poll_s = Path(folder), index, lock, poll_s
        self.keep = keep
        self.applied: dict[str, float] = {}  # file name -> when it was applied (time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> int:
        """Applies every file not yet applied, in name order; returns how many."""
        if not self.folder.is_dir():
            return 0
        count = 0
        for path in sorted(self.folder.glob(f"*{UPDATE_SUFFIX}")):
            if path.name in self.applied:
                continue
            try:
                update = read_update(path, self.index.dim)
                if self.keep is not None:
                    update = update.only(self.keep)
                done = apply_update(self.index, update, self.lock)
            except CandgenError as e:
                log.error("ad updates: %s: set aside: %s", path.name, e)
                path.rename(path.with_name(path.name + ".rejected"))
                continue
            self.applied[path.name] = time.time()
            log.info("ad updates: %s: %s", path.name, done)
            count += 1
        return count

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except OSError as e:  # the folder went away for a moment: try again next poll
                log.warning("ad updates: %s", e)
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ad-updates", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
