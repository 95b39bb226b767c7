"""Offline retrieval evaluation: full ranking, sampled-100, and splits by label and surface."""
