"""ANN indexes over item/ad embeddings (FAISS), with query-time eligibility."""
