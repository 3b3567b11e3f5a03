"""Classifier training with weighted real/synthetic sampling, temperature scaling (no Dagster)."""
