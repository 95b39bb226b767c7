"""Fixed-shape tensors from variable-length sequences (left padding, 0 = no item)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from candgen.data.sequences import EvalSet, SequenceData
from candgen.data.tensors import Batch, pad_left, relative_timestamps
from candgen.errors import ConfigError


@dataclass(frozen=True)
class TrainingWindows:
    """Next-item training examples: input window -> the same window shifted by one.

    A user whose sequence is longer than ``max_len + 1`` gives several non-overlapping windows,
    newest first, so that long histories are not thrown away; built with ``prefixes``, each
    target has its own window, trained at its last position only (``training_windows``).
    Where the data has them, ``target_labels`` and ``target_surfaces`` give each target's
    label code and the surface it happened on (the scenario of the request that the position's
    query answers), and
    ``long_term_rows`` each position's row in ``SequenceData.long_term.vectors`` (the user's
    long-term embedding published before that position's day; 0: none yet), and
    ``target_queries`` / ``target_contexts`` the search query code and context item of the request
    each target answered (its own event's logged context; 0: none).

    With ``all_action_days``, position j may also be trained on any of the user's actions in the
    following days: they are ``flat_items[future_lo[j]:future_hi[j]]`` (see
    ``all_action_targets``).
    """

    inputs: np.ndarray
    targets: np.ndarray
    times: np.ndarray | None
    user_rows: np.ndarray
    target_labels: np.ndarray | None = None
    target_surfaces: np.ndarray | None = None
    long_term_rows: np.ndarray | None = None
    flat_items: np.ndarray | None = None
    future_lo: np.ndarray | None = None
    future_hi: np.ndarray | None = None
    target_queries: np.ndarray | None = None
    target_contexts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.user_rows)

    def take(self, idx: np.ndarray) -> TrainingWindows:
        """The windows ``idx``, less the leading positions that are padding in all of them (the
        models read positions from the right, so the states of the rest do not change, and a
        batch of short windows costs what short windows cost)."""
        occupied = (self.inputs[idx] > 0).any(axis=0)
        first = int(occupied.argmax()) if occupied.any() else self.inputs.shape[1] - 1
        changes: dict[str, Any] = {
            name: None if value is None else value[idx, first:]
            for name, value in self._per_window().items()
        }
        return dataclasses.replace(self, **changes, user_rows=self.user_rows[idx])

    def by_length(
        self, order: np.ndarray, batch_size: int, rng: np.random.Generator, chunk: int = 64
    ) -> np.ndarray:
        """``order`` rearranged so that each run of ``batch_size`` holds windows of similar
        length: each chunk of ``chunk`` batches is sorted by length and cut into batches, and
        the batches are shuffled (so that ``take`` trims most of the padding)."""
        lengths = (self.inputs > 0).sum(axis=1)
        # What does not fill a batch is set aside first, at random, and stays last, where a
        # trainer that takes whole batches leaves it (sorted, it would be the longest windows).
        whole = len(order) - len(order) % batch_size
        span = batch_size * chunk
        parts = [
            part[np.argsort(lengths[part], kind="stable")]
            for part in (order[i : min(i + span, whole)] for i in range(0, whole, span))
        ]
        ordered = np.concatenate([*parts, order[:0]])
        batches = [ordered[i : i + batch_size] for i in range(0, whole, batch_size)]
        shuffled = [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate([*shuffled, order[whole:]])

    def _per_window(self) -> dict[str, np.ndarray | None]:
        """The (windows, positions) arrays."""
        skip = ("flat_items", "user_rows")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }

    def all_action_targets(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(len(idx), L) targets of PinnerFormer's dense all-action objective: for each position,
        one of the user's actions in its future window, drawn uniformly (0 where none)."""
        if self.flat_items is None or self.future_lo is None or self.future_hi is None:
            raise ValueError("all_action_targets: the windows were built without all_action_days")
        lo, hi = self.future_lo[idx], self.future_hi[idx]
        span = hi - lo
        pick = np.minimum(
            lo + np.floor(rng.random(lo.shape) * span).astype(np.int64), len(self.flat_items) - 1
        )
        return np.where(span > 0, self.flat_items[pick], 0)


def _last_only(values: np.ndarray, prefixes: bool) -> np.ndarray:
    """A window's per-target values; with ``prefixes``, zero (no target) but at the last."""
    if not prefixes or len(values) < 2:
        return values
    out = np.zeros_like(values)
    out[-1] = values[-1]
    return out


def _spans(length: int, max_len: int, prefixes: bool) -> Iterator[tuple[int, int]]:
    """The (start, end) spans of one user's training windows: inputs ``seq[start:end - 1]``,
    targets ``seq[start + 1:end]``. Without ``prefixes``, non-overlapping windows, newest first;
    with them, one window per target, ending at it, that holds up to ``max_len`` items before it."""
    if prefixes:
        for end in range(length, 1, -1):
            yield max(0, end - max_len - 1), end
        return
    end = length
    while end >= 2:
        start = max(0, end - max_len - 1)
        yield start, end
        end = start + 1 if start > 0 else 0


def training_windows(
    data: SequenceData, max_len: int, all_action_days: float = 0.0, prefixes: bool = False
) -> TrainingWindows:
    """The next-item training windows of ``data`` (and, with ``all_action_days``, each
    position's future window of actions).

    With ``prefixes``, each target is its own example and only its window's last position is
    trained (FMLP-Rec's and BSARec's examples): the model learns to predict from the last
    position alone, where serving reads it, at the cost of one forward pass per target."""
    if all_action_days and data.train_times is None:
        raise ConfigError("objective", f"all_action needs timestamps; {data.name} has none")
    ins, outs, times, rows, labels, surfaces, lt_rows, lo_s, hi_s, queries, contexts = (
        [] for _ in range(11)
    )
    offset = 0
    for r, seq in enumerate(data.train):
        secs = data.train_times[r] if data.train_times is not None else None
        if all_action_days:
            assert secs is not None
            # The window of position j is (j, last index within all_action_days of it].
            future_hi = offset + np.searchsorted(secs, secs + all_action_days * 86_400, "right")
            future_lo = offset + np.arange(1, len(seq) + 1)
        for start, end in _spans(len(seq), max_len, prefixes):
            ins.append(seq[start : end - 1])
            outs.append(_last_only(seq[start + 1 : end], prefixes))
            if secs is not None:
                times.append(secs[start : end - 1])
                if data.long_term is not None:
                    lt_rows.append(data.long_term.rows_before_day(r, secs[start : end - 1]))
            if all_action_days:
                lo_s.append(future_lo[start : end - 1])
                hi_s.append(future_hi[start : end - 1])
            if data.train_labels is not None:
                labels.append(_last_only(data.train_labels[r][start + 1 : end], prefixes))
            if data.train_surfaces is not None:
                surfaces.append(_last_only(data.train_surfaces[r][start + 1 : end], prefixes))
            if data.train_queries is not None:
                queries.append(_last_only(data.train_queries[r][start + 1 : end], prefixes))
            if data.train_contexts is not None:
                contexts.append(_last_only(data.train_contexts[r][start + 1 : end], prefixes))
            rows.append(r)
        offset += len(seq)
    if not rows:
        raise ConfigError(
            "dataset", f"{data.name}: the training data has no user with two or more interactions"
        )
    return TrainingWindows(
        inputs=pad_left(ins, max_len),
        targets=pad_left(outs, max_len),
        times=pad_left(times, max_len, np.float64) if times else None,
        user_rows=np.asarray(rows, dtype=np.int64),
        target_labels=pad_left(labels, max_len) if labels else None,
        target_surfaces=pad_left(surfaces, max_len) if surfaces else None,
        long_term_rows=pad_left(lt_rows, max_len) if lt_rows else None,
        flat_items=np.concatenate(data.train).astype(np.int64) if all_action_days else None,
        future_lo=pad_left(lo_s, max_len) if all_action_days else None,
        future_hi=pad_left(hi_s, max_len) if all_action_days else None,
        target_queries=pad_left(queries, max_len) if queries else None,
        target_contexts=pad_left(contexts, max_len) if contexts else None,
    )


def restrict_targets(windows: TrainingWindows, labels: Sequence[int]) -> TrainingWindows:
    """The windows with only the targets of ``labels`` (codes) left as targets; the others
    become padding targets (their items stay in the inputs, as history), and windows left with
    no target are dropped."""
    if windows.target_labels is None:
        raise ConfigError("train_labels", "the data has no labels to choose targets by")
    keep = np.isin(windows.target_labels, np.asarray(labels)) & (windows.targets > 0)
    rows = keep.any(axis=1)
    if not rows.any():
        raise ConfigError("train_labels", f"no training target has label code(s) {list(labels)}")

    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[rows]

    return TrainingWindows(
        inputs=windows.inputs[rows],
        targets=np.where(keep, windows.targets, 0)[rows],
        times=pick(windows.times),
        user_rows=windows.user_rows[rows],
        target_labels=pick(windows.target_labels),
        target_surfaces=pick(windows.target_surfaces),
        long_term_rows=pick(windows.long_term_rows),
        target_queries=pick(windows.target_queries),
        target_contexts=pick(windows.target_contexts),
    )


def make_batch(
    data: SequenceData,
    items: np.ndarray,
    times: np.ndarray | None,
    user_rows: np.ndarray,
    device: torch.device,
    labels: np.ndarray | None = None,
    scenarios: np.ndarray | None = None,
    long_term_rows: np.ndarray | None = None,
    queries: np.ndarray | None = None,
    contexts: np.ndarray | None = None,
) -> Batch:
    """A model batch from padded arrays (and the users' static features, the label heads and
    scenarios to query for, the users' long-term embeddings by their rows, and the requests'
    search queries by their codes and context items, if any)."""
    batch: Batch = {"items": torch.from_numpy(items).to(device)}
    if long_term_rows is not None and data.long_term is not None:
        batch["long_term"] = torch.from_numpy(data.long_term.vectors[long_term_rows]).to(device)
    if labels is not None:
        batch["labels"] = torch.from_numpy(labels).to(device)
    if scenarios is not None:
        batch["scenarios"] = torch.from_numpy(scenarios).to(device)
    if queries is not None and data.query_embeddings is not None:
        batch["query_text"] = torch.from_numpy(data.query_embeddings[queries]).to(device)
    if contexts is not None:
        batch["context_items"] = torch.from_numpy(contexts).to(device)
    if times is not None:
        batch["timestamps"] = relative_timestamps(times).to(device)
    if data.user_features is not None:
        batch["user_features"] = torch.from_numpy(data.user_features[user_rows]).to(device)
    return batch


def eval_batches(
    data: SequenceData, eval_set: EvalSet, max_len: int, batch_size: int, device: torch.device
) -> Iterator[tuple[slice, Batch]]:
    """Yields (slice of eval users, batch of their histories)."""
    for start in range(0, len(eval_set), batch_size):
        sl = slice(start, min(start + batch_size, len(eval_set)))
        hist = pad_left(eval_set.histories[sl], max_len)
        times = (
            pad_left(eval_set.history_times[sl], max_len, np.float64)
            if eval_set.history_times is not None
            else None
        )
        lt_rows = None if eval_set.long_term_rows is None else eval_set.long_term_rows[sl]
        yield sl, make_batch(data, hist, times, eval_set.users[sl], device, long_term_rows=lt_rows)
