"""Entities: the join keys of every feature view."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A person who sees ads on a surface.",
)

ad = Entity(
    name="ad",
    join_keys=["ad_id"],
    value_type=ValueType.INT64,
    description="An ad creative; ids start at 1,000,000,001 so they never collide with items.",
)

advertiser = Entity(
    name="advertiser",
    join_keys=["advertiser_id"],
    value_type=ValueType.INT64,
    description="The account that owns campaigns and ads.",
)

campaign = Entity(
    name="campaign",
    join_keys=["campaign_id"],
    value_type=ValueType.INT64,
    description="An advertiser's campaign: targeting, daily budget, pacing; owns ads.",
)

delivery_shard = Entity(
    name="delivery_shard",
    join_keys=["delivery_shard_id"],
    value_type=ValueType.INT64,
    description="campaign_id % 16: one slice of the live delivery state that serving watches.",
)
