"""Hugging Face datasets as a source (``dataset.source: hf:<hub id or local path>``; no torch, no Dagster).

* A local folder written by ``Dataset(Dict).save_to_disk`` is opened with ``datasets.load_from_disk``; any other
  local folder (parquet files ``train-*.parquet``/``test-*.parquet``, an imagefolder, ...) and a hub id with
  ``datasets.load_dataset`` (``dataset.hf.revision`` for hub ids). Hub ids need network access, or a filled
  Hugging Face cache with ``HF_HUB_OFFLINE=1``.
* Splits map to pools: ``dataset.hf.train_split`` -> train, ``test_split`` -> test, ``ood_split`` -> ood.
* Class ids are the ``ClassLabel`` names of ``dataset.hf.label_column`` (an integer or string column is used as is).
* Images are never all held in memory: ingestion reads the image column undecoded (``Image(decode=False)``) in
  batches, hashes and checks one image at a time; later stages read single rows by index (:class:`HFReader`).
* Every row records ``hf_dataset`` (the locator), ``hf_revision``, ``hf_fingerprint`` (the split's
  ``datasets`` fingerprint), ``hf_split`` and ``hf_row``; ``path`` is ``<split>/<row>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..config import ConfigError
from .imagefolder import (COLUMNS, BadImageError, DatasetError, ScanResult, bad_files_error, check_image, content_id,
                          open_image)

HF_COLUMNS = ["hf_dataset", "hf_revision", "hf_fingerprint", "hf_split", "hf_row"]
_BATCH = 64
_OPEN: dict[tuple[str, str | None, int], Any] = {}


def locator(source: str) -> str:
    """'hf:<hub id or path>' -> an absolute path for an existing local folder, else the hub id."""
    loc = source[3:].strip() if source.startswith("hf:") else source
    if not loc:
        raise ConfigError("dataset.source: 'hf:' needs a hub id or a local folder, e.g. hf:uoft-cs/cifar10 or hf:./my_ds")
    p = Path(loc).expanduser()
    if p.exists() or loc.startswith((".", "/", "~")):
        return str(p.resolve())
    return loc


def open_dataset(loc: str, revision: str | None = None):
    """The DatasetDict (or Dataset) behind a locator, cached per process."""
    p = Path(loc)
    # a local folder saved again (same path) is opened again: its top-level files' mtimes are part of the key
    stamp = max((f.stat().st_mtime_ns for f in p.iterdir()), default=0) if p.is_dir() else 0
    key = (loc, revision, stamp)
    if key in _OPEN:
        return _OPEN[key]
    import datasets

    datasets.disable_progress_bars()  # the run's own progress lines report the work
    try:
        if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
            ds = datasets.load_from_disk(str(p))
        elif p.is_file() and p.suffix == ".parquet":  # one parquet file: the train split
            ds = datasets.load_dataset("parquet", data_files={"train": str(p)})
        elif p.is_absolute() and not p.exists():
            raise DatasetError(f"dataset.source hf:{loc}: no such folder; give a save_to_disk folder, a folder of "
                               "parquet files or a hub id")
        else:
            ds = datasets.load_dataset(str(p) if p.is_dir() else loc, revision=None if p.is_dir() else revision)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets/hub raise many types for a bad locator
        msg = " ".join(str(e).split())[:200]
        raise DatasetError(f"dataset.source hf:{loc}: cannot load it ({type(e).__name__}: {msg}); give a save_to_disk "
                           "folder, a folder of parquet files, or a hub id reachable from here") from None
    _OPEN[key] = ds
    return ds


def _split(dd, loc: str, name: str, key: str, train_split: str):
    import datasets

    if isinstance(dd, datasets.Dataset):  # a single saved Dataset: it is the train split
        if name == train_split:
            return dd
        raise ConfigError(f"{key}: split {name!r} is not in hf:{loc}, a single Dataset (no named splits); set {key}: null")
    if name not in dd:
        raise ConfigError(f"{key}: split {name!r} is not in hf:{loc} (splits: {', '.join(dd)}); set {key} to one of them")
    return dd[name]


def _image_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return _read_path(value["path"], where)
        raise BadImageError(f"{where}: the image cell is empty; remove the row or fill it")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return _read_path(value, where)
    if value is None:
        raise BadImageError(f"{where}: the image cell is empty; remove the row or fill it")
    raise BadImageError(f"{where}: the image cell holds {type(value).__name__}, not image bytes or a path")


def _read_path(path: str, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BadImageError(f"{where}: cannot read its image file {path} ({e.strerror or e})") from None


def _columns(ds, loc: str, split: str, image_column: str, label_column: str):
    """(undecoded dataset with the two columns, label -> class id function). ConfigError naming the key otherwise."""
    import datasets

    feats = ds.features
    for key, col in (("dataset.hf.image_column", image_column), ("dataset.hf.label_column", label_column)):
        if col not in feats:
            raise ConfigError(f"{key}: column {col!r} is not in split {split!r} of hf:{loc} (columns: "
                              f"{', '.join(feats)}); set {key} to the right column")
    img = feats[image_column]
    if isinstance(img, datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    elif not (isinstance(img, datasets.Value) and img.dtype in ("binary", "large_binary", "string", "large_string")):
        raise ConfigError(f"dataset.hf.image_column: column {image_column!r} of hf:{loc} is {type(img).__name__}"
                          f"({getattr(img, 'dtype', '')}), not an Image feature, bytes or file paths; name the image column")
    lab = feats[label_column]
    if isinstance(lab, datasets.ClassLabel):
        names = list(lab.names)

        def to_id(v):
            return names[v] if isinstance(v, int) and 0 <= v < len(names) else None
    elif isinstance(lab, datasets.Value) and (lab.dtype.startswith("int") or lab.dtype.startswith("uint")
                                              or lab.dtype in ("string", "large_string")):
        def to_id(v):
            return None if v is None or (isinstance(v, int) and v < 0) else str(v)
    else:
        raise ConfigError(f"dataset.hf.label_column: column {label_column!r} of hf:{loc} is {type(lab).__name__}"
                          f"({getattr(lab, 'dtype', '')}), not a ClassLabel, integer or string column; name the label column")
    return ds.select_columns([image_column, label_column]), to_id


def scan_hf(source: str, hf_cfg, on_bad_file: str = "error", max_pixels: int = 40_000_000,
            min_size: int = 8) -> ScanResult:
    """One row per image of the configured splits (ids = sha256 of the image bytes), decoded one at a time."""
    loc = locator(source)
    dd = open_dataset(loc, hf_cfg.revision)
    pools = [("train", hf_cfg.train_split, "dataset.hf.train_split")]
    notes = []
    for pool, name, key in (("test", hf_cfg.test_split, "dataset.hf.test_split"), ("ood", hf_cfg.ood_split, "dataset.hf.ood_split")):
        if name is None:
            continue
        import datasets

        if pool == "test" and name == "test" and "test_split" not in hf_cfg.model_fields_set and (
                isinstance(dd, datasets.Dataset) or name not in dd):
            notes.append(f"hf:{loc} has no split 'test': no in-distribution test pool (set dataset.hf.test_split)")
            continue
        pools.append((pool, name, key))
    rows, bad = [], []
    for pool, name, key in pools:
        ds = _split(dd, loc, name, key, hf_cfg.train_split)
        raw, to_id = _columns(ds, loc, name, hf_cfg.image_column, hf_cfg.label_column)
        fp = getattr(ds, "_fingerprint", "") or ""
        for start in range(0, len(raw), _BATCH):
            batch = raw[start:start + _BATCH]
            for j, (cell, lab) in enumerate(zip(batch[hf_cfg.image_column], batch[hf_cfg.label_column])):
                i = start + j
                where = f"hf:{loc} split {name!r} row {i}"
                try:
                    cid = to_id(lab)
                    if cid is None:
                        raise BadImageError(f"{where}: label {lab!r} is not a class (unlabelled row); remove the row "
                                            f"or use another split")
                    data = _image_bytes(cell, where)
                    im, info = open_image(data, where, max_pixels)
                    check_image(im, info, where, min_size)
                except BadImageError as e:
                    bad.append({"path": f"{name}/{i}", "reason": str(e)})
                    continue
                rows.append(dict(image_id=content_id(data, info), label=cid, pool=pool, path=f"{name}/{i}", bytes=len(data),
                                 width=im.size[0], height=im.size[1], exif_transposed=info["exif_orientation"] != 1,
                                 hf_dataset=loc, hf_revision=hf_cfg.revision or "", hf_fingerprint=fp, hf_split=name, hf_row=i))
    if bad and on_bad_file != "skip":
        raise bad_files_error(bad, f"hf:{loc}")
    df = pd.DataFrame(rows, columns=COLUMNS + HF_COLUMNS)
    if not (df["pool"] == "train").any():
        raise DatasetError(f"hf:{loc} split {hf_cfg.train_split!r} has no usable images; check dataset.hf.train_split")
    n_t = int(df["exif_transposed"].sum())
    if n_t:
        notes.append(f"EXIF orientation applied to {n_t} image(s), e.g. row {df.loc[df.exif_transposed, 'path'].iloc[0]}")
    return ScanResult(df, bad, notes=notes)


class HFReader:
    """Single rows of a Hugging Face dataset by (split, row index), decoded on demand."""

    def __init__(self, loc: str, revision: str | None, image_column: str):
        self.loc, self.revision, self.image_column = loc, revision or None, image_column
        self._splits: dict[str, Any] = {}

    def _raw(self, split: str):
        if split not in self._splits:
            import datasets

            dd = open_dataset(self.loc, self.revision)
            ds = dd if isinstance(dd, datasets.Dataset) else dd[split]
            if isinstance(ds.features.get(self.image_column), datasets.Image):
                ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
            self._splits[split] = ds.select_columns([self.image_column])
        return self._splits[split]

    def read(self, split: str, row: int) -> bytes:
        where = f"hf:{self.loc} split {split!r} row {row}"
        try:
            cell = self._raw(split)[int(row)][self.image_column]
        except (IndexError, KeyError) as e:
            raise DatasetError(f"{where}: no such row ({e}); the dataset changed since raw_images was materialized: "
                               "rematerialize raw_images") from None
        return _image_bytes(cell, where)


def describe_row(r: dict) -> str:
    """'hf:<dataset> split train row 12 (revision r, fingerprint f)' for lineage printing."""
    rev = r.get("hf_revision") or "-"
    return f"hf:{r.get('hf_dataset')} split {r.get('hf_split')!r} row {r.get('hf_row')} (revision {rev}, fingerprint {r.get('hf_fingerprint')})"

