"""Seeds derived from the config's seed (pure; no Dagster, no torch)."""
from __future__ import annotations


def split_seed(base_seed: int, split_seed: int) -> int:
    """The seed of every stage computed for one split partition: ``base_seed * 1000 + split_seed`` (``base_seed`` is
    the config's ``seed``, ``split_seed`` the partition's ``-s<n>``). It enters memo keys: never change it."""
    return int(base_seed) * 1000 + int(split_seed)
