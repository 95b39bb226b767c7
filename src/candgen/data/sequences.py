"""Turns each data set into what the trainer, the evaluator, the quota learner and the long-term
summariser read: integer item sequences.

Item ids are re-indexed to 1..N (0 pads sequences); ``SequenceData.item_ids`` maps them back to
the data set's own ids (for the marketplace, items 1..M and ads 1,000,000,000 + k share one space).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

import numpy as np
import numpy.typing as npt
import pandas as pd

from candgen.data.config import DataConfig
from candgen.data.interactions import leave_one_out, validate_interactions
from candgen.errors import CandgenError, DataFormatError
from candgen.vocab import LABELS, LONG_TERM_TABLE, QUERY_TABLE, scenario_code

USER_FEATURE_COLUMNS = ("age_bucket", "country", "device")


def load_data(config: DataConfig, seed: int = 0) -> SequenceData:
    """The data set a config names; ``seed`` draws the planted set."""
    if config.dataset in ("beauty", "games"):
        return load_amazon(config.dataset, Path(config.data_dir) if config.data_dir else None)
    if config.dataset == "sequences":
        return load_sequence_file(Path(config.data_dir))
    if config.dataset == "marketplace":
        root = Path(config.data_dir or "data/marketplace")
        feats = Path(config.features_dir) if config.features_dir else None
        return load_marketplace(root, feats, eval_days=config.eval_days)
    return load_planted(seed=seed)


@dataclass(frozen=True)
class EvalSet:
    """Users to evaluate, what they did before, and what they did next.

    Attributes:
        users: (M,) row of each evaluated user in ``SequenceData.user_ids``.
        histories: per evaluated user, the items before the target window (internal ids, oldest
            first); these are also excluded from the ranking.
        history_times: per user, seconds since the epoch of each history item, or None.
        target_user: (T,) position in ``users`` of each target.
        target_item: (T,) internal id of each target item.
        target_label: (T,) ``organic``, ``click`` or ``conversion``.
        target_surface: (T,) surface of each target, or None where the data has none.
        long_term_rows: (M,) each user's row in ``SequenceData.long_term.vectors`` as of the
            window's start (0: none), or None where the data has no long-term embeddings.
        target_query: (T,) the code of each target's logged search query (its row in
            ``SequenceData.query_embeddings``; 0: none), or None where the data has none.
        target_context: (T,) the internal id of each target's logged context item (0: none),
            or None where the data has none.
    """

    users: np.ndarray
    histories: list[np.ndarray]
    history_times: list[np.ndarray] | None
    target_user: np.ndarray
    target_item: np.ndarray
    target_label: np.ndarray
    target_surface: np.ndarray | None = None
    long_term_rows: np.ndarray | None = None
    target_query: np.ndarray | None = None
    target_context: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)


SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class LongTermFeatures:
    """The users' long-term embeddings, one per daily snapshot (``user_long_term_embedding``).

    Attributes:
        vectors: (S + 1, D) float32 embeddings; row 0 is zeros (no snapshot yet).
        user_offsets: (U + 1,) user r's snapshots are rows ``1 + user_offsets[r]`` to
            ``user_offsets[r + 1]`` (inclusive), oldest first.
        times: (S,) seconds since the epoch at which each snapshot became known.
        trained_before: the summariser's training cutoff (ISO time): it saw no action after it.
        summariser: the summariser's model file; a model that fuses these embeddings must be
            served with embeddings of the same summariser.
    """

    vectors: np.ndarray
    user_offsets: np.ndarray
    times: np.ndarray
    trained_before: str = ""
    summariser: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows_before_day(self, user_row: int, seconds: npt.ArrayLike) -> np.ndarray:
        """For each time, the row of the user's newest snapshot known before that time's UTC
        day began (what a daily batch job had published by then), or 0 where none was."""
        lo, hi = int(self.user_offsets[user_row]), int(self.user_offsets[user_row + 1])
        day_start = np.floor(np.asarray(seconds, dtype=np.float64) / SECONDS_PER_DAY)
        found = np.searchsorted(self.times[lo:hi], day_start * SECONDS_PER_DAY, side="left")
        return np.where(found > 0, lo + found, 0).astype(np.int64)


def load_long_term(
    path: Path, user_ids: np.ndarray, cutoff: pd.Timestamp
) -> LongTermFeatures | None:
    """The long-term embedding table at ``path`` for ``user_ids``, or None when it has no rows.

    Raises:
        CandgenError: the summariser that wrote it trained on actions after ``cutoff`` (the
            training cutoff of the model that would read it), which would leak the evaluation
            window into its features.
    """
    table = pd.read_parquet(path)
    if table.empty:
        return None
    meta = pq_metadata(path)
    trained_before = meta.get("trained_before", "")
    if not trained_before or pd.Timestamp(trained_before) > cutoff:
        raise CandgenError(
            f"{path}: the long-term summariser trained on actions up to {trained_before or '?'}, "
            f"after this model's training cutoff {cutoff.isoformat()}; rebuild the long-term "
            "features with the same eval_days as the model (candgen features long-term)"
        )
    known = table[table["user_id"].isin(user_ids)]
    row_of = pd.Series(np.arange(len(user_ids)), index=user_ids)
    known = known.assign(
        row=row_of.loc[known["user_id"].to_numpy()].to_numpy(),
        sec=known["event_timestamp"].astype("int64") / 1e6,
    )
    known = known.sort_values(["row", "sec"], kind="stable")
    counts = np.bincount(known["row"].to_numpy(), minlength=len(user_ids))
    vectors = np.stack(known["long_term_embedding"].to_numpy()).astype(np.float32)
    return LongTermFeatures(
        vectors=np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors]),
        user_offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        times=known["sec"].to_numpy(np.float64),
        trained_before=trained_before,
        summariser=meta.get("summariser", ""),
    )


def pq_metadata(path: Path) -> dict[str, str]:
    """The string key/value metadata a parquet file carries (candgen keeps lineage there)."""
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}


@dataclass(frozen=True)
class SequenceData:
    """A data set ready for training and evaluation.

    Attributes:
        name: ``beauty``, ``games``, ``marketplace`` or ``planted``.
        item_ids: (N + 1,) external id of each internal item id (row 0 is padding).
        user_ids: (U,) external user ids.
        train: per user, training items in time order (internal ids; may be empty).
        train_times: per user, their timestamps in seconds, or None.
        valid: evaluation set for model selection.
        test: evaluation set for the reported numbers.
        item_attributes: (N + 1, A) attribute ids per item, 0-padded (at least one column).
        item_text: (N + 1, T) text embeddings (zeros where an item has none), or None.
        user_features: (U, F) categorical codes (0 = unknown), or None.
        user_feature_cardinalities: the vocabulary size of each user feature column.
        snapshot: a hash of the input files, for lineage.
        feature_service: the Feast feature service whose features the data used, if any.
        train_labels: per user, the label code of each training item (index into
            ``candgen.data.interactions.LABELS``), or None.
        train_surfaces: per user, the surface code of each training item (1 + index into
            ``candgen.vocab.SURFACES``; 0 where unknown), or None.
        ad_items: (N + 1,) True where an internal id is an ad (the marketplace), or None.
        long_term: the users' long-term embeddings, or None.
        train_cutoff: where the data is split by time, the start of the validation window (ISO
            time): training saw nothing at or after it.
        train_queries: per user, the code of each training item's logged search query (0:
            none), or None where the data has no queries.
        train_contexts: per user, the internal id of each training item's logged context item
            (0: none), or None.
        query_texts: the search queries of the log; query code ``i`` is ``query_texts[i - 1]``.
        query_embeddings: (Q + 1, T) each query's text embedding (row 0 and queries the
            features do not cover are zeros), or None where the features have none.
    """

    name: str
    item_ids: np.ndarray
    user_ids: np.ndarray
    train: list[np.ndarray]
    train_times: list[np.ndarray] | None
    valid: EvalSet
    test: EvalSet
    item_attributes: np.ndarray
    item_text: np.ndarray | None = None
    user_features: np.ndarray | None = None
    user_feature_cardinalities: tuple[int, ...] = ()
    snapshot: str = ""
    feature_service: str | None = None
    train_labels: list[np.ndarray] | None = None
    train_surfaces: list[np.ndarray] | None = None
    ad_items: np.ndarray | None = None
    long_term: LongTermFeatures | None = None
    train_cutoff: str = ""
    train_queries: list[np.ndarray] | None = None
    train_contexts: list[np.ndarray] | None = None
    query_texts: tuple[str, ...] = ()
    query_embeddings: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @functools.cached_property
    def cold_ads(self) -> np.ndarray:
        """(N + 1,) True where an ad has no training interaction (first seen after the training
        cutoff: a cold-start ad); all False where the data has no ads."""
        if self.ad_items is None:
            return np.zeros(self.num_items + 1, dtype=bool)
        cold: np.ndarray = self.ad_items & (self.train_popularity() == 0)
        return cold

    def train_popularity(self) -> np.ndarray:
        """(N + 1,) count of each item among training interactions (row 0 is 0)."""
        counts = np.bincount(np.concatenate(self.train), minlength=self.num_items + 1)
        counts[0] = 0
        return counts

    def summary(self) -> dict[str, int]:
        return {
            "users": len(self.user_ids),
            "items": self.num_items,
            "train_interactions": int(sum(len(s) for s in self.train)),
            "valid_users": len(self.valid),
            "test_users": len(self.test),
        }


def label_codes(labels: np.ndarray) -> np.ndarray:
    """Label names -> their index in ``LABELS``; an unknown name is an error naming it."""
    codes = pd.Series(labels).map({name: i for i, name in enumerate(LABELS)})
    if codes.isna().any():
        bad = sorted(set(pd.Series(labels)[codes.isna()].astype(str)))
        raise CandgenError(f"label: unknown label(s) {bad}; expected one of {LABELS}")
    out: np.ndarray = codes.to_numpy(np.int64)
    return out


def surface_codes(surfaces: np.ndarray) -> np.ndarray:
    """Surface names -> their scenario codes (``candgen.vocab.scenario_code``)."""
    return np.fromiter((scenario_code(s) for s in surfaces), np.int64, len(surfaces))


def file_snapshot(*paths: Path) -> str:
    """sha256 over the bytes of the given files, in order."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _item_index(external: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    ids = np.unique(external)
    return np.concatenate([[0], ids]).astype(np.int64), {int(x): i + 1 for i, x in enumerate(ids)}


