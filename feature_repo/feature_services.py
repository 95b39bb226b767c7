"""Versioned feature services. A model records the service version it was trained on; a change
to a service's features is a new version (_v2), never an edit of _v1."""

from feast import FeatureService
from features import (
    ad_attributes,
    ad_delivery,
    advertiser_profile,
    campaign_delivery,
    delivery_shard,
    user_ad_impressions,
    user_hidden_advertisers,
    user_long_term,
    user_long_term_embedding,
    user_profile,
    user_short_term,
)

user_features_v1 = FeatureService(
    name="user_features_v1",
    features=[user_profile, user_short_term, user_long_term],
    description="What the user encoder reads at request time.",
)

ad_features_v1 = FeatureService(
    name="ad_features_v1",
    features=[ad_attributes, ad_delivery],
    description="What the ad tower and the eligibility filters read.",
)

advertiser_features_v1 = FeatureService(
    name="advertiser_features_v1",
    features=[advertiser_profile],
)

training_v1 = FeatureService(
    name="training_v1",
    features=[
        user_profile,
        user_short_term,
        user_long_term,
        ad_attributes[["advertiser_id", "campaign_id", "category", "price", "text_embedding"]],
        ad_delivery[["ctr_7d", "cvr_7d"]],
    ],
    description="Point-in-time training rows: (user, ad, timestamp, label) joined to features.",
)

user_serving_v1 = FeatureService(
    name="user_serving_v1",
    features=[
        user_short_term[["recent_item_ids", "recent_timestamps"]],
        user_long_term[["category_affinity"]],
    ],
    description="Only what the retrieve ensemble's features step reads: the feature server "
    "answers it in about half the time of user_features_v1 (docs/BENCHMARKS.md).",
)

user_features_v2 = FeatureService(
    name="user_features_v2",
    features=[user_profile, user_short_term, user_long_term, user_long_term_embedding],
    description="user_features_v1 and the long-term summary embedding.",
)

user_serving_v2 = FeatureService(
    name="user_serving_v2",
    features=[
        user_short_term[["recent_item_ids", "recent_timestamps"]],
        user_long_term[["category_affinity", "engagements_total", "ad_clicks_total"]],
        user_long_term_embedding[["long_term_embedding"]],
    ],
    description="What the retrieve ensemble's features step reads: user_serving_v1, the "
    "long-term summary the unified model fuses, and the lifetime counts that set the user's "
    "activity bucket for the learned quotas.",
)

user_serving_v3 = FeatureService(
    name="user_serving_v3",
    features=[
        user_short_term[["recent_item_ids", "recent_timestamps"]],
        user_long_term[["category_affinity", "engagements_total", "ad_clicks_total"]],
        user_long_term_embedding[["long_term_embedding"]],
        user_profile,
        user_ad_impressions,
        user_hidden_advertisers,
    ],
    description="user_serving_v2 and what eligibility reads per user: the profile that "
    "targeting matches, the day's impression counts (frequency caps), hidden advertisers.",
)

campaign_delivery_v1 = FeatureService(
    name="campaign_delivery_v1",
    features=[campaign_delivery],
    description="A campaign's targeting, budget, pacing and status.",
)

delivery_shards_v1 = FeatureService(
    name="delivery_shards_v1",
    features=[delivery_shard],
    description="The live delivery state, by shard, that the generators step watches.",
)
