"""Feature views. Names are an API: the serving path and the training-set builder use them."""

from datetime import timedelta

from data_sources import (
    ad_attributes_source,
    ad_delivery_source,
    advertiser_profile_source,
    campaign_delivery_push,
    delivery_shard_push,
    user_ad_impressions_push,
    user_hidden_advertisers_push,
    user_long_term_embedding_source,
    user_long_term_source,
    user_profile_source,
    user_short_term_push,
)
from entities import ad, advertiser, campaign, user
from entities import delivery_shard as shard
from feast import FeatureView, Field
from feast.types import Array, Float32, Int64, String

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),  # a profile does not expire
    schema=[
        Field(name="age_bucket", dtype=String),
        Field(name="country", dtype=String),
        Field(name="device", dtype=String),
    ],
    source=user_profile_source,
)

user_short_term = FeatureView(
    name="user_short_term",
    entities=[user],
    ttl=timedelta(days=14),  # a "recent" sequence older than two weeks is no longer recent
    schema=[
        Field(name="recent_item_ids", dtype=Array(Int64)),
        Field(name="recent_action_types", dtype=Array(String)),
        Field(name="recent_surfaces", dtype=Array(String)),
        Field(name="recent_timestamps", dtype=Array(Int64)),
    ],
    source=user_short_term_push,
    description="Last N engaged item/ad ids, oldest first; appended to in real time by push.",
)

user_long_term = FeatureView(
    name="user_long_term",
    entities=[user],
    ttl=timedelta(days=365),
    schema=[
        Field(name="long_item_ids", dtype=Array(Int64)),
        Field(name="category_affinity", dtype=Array(Float32)),
        Field(name="engagements_total", dtype=Int64),
        Field(name="ad_clicks_total", dtype=Int64),
        Field(name="conversions_total", dtype=Int64),
    ],
    source=user_long_term_source,
    description="Long engagement sequence and lifetime category affinity, rebuilt daily.",
)

user_long_term_embedding = FeatureView(
    name="user_long_term_embedding",
    entities=[user],
    ttl=timedelta(days=30),  # a summary a month old no longer describes the user
    schema=[Field(name="long_term_embedding", dtype=Array(Float32))],
    source=user_long_term_embedding_source,
    description="PinnerFormer-style summary of the long engagement sequence (the long-term "
    "summariser's embedding of each daily user_long_term snapshot; candgen features long-term).",
)

ad_attributes = FeatureView(
    name="ad_attributes",
    entities=[ad],
    ttl=timedelta(0),
    schema=[
        Field(name="advertiser_id", dtype=Int64),
        Field(name="campaign_id", dtype=Int64),
        Field(name="category", dtype=String),
        Field(name="price", dtype=Float32),
        Field(name="title", dtype=String),
        Field(name="text_embedding", dtype=Array(Float32)),
    ],
    source=ad_attributes_source,
    description="Creative attributes; text_embedding is all-MiniLM-L6-v2 of title + description.",
)

ad_delivery = FeatureView(
    name="ad_delivery",
    entities=[ad],
    ttl=timedelta(0),  # the last known state holds until it changes
    schema=[
        Field(name="status", dtype=String),
        Field(name="budget_remaining", dtype=Float32),
        Field(name="impressions_7d", dtype=Int64),
        Field(name="clicks_7d", dtype=Int64),
        Field(name="conversions_7d", dtype=Int64),
        Field(name="ctr_7d", dtype=Float32),
        Field(name="cvr_7d", dtype=Float32),
    ],
    source=ad_delivery_source,
    description="Eligibility and recent performance: status, budget left, smoothed CTR/CVR.",
)

advertiser_profile = FeatureView(
    name="advertiser_profile",
    entities=[advertiser],
    ttl=timedelta(0),
    schema=[
        Field(name="vertical", dtype=String),
        Field(name="daily_budget", dtype=Float32),
        Field(name="status", dtype=String),
    ],
    source=advertiser_profile_source,
)

campaign_delivery = FeatureView(
    name="campaign_delivery",
    entities=[campaign],
    ttl=timedelta(0),  # the last known state holds until it changes
    schema=[
        Field(name="status", dtype=String),
        Field(name="throttle", dtype=Float32),
        Field(name="daily_budget", dtype=Float32),
        Field(name="pacing", dtype=String),
        Field(name="target_countries", dtype=Array(String)),
        Field(name="target_age_buckets", dtype=Array(String)),
        Field(name="target_devices", dtype=Array(String)),
        Field(name="target_surfaces", dtype=Array(String)),
    ],
    source=campaign_delivery_push,
    description="Targeting (an empty list: everyone), daily budget, pacing mode, status "
    "(active, paused, exhausted) and the pacing throttle (share of requests it takes part in).",
)

delivery_shard = FeatureView(
    name="delivery_shard",
    entities=[shard],
    ttl=timedelta(0),
    schema=[
        Field(name="campaign_ids", dtype=Array(Int64)),
        Field(name="statuses", dtype=Array(String)),
        Field(name="throttles", dtype=Array(Float32)),
        Field(name="targeting_masks", dtype=Array(Int64)),
        Field(name="version", dtype=Int64),
    ],
    source=delivery_shard_push,
    description="The campaigns of one shard that are not simply active (paused, exhausted, "
    "throttled) or whose targeting changed, as serving reads them; version counts the pushes.",
)

user_ad_impressions = FeatureView(
    name="user_ad_impressions",
    entities=[user],
    ttl=timedelta(days=2),
    schema=[
        Field(name="impression_day", dtype=String),
        Field(name="impressed_ad_ids", dtype=Array(Int64)),
        Field(name="ad_impression_counts", dtype=Array(Int64)),
        Field(name="impressed_advertiser_ids", dtype=Array(Int64)),
        Field(name="advertiser_impression_counts", dtype=Array(Int64)),
    ],
    source=user_ad_impressions_push,
    description="The user's impressions on impression_day (UTC), per ad and per advertiser: "
    "what the frequency caps count. Pushed on each impression.",
)

user_hidden_advertisers = FeatureView(
    name="user_hidden_advertisers",
    entities=[user],
    ttl=timedelta(0),
    schema=[Field(name="hidden_advertiser_ids", dtype=Array(Int64))],
    source=user_hidden_advertisers_push,
    description="Advertisers the user chose not to see again.",
)
