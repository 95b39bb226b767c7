"""The tensors every model reads, built the same way for training, evaluation and serving.

Light on purpose (numpy and torch only): the Triton runtime, which has no pandas, builds its
encoder batches here too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

# A batch is a dict of tensors. Every model reads "items" (B, L) int64, left-padded with 0;
# sequential models may read "timestamps" (B, L) float seconds; the two-tower reads
# "user_features" (B, F) int64 categorical ids.
Batch = dict[str, torch.Tensor]


def relative_timestamps(times: np.ndarray) -> torch.Tensor:
    """(B, L) float32 seconds relative to each row's newest item (the model's time input).

    Absolute epoch seconds lose precision in float32; only gaps matter to the time bias.
    Training and serving both go through here, so they feed the model the same values.
    """
    return torch.from_numpy((times - times.max(axis=1, keepdims=True)).astype(np.float32))


def pad_left(
    seqs: Sequence[np.ndarray] | np.ndarray, length: int, dtype: npt.DTypeLike = np.int64
) -> np.ndarray:
    """(len(seqs), length) array holding each sequence's last ``length`` values, right-aligned
    (``seqs``: a list of 1-D arrays, or an object array of them)."""
    out: np.ndarray = np.zeros((len(seqs), length), dtype=dtype)
    for i, s in enumerate(seqs):
        tail = s[-length:]
        if len(tail):
            out[i, length - len(tail) :] = tail
    return out
