"""Fixed-shape tensors from variable-length sequences (left padding, 0 = no item)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from candgen.errors import ConfigError
from candgen.models.base import Batch, pad_left, relative_timestamps
from candgen.training.data import EvalSet, SequenceData


@dataclass(frozen=True)
class TrainingWindows:
    """Next-item training examples: input window -> the same window shifted by one.

    A user whose sequence is longer than ``max_len + 1`` gives several non-overlapping windows,
    newest first, so that long histories are not thrown away. Where the data has them,
    ``target_labels`` and ``target_surfaces`` give each target's label code and the surface it
    happened on (the scenario of the request that the position's query answers).
    """

    inputs: np.ndarray
    targets: np.ndarray
    times: np.ndarray | None
    user_rows: np.ndarray
    target_labels: np.ndarray | None = None
    target_surfaces: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.user_rows)


def training_windows(data: SequenceData, max_len: int) -> TrainingWindows:
    ins, outs, times, rows, labels, surfaces = [], [], [], [], [], []
    for r, seq in enumerate(data.train):
        secs = data.train_times[r] if data.train_times is not None else None
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            ins.append(seq[start : end - 1])
            outs.append(seq[start + 1 : end])
            if secs is not None:
                times.append(secs[start : end - 1])
            if data.train_labels is not None:
                labels.append(data.train_labels[r][start + 1 : end])
            if data.train_surfaces is not None:
                surfaces.append(data.train_surfaces[r][start + 1 : end])
            rows.append(r)
            end = start + 1 if start > 0 else 0
    if not rows:
        raise ValueError("the training data has no user with two or more interactions")
    return TrainingWindows(
        inputs=pad_left(ins, max_len),
        targets=pad_left(outs, max_len),
        times=pad_left(times, max_len, np.float64) if times else None,
        user_rows=np.asarray(rows, dtype=np.int64),
        target_labels=pad_left(labels, max_len) if labels else None,
        target_surfaces=pad_left(surfaces, max_len) if surfaces else None,
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
        inputs=windows.inputs[rows], targets=np.where(keep, windows.targets, 0)[rows],
        times=pick(windows.times), user_rows=windows.user_rows[rows],
        target_labels=pick(windows.target_labels), target_surfaces=pick(windows.target_surfaces),
    )  # fmt: skip


def make_batch(
    data: SequenceData,
    items: np.ndarray,
    times: np.ndarray | None,
    user_rows: np.ndarray,
    device: torch.device,
    labels: np.ndarray | None = None,
    scenarios: np.ndarray | None = None,
) -> Batch:
    """A model batch from padded arrays (and the users' static features, the label heads and
    scenarios to query for, if any)."""
    batch: Batch = {"items": torch.from_numpy(items).to(device)}
    if labels is not None:
        batch["labels"] = torch.from_numpy(labels).to(device)
    if scenarios is not None:
        batch["scenarios"] = torch.from_numpy(scenarios).to(device)
    if times is not None:
        batch["timestamps"] = relative_timestamps(times).to(device)
    if data.user_features is not None:
        batch["user_features"] = torch.from_numpy(data.user_features[user_rows]).to(device)
    return batch


def eval_batches(
    data: SequenceData, eval_set: EvalSet, max_len: int, batch_size: int, device: torch.device
):  # type: ignore[no-untyped-def]
    """Yields (slice of eval users, batch of their histories)."""
    for start in range(0, len(eval_set), batch_size):
        sl = slice(start, min(start + batch_size, len(eval_set)))
        hist = pad_left(eval_set.histories[sl], max_len)
        times = (
            pad_left(eval_set.history_times[sl], max_len, np.float64)
            if eval_set.history_times is not None
            else None
        )
        yield sl, make_batch(data, hist, times, eval_set.users[sl], device)
