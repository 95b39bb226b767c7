"""Features: offline feature tables, the Feast store around feature_repo/, training sets."""