def _map(index: dict[int, int], values: np.ndarray) -> np.ndarray:
    return np.fromiter((index[int(v)] for v in values), dtype=np.int64, count=len(values))


def from_interactions(
    df: pd.DataFrame,
    name: str,
    snapshot: str,
    item_attributes: dict[int, list[int]] | None = None,
) -> SequenceData:
    """Leave-one-out data from a table in the common interaction schema.

    Each user's last item is the test target, the second-to-last the validation target; the
    validation history is the training sequence and the test history adds the validation item.

    Args:
        df: the common interaction table (``candgen.data.interactions``).
        name: the data set's name.
        snapshot: a hash of the input for lineage.
        item_attributes: optional external item id -> attribute ids (e.g. Beauty's brand and
            category ids).

    Returns:
        The data set.

    Raises:
        CandgenError: the table is empty or malformed.
    """
    validate_interactions(df, name)
    item_ids, index = _item_index(df["item_id"].to_numpy())
    split = leave_one_out(df)
    users = np.unique(df["user_id"].to_numpy())
    user_row = {int(u): i for i, u in enumerate(users)}
    train_seq = split.train_sequences()
    train = [_map(index, train_seq.get(int(u), np.zeros(0, np.int64))) for u in users]

    def eval_set(part: pd.DataFrame, with_valid: bool) -> EvalSet:
        rows = np.array([user_row[int(u)] for u in part["user_id"]], dtype=np.int64)
        valid_item = dict(zip(split.valid["user_id"], split.valid["item_id"], strict=True))
        histories = []
        for u, r in zip(part["user_id"], rows, strict=True):
            h = train[r]
            if with_valid:
                h = np.concatenate([h, [index[int(valid_item[u])]]])
            histories.append(h)
        return EvalSet(
            users=rows,
            histories=histories,
            history_times=None,
            target_user=np.arange(len(rows)),
            target_item=_map(index, part["item_id"].to_numpy()),
            target_label=part["label"].astype(str).to_numpy(),
        )

    attrs = np.zeros((len(item_ids), 1), dtype=np.int64)
    if item_attributes:
        width = max((len(v) for v in item_attributes.values()), default=1) or 1
        vocab = {
            a: i + 1 for i, a in enumerate(sorted({a for v in item_attributes.values() for a in v}))
        }
        attrs = np.zeros((len(item_ids), width), dtype=np.int64)
        for ext, internal in index.items():
            codes = [vocab[a] for a in item_attributes.get(ext, [])]
            attrs[internal, : len(codes)] = codes
    return SequenceData(
        name=name,
        item_ids=item_ids,
        user_ids=users.astype(np.int64),
        train=train,
        train_times=None,
        valid=eval_set(split.valid, with_valid=False),
        test=eval_set(split.test, with_valid=True),
        item_attributes=attrs,
        snapshot=snapshot,
    )


