"""The names every part of candgen shares, and their codes inside models.

Light on purpose (no dependencies): the data generator, the trainer, the models and the Triton
runtime (which has no pandas) all read it.
"""

from __future__ import annotations

from typing import Final

# Where an ad request comes from; scenario code 0 means unknown, then 1, 2, 3 in this order.
SURFACES: Final = ("home", "search", "related")
NUM_SCENARIOS: Final = len(SURFACES) + 1
# What a user did with an item: engaged organically, clicked an ad, or clicked and converted.
LABELS: Final = ("organic", "click", "conversion")


def scenario_code(surface: str) -> int:
    """A surface's code in models: 1 + its index in ``SURFACES``, 0 when unknown."""
    return SURFACES.index(surface) + 1 if surface in SURFACES else 0


# Where a model runs: auto is cuda where torch sees a GPU, else cpu.
DEVICES: Final = ("auto", "cpu", "cuda")

# The narrow feature service the retrieve ensemble's features step reads (with what eligibility
# reads per user); versioned, so a change to what serving reads is a new name.
USER_SERVING_SERVICE: Final = "user_serving_v3"

# The offline feature table of the long-term summaries: the features step writes it, the data
# layer reads it into training sets.
LONG_TERM_TABLE: Final = "user_long_term_embedding"

# The search queries of the log with their text embeddings (the same language model as the ads'):
# the features step writes it, the data layer reads it into training sets. Not a feature view:
# serving embeds each request's query itself.
QUERY_TABLE: Final = "query_embedding"

# The live delivery state serving watches is split by campaign_id % DELIVERY_SHARDS (the
# delivery_shard feature view): a pause rewrites one shard, and serving rereads only the shards
# whose version moved.
DELIVERY_SHARDS: Final = 16
