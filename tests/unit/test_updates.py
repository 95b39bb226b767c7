"""Catalogue updates applied to a serving index in place: files, steps, the watcher, and
searches running meanwhile (threads, no server; tests/integration/test_ad_shards.py has one)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from candgen.errors import ConfigError, DataFormatError
from candgen.index.ann import AdIndex, IndexConfig
from candgen.serving import updates
from candgen.serving.steps import ServingConfig
from candgen.serving.updates import UpdateWatcher, apply_update, read_update, write_update

AD = 1_000_000_000
DIM = 16


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _index(kind: str = "ivfpq") -> tuple[AdIndex, np.ndarray, np.ndarray]:
    ids, vecs = AD + np.arange(3000, dtype=np.int64), _vectors(3000, 0)
    config = IndexConfig(kind=kind, pq_m=4, ivf_nlist=16, nprobe=16)
    return AdIndex.build(ids, vecs, config), ids, vecs


def test_an_update_file_reads_back_as_written(tmp_path: Path) -> None:
    path = write_update(tmp_path, 7, [AD + 1], _vectors(1, 1), [AD + 2, AD + 3])
    assert path.name == "000000000007.npz" and not list(tmp_path.glob(".*"))
    update = read_update(path, DIM)
    assert update.add_ids.tolist() == [AD + 1] and update.expire_ids.tolist() == [AD + 2, AD + 3]
    assert update.add_vectors.shape == (1, DIM)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"add_ids": [1], "add_vectors": np.zeros((1, 3)), "expire_ids": []}, "add_vectors: need"),
        ({"add_ids": [1], "add_vectors": np.full((1, DIM), np.nan), "expire_ids": []}, "finite"),
        ({"add_ids": [1.5], "add_vectors": np.zeros((1, DIM)), "expire_ids": []}, "add_ids: need"),
        ({"add_ids": [1], "add_vectors": np.zeros((1, DIM))}, "not an update file"),
    ],
)
def test_a_bad_update_file_is_refused_naming_file_and_array(
    tmp_path: Path, arrays: dict, message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(DataFormatError, match=rf"bad\.npz: .*{message}"):
        read_update(tmp_path / "bad.npz", DIM)


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_new_ads_are_found_expired_ones_never_and_held_ids_are_skipped(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(updates, "APPLY_STEP", 40)
    index, ids, vecs = _index(kind)
    new_ids, new_vecs = AD + 10_000 + np.arange(100), _vectors(100, 2)
    holds = []

    class CountingLock:
        def __enter__(self) -> None:
            holds.append(1)

        def __exit__(self, *exc: object) -> None:
            pass

    update = updates.AdUpdate(
        np.r_[new_ids, ids[:2], new_ids[:1]], np.r_[new_vecs, vecs[:2], new_vecs[:1]], ids[10:60]
    )
    done = apply_update(index, update, CountingLock())  # type: ignore[arg-type]
    assert done == {"added": 100, "expired": 50, "skipped": 3}
    assert len(holds) == 2 + 3  # 50 expired in steps of 40, then 100 added in steps of 40
    assert len(index) == 3000 - 50 + 100
    found = index.search(new_vecs[:20], 10)[0]  # each new ad among its own vector's best 10
    assert all(i in f.tolist() for i, f in zip(new_ids[:20].tolist(), found, strict=True))
    gone = index.search(vecs[10:60], 20)[0]
    assert not set(np.concatenate(gone).tolist()) & set(ids[10:60].tolist())


def test_the_watcher_applies_each_file_once_in_order_and_sets_a_bad_one_aside(
    tmp_path: Path,
) -> None:
    index, ids, _ = _index()
    lock = threading.Lock()
    watcher = UpdateWatcher(tmp_path, index, lock, 0.05, keep=lambda x: x % 2 == 0)
    write_update(tmp_path, 1, AD + 10_000 + np.arange(10), _vectors(10, 3), [])
    np.savez(tmp_path / "000000000002.npz", add_ids=np.arange(2))  # no vectors
    write_update(tmp_path, 3, [], np.zeros((0, DIM)), ids[:10])
    assert watcher.poll() == 2 and watcher.poll() == 0
    assert sorted(watcher.applied) == ["000000000001.npz", "000000000003.npz"]
    assert (tmp_path / "000000000002.npz.rejected").exists()
    held = [i for i in range(AD + 10_000, AD + 10_010) if i in index]
    assert held == list(range(AD + 10_000, AD + 10_010, 2))  # this shard's residue only
    assert [int(i) in index for i in ids[:10]] == [i % 2 == 1 for i in ids[:10].tolist()]


def test_searches_running_while_updates_apply_never_fail_nor_come_back_short(
    tmp_path: Path,
) -> None:
    index, ids, vecs = _index()
    lock = threading.Lock()
    errors: list[BaseException] = []
    short = []
    stop = threading.Event()

    def serve() -> None:
        rng = np.random.default_rng(4)
        while not stop.is_set():
            q = vecs[rng.integers(0, len(vecs))][None]
            try:
                with lock:
                    found = index.search(q, 50)[0][0]
                if len(found) < 50:
                    short.append(len(found))
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    for seq in range(5):
        write_update(tmp_path, seq, AD + 20_000 + seq * 500 + np.arange(500), _vectors(500, seq),
                     ids[seq * 100 : (seq + 1) * 100])  # fmt: skip
    UpdateWatcher(tmp_path, index, lock, 0.05).poll()
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and short == []
    assert len(index) == 3000 + 2500 - 500


def test_update_settings_are_validated_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^ad_updates_poll_s: must be seconds > 0"):
        ServingConfig(ad_updates_poll_s=0)
