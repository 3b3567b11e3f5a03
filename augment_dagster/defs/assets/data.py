"""raw_images (ingest of the dataset tree) and few_shot_split (stable K-shot train/val per seed)."""

from pathlib import Path

import dagster as dg
import pandas as pd

from ...data.ingest import ingest
from ...data.splits import few_shot_split
from ...config import parse_split_key
from ...util import hash_obj
from .common import EAGER_AUTOMATION, Experiment, md_table, output, stage_asset


def dataset_root(exp: Experiment) -> Path | None:
    """The imagefolder tree of the experiment: the built-in dataset is written once under the data dir
    (None for a Hugging Face dataset, ``hf:...``)."""
    ds = exp.cfg.dataset
    if ds.is_hf:
        return None
    if ds.source == "builtin":
        from ...data.builtin import write_builtin

        b = ds.builtin
        return write_builtin(exp.data_dir / "datasets", classes=b.classes, train_per_class=b.train_per_class,
                             test_per_class=b.test_per_class, ood_per_class=b.ood_per_class, size=b.image_size, seed=b.seed)
    return Path(ds.source).expanduser().resolve()


def listing_version(df: pd.DataFrame) -> str:
    """Data version of the raw data: hash of (relative path, size, content hash) of every file, and of the class
    words that differ from the class ids (none for the built-in shapes, whose version is as it always was)."""
    listing = sorted(zip(df["path"], df["bytes"].astype(int), df["image_id"]))
    if "class_id" in df:
        renamed = sorted({(c, w) for c, w in zip(df["class_id"], df["label"]) if c != w})
        if renamed:
            return hash_obj(listing, renamed)[:24]
    return hash_obj(listing)[:24]


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @stage_asset(exp, "raw_images", partitioned=False, automation=EAGER_AUTOMATION,
        code_version=exp.code_version("dataset"), kinds={"python"},
        description="Ingest of the dataset (imagefolder tree root/<class>/*, test/, ood/, or an hf: dataset): one row per "
                    "image, id = sha256 of its bytes, class_id + label (the class words); bad files, duplicates and leaks "
                    "are reported (data/ingest.py).",
    )
    def raw_images(context: dg.AssetExecutionContext) -> dg.Output:
        root = dataset_root(exp)
        res = ingest(cfg.dataset, root)
        df = res.images.copy()
        for s in res.skipped:
            context.log.warning(f"skipped bad file {s['path']}: {s['reason']}")
        for d in res.duplicates:
            context.log.warning(f"duplicate image ({cfg.dataset.on_duplicate}): {d['text']}")
        for n in res.notes:
            context.log.info(n)
        counts = df.groupby(["label", "pool"]).size().unstack(fill_value=0).reset_index()
        from ..automation import dataset_folder, listing_hash
        from ...store.manifests import stored_root

        # relative inside the data dir (the data dir can move); a Hugging Face source is its `hf:` locator
        df["dataset_root"] = cfg.dataset.source if root is None else stored_root(root, exp.data_dir)
        watched = root if root is not None else dataset_folder(cfg)
        md = {
            "dataset_root": dg.MetadataValue.path(cfg.dataset.source if root is None else str(root)),
            "listing_hash": dg.MetadataValue.text(listing_hash(watched) if watched is not None else "hub"),  # the new-data sensor starts from it
            "classes": dg.MetadataValue.int(int(df.loc[df.pool == "train", "label"].nunique())),
            "images_per_class": dg.MetadataValue.md(md_table(counts)),
            "skipped_files": dg.MetadataValue.int(len(res.skipped)),
        }
        if res.skipped:
            md["skipped"] = dg.MetadataValue.json(res.skipped[:100])
        if res.duplicates:
            md["duplicates"] = dg.MetadataValue.json([{k: d[k] for k in ("kind", "files")} for d in res.duplicates[:100]])
        if res.notes:
            md["notes"] = dg.MetadataValue.json(res.notes)
        if (df["class_id"] != df["label"]).any():
            md["class_words"] = dg.MetadataValue.json(dict(sorted(zip(df["class_id"], df["label"]))))
        out = output(df, md)
        return dg.Output(out.value, data_version=dg.DataVersion(listing_version(df)), metadata=out.metadata)

    @stage_asset(exp, "few_shot_split", ins={"raw": "raw_images"}, automation=EAGER_AUTOMATION,
        code_version=exp.code_version("splits"), kinds={"python"},
        description="Stable few-shot split: per class, images ranked by hash(seed, image id); first K train, next V val.",
    )
    def split(context: dg.AssetExecutionContext, raw: pd.DataFrame) -> dg.Output:
        shots, seed = parse_split_key(context.partition_key)
        df = few_shot_split(raw, shots, seed, cfg.splits.val_per_class, cfg.splits.fewer_than_k)
        df["split"] = context.partition_key
        short = df[(df["role"] == "train") & (df["shortfall"] > 0)]["label"].unique().tolist()
        if short:
            context.log.warning(f"classes with fewer than K+V images (used all they have): {short}")
        summary = df.groupby(["label", "role"]).size().unstack(fill_value=0).reset_index()
        return output(df, {"shots": dg.MetadataValue.int(shots), "seed": dg.MetadataValue.int(seed),
                           "roles": dg.MetadataValue.md(md_table(summary)),
                           "short_classes": dg.MetadataValue.json(short)})

    return [raw_images, split]