def load_amazon(dataset: str, data_dir: Path | None = None) -> SequenceData:
    """Beauty (with its brand/category attributes) or Games, split leave-one-out."""
    from candgen.data import amazon
    from candgen.paths import shared_data_dir

    root = Path(data_dir) if data_dir else shared_data_dir()
    files = {"beauty": amazon.BEAUTY_FILE, "games": amazon.GAMES_FILE}
    if dataset in files and not (root / files[dataset]).exists():
        raise DataFormatError(
            str(root / files[dataset]),
            None,
            "no such file; set data_dir (or $CANDGEN_SHARED_DATA) to the "
            "folder that holds amazon-beauty/ and amazon-games/",
        )
    if dataset == "beauty":
        df = amazon.load_beauty(root)
        attrs = amazon.load_beauty_attributes(root)
        return from_interactions(
            df, "beauty", file_snapshot(root / amazon.BEAUTY_FILE), item_attributes=attrs
        )
    if dataset == "games":
        return from_interactions(
            amazon.load_games(root), "games", file_snapshot(root / amazon.GAMES_FILE)
        )
    raise CandgenError(f"dataset: unknown Amazon set {dataset!r}; expected beauty or games")


def load_sequence_file(path: Path) -> SequenceData:
    """Any file in Beauty.txt's format (one line per user, ``user item1 item2 ...`` in time
    order), split leave-one-out, with ``<name>_item2attributes.json`` beside it as the items'
    attributes where it exists.

    Args:
        path: the file, or a folder holding exactly one ``.txt`` file.

    Raises:
        DataFormatError: no such file, a folder without exactly one .txt, or a malformed line.
    """
    from candgen.data import amazon

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.txt"))
        if len(found) != 1:
            raise DataFormatError(
                str(path),
                None,
                f"expected one .txt sequence file in the folder, found {len(found)}",
            )
        path = found[0]
    if not path.is_file():
        raise DataFormatError(str(path), None, "no such file (data_dir of the sequences set)")
    attributes = amazon.attributes_beside(path)
    return from_interactions(
        amazon.load_user_lines(path),
        path.stem,
        file_snapshot(path),
        item_attributes=amazon.load_item_attributes(attributes) if attributes.exists() else None,
    )


