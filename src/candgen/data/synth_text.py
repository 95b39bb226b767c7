"""Vocabulary for the synthetic marketplace's ad titles and descriptions.

Each category has its own nouns so that an ad's text carries its category, which is what a
language-model embedding can pick up for cold-start ads.
"""

from __future__ import annotations

from typing import Final

import numpy as np

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


VAGUE_QUERY_FORMS: Final = ("{}", "best {}", "{} deals", "{} ideas", "cheap {}", "{} gifts")
"""Queries that name only a category (a vague search): ``{}`` is the category word."""


def misspell(word: str, rng: np.random.Generator) -> str:
    """The word with one typo: a letter dropped, doubled, or swapped with its neighbour."""
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if len(letters) < 3:
        return word
    i = letters[int(rng.integers(1, len(letters) - 1))]
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return word[:i] + word[i + 1 :]
    if kind == 1:
        return word[:i] + word[i] + word[i:]
    return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]


def query_text(
    category: int,
    noun: int,
    adjective: int,
    brand: str,
    typo: bool,
    rng: np.random.Generator,
) -> str:
    """A search query for an intent: the category's noun (``noun`` = -1: a vague query that
    names only the category), sometimes an adjective (``adjective`` >= 0) or a brand (non-empty
    ``brand``), with one typo where ``typo``."""
    if noun < 0:
        form = VAGUE_QUERY_FORMS[int(rng.integers(0, len(VAGUE_QUERY_FORMS)))]
        words = form.format(CATEGORY_NOUNS[category][0]).split()
    else:
        words = CATEGORY_NOUNS[category][1][noun].lower().split()
        if adjective >= 0:
            words = [ADJECTIVES[adjective], *words]
        if brand:
            words = [brand.lower(), *words]
    if typo:
        at = int(rng.integers(0, len(words)))
        words[at] = misspell(words[at], rng)
    return " ".join(words)
