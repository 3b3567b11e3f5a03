"""Stable few-shot splits.

Within each class, images are ranked by hash(seed, image content id); the first K go to train and the
next V to validation (``fewer_than_k: use_all``: a class short of K + V keeps its K train images and validates on
the rest; a K of at least the class's size takes the class minus V images when the class has more than V, so
full-dataset presets still validate on V per class). A new image in one class can only move into that class's split if it ranks
before the current members, and never changes another class's split.

Class-split benchmarks (``dataset.class_split``; raw_images has ``class_evaluated``): only the evaluated classes
enter the split. When those classes have no test/ pool (mini-/tiered-ImageNet ship one folder of images per
class), each class's images ranked after its K + V become its test images (role ``test``, pool ``train``).
"""
from __future__ import annotations

import pandas as pd

from ..errors import UserError
from ..util import stable_int


class SplitError(UserError, ValueError):
    pass


def rank_key(seed: int, image_id: str) -> int:
    return stable_int("split", seed, image_id)


def few_shot_split(images: pd.DataFrame, shots: int, seed: int, val_per_class: int,
                   fewer_than_k: str = "error") -> pd.DataFrame:
    """Rows: every train-pool image chosen for train/val, plus all test/ood images (role test|ood)."""
    class_split = "class_evaluated" in images.columns
    if class_split:
        images = images[images["class_evaluated"].astype(bool)]
    train_pool = images[images["pool"] == "train"]
    rest_as_test = class_split and not (images["pool"] == "test").any()
    out = []
    for label, grp in sorted(train_pool.groupby("label"), key=lambda kv: kv[0]):
        grp = grp.drop_duplicates("image_id")
        need = shots + val_per_class
        if len(grp) < need:
            if fewer_than_k == "error" or len(grp) < 1:
                raise SplitError(
                    f"class {label!r} has {len(grp)} unique images but the split {shots}-shot needs {shots} train + "
                    f"{val_per_class} val = {need}; add images, lower splits.shots/val_per_class, or set "
                    "splits.fewer_than_k: use_all"
                )
        ranked = sorted(grp.to_dict("records"), key=lambda r: rank_key(seed, r["image_id"]))
        if len(ranked) >= need:
            n_train = shots
        elif shots >= len(ranked) > val_per_class:  # K = "the whole class" (SGID's full datasets): V still validate
            n_train = len(ranked) - val_per_class
        else:  # K shots first, validation gets what is left
            n_train = min(shots, max(1, len(ranked) - 1))
        for i, r in enumerate(ranked[: n_train + val_per_class]):
            out.append({**r, "role": "train" if i < n_train else "val", "rank": i,
                        "shortfall": max(0, need - len(ranked))})
        if rest_as_test:
            for i, r in enumerate(ranked[n_train + val_per_class:], start=n_train + val_per_class):
                out.append({**r, "role": "test", "rank": i, "shortfall": 0})
    split = pd.DataFrame(out)
    rest = images[images["pool"].isin(["test", "ood"])].copy()
    rest["role"] = rest["pool"]
    rest["rank"] = -1
    rest["shortfall"] = 0
    return pd.concat([split, rest], ignore_index=True)
