"""Learning the retrieve ensemble's quotas offline from logged outcomes, and comparing quota
policies (`candgen quotas`). The served tables live in ``candgen.serving.quota``."""
