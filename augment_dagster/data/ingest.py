"""Ingestion of a dataset source into the ``raw_images`` manifest (no torch, no Dagster).

``ingest`` scans the source (built-in tree, imagefolder tree or Hugging Face dataset), validates every image
(one error lists every bad file, up to 20, then a count), turns class ids into class words (``class_id`` keeps
the id, ``label`` holds the words; data/classes.py), tags the classes of a class-split benchmark, and finds exact
duplicates: the same bytes in two classes, or in the train pool and the test/ood pools (a leak), reported with
both file names. ``dataset.on_duplicate``: error (default), warn, or drop.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .classes import class_split_of, class_words
from .imagefolder import DatasetError, ScanResult, scan_imagefolder


def ingest(ds_cfg, root: str | Path | None) -> ScanResult:
    """Scan ``ds_cfg``'s source (``root``: the folder of a built-in or imagefolder source) into a ScanResult."""
    if ds_cfg.is_hf:
        from .hf import scan_hf

        res = scan_hf(ds_cfg.source, ds_cfg.hf, on_bad_file=ds_cfg.on_bad_file, max_pixels=ds_cfg.max_image_pixels,
                      min_size=ds_cfg.min_image_size)
        clean = True
    else:
        res = scan_imagefolder(root, on_bad_file=ds_cfg.on_bad_file, max_pixels=ds_cfg.max_image_pixels,
                               min_size=ds_cfg.min_image_size)
        clean = ds_cfg.source != "builtin"
    df = res.images
    ids = sorted(df["label"].astype(str).unique())
    words = class_words(ids, ds_cfg.class_names, clean=clean)
    df.insert(1, "class_id", df["label"].astype(str))
    df["label"] = df["class_id"].map(words)
    if ds_cfg.class_split is not None:
        where = class_split_of(sorted(df.loc[df.pool == "train", "class_id"].unique()), ds_cfg.class_split)
        df["class_split"] = df["class_id"].map(where).fillna("")
        df["class_evaluated"] = df["class_split"] == ds_cfg.class_split.evaluate
    df, dups = find_duplicates(df, ds_cfg.on_duplicate, where=_where(ds_cfg, root))
    res.images = df.reset_index(drop=True)
    res.duplicates = dups
    return res


def _where(ds_cfg, root) -> str:
    return ds_cfg.source if ds_cfg.is_hf else str(root)


def _name(r) -> str:
    return r["path"]


def find_duplicates(df: pd.DataFrame, on_duplicate: str = "error", where: str = "the dataset", limit: int = 20):
    """Exact duplicates (same image id) across classes or between the train pool and test/ood.

    Returns (rows kept, report). ``error``: DatasetError naming both files of each pair (up to ``limit`` pairs, then
    a count); ``warn``: every row kept; ``drop``: a cross-class duplicate loses every copy (its label is ambiguous),
    a leak loses its train copies (the test set stays as it is)."""
    report, drop_idx = [], set()
    for image_id, grp in df[df.duplicated("image_id", keep=False)].groupby("image_id", sort=False):
        recs = grp.to_dict("records")
        idx = list(grp.index)
        classes = sorted(set(grp["class_id"]))
        if len(classes) > 1:
            a, b = recs[0], next(r for r in recs if r["class_id"] != recs[0]["class_id"])
            report.append({"kind": "classes", "image_id": image_id, "files": [_name(r) for r in recs],
                           "text": f"{_name(a)} = {_name(b)} (classes {a['class_id']!r} and {b['class_id']!r})"})
            drop_idx.update(idx)
            continue
        pools = set(grp["pool"])
        if "train" in pools and pools & {"test", "ood"}:
            a = next(r for r in recs if r["pool"] == "train")
            b = next(r for r in recs if r["pool"] != "train")
            report.append({"kind": "leak", "image_id": image_id, "files": [_name(r) for r in recs],
                           "text": f"{_name(a)} = {_name(b)} (train image also in {b['pool']})"})
            drop_idx.update(i for i, r in zip(idx, recs) if r["pool"] == "train")
    if report and on_duplicate == "error":
        shown = "; ".join(r["text"] for r in report[:limit])
        more = f"; and {len(report) - limit} more" if len(report) > limit else ""
        raise DatasetError(f"{len(report)} duplicate image(s) in {where}: {shown}{more}; remove one copy of each, or set "
                           "dataset.on_duplicate: warn (keep) or drop (drop the train copy of a leak, every copy "
                           "across classes)")
    if on_duplicate == "drop" and drop_idx:
        df = df.drop(index=sorted(drop_idx))
    return df, report
