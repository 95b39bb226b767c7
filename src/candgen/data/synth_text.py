"""Vocabulary for the synthetic marketplace's ad titles and descriptions.

Each category has its own nouns so that an ad's text carries its category, which is what a
language-model embedding can pick up for cold-start ads.
"""

from __future__ import annotations

from typing import Final

CATEGORY_NOUNS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("running", ("running shoes", "trail sneakers", "marathon socks", "sports watch")),
    ("skincare", ("face serum", "moisturizer", "sunscreen SPF 50", "night cream")),
    ("makeup", ("lipstick", "mascara", "foundation", "eyeshadow palette")),
    ("haircare", ("shampoo", "hair mask", "curling iron", "hair dryer")),
    ("gaming", ("gaming headset", "mechanical keyboard", "game controller", "gaming mouse")),
    ("consoles", ("handheld console", "console bundle", "VR headset", "racing wheel")),
    ("kitchen", ("chef knife", "cast iron skillet", "espresso machine", "stand mixer")),
    ("home", ("throw blanket", "scented candle", "table lamp", "area rug")),
    ("garden", ("garden hose", "pruning shears", "raised planter", "seed starter kit")),
    ("travel", ("carry-on suitcase", "travel pillow", "packing cubes", "weekender bag")),
    ("fitness", ("yoga mat", "adjustable dumbbells", "resistance bands", "foam roller")),
    ("outdoor", ("camping tent", "hiking backpack", "sleeping bag", "headlamp")),
    ("pets", ("dog bed", "cat tree", "pet fountain", "chew toy set")),
    ("baby", ("baby stroller", "diaper bag", "baby monitor", "crib mattress")),
    ("books", ("mystery novel", "cookbook", "science fiction box set", "travel guide")),
    ("music", ("acoustic guitar", "studio headphones", "bluetooth speaker", "vinyl record")),
    ("phones", ("phone case", "wireless charger", "smartphone", "screen protector")),
    ("computers", ("ultrabook laptop", "4K monitor", "USB-C dock", "external SSD")),
    ("fashion", ("denim jacket", "wool coat", "leather belt", "summer dress")),
    ("jewelry", ("silver necklace", "gold hoops", "wristwatch", "charm bracelet")),
    ("toys", ("building blocks", "puzzle", "plush bear", "remote control car")),
    ("auto", ("dash cam", "car vacuum", "seat covers", "tire inflator")),
    ("grocery", ("organic coffee", "green tea", "protein bars", "olive oil")),
    ("finance", ("budgeting app", "credit card", "savings account", "tax software")),
)

ADJECTIVES: Final = (
    "premium",
    "lightweight",
    "eco-friendly",
    "best-selling",
    "compact",
    "professional",
    "limited edition",
    "everyday",
    "ultra-soft",
    "award-winning",
)

AUDIENCES: Final = (
    "beginners",
    "busy parents",
    "students",
    "professionals",
    "weekend adventurers",
    "gift shoppers",
    "enthusiasts",
    "small spaces",
)

BENEFITS: Final = (
    "Ships in 24 hours",
    "30-day free returns",
    "Rated 4.8 stars by customers",
    "Save 20% today",
    "Made to last",
    "New season collection",
)

BRAND_SYLLABLES: Final = (
    "zen",
    "nova",
    "lumi",
    "aero",
    "kai",
    "vera",
    "orbi",
    "tera",
    "mira",
    "flux",
    "echo",
    "sola",
    "rivo",
    "pico",
    "nex",
    "ora",
    "velo",
    "quin",
    "astra",
    "moda",
)

CATEGORIES: Final = tuple(name for name, _ in CATEGORY_NOUNS)


def brand_name(advertiser_id: int) -> str:
    """A stable, pronounceable brand name for an advertiser id."""
    n = len(BRAND_SYLLABLES)
    a, b = BRAND_SYLLABLES[advertiser_id % n], BRAND_SYLLABLES[(advertiser_id // n) % n]
    suffix = "" if advertiser_id < n * n else str(advertiser_id // (n * n))
    return f"{a.capitalize()}{b}{suffix}"
