"""Parquet manifests: ``<root>/manifests/<asset key path>/<partition>.parquet`` (``__all__`` when the
asset is not partitioned). Written atomically; the Dagster IO manager in ``resources.py`` and the
lineage views both use these paths.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..util import atomic_path, hash_obj

UNPARTITIONED = "__all__"


def manifest_path(root: str | os.PathLike, asset_path: Sequence[str], partition: str | None) -> Path:
    safe = [p.replace("/", "_") for p in asset_path]
    return Path(root, "manifests", *safe, f"{partition or UNPARTITIONED}.parquet")


def write_manifest(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"manifest {p} does not exist: materialize its asset first")
    return pd.read_parquet(p)


def manifest_version(df: pd.DataFrame, ignore: Sequence[str] = ("created_by_run", "mlflow_run_id", "mlflow_error", "compute_seconds", "reused", "train_seconds", "dataset_root")) -> str:
    """Deterministic content hash of a manifest, ignoring run-specific columns and where the dataset lies
    (``dataset_root``: a moved data dir or dataset folder keeps every data version)."""
    cols = [c for c in df.columns if c not in ignore]
    d = df[cols]
    records = d.astype(object).where(pd.notna(d), None).to_dict(orient="list")
    return hash_obj(cols, records)[:24]


def stored_root(root: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """``root`` as a manifest stores it: relative (posix) when inside the data dir, so the data dir can be moved or
    copied; absolute otherwise (a user's dataset folder)."""
    root, data_dir = Path(root).resolve(), Path(data_dir).resolve()
    try:
        return root.relative_to(data_dir).as_posix()
    except ValueError:
        return str(root)


def resolve_root(stored: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """The dataset folder of a manifest's ``dataset_root`` (relative: under the data dir; absolute as is — also
    what the previous code stored)."""
    p = Path(stored)
    if not p.is_absolute():
        return Path(data_dir) / p
    if not p.exists() and "datasets" in p.parts:  # a data dir of the previous code, moved: the built-in dataset
        i = len(p.parts) - 1 - p.parts[::-1].index("datasets")  # lies under <data dir>/datasets/
        moved = Path(data_dir, *p.parts[i:])
        if moved.exists():
            return moved
    return p

