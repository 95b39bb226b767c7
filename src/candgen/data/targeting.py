"""Campaign targeting: who may see a campaign's ads, as one bit mask per campaign.

A campaign names the values it targets in each dimension (countries, age buckets, devices,
surfaces); an empty list targets every value. Serving keeps a campaign's targeting as one int64
mask, a dimension's values in its own bit range (``DIMENSIONS`` order), and a user's profile and
request surface as the bits they set: the user may see the campaign when every dimension shares a
bit. numpy only: the Triton runtime reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np

from candgen.errors import ConfigError
from candgen.vocab import SURFACES

AGE_BUCKETS: Final = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
COUNTRIES: Final = ("US", "GB", "DE", "FR", "JP", "BR", "IN", "CA")
DEVICES: Final = ("ios", "android", "web")

# dimension -> (the campaign's column, the user's or request's field, its values)
DIMENSIONS: Final = {
    "country": ("target_countries", "country", COUNTRIES),
    "age": ("target_age_buckets", "age_bucket", AGE_BUCKETS),
    "device": ("target_devices", "device", DEVICES),
    "surface": ("target_surfaces", "surface", SURFACES),
}
TARGET_COLUMNS: Final = tuple(column for column, _, _ in DIMENSIONS.values())


def _offsets() -> dict[str, int]:
    out, at = {}, 0
    for dim, (_, _, values) in DIMENSIONS.items():
        out[dim] = at
        at += len(values)
    return out


_OFFSET: Final = _offsets()
EVERYONE: Final = int(sum(((1 << len(v)) - 1) << _OFFSET[d] for d, (_, _, v) in DIMENSIONS.items()))
"""The mask of an untargeted campaign."""


def dimension_mask(dim: str, bits: np.ndarray) -> np.ndarray:
    """Per-dimension bit masks (bit j: the j-th value) shifted into the campaign mask's layout."""
    shifted: np.ndarray = np.asarray(bits, np.int64) << _OFFSET[dim]
    return shifted


def targeting_mask(targets: Mapping[str, object], campaign_id: int) -> int:
    """One campaign's mask from its targeting lists (keyed by ``TARGET_COLUMNS``).

    Raises:
        ConfigError: a list that is not a list of known values, naming the campaign and field.
    """
    mask = 0
    for dim, (column, _, values) in DIMENSIONS.items():
        chosen = targets.get(column)
        if chosen is None:
            chosen = []
        if not isinstance(chosen, list | tuple) or not all(isinstance(v, str) for v in chosen):
            raise ConfigError(
                column, f"campaign {campaign_id}: must be a list of strings, got {chosen!r}"
            )
        unknown = sorted(set(chosen) - set(values))
        if unknown:
            raise ConfigError(
                column,
                f"campaign {campaign_id}: unknown value(s) {unknown}; expected some of {values}",
            )
        bits = sum(1 << values.index(v) for v in set(chosen)) or (1 << len(values)) - 1
        mask |= bits << _OFFSET[dim]
    return mask


def targeting_masks(table: Mapping[str, Sequence[object]], ids: Sequence[int]) -> np.ndarray:
    """Masks of many campaigns from columns of targeting lists (rows in ``ids`` order)."""
    return np.array(
        [
            targeting_mask({c: _as_list(table[c][i]) for c in TARGET_COLUMNS}, int(ids[i]))
            for i in range(len(ids))
        ],
        dtype=np.int64,
    )


def _as_list(value: object) -> object:
    # A string stays a string so that targeting_mask refuses it, naming the field.
    if value is None or isinstance(value, str):
        return value
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return value


def targeting_lists(mask: int) -> dict[str, list[str]]:
    """The targeting lists of a mask (empty list: every value)."""
    out = {}
    for dim, (column, _, values) in DIMENSIONS.items():
        bits = (int(mask) >> _OFFSET[dim]) & ((1 << len(values)) - 1)
        everyone = bits == (1 << len(values)) - 1
        out[column] = [] if everyone else [v for j, v in enumerate(values) if bits >> j & 1]
    return out


def audience_bits(profile: Mapping[str, str | None]) -> dict[str, int]:
    """The bits a user's profile (country, age_bucket, device) and the request's surface set,
    per dimension; a value missing or unknown sets none (only campaigns that do not target that
    dimension reach the user)."""
    out = {}
    for dim, (_, field, values) in DIMENSIONS.items():
        value = profile.get(field)
        out[dim] = (1 << values.index(value)) << _OFFSET[dim] if value in values else 0
    return out


def dimension_full(dim: str) -> int:
    """The mask bits of every value of one dimension (an untargeted dimension)."""
    return ((1 << len(DIMENSIONS[dim][2])) - 1) << _OFFSET[dim]


def reaches(masks: np.ndarray, profile: Mapping[str, str | None]) -> np.ndarray:
    """Which campaigns (by mask) may show ads to this user on this surface.

    A dimension whose value the request lacks passes only a campaign that does not target it.
    """
    masks = np.asarray(masks, np.int64)
    ok = np.ones(masks.shape, bool)
    for dim, bit in audience_bits(profile).items():
        full = dimension_full(dim)
        part = masks & full
        ok &= (part & bit) != 0 if bit else part == full
    return ok
