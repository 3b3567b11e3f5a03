"""The classifier stages with the unit memo (no Dagster): train (or reuse) a classifier on a split plus an
optional synthetic set, evaluate it, and DIAGen's weight rule (the weights themselves: ``training/filter.py``). Torch is imported inside functions."""
from __future__ import annotations

import json
import time
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cachetools import LRUCache, cached

from ..data.images import ImageSource, label_index, to_tensor
from ..stages import StageStats
from ..store import BlobStore, Memo, memo_key
from .recipes import freeze_for

CLASSIFIER_VERSION = "clf-2"
WEIGHTS_VERSION = "w-1"


# TrainingConfig keys that do not change a trained classifier (kept out of its memo key)
_NOT_CLASSIFIER_KEYS = {"headline", "evaluation", "episodes", "diagen_filter", "recipe"}


# keys added after the demo's memo entries were written: they enter a classifier's memo key only when they differ
# from this default, so the keys of configs that leave them alone stay as they were
_KEY_DEFAULTS = {"epoch_unit": "steps", "synthetic_aug": "none"}


def classifier_key_params(training, classifier_cfg) -> dict[str, Any]:
    """The training settings that go into a classifier's memo key (see ``_KEY_DEFAULTS``)."""
    d = training.model_dump(mode="json", exclude=_NOT_CLASSIFIER_KEYS)
    for k, v in _KEY_DEFAULTS.items():
        if d.get(k) == v:
            d.pop(k, None)
    if d.get("epoch_unit") == "data":
        d.pop("steps_per_epoch", None)  # unused
    if not getattr(classifier_cfg, "pretrained", True):
        d["pretrained"] = False
    return d


def synthetic_groups(train: pd.DataFrame, synth: pd.DataFrame) -> list[np.ndarray]:
    """For each real train image n: the synthetic rows that belong to it (Eq. 2's m index).

    A synthetic image belongs to real image n when n is its only guide and they share the label
    (DA-Fusion/DIAGen/real-guidance). Synthetics with no same-class guide (txt2img, GeNIe's hard
    negatives) or with several guides (Diff-II's interpolation of two inverted images: its mixing draws a
    same-class synthetic uniformly, METHODS §3) form a per-class pool shared by every real image of that class."""
    by_guide: dict[str, list[int]] = {}
    pool: dict[str, list[int]] = {}
    train_label = dict(zip(train["image_id"], train["label"]))
    for j, r in enumerate(synth.itertuples()):
        guides = list(r.guide_ids) if r.guide_ids is not None else []
        g = guides[0] if len(guides) == 1 else None
        if g is not None and train_label.get(g) == r.label:
            by_guide.setdefault(g, []).append(j)
        else:
            pool.setdefault(r.label, []).append(j)
    return [np.array(by_guide.get(i, []) + pool.get(lab, []), dtype=np.int64)
            for i, lab in zip(train["image_id"], train["label"])]


