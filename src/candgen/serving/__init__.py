"""Online retrieval: candidate generators, quota allocation and filters (Triton calls into it)."""