def planted_interactions(
    users: int = 600,
    items: int = 300,
    clusters: int = 10,
    length: int = 12,
    stay: float = 0.9,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[int, list[int]]]:
    """Interactions with planted structure, for tests: each user walks one cluster of items.

    Items are split into ``clusters`` groups; each user picks a group and steps through it in
    order (next item in the group with probability ``stay``, else a random item of the group),
    with cluster sizes skewed so that a popularity baseline is weak but not useless.

    Returns:
        The interaction table and each item's attribute list (its cluster id).
    """
    rng = np.random.default_rng(seed)
    members = np.array_split(np.arange(1, items + 1), clusters)
    weights = 1.0 / np.arange(1, clusters + 1)
    rows: list[tuple[int, int, int]] = []
    for u in range(1, users + 1):
        group = members[rng.choice(clusters, p=weights / weights.sum())]
        pos = int(rng.integers(len(group)))
        for t in range(length):
            rows.append((u, int(group[pos]), t))
            pos = (pos + 1) % len(group) if rng.random() < stay else int(rng.integers(len(group)))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "position"])
    df["timestamp"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[us, UTC]")
    df["label"] = "organic"
    attrs = {int(i): [c + 1] for c, group in enumerate(members) for i in group}
    return df, attrs


class PlantedShape(TypedDict, total=False):
    """``planted_interactions``'s settings other than the seed."""

    users: int
    items: int
    clusters: int
    length: int
    stay: float


def load_planted(seed: int = 0, **kwargs: Unpack[PlantedShape]) -> SequenceData:
    """The planted-structure set (see ``planted_interactions``)."""
    df, attrs = planted_interactions(seed=seed, **kwargs)
    snap = hashlib.sha256(json.dumps({"seed": seed, **kwargs}, sort_keys=True).encode())
    return from_interactions(df, "planted", snap.hexdigest(), item_attributes=attrs)


def marketplace_interactions(data_dir: Path) -> pd.DataFrame:
    """The marketplace's engagements as one table: organic engagements and ad clicks.

    A click that led to an attributed conversion is labelled ``conversion``; the conversion
    event itself is not a second interaction (it is an outcome of the click).

    Returns:
        Columns user_id, item_id (items and ads in one id space), timestamp, label, surface,
        and the request's context: query (search text or None) and context_item_id (or NA), in
        time order.
    """
    path = Path(data_dir) / "events"
    if not path.exists():
        raise DataFormatError(str(path), None, "no events: run `candgen data synth` first")
    cols = [
        "event_id",
        "user_id",
        "event_ts",
        "surface",
        "event_type",
        "item_id",
        "ad_id",
        "caused_by_event_id",
        "query",
        "context_item_id",
    ]
    ev = pd.read_parquet(path, columns=cols)
    converted = set(ev.loc[ev["event_type"] == "conversion", "caused_by_event_id"].astype("int64"))
    engage = ev[ev["event_type"] == "engage"]
    clicks = ev[ev["event_type"] == "click"]
    out = pd.concat(
        [
            pd.DataFrame(
                {
                    "user_id": engage["user_id"],
                    "item_id": engage["item_id"],
                    "timestamp": engage["event_ts"],
                    "label": "organic",
                    "surface": engage["surface"],
                    "query": engage["query"],
                    "context_item_id": engage["context_item_id"],
                }
            ),
            pd.DataFrame(
                {
                    "user_id": clicks["user_id"],
                    "item_id": clicks["ad_id"],
                    "timestamp": clicks["event_ts"],
                    "label": np.where(clicks["event_id"].isin(converted), "conversion", "click"),
                    "surface": clicks["surface"],
                    "query": clicks["query"],
                    "context_item_id": clicks["context_item_id"],
                }
            ),
        ],
        ignore_index=True,
    )
    if out.empty:
        raise CandgenError(f"{path}: the dataset is empty (no engagements or clicks)")
    out["item_id"] = out["item_id"].astype("int64")
    return out.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)