def train_classifier_stage(
    split: pd.DataFrame,
    *,
    images: ImageSource,
    blobs: BlobStore,
    memo: Memo,
    training,
    classifier_cfg,
    seed: int,
    device: str = "auto",
    synth: pd.DataFrame | None = None,
    weights: pd.DataFrame | None = None,
    alpha: float = 0.0,
    fit_temperature: bool = False,
    name: str = "classifier",
) -> tuple[dict, StageStats]:
    """Train (or reuse) one classifier; returns a record with the model blob, T and history.
    ``training`` is a TrainingConfig; its recipe is applied here (``resolved()``; idempotent)."""
    t0 = time.perf_counter()
    if hasattr(training, "resolved"):
        training = training.resolved()
    stats = StageStats()
    train = split[split["role"] == "train"].sort_values(["label", "rank"]).reset_index(drop=True)
    val = split[split["role"] == "val"].sort_values(["label", "rank"]).reset_index(drop=True)
    classes = sorted(train["label"].unique())
    idx = label_index(classes)
    use_synth = synth is not None and len(synth) > 0 and alpha > 0
    syn_w = None
    if use_synth:
        synth = synth.reset_index(drop=True)
        if weights is not None and len(weights):
            wmap = dict(zip(weights["synthetic_id"], weights["weight"]))
            syn_w = np.array([float(wmap.get(s, 1.0)) for s in synth["synthetic_id"]])
        else:
            syn_w = np.ones(len(synth))
    from .episodes import encoder_fingerprint  # the shipped backbone's digest, so retrained weights retrain

    key = memo_key(name, CLASSIFIER_VERSION, model=encoder_fingerprint(classifier_cfg.source),
                   params={"training": classifier_key_params(training, classifier_cfg),
                           "freeze": freeze_for(training, classifier_cfg),
                           "alpha": alpha if use_synth else 0.0, "temperature": fit_temperature},
                   inputs={"train": list(zip(train["image_id"], train["label"])), "val": list(zip(val["image_id"], val["label"])),
                           "synth": list(zip(synth["synthetic_id"], synth["label"])) if use_synth else [],
                           "w": [round(float(x), 6) for x in syn_w] if use_synth else []},
                   seed=seed)
    rec = memo.get(key)
    if rec is not None and blobs.exists(rec["blob"]):
        stats.reused = 1
    else:
        import torch

        from .backbones import save_classifier
        from .loop import predict_logits, train_classifier

        size = training.image_size
        rx = to_tensor([images.real(i) for i in train["image_id"]], size)
        ry = torch.tensor([idx[l] for l in train["label"]])
        vx = to_tensor([images.real(i) for i in val["image_id"]], size) if len(val) else rx
        vy = torch.tensor([idx[l] for l in val["label"]]) if len(val) else ry
        kw: dict[str, Any] = {}
        if use_synth:
            kw = dict(synth_x=to_tensor([images.synthetic(b) for b in synth["blob"]], size),
                      synth_y=torch.tensor([idx[l] for l in synth["label"]]),
                      groups=synthetic_groups(train, synth), syn_weights=syn_w, alpha=alpha)
        if (freeze_for(training, classifier_cfg) and training.train_aug == "none" and training.synthetic_aug == "none"
                and training.cutmix_prob == 0 and training.mixup_alpha == 0 and classifier_cfg.pretrained
                and not classifier_cfg.source.startswith("tiny-cnn")):
            # linear probe of a fixed pretrained backbone: features from the store, shared by every classifier
            from .episodes import cached_features

            fk = dict(encoder=classifier_cfg.source, image_size=size, blobs=blobs, memo=memo, normalize=False)
            f_r, _ = cached_features(list(train["image_id"]), images.real, **fk)
            f_v = cached_features(list(val["image_id"]), images.real, **fk)[0] if len(val) else f_r
            f_s = None
            if use_synth:
                blob_of = dict(zip(synth["synthetic_id"], synth["blob"]))
                f_s, _ = cached_features(list(synth["synthetic_id"]), lambda i: images.synthetic(blob_of[i]), **fk)
            kw["features"] = (f_r, f_s, f_v)
        res = train_classifier(rx, ry, vx, vy, len(classes), training, classifier_cfg, seed=seed, device=device, **kw)
        T = 1.0
        nll_before = nll_after = None
        val_confusion = None
        if fit_temperature:
            from ..metrics import confusion_matrix
            from .temperature import fit_temperature as fit_t, nll

            logits = predict_logits(res.model, vx)
            val_confusion = json.dumps(np.asarray(confusion_matrix(logits.argmax(1), vy, len(classes))).tolist())
            T = float(fit_t(logits, vy))
            nll_before, nll_after = float(nll(logits, vy, 1.0)), float(nll(logits, vy, T))
        blob = blobs.put(save_classifier(res.model, {"classes": classes, "temperature": T, "backbone": classifier_cfg.source,
                                                    "image_size": size}), "pt")
        rec = {"blob": blob, "temperature": T, "best_epoch": int(res.best_epoch), "best_val_acc": float(res.best_val_acc),
               "history": res.history, "n_real_draws": int(res.n_real_draws), "n_syn_draws": int(res.n_syn_draws),
               "val_nll_before_T": nll_before, "val_nll_after_T": nll_after, "val_confusion": val_confusion,
               "optimizer": res.optimizer, "features_cached": bool(res.features_cached),
               "train_seconds": time.perf_counter() - t0}
        rec = memo.put(key, rec)
        stats.computed = 1
    out = {**rec, "classes": classes, "memo_key": key, "n_train": len(train), "n_val": len(val),
           "n_synthetic": int(len(synth)) if use_synth else 0, "alpha": alpha if use_synth else 0.0}
    out["history"] = json.dumps(rec["history"], default=float)
    stats.seconds = time.perf_counter() - t0
    return out, stats


