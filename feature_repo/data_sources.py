"""Parquet sources of the offline feature tables, and the push source for real-time engagements.

The tables are written by `candgen features build`. Their folder is $CANDGEN_FEATURES_DIR, else
data/features inside this repo (relative paths resolve against the repo folder).
"""

import os

from feast import FileSource, PushSource

FEATURES_DIR = os.environ.get("CANDGEN_FEATURES_DIR", "data/features")


def _parquet(name: str) -> FileSource:
    return FileSource(
        name=f"{name}_source",
        path=os.path.join(FEATURES_DIR, f"{name}.parquet"),
        timestamp_field="event_timestamp",
    )


user_profile_source = _parquet("user_profile")
user_short_term_source = _parquet("user_short_term")
user_long_term_source = _parquet("user_long_term")
user_long_term_embedding_source = _parquet("user_long_term_embedding")
ad_attributes_source = _parquet("ad_attributes")
ad_delivery_source = _parquet("ad_delivery")
advertiser_profile_source = _parquet("advertiser_profile")
campaign_delivery_source = _parquet("campaign_delivery")
delivery_shard_source = _parquet("delivery_shard")
user_ad_impressions_source = _parquet("user_ad_impressions")
user_hidden_advertisers_source = _parquet("user_hidden_advertisers")

# Real-time engagements arrive here: candgen.features.store.push_engagements appends them to the
# user's short-term sequence and pushes the new sequence.
user_short_term_push = PushSource(name="user_short_term_push", batch_source=user_short_term_source)

# Delivery state changes arrive here (candgen.features.delivery): a campaign paused, resumed,
# out of budget, throttled or retargeted is pushed to campaign_delivery and to its shard; each
# impression to the user's counts of the day; a hidden advertiser to the user's list.
campaign_delivery_push = PushSource(
    name="campaign_delivery_push", batch_source=campaign_delivery_source
)
delivery_shard_push = PushSource(name="delivery_shard_push", batch_source=delivery_shard_source)
user_ad_impressions_push = PushSource(
    name="user_ad_impressions_push", batch_source=user_ad_impressions_source
)
user_hidden_advertisers_push = PushSource(
    name="user_hidden_advertisers_push", batch_source=user_hidden_advertisers_source
)
