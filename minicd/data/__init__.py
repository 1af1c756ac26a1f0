"""Data: MIMIC preprocessing, splits, records, truncation, retrieval, synthetic corpus."""
