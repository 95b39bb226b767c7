"""Which ads one request may get: targeting, delivery status and pacing, frequency caps and the
user's hidden advertisers, as a bitmap over each index's positions that the ANN search stays
inside (``AdIndex.search(allowed=...)``).

Campaign state (targeting mask, status, throttle) is one ``DeliveryState`` snapshot: the export's,
then each change the delivery watcher reads from the online store's shards (a new snapshot, never
an edit, so a request always sees one consistent state). Per request:

1. the request's segment (the user's country, age bucket and device, the surface) picks the
   campaigns that target it and are running: active, and for a throttled campaign a fixed
   uniform draw per (campaign, segment) below its throttle, so that it takes part in that share
   of the segments; these bitmaps are cached per segment and index (built for every known
   segment at load, ``warm``), and a state change patches the bits of the campaigns it changed;
2. the request's own exclusions clear their bits in a copy: ads at their frequency cap, every ad
   of an advertiser the user hid or saw too often today.

An ad of a campaign the state does not know is never eligible. numpy only: it runs inside the
Triton runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from candgen.data.ids import SortedIds, narrow
from candgen.data.targeting import reaches
from candgen.errors import CandgenError, ConfigError, DataFormatError
from candgen.features.client import FeatureServerClient, FeatureStoreUnavailable
from candgen.index.ann import AdIndex, clear_bits, set_bits
from candgen.vocab import DELIVERY_SHARDS

log = logging.getLogger(__name__)
WATCHED_FIELDS: Final = ("campaign_ids", "statuses", "throttles", "targeting_masks")

ELIGIBILITY_FILE: Final = "eligibility.npz"
AD_INDEX, CONTENT_INDEX = "ads", "content"  # the indexes the generators search
NO_PROFILE: Final = "no_profile"  # the user has no profile: only untargeted campaigns reach them
PROFILE_FIELDS: Final = ("country", "age_bucket", "device")
# Every (country, age, device, surface) with unknown values too: 9 x 7 x 4 x 3 = 756.
_SEGMENT_CACHE: Final = 1_024


@dataclass(frozen=True)
class FrequencyCaps:
    """How often one user may see one ad, and one advertiser's ads, in a UTC day.

    Args:
        per_ad: impressions of one ad.
        per_advertiser: impressions of one advertiser's ads.
    """

    per_ad: int = 3
    per_advertiser: int = 10

    def __post_init__(self) -> None:
        for name, field_name in (
            ("per_ad", "frequency_cap"),
            ("per_advertiser", "advertiser_frequency_cap"),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field_name, f"must be a whole number >= 1, got {v!r}")


@dataclass(frozen=True)
class DeliveryState:
    """Every campaign's delivery state at one moment.

    Args:
        campaign_ids: (C,) sorted campaign ids.
        masks: (C,) targeting masks (``candgen.data.targeting``).
        active: (C,) whether the campaign may deliver (not paused, not out of budget).
        throttles: (C,) the share of requests a paced campaign takes part in, in [0, 1].
        version: counts the changes applied since the export (0: the export's state).
    """

    campaign_ids: np.ndarray
    masks: np.ndarray
    active: np.ndarray
    throttles: np.ndarray
    version: int = 0

    def row(self, campaign_ids: np.ndarray) -> np.ndarray:
        """Each campaign's row, -1 for a campaign the state does not know."""
        return SortedIds(self.campaign_ids).rows(campaign_ids)

    def updated(
        self, entries: Iterable[tuple[int, str, float, int]], version: int | None = None
    ) -> DeliveryState:
        """A new state with (campaign id, status, throttle, targeting mask) entries applied;
        entries for campaigns this state does not know (created after the export, so without
        ads in its indexes) are skipped."""
        entries = list(entries)
        masks, active, throttles = self.masks.copy(), self.active.copy(), self.throttles.copy()
        if entries:
            ids = np.array([e[0] for e in entries], np.int64)
            rows = self.row(ids)
            known = rows >= 0
            rows = rows[known]
            masks[rows] = np.array([e[3] for e in entries], np.int64)[known]
            active[rows] = np.array([e[1] == "active" for e in entries], bool)[known]
            throttles[rows] = np.array([e[2] for e in entries], np.float32)[known]
        return DeliveryState(
            self.campaign_ids,
            masks,
            active,
            throttles,
            self.version + 1 if version is None else version,
        )


@dataclass(frozen=True)
class AdTable:
    """The exported ads' campaigns and advertisers, and the ads ineligible by their own state.

    Args:
        ad_ids: (N,) ad ids.
        campaign_ids: (N,) each ad's campaign.
        advertiser_ids: (N,) each ad's advertiser.
        ineligible: ad ids that no request may get (the ad itself paused).
    """

    ad_ids: np.ndarray
    campaign_ids: np.ndarray
    advertiser_ids: np.ndarray
    ineligible: np.ndarray


def save_eligibility(folder: Path, ads: AdTable, state: DeliveryState) -> None:
    """Writes the ads and the campaigns' delivery state at export (``ELIGIBILITY_FILE``)."""
    np.savez(
        Path(folder) / ELIGIBILITY_FILE,
        ad_ids=ads.ad_ids,
        ad_campaign_ids=ads.campaign_ids,
        ad_advertiser_ids=ads.advertiser_ids,
        ad_ineligible=ads.ineligible,
        campaign_ids=state.campaign_ids,
        masks=state.masks,
        active=state.active,
        throttles=state.throttles,
    )


def load_eligibility(folder: Path) -> tuple[AdTable, DeliveryState]:
    """Reads what ``save_eligibility`` wrote.

    Raises:
        CandgenError: the file is missing (an export from before eligibility).
        DataFormatError: an array is missing or malformed, naming the file and the array.
    """
    path = Path(folder) / ELIGIBILITY_FILE
    if not path.exists():
        raise CandgenError(
            f"{path}: missing; re-export the version with `candgen serving export` "
            "(it predates eligibility inside retrieval)"
        )
    arrays = np.load(path)
    want = {
        "ad_ids": np.int64,
        "ad_campaign_ids": np.int64,
        "ad_advertiser_ids": np.int64,
        "ad_ineligible": np.int64,
        "campaign_ids": np.int64,
        "masks": np.int64,
        "active": np.bool_,
        "throttles": np.float32,
    }
    for name, dtype in want.items():
        if name not in arrays.files or arrays[name].dtype != dtype or arrays[name].ndim != 1:
            raise DataFormatError(
                str(path), None, f"{name}: missing, or not a 1-d {np.dtype(dtype)} array"
            )
    n_ads, n_camps = len(arrays["ad_ids"]), len(arrays["campaign_ids"])
    for name, n in (("ad_campaign_ids", n_ads), ("ad_advertiser_ids", n_ads), ("masks", n_camps),
                    ("active", n_camps), ("throttles", n_camps)):  # fmt: skip
        if len(arrays[name]) != n:
            raise DataFormatError(
                str(path), None, f"{name}: {len(arrays[name])} entries, expected {n}"
            )
    if (np.diff(arrays["campaign_ids"]) <= 0).any():
        raise DataFormatError(str(path), None, "campaign_ids: must be sorted and unique")
    ads = AdTable(
        arrays["ad_ids"],
        arrays["ad_campaign_ids"],
        arrays["ad_advertiser_ids"],
        arrays["ad_ineligible"],
    )
    state = DeliveryState(
        arrays["campaign_ids"], arrays["masks"], arrays["active"], arrays["throttles"]
    )
    return ads, state


class _IndexView:
    """Ads in an index's position order: their campaign rows and advertisers. Indexes with the
    same layout (the content and ads indexes of one export, until an update) share one view,
    and so one bitmap per segment: at 10M ads a segment's bitmap is 1.25 MB an index.

    Row numbers are int32 below 2**31 ads (``narrow``): 16 bytes an ad with the advertisers,
    160 MB a view at 10M ads."""

    def __init__(
        self, index: AdIndex, ads: AdTable, ad_rows: SortedIds, state: DeliveryState
    ) -> None:
        positions = index.positions()
        self.positions = positions  # the layout the bitmaps follow (see Eligibility._view)
        row = ad_rows.rows(positions)  # each position's row in the ad table
        known = row >= 0
        self.n = len(positions)
        self.campaign_row = narrow(
            np.where(known, state.row(ads.campaign_ids[np.maximum(row, 0)]), -1)
        )
        banned = np.isin(positions, ads.ineligible)
        self.campaign_row[banned] = -1  # the ad's own pause: never eligible
        advertiser = np.where(known, ads.advertiser_ids[np.maximum(row, 0)], -1)
        del row, known
        self.by_advertiser = narrow(np.argsort(advertiser, kind="stable"))
        self.advertiser_sorted = advertiser[self.by_advertiser]

    def lays_out(self, index: AdIndex) -> bool:
        """Whether ``index``'s positions are this view's."""
        positions = index.positions()
        return positions is self.positions or (
            len(positions) == self.n and bool(np.array_equal(positions, self.positions))
        )

    def campaign_positions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The positions of these campaigns' ads, and each one's campaign row."""
        mine = np.isin(self.campaign_row, rows)
        positions = np.flatnonzero(mine)
        return positions, self.campaign_row[positions]

    def advertiser_positions(self, advertisers: Sequence[int]) -> np.ndarray:
        lo = np.searchsorted(self.advertiser_sorted, advertisers, side="left")
        hi = np.searchsorted(self.advertiser_sorted, advertisers, side="right")
        if not len(lo):
            return np.zeros(0, np.int64)
        return np.concatenate([self.by_advertiser[a:b] for a, b in zip(lo, hi, strict=True)])

    def bitmap(self, campaign_ok: np.ndarray) -> np.ndarray:
        ok = np.zeros(self.n, bool)
        has = self.campaign_row >= 0
        ok[has] = campaign_ok[self.campaign_row[has]]
        bits: np.ndarray = np.packbits(ok, bitorder="little")
        return bits


class Eligibility:
    """Per-request eligibility over the registered indexes.

    Args:
        ads: the exported ads.
        state: the campaigns' delivery state at export.
        indexes: name -> index whose searches the bitmaps filter.
        seed: the seed of the throttle draws.
    """

    def __init__(
        self,
        ads: AdTable,
        state: DeliveryState,
        indexes: Mapping[str, AdIndex],
        seed: int = 0,
    ) -> None:
        for index in indexes.values():  # one array where an index holds the ads in order
            positions = index.positions()
            if positions is not ads.ad_ids and np.array_equal(positions, ads.ad_ids):
                ads = dataclasses.replace(ads, ad_ids=positions)  # 80 MB less at 10M ads
                break
        self.ads = ads
        self.seed = seed
        self._ad_rows = SortedIds(ads.ad_ids)
        self._indexes = dict(indexes)
        self._views: dict[str, _IndexView] = {}
        for name, index in indexes.items():
            shared = [v for v in self._views.values() if v.lays_out(index)]
            self._views[name] = (
                shared[0] if shared else _IndexView(index, ads, self._ad_rows, state)
            )
        # The positions each index had when its view was made (see _view).
        self._laid_out = {name: index.positions() for name, index in indexes.items()}
        # Each ad's campaign row in table order: a view laid out in that order has it already.
        same = [v for v in self._views.values() if v.positions is ads.ad_ids]
        if same:
            self._ad_campaign_row = same[0].campaign_row
        else:
            self._ad_campaign_row = narrow(state.row(ads.campaign_ids))
            self._ad_campaign_row[np.isin(ads.ad_ids, ads.ineligible)] = -1
        self._lock = threading.Lock()
        self._state = state
        # segment -> {"": campaigns running for it, index name -> (its view, its bitmap)}
        self._segments: OrderedDict[tuple[object, ...], dict[str, Any]] = OrderedDict()

    @property
    def state(self) -> DeliveryState:
        return self._state

    def update(self, state: DeliveryState) -> None:
        """Serves ``state`` from the next request on.

        The cached segments are patched, not dropped: only the ads of the campaigns whose
        targeting, status or throttle changed get their bits set again, in a copy that replaces
        the segment (a request in flight keeps the one it holds). A segment rebuilt from nothing
        costs about 9 ms for two 1M-ad indexes; dropping all of them on each pause put that on
        the first request of every segment (docs/benchmarks/serving_notes.md, section 8).
        """
        old = self._state
        if len(state.campaign_ids) != len(old.campaign_ids):
            raise CandgenError("eligibility: a state update must keep the export's campaigns")
        changed = np.flatnonzero(
            (old.masks != state.masks)
            | (old.active != state.active)
            | (old.throttles != state.throttles)
        )
        with self._lock:  # the segments and the views of one moment (see _view)
            cached = list(self._segments.items())
            views = dict(self._views)
        patched: OrderedDict[tuple[object, ...], dict[str, Any]] = OrderedDict()
        if len(changed):
            places = {id(v): v.campaign_positions(changed) for v in views.values()}
            for key, segment in cached:
                patched[key] = self._patched(segment, key, state, changed, views, places)
        else:
            patched = OrderedDict(cached)
        with self._lock:
            self._state = state
            self._segments = patched

    def _patched(
        self,
        segment: dict[str, Any],
        key: tuple[object, ...],
        state: DeliveryState,
        changed: np.ndarray,
        views: dict[str, _IndexView],
        places: dict[int, tuple[np.ndarray, np.ndarray]],
    ) -> dict[str, Any]:
        profile = _profile(key)
        ok = segment[""].copy()
        ok[changed] = reaches(state.masks[changed], profile) & self._running(state, changed, key)
        out: dict[str, Any] = {"": ok}
        done: dict[int, tuple[_IndexView, np.ndarray]] = {}  # a shared view's bits: patched once
        # A snapshot: requests still add bitmaps to the segment while it is patched.
        for name, cached in list(segment.items()):
            view = views.get(name)
            if name == "" or view is None or cached[0] is not view:
                continue
            if id(view) not in done:
                positions, rows = places[id(view)]
                bits = cached[1].copy()
                now = ok[rows]
                clear_bits(bits, positions[~now])
                set_bits(bits, positions[now])
                done[id(view)] = (view, bits)
            out[name] = done[id(view)]
        return out

    def _running(
        self, state: DeliveryState, rows: np.ndarray, key: tuple[object, ...]
    ) -> np.ndarray:
        """Whether these campaigns run for this segment: active, and a throttled one when its
        fixed draw for (campaign, segment) falls below its throttle, so that it takes part in
        that share of the segments and one state gives one answer wherever it is served (a
        replica, the offline pipeline)."""
        throttle = state.throttles[rows]
        running: np.ndarray = state.active[rows] & (
            (throttle >= 1.0) | (_draws(self.seed, key, rows) < throttle)
        )
        return running

    def _segment(self, profile: Mapping[str, str | None]) -> dict[str, Any]:
        key = tuple(profile.get(f) for f in (*PROFILE_FIELDS, "surface"))
        with self._lock:
            found = self._segments.get(key)
            if found is not None:
                self._segments.move_to_end(key)
                return found
            state = self._state
        rows = np.arange(len(state.campaign_ids))
        found = {"": reaches(state.masks, profile) & self._running(state, rows, key)}
        with self._lock:
            if state is self._state:
                self._segments[key] = found
                while len(self._segments) > _SEGMENT_CACHE:
                    self._segments.popitem(last=False)
        return found

    def warm(self) -> int:
        """Builds every segment of known profiles (and of no profile) for every index, so that
        no request pays for one; returns how many. Run on a thread of its own at load."""
        from itertools import product

        from candgen.data.targeting import DIMENSIONS

        values = [DIMENSIONS[d][2] for d in ("country", "age", "device", "surface")]
        keys = [*product(*values), *((None, None, None, s) for s in values[3])]
        for key in keys:
            segment = self._segment(_profile(key))
            for name in self._views:
                self._bitmap(segment, name)
        return len(keys)

    def request(
        self,
        profile: Mapping[str, str | None],
        blocked_ads: Sequence[int] = (),
        blocked_advertisers: Sequence[int] = (),
    ) -> RequestEligibility:
        """One request's eligibility.

        Args:
            profile: the user's country, age_bucket and device (None: unknown) and the
                request's surface.
            blocked_ads: ads at the user's frequency cap today.
            blocked_advertisers: advertisers the user hid or saw too often today.
        """
        return RequestEligibility(
            self, self._segment(profile), list(blocked_ads), sorted(set(blocked_advertisers))
        )

    def _view(self, name: str) -> _IndexView:
        """The index's view, rebuilt when the index's positions changed (an ad added, or removed
        from a flat or IVF index, which compacts them)."""
        view = self._views[name]
        index = self._indexes[name]
        positions = index.positions()
        if positions is not self._laid_out[name]:
            view = _IndexView(index, self.ads, self._ad_rows, self._state)  # its own from now on
            with self._lock:
                self._views[name] = view
                self._laid_out[name] = positions
                self._segments = OrderedDict()
        return view

    def _bitmap(self, segment: dict[str, Any], name: str) -> np.ndarray:
        view = self._view(name)
        cached = segment.get(name)
        if cached is None or cached[0] is not view:
            # A snapshot: other requests (and the warm-up) add to the segment meanwhile.
            built = [c for k, c in list(segment.items()) if k != "" and c[0] is view]
            cached = built[0] if built else (view, view.bitmap(segment[""]))
            segment[name] = cached  # a race only builds the same bitmap twice
        bits: np.ndarray = cached[1]
        return bits


class RequestEligibility:
    """What one request may get: a bitmap per registered index, and a check for any ad id."""

    def __init__(
        self,
        owner: Eligibility,
        segment: dict[str, Any],
        blocked_ads: list[int],
        blocked_advertisers: list[int],
    ) -> None:
        self._owner = owner
        self._segment = segment
        self.blocked_ads = blocked_ads
        self.blocked_advertisers = blocked_advertisers

    def bitmap(self, name: str) -> np.ndarray:
        """The allowed positions of index ``name`` (``AdIndex.search``'s ``allowed``)."""
        bits = self._owner._bitmap(self._segment, name)
        if not self.blocked_ads and not self.blocked_advertisers:
            return bits
        view = self._owner._view(name)
        bits = bits.copy()
        index = self._owner._indexes[name]
        clear_bits(bits, index.position_of(np.asarray(self.blocked_ads, np.int64)))
        clear_bits(bits, view.advertiser_positions(self.blocked_advertisers))
        return bits

    def advertisers(self, ad_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Each ad's advertiser, -1 for an ad the export does not know."""
        owner = self._owner
        row = owner._ad_rows.rows(ad_ids)
        found: np.ndarray = np.where(row >= 0, owner.ads.advertiser_ids[np.maximum(row, 0)], -1)
        return found

    def allows(self, ad_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Whether each ad may be returned (for candidates that come from no index)."""
        owner = self._owner
        ad_ids = np.asarray(ad_ids, np.int64)
        row = owner._ad_rows.rows(ad_ids)
        camp = np.where(row >= 0, owner._ad_campaign_row[np.maximum(row, 0)], -1)
        ok = (camp >= 0) & self._segment[""][np.maximum(camp, 0)]
        advertiser = owner.ads.advertiser_ids[np.maximum(row, 0)]
        ok &= ~np.isin(ad_ids, self.blocked_ads) & ~np.isin(advertiser, self.blocked_advertisers)
        allowed: np.ndarray = ok
        return allowed


def _profile(key: tuple[object, ...]) -> dict[str, str | None]:
    """A segment's key as the profile it stands for."""
    return {
        f: v if isinstance(v, str) else None
        for f, v in zip((*PROFILE_FIELDS, "surface"), key, strict=True)
    }


def _draws(seed: int, key: tuple[object, ...], rows: np.ndarray) -> np.ndarray:
    """A fixed uniform draw in [0, 1) per (campaign row, segment): splitmix64 of the row and a
    hash of the segment, so that any subset of campaigns can be drawn again alone."""
    digest = hashlib.sha256(repr((seed, key)).encode()).digest()[:8]
    x = np.asarray(rows, np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
        int.from_bytes(digest, "little")
    )
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    draws: np.ndarray = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return draws


def caps_from_features(
    features: Mapping[str, object] | None,
    today: str,
    frequency_cap: int,
    advertiser_frequency_cap: int,
) -> tuple[list[int], list[int]]:
    """The ads and advertisers a user may not get today: ads shown ``frequency_cap`` times,
    advertisers shown ``advertiser_frequency_cap`` times, and the advertisers the user hid.

    Args:
        features: the user's online features (user_serving_v3), or None.
        today: the UTC date (YYYY-MM-DD) whose counts apply; older counts are a past day's.
    """
    if not features:
        return [], []

    def listed(name: str) -> list[int]:
        value = features.get(name)
        return [int(v) for v in value] if isinstance(value, list | tuple) else []

    blocked_ads: list[int] = []
    blocked_advertisers = listed("hidden_advertiser_ids")
    if features.get("impression_day") == today:
        for ids, counts, cap, out in (
            ("impressed_ad_ids", "ad_impression_counts", frequency_cap, blocked_ads),
            (
                "impressed_advertiser_ids",
                "advertiser_impression_counts",
                advertiser_frequency_cap,
                blocked_advertisers,
            ),
        ):
            out.extend(i for i, n in zip(listed(ids), listed(counts), strict=False) if n >= cap)
    return blocked_ads, sorted(set(blocked_advertisers))


class DeliveryWatcher:
    """Keeps an ``Eligibility``'s delivery state current: every ``poll_s`` it reads the shards'
    versions from the online store (one small request) and rereads the shards whose version
    moved, so a pushed pause reaches the next requests within about one poll.

    The first poll reads every shard (the state materialized since the export). While the store
    cannot be reached the last state holds, and the failure is logged once per outage.

    Args:
        eligibility: the state to keep current.
        client: the feature server.
        poll_s: seconds between polls.
    """

    def __init__(self, eligibility: Eligibility, client: FeatureServerClient, poll_s: float):
        self.eligibility = eligibility
        self.client = client
        self.poll_s = poll_s
        self.seen: dict[int, int] = {}
        self.changes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def poll(self) -> bool:
        """One poll; True when the state changed."""
        shards = list(range(DELIVERY_SHARDS))
        versions = self.client.read(["delivery_shard:version"], "delivery_shard_id", shards)
        current = versions.get("version", [None] * len(shards))
        moved = [s for s, v in zip(shards, current, strict=True) if v is not None
                 and self.seen.get(s) != int(v)]  # fmt: skip
        if not moved:
            return False
        rows = self.client.read(
            [f"delivery_shard:{f}" for f in (*WATCHED_FIELDS, "version")],
            "delivery_shard_id",
            moved,
        )
        entries: list[tuple[int, str, float, int]] = []
        seen: dict[int, int] = {}
        for j, shard in enumerate(moved):
            lists = [rows[f][j] or [] for f in WATCHED_FIELDS]
            entries += [
                (int(c), str(st), float(t), int(m)) for c, st, t, m in zip(*lists, strict=True)
            ]
            if rows["version"][j] is not None:
                seen[shard] = int(rows["version"][j])
        self.eligibility.update(self.eligibility.state.updated(entries))
        # Only once the state holds them: a shard that failed to apply is read again next poll.
        self.seen.update(seen)
        self.changes += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
                if self._failing:
                    log.warning("delivery state: the feature server answers again")
                self._failing = False
            except (FeatureStoreUnavailable, KeyError, TypeError, ValueError) as e:
                if not self._failing:
                    log.warning("delivery state: keeping the last state: %s", e)
                self._failing = True
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="delivery-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
