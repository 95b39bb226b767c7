"""Advertiser diversity for the select step: a per-advertiser cap and near-duplicate collapse.

While the quota merge fills the K slots, a ``Diversifier`` refuses an ad whose advertiser
already holds its share of the answer (``DiversityConfig.limit``), or whose text is a
near-duplicate of an ad of the same advertiser already taken; the merge then refills the slot
from that generator's next candidate. ``spread`` then reorders the answer so that no advertiser
crowds one window of it (the first 20 ads hold at most 3 of one advertiser).

An ad the catalog does not know (too new for the last export) has no advertiser: it is never
capped or collapsed. numpy only: this runs inside the Triton runtime.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from candgen.errors import CandgenError, ConfigError, DataFormatError
from candgen.serving.quota import Candidate

DIVERSITY_FILE = "diversity.npz"
REASONS = ("capped", "duplicate")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class DiversityConfig:
    """How diverse one answer must be.

    Args:
        max_per_advertiser: at most this many ads of one advertiser per ``window`` slots.
        window: the window, in slots, that ``max_per_advertiser`` applies to.
        duplicate_similarity: two ads of one advertiser whose text embeddings have a cosine
            similarity >= this are near-duplicates, and only the better-ranked one is kept.
            In (0, 1]; exactly 1.0 turns the collapse off (float rounding makes "only identical
            texts" unreliable, so 1.0 means never rather than almost never).
    """

    max_per_advertiser: int = 3
    window: int = 20
    duplicate_similarity: float = 0.92

    def __post_init__(self) -> None:
        for name in ("max_per_advertiser", "window"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        sim = self.duplicate_similarity
        ok = isinstance(sim, int | float) and not isinstance(sim, bool)
        if not ok or not 0.0 < sim <= 1.0:
            raise ConfigError(
                "duplicate_similarity", f"must be in (0, 1] (1.0 turns it off), got {sim!r}"
            )

    @property
    def collapses(self) -> bool:
        """Whether near-duplicates are collapsed at all."""
        return self.duplicate_similarity < 1.0

    def limit(self, k: int) -> int:
        """The most ads of one advertiser a ``k``-ad answer may hold.

        Args:
            k: the answer's size.

        Returns:
            ``max_per_advertiser`` per window, counting a partial last window as a whole one.
        """
        if not _is_int(k) or k < 1:
            raise ConfigError("k", f"must be > 0, got {k!r}")
        return self.max_per_advertiser * math.ceil(k / self.window)


def duplicate_groups(
    advertiser_ids: np.ndarray, embeddings: np.ndarray, similarity: float
) -> np.ndarray:
    """Near-duplicate groups within each advertiser, computed once at export.

    Greedy leader clustering in row order: an ad joins the first earlier leader of its
    advertiser whose text embedding has cosine similarity >= ``similarity`` with its own, or
    leads a group of its own. An ad without text (a row of zeros) is in no group (-1).
    ``embeddings`` may be a memory map larger than memory (15 GB at 10M ads of 384-d text): it
    is read a block of rows, then one advertiser's rows, at a time.

    Args:
        advertiser_ids: (n,) each ad's advertiser.
        embeddings: (n, d) each ad's text embedding.
        similarity: the threshold; 1.0 or more puts every ad with text in its own group.

    Returns:
        (n,) group ids, unique across advertisers (the leader's row), -1 for no text.
    """
    advertiser_ids = np.asarray(advertiser_ids)
    if embeddings.ndim != 2 or len(embeddings) != len(advertiser_ids):
        raise ConfigError(
            "embeddings", f"need one row per ad ({len(advertiser_ids)}), got {embeddings.shape}"
        )
    n = len(advertiser_ids)
    norms = np.empty(n, np.float32)
    for lo in range(0, n, _GROUP_BLOCK):
        block = np.asarray(embeddings[lo : lo + _GROUP_BLOCK], np.float32)
        norms[lo : lo + len(block)] = np.linalg.norm(block, axis=1)
    groups = np.where(norms > 0, np.arange(n), -1).astype(np.int64)
    if similarity >= 1.0 or not n:
        return groups
    order = np.argsort(advertiser_ids, kind="stable")
    bounds = np.flatnonzero(np.diff(advertiser_ids[order])) + 1
    for rows in np.split(order, bounds):
        rows = rows[norms[rows] > 0]
        if len(rows) > 1:
            unit = np.asarray(embeddings[rows], np.float32) / norms[rows, None]
            groups[rows] = rows[_leaders(unit, similarity)]
    return groups


_GROUP_BLOCK: Final = 65_536  # rows of embeddings read at once, and one advertiser's sims block


def _leaders(unit: np.ndarray, similarity: float) -> np.ndarray:
    """``duplicate_groups`` within one advertiser: each row's leader (its own row when it leads).

    An ad with no earlier ad near it leads: only the others are decided one by one, in order,
    against the earlier leaders near them (a loop over every ad and every leader took minutes
    per million ads). The similarities are taken a block of rows at a time."""
    n = len(unit)
    leader_of = np.arange(n)
    leads = np.ones(n, bool)
    rows_per_block = max(1, _GROUP_BLOCK * 64 // n)  # at most about 4M similarities at once
    for lo in range(0, n, rows_per_block):
        hi = min(lo + rows_per_block, n)
        near = unit[lo:hi] @ unit[:hi].T >= similarity
        near &= np.arange(hi)[None, :] < np.arange(lo, hi)[:, None]  # earlier ads only
        for j in np.flatnonzero(near.any(axis=1)).tolist():
            earlier = np.flatnonzero(near[j] & leads[:hi])
            if len(earlier):
                leads[lo + j] = False
                leader_of[lo + j] = earlier[0]
    return leader_of


class AdCatalog:
    """Each ad's advertiser and near-duplicate group (``duplicate_groups``), by ad id.

    Ids are kept sorted and found by binary search: a dict over a million ads would cost far
    more memory in the Triton process than three arrays, and the groups replace the ads' text
    embeddings, which would take 1.5 GB for a million ads.

    Args:
        ad_ids: (n,) unique ad ids.
        advertiser_ids: (n,) each ad's advertiser.
        groups: (n,) each ad's near-duplicate group, -1 for none (never a near-duplicate).
    """

    def __init__(self, ad_ids: np.ndarray, advertiser_ids: np.ndarray, groups: np.ndarray) -> None:
        ids, advertisers, group = (np.asarray(a) for a in (ad_ids, advertiser_ids, groups))
        for name, arr in (("ad_ids", ids), ("advertiser_ids", advertisers), ("groups", group)):
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise ConfigError(name, f"need a 1-D integer array, got {arr.dtype} {arr.shape}")
            if arr.shape != ids.shape:
                raise ConfigError(name, f"need one per ad ({ids.shape[0]}), got {arr.shape[0]}")
        order = np.argsort(ids, kind="stable")
        self.ad_ids = ids[order].astype(np.int64)
        if (np.diff(self.ad_ids) == 0).any():
            dup = int(self.ad_ids[1:][np.diff(self.ad_ids) == 0][0])
            raise ConfigError("ad_ids", f"ad id {dup} appears more than once")
        self.advertiser_ids = advertisers[order].astype(np.int64)
        self.groups = group[order].astype(np.int64)

    @classmethod
    def empty(cls) -> AdCatalog:
        """A catalog of no ads: no ad is ever capped or collapsed."""
        none = np.zeros(0, np.int64)
        return cls(none, none, none)

    def __len__(self) -> int:
        return int(self.ad_ids.shape[0])

    def row(self, ad_id: int) -> int:
        """The ad's row, or -1 when the catalog does not know it."""
        i = int(np.searchsorted(self.ad_ids, ad_id))
        return i if i < len(self) and self.ad_ids[i] == ad_id else -1

    def lookup(self, ad_ids: Sequence[int]) -> dict[int, tuple[int, int, int]]:
        """ad id -> (row, advertiser, group) for the ads the catalog knows."""
        ids = np.asarray(ad_ids, np.int64)
        if not len(ids) or not len(self):
            return {}
        rows = np.minimum(np.searchsorted(self.ad_ids, ids), len(self) - 1)
        hit = self.ad_ids[rows] == ids
        rows = rows[hit]
        return dict(
            zip(
                ids[hit].tolist(),
                zip(
                    rows.tolist(),
                    self.advertiser_ids[rows].tolist(),
                    self.groups[rows].tolist(),
                    strict=True,
                ),
                strict=True,
            )
        )

    def advertiser(self, ad_id: int) -> int | None:
        """The ad's advertiser, or None when the catalog does not know the ad."""
        i = self.row(ad_id)
        return int(self.advertiser_ids[i]) if i >= 0 else None

    def save(self, folder: Path) -> None:
        """Writes the catalog to ``folder / DIVERSITY_FILE``."""
        np.savez(
            Path(folder) / DIVERSITY_FILE,
            ad_ids=self.ad_ids,
            advertiser_ids=self.advertiser_ids,
            groups=self.groups,
        )

    @classmethod
    def load(cls, folder: Path) -> AdCatalog:
        """Reads what ``save`` wrote.

        Args:
            folder: the folder holding ``DIVERSITY_FILE``.

        Returns:
            The catalog.

        Raises:
            CandgenError: the file is missing, not an npz, or an array is missing or malformed.
        """
        path = Path(folder) / DIVERSITY_FILE
        if not path.exists():
            raise CandgenError(f"diversity: {path} does not exist")
        arrays: dict[str, np.ndarray] = {}
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):  # else a lone .npy array: none named
                with loaded:
                    arrays = dict(loaded.items())
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataFormatError(str(path), None, f"not a readable npz file: {e}") from None
        for name in ("ad_ids", "advertiser_ids", "groups"):
            if name not in arrays:
                raise DataFormatError(str(path), None, f"{name}: missing array")
        try:
            return cls(arrays["ad_ids"], arrays["advertiser_ids"], arrays["groups"])
        except ConfigError as e:  # the field is the array at fault
            raise DataFormatError(str(path), None, str(e)) from None


class Diversifier:
    """One request's diversity state: what the merge has admitted so far, per advertiser.

    Pass ``admit`` to ``allocate``/``snake_merge``/``QuotaPolicy.select`` as their ``admit``.

    Args:
        catalog: the ads' advertisers and near-duplicate groups.
        config: the cap and the near-duplicate threshold.
        k: the answer's size (sets the per-advertiser limit).
    """

    def __init__(
        self, catalog: AdCatalog, config: DiversityConfig, k: int, candidates: Sequence[int] = ()
    ) -> None:
        self.catalog = catalog
        self.config = config
        self.limit = config.limit(k)
        self.taken: dict[int, list[int]] = {}  # advertiser -> its admitted ads' groups
        self.refused = dict.fromkeys(REASONS, 0)
        self.admitted = 0
        self.deferred: list[int] = []  # ads held back by the window's step limit, in order
        # The request's candidates looked up at once (one vectorised search, not one per
        # admit: the select step's profile showed the per-ad lookups at about 1 ms a request).
        self._known: dict[int, tuple[int, int, int]] = catalog.lookup(candidates)

    def admit(self, ad_id: int) -> bool:
        """Whether the ad may join the answer; if so it is recorded as taken.

        Args:
            ad_id: a candidate not already in the answer.

        Returns:
            False when its advertiser is at the limit or it near-duplicates one of that
            advertiser's admitted ads; True otherwise (always for an ad the catalog lacks).
        """
        known = self._known.get(ad_id)
        if known is None:
            found = self.catalog.lookup([ad_id])
            known = found.get(ad_id)
            if known is None:
                return True
        return self._admit(ad_id, known[1], known[2], final=False)

    def _admit(self, ad_id: int, advertiser: int, group: int, final: bool) -> bool:
        groups = self.taken.setdefault(advertiser, [])
        if len(groups) >= self.limit:
            self.refused["capped"] += 1
            return False
        if group >= 0 and self.config.collapses and group in groups:
            self.refused["duplicate"] += 1
            return False
        # The limit grows a window at a time: the first ``window`` ads admitted hold at most
        # ``max_per_advertiser`` of one advertiser, so that ``spread`` can always fill the top
        # window. An ad over that step waits in ``deferred`` for ``refill``.
        step = self.config.max_per_advertiser * (self.admitted // self.config.window + 1)
        if not final and len(groups) >= step:
            self.deferred.append(ad_id)
            return False
        groups.append(group)
        self.admitted += 1
        return True

    def refill(self, taken: Sequence[int], k: int) -> list[int]:
        """The deferred ads that fit once the merge is done, in the order they were offered,
        until the answer (``taken``) holds ``k``: an answer is never short for the step limit."""
        out: list[int] = []
        seen = set(taken)
        for ad_id in self.deferred:
            if len(taken) + len(out) >= k:
                break
            known = self._known.get(ad_id)
            if ad_id in seen or known is None:
                continue
            if self._admit(ad_id, known[1], known[2], final=True):
                out.append(ad_id)
                seen.add(ad_id)
        return out


def spread(
    chosen: Sequence[Candidate], catalog: AdCatalog, config: DiversityConfig
) -> list[Candidate]:
    """Reorders an answer so that each ``window`` of it holds at most ``max_per_advertiser`` ads
    of one advertiser, where the answer allows.

    Greedy and stable: ads are taken in order, and an ad whose advertiser is full in the current
    window waits for the earliest later position where it fits. When only such ads are left,
    the answer ends if the first window is not yet full (its cap is the promise: the top 20
    holds at most 3 of one advertiser), else the earliest of them is placed anyway. No ad is
    repeated.

    Args:
        chosen: the answer, best first.
        catalog: the ads' advertisers.
        config: the cap and the window.

    Returns:
        The ads reordered (fewer only where the first window could not be filled).
    """
    known = catalog.lookup([c.ad_id for c in chosen])
    advertisers = [known[c.ad_id][1] if c.ad_id in known else None for c in chosen]
    # Deferred ads per advertiser as original positions, in order: only each queue's head can
    # be next, so a position costs one look per deferred advertiser, not per deferred ad.
    deferred: dict[int, list[int]] = {}
    counts: dict[int, int] = {}
    out: list[Candidate] = []
    nxt = 0
    while len(out) < len(chosen):
        if len(out) % config.window == 0:
            counts = {}
        fits = [q[0] for a, q in deferred.items() if counts.get(a, 0) < config.max_per_advertiser]
        pick = min(fits, default=-1)
        while pick < 0 and nxt < len(chosen):
            adv = advertisers[nxt]
            if adv is None or counts.get(adv, 0) < config.max_per_advertiser:
                pick = nxt
            else:
                deferred.setdefault(adv, []).append(nxt)
            nxt += 1
        if pick < 0:  # only full advertisers are left
            if len(out) < config.window:
                # The first window is the cap's promise (the top 20 holds at most 3 of one
                # advertiser): a short answer ends here rather than break it.
                break
            pick = min(q[0] for q in deferred.values())  # later: keep the ad, break the cap
        adv = advertisers[pick]
        if adv is not None:
            counts[adv] = counts.get(adv, 0) + 1
            if deferred.get(adv, [-1])[0] == pick:
                deferred[adv].pop(0)
                if not deferred[adv]:
                    del deferred[adv]
        out.append(chosen[pick])
    return out