def load_marketplace(
    data_dir: Path, features_dir: Path | None = None, eval_days: int = 1
) -> SequenceData:
    """The synthetic marketplace, split by time.

    The last ``eval_days`` days are the test window and the ``eval_days`` before them the
    validation window; every engagement and click in a window is a target for its user, ranked
    from the user's history before the window. User features are the static profile
    (age bucket, country, device); item attributes are category and advertiser; ads carry their
    MiniLM text embedding when ``features_dir`` holds ``ad_attributes.parquet``, and users their
    long-term embeddings when it holds a non-empty ``user_long_term_embedding.parquet``.
    """
    data_dir = Path(data_dir)
    df = marketplace_interactions(data_dir)
    catalogue = np.concatenate(
        [
            pd.read_parquet(data_dir / "items.parquet", columns=["item_id"])["item_id"].to_numpy(),
            pd.read_parquet(data_dir / "ads.parquet", columns=["ad_id"])["ad_id"].to_numpy(),
        ]
    )
    item_ids, index = _item_index(catalogue)
    df["iid"] = _map(index, df["item_id"].to_numpy())
    df["sec"] = df["timestamp"].astype("int64") / 1e6
    end = df["timestamp"].max().normalize() + pd.Timedelta(days=1)
    test_start = end - pd.Timedelta(days=eval_days)
    valid_start = test_start - pd.Timedelta(days=eval_days)

    profile = pd.read_parquet(data_dir / "users.parquet")
    users = profile["user_id"].to_numpy().astype(np.int64)
    user_row = pd.Series(np.arange(len(users)), index=users)
    feats = np.zeros((len(users), len(USER_FEATURE_COLUMNS)), dtype=np.int64)
    cards = []
    for j, col in enumerate(USER_FEATURE_COLUMNS):
        codes, uniques = pd.factorize(profile[col])
        feats[:, j] = codes + 1
        cards.append(len(uniques))

    df["row"] = user_row.loc[df["user_id"].to_numpy()].to_numpy()
    df["label_code"] = label_codes(df["label"].to_numpy())
    df["surface_code"] = surface_codes(df["surface"].to_numpy())
    query_texts = tuple(sorted(set(df["query"].dropna())))
    df["query_code"] = (
        df["query"].map({q: i + 1 for i, q in enumerate(query_texts)}).fillna(0).astype(np.int64)
    )
    context = df["context_item_id"].dropna().astype(np.int64)
    df["context_code"] = 0
    df.loc[context.index, "context_code"] = _map(index, context.to_numpy())
    by_user = {r: g for r, g in df.groupby("row", sort=True)}
    empty = np.zeros(0, np.int64)

    def before(r: int, t: pd.Timestamp) -> pd.DataFrame | None:
        g = by_user.get(r)
        return None if g is None else g[g["timestamp"] < t]

    def column(g: pd.DataFrame | None, name: str) -> np.ndarray:
        return empty if g is None else g[name].to_numpy()

    train, train_times, train_labels, train_surfaces, train_queries, train_contexts = (
        [] for _ in range(6)
    )
    for r in range(len(users)):
        g = before(r, valid_start)
        train.append(column(g, "iid"))
        train_times.append(column(g, "sec").astype(np.float64))
        train_labels.append(column(g, "label_code"))
        train_surfaces.append(column(g, "surface_code"))
        train_queries.append(column(g, "query_code"))
        train_contexts.append(column(g, "context_code"))

    long_term = None
    lt_path = Path(features_dir) / f"{LONG_TERM_TABLE}.parquet" if features_dir else None
    if lt_path is not None and lt_path.exists():
        long_term = load_long_term(lt_path, users, valid_start)

    def eval_set(start: pd.Timestamp, stop: pd.Timestamp) -> EvalSet:
        window = df[(df["timestamp"] >= start) & (df["timestamp"] < stop)]
        rows: list[int] = []
        hists: list[np.ndarray] = []
        times: list[np.ndarray] = []
        t_user, t_item, t_label, t_surface, t_query, t_context = ([] for _ in range(6))
        for r, g in window.groupby("row", sort=True):
            history = before(int(r), start)
            h, s = column(history, "iid"), column(history, "sec")
            if len(h) == 0:
                continue
            pos = len(rows)
            rows.append(int(r))
            hists.append(h)
            times.append(s)
            t_user.extend([pos] * len(g))
            t_item.extend(g["iid"].tolist())
            t_label.extend(g["label"].tolist())
            t_surface.extend(g["surface"].tolist())
            t_query.extend(g["query_code"].tolist())
            t_context.extend(g["context_code"].tolist())
        return EvalSet(
            users=np.asarray(rows, dtype=np.int64),
            histories=hists,
            history_times=times,
            target_user=np.asarray(t_user, dtype=np.int64),
            target_item=np.asarray(t_item, dtype=np.int64),
            target_label=np.asarray(t_label, dtype=object),
            target_surface=np.asarray(t_surface, dtype=object),
            target_query=np.asarray(t_query, dtype=np.int64),
            target_context=np.asarray(t_context, dtype=np.int64),
            long_term_rows=None
            if long_term is None
            else np.asarray(
                [long_term.rows_before_day(r, [start.timestamp()])[0] for r in rows], dtype=np.int64
            ),
        )

    ads = pd.read_parquet(data_dir / "ads.parquet", columns=["ad_id", "category", "advertiser_id"])
    items = pd.read_parquet(data_dir / "items.parquet", columns=["item_id", "category"])
    categories = sorted(set(ads["category"]) | set(items["category"]))
    cat_codes = {c: i + 1 for i, c in enumerate(categories)}
    n_cat = len(cat_codes)
    attrs = np.zeros((len(item_ids), 2), dtype=np.int64)
    attrs[_map(index, items["item_id"].to_numpy()), 0] = items["category"].map(cat_codes)
    ad_rows = _map(index, ads["ad_id"].to_numpy())
    attrs[ad_rows, 0] = ads["category"].map(cat_codes)
    attrs[ad_rows, 1] = n_cat + ads["advertiser_id"].to_numpy()

    is_ad = np.zeros(len(item_ids), dtype=bool)
    is_ad[ad_rows] = True
    text = None
    snapshot = json.loads((data_dir / "manifest.json").read_text()).get("snapshot", "")
    if features_dir is not None and (Path(features_dir) / "ad_attributes.parquet").exists():
        emb = pd.read_parquet(
            Path(features_dir) / "ad_attributes.parquet", columns=["ad_id", "text_embedding"]
        )
        emb = emb.dropna().drop_duplicates("ad_id", keep="last")
        if len(emb):
            mat = np.stack(emb["text_embedding"].to_numpy()).astype(np.float32)
            text = np.zeros((len(item_ids), mat.shape[1]), dtype=np.float32)
            text[_map(index, emb["ad_id"].to_numpy())] = mat
    query_embeddings = None
    query_path = Path(features_dir) / f"{QUERY_TABLE}.parquet" if features_dir else None
    if query_path is not None and query_path.exists():
        known = pd.read_parquet(query_path)
        if len(known):
            mat = np.stack(known["text_embedding"].to_numpy()).astype(np.float32)
            query_embeddings = np.zeros((len(query_texts) + 1, mat.shape[1]), np.float32)
            code = pd.Series(np.arange(1, len(query_texts) + 1), index=list(query_texts))
            found = known["query"].isin(code.index).to_numpy()
            query_embeddings[code.loc[known["query"][found]].to_numpy()] = mat[found]
    return SequenceData(
        name="marketplace",
        item_ids=item_ids,
        user_ids=users,
        train=train,
        train_times=train_times,
        valid=eval_set(valid_start, test_start),
        test=eval_set(test_start, end),
        item_attributes=attrs,
        item_text=text,
        user_features=feats,
        user_feature_cardinalities=tuple(cards),
        snapshot=snapshot,
        # Serving reads the same profile and ad text through these Feast feature services.
        feature_service=f"user_features_v{1 if long_term is None else 2},ad_features_v1",
        train_labels=train_labels,
        train_surfaces=train_surfaces,
        ad_items=is_ad,
        long_term=long_term,
        train_cutoff=valid_start.isoformat(),
        train_queries=train_queries,
        train_contexts=train_contexts,
        query_texts=query_texts,
        query_embeddings=query_embeddings,
    )
