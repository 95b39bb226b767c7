"""Data: real interaction sets, the synthetic ads marketplace, and their common schema."""