# Loaded classifiers the process keeps, bounded by their tensors' bytes rather than by count: 16 ResNet-50s were
# 1.6 GB held to the end of a run (each metrics step loads its method's classifier once). 256 MiB keeps the
# classifiers read again and again (the real classifier, DIAGen's filter) next to the one in use.
CLASSIFIER_CACHE_BYTES = 256 * 2**20


def _classifier_bytes(entry) -> int:
    model = entry[0]
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


_CLASSIFIERS = LRUCache(maxsize=CLASSIFIER_CACHE_BYTES, getsizeof=_classifier_bytes)


@cached(_CLASSIFIERS, lock=threading.Lock())  # a classifier larger than the bound is loaded each time, not kept
def _load_classifier_cached(blob_path: str):
    from .backbones import load_classifier

    return load_classifier(Path(blob_path).read_bytes())


def load_classifier_blob(blobs: BlobStore, blob: str):
    model, meta = _load_classifier_cached(str(blobs.find(blob)))
    model.eval()
    return model, meta


def evaluate(model, meta, images: ImageSource, rows: pd.DataFrame, image_size: int,
             stored_features: dict[str, Any] | None = None) -> dict[str, Any]:
    """Top-1 accuracy, mean per-class accuracy (DA-Fusion/DIAGen's headline), per-class accuracy and confusion
    matrix of a classifier on rows (image_id, label).

    ``stored_features`` (``cached_features``' encoder/blobs/memo) for a linear probe trained on the store's
    features (its backbone is that frozen encoder, untouched): the rows' backbone features come from the store,
    shared by every classifier of the split, and only the head runs here."""
    import torch

    from ..metrics import accuracy, confusion_matrix, mean_per_class_accuracy, per_class_accuracy
    from .loop import predict_logits

    classes = meta["classes"]
    idx = label_index(classes)
    rows = rows[rows["label"].isin(classes)]
    if len(rows) == 0:
        return {"n": 0, "accuracy": float("nan"), "mean_per_class": float("nan"), "per_class": {},
                "confusion": np.zeros((len(classes), len(classes)), int)}
    y = torch.tensor([idx[l] for l in rows["label"]])
    with torch.no_grad():
        if stored_features is not None:
            from .episodes import cached_features

            f, _ = cached_features(list(rows["image_id"]), images.real, image_size=image_size, normalize=False,
                                   **stored_features)
            head = model.head
            logits = head(f.to(head.weight.device, head.weight.dtype)).float().cpu()
        else:
            from ..data.images import map_image_batches  # one chunk of decoded test images at a time

            logits = (map_image_batches(lambda x: predict_logits(model, x), list(rows["image_id"]), images.real, image_size)
                      if len(rows) else predict_logits(model, torch.zeros(0, 3, image_size, image_size)))
    preds = logits.argmax(1)
    pc = per_class_accuracy(preds, y, len(classes))
    return {"n": int(len(rows)), "accuracy": float(accuracy(preds, y)),
            "mean_per_class": float(mean_per_class_accuracy(preds, y, len(classes))),
            "per_class": {c: float(v) for c, v in zip(classes, pc)},
            "confusion": confusion_matrix(preds, y, len(classes))}


def weight_rule(q: np.ndarray, rule: str) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if rule == "paper":
        return q
    if rule == "code":
        return np.where(q >= 0.5, 1.0, 2.0 * q)
    if rule == "none":
        return np.ones_like(q)
    raise ValueError(f"unknown weighting rule {rule!r}: use none | paper | code")
