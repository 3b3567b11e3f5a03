"""GeNIe's episodic few-shot evaluation (METHODS §4), available to every method.

Frozen encoder (``tiny-pretrained`` by default), L2-normalised pooled features. Per episode (seeded; the same
episodes for every method of a split, so methods are compared on paired episodes):

* N classes drawn from the split's classes (N = ``n_way``, capped at the number of classes);
* queries: ``queries_per_class`` test-pool images per class, drawn without replacement;
* support: the split's K real shots of those classes, each encoded under GeNIe's weak transform
  (RRC(0.2–1) + HFlip) ``caching_epochs`` times, plus every augmented image whose label is in the episode once;
* scikit-learn ``LogisticRegression(C=1, lbfgs, max_iter=1000)`` (multinomial), accuracy on the queries.

Reported as mean ± 1.96·std/√episodes; ``episodes_digest`` identifies the episode list, so the report pairs
methods episode by episode only where the digests agree (a per-method episode config would break pairing). Features are cached in the store (memo + tensor blobs) per
(encoder, image set, views), so the test pool and the real support are encoded once per split and shared by
every method; the per-episode fits are the only per-method cost (a few ms each).

The support comes from the split (the synthetic images were made from its shots), so episodes sample only
classes and queries; GeNIe samples fresh supports per episode because it generates per episode.
"""
from __future__ import annotations

import hashlib
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.images import ImageSource, label_index, to_tensor
from ..store import BlobStore, Memo, memo_key

EPISODES_VERSION = "episodes-1"
FEATURES_VERSION = "feats-1"


@lru_cache(maxsize=4)
def encoder_fingerprint(source: str) -> str:
    """The encoder's identity for memo keys: the weights' digest for the shipped backbone, else the source."""
    from .classifier import PRETRAINED_BACKBONE, PRETRAINED_BACKBONE_FILE

    if source == PRETRAINED_BACKBONE and Path(PRETRAINED_BACKBONE_FILE).is_file():
        return f"{source}@{hashlib.sha256(Path(PRETRAINED_BACKBONE_FILE).read_bytes()).hexdigest()[:16]}"
    return source


@lru_cache(maxsize=4)
def load_encoder(source: str):
    from .classifier import build_classifier

    return build_classifier(source, 1, freeze_backbone=True).eval()


def cached_features(ids: list[str], load, *, encoder: str, image_size: int, blobs: BlobStore, memo: Memo,
                    views: int = 0, seed: int = 0, normalize: bool = True):
    """Features [len(ids)·max(1, views), D] (L2-normalised rows when ``normalize``) of the images ``load(id)``
    (PIL) under the frozen ``encoder``, cached in the store. ``views`` = 0: the plain image; > 0: that many
    weak-transform views per image (view-major order)."""
    import torch

    from ..store.tensors import tensor_bytes, tensor_from_bytes
    from .classifier import build_train_transform, extract_features

    key = memo_key("features", FEATURES_VERSION, model=encoder_fingerprint(encoder),
                   params={"image_size": image_size, "views": views, "normalize": normalize}, inputs=list(ids),
                   seed=seed if views else None)
    rec = memo.get(key)
    if rec is not None and blobs.exists(rec["blob"]):
        return tensor_from_bytes(blobs.get(rec["blob"])), True
    model = load_encoder(encoder)
    if not ids:
        return torch.zeros(0, model.head.in_features), False
    x = to_tensor([load(i) for i in ids], image_size)
    if views:
        aug = build_train_transform("weak", tuple(x.shape[-2:]))
        outs = []
        with torch.random.fork_rng(), torch.no_grad():
            for v in range(views):
                torch.manual_seed(int(seed) * 1000 + v)
                outs.append(extract_features(model, aug(x).reshape(x.shape).clamp(0, 1), normalize=normalize))
        f = torch.cat(outs)
    else:
        f = extract_features(model, x, normalize=normalize)
    memo.put(key, {"blob": blobs.put(tensor_bytes(f.contiguous()), "safetensors"), "shape": list(f.shape)})
    return f, False


def sample_episodes(test_labels: np.ndarray, num_classes: int, n_way: int, queries: int, episodes: int, seed: int):
    """[(class indices [N], query row indices)] — seeded, method-independent."""
    rng = np.random.default_rng(seed)
    n_way = min(n_way, num_classes)
    by_class = {c: np.nonzero(test_labels == c)[0] for c in range(num_classes)}
    eligible = [c for c in range(num_classes) if len(by_class[c])]
    if len(eligible) < 2:
        raise ValueError("training.evaluation few_shot_episodes needs test images of at least 2 of the split's "
                         "classes (the dataset's test pool); drop few_shot_episodes or add test images")
    n_way = min(n_way, len(eligible))
    out = []
    for _ in range(episodes):
        cls = np.sort(rng.choice(eligible, n_way, replace=False))
        q = np.concatenate([rng.choice(by_class[c], min(queries, len(by_class[c])), replace=False) for c in cls])
        out.append((cls, q))
    return out


def episodes_digest(episodes) -> str:
    """A short digest of an episode list (classes and query rows, in order): equal digests = the same episodes,
    which is what makes two methods' per-episode accuracies pairable."""
    h = hashlib.sha256()
    for cls, q in episodes:
        h.update(np.asarray(cls, np.int64).tobytes() + b"|" + np.asarray(q, np.int64).tobytes() + b";")
    return h.hexdigest()[:16]


def split_episodes(split: pd.DataFrame, ecfg, split_seed: int):
    """(classes, train rows, test rows, test label indices, episodes) of one split: the episodes depend only on
    the split's train classes and test pool and on the episode config (n_way, queries_per_class, episodes, seed) —
    never on the method or its synthetic set, so every method of a split meets the same episodes."""
    train = split[split["role"] == "train"].sort_values(["label", "rank"]).reset_index(drop=True)
    test = split[split["role"] == "test"].sort_values(["label", "image_id"]).reset_index(drop=True)
    classes = sorted(train["label"].unique())
    idx = label_index(classes)
    test = test[test["label"].isin(classes)].reset_index(drop=True)
    ty = np.array([idx[l] for l in test["label"]])
    seed = int(ecfg.seed) * 1000 + int(split_seed)
    eps = sample_episodes(ty, len(classes), ecfg.n_way, ecfg.queries_per_class, ecfg.episodes, seed)
    return classes, train, test, ty, eps


def run_episodes(support_f, support_y, test_f, test_y, episodes) -> np.ndarray:
    """Accuracy per episode of LogisticRegression(C=1, lbfgs, max_iter=1000) fit on the episode's support."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    sf, sy = np.asarray(support_f, np.float64), np.asarray(support_y)
    tf, ty = np.asarray(test_f, np.float64), np.asarray(test_y)
    accs = np.zeros(len(episodes))
    for e, (cls, q) in enumerate(episodes):
        m = np.isin(sy, cls)
        if len(np.unique(sy[m])) < 2:
            accs[e] = float(np.mean(ty[q] == (sy[m][0] if m.any() else -1)))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000).fit(sf[m], sy[m])
        accs[e] = float((clf.predict(tf[q]) == ty[q]).mean())
    return accs


def episodic_eval(split: pd.DataFrame, synth: pd.DataFrame | None, *, images: ImageSource, blobs: BlobStore,
                  memo: Memo, ecfg, image_size: int, split_seed: int) -> dict:
    """Run (or reuse) the episodes of one method on one split -> {mean, ci95, std, episodes, accs, ...}."""
    from ..metrics import episode_ci

    t0 = time.perf_counter()
    classes, train, test, ty, eps = split_episodes(split, ecfg, split_seed)
    digest = episodes_digest(eps)
    idx = label_index(classes)
    syn = synth[synth["label"].isin(classes)].reset_index(drop=True) if synth is not None and len(synth) else None
    seed = int(ecfg.seed) * 1000 + int(split_seed)
    key = memo_key("episodes", EPISODES_VERSION, model=encoder_fingerprint(ecfg.encoder),
                   params={"episodes": ecfg.model_dump(mode="json"), "image_size": image_size},
                   inputs={"train": list(zip(train["image_id"], train["label"])),
                           "test": list(zip(test["image_id"], test["label"])),
                           "synth": sorted(syn["synthetic_id"]) if syn is not None else []}, seed=seed)
    rec = memo.get(key)
    if rec is not None:
        return {**rec, "episodes_digest": digest, "reused": True}
    kw = dict(encoder=ecfg.encoder, image_size=image_size, blobs=blobs, memo=memo)
    tf, _ = cached_features(list(test["image_id"]), images.real, **kw)
    rf, _ = cached_features(list(train["image_id"]), images.real, views=ecfg.caching_epochs, seed=seed, **kw)
    ry = np.tile(np.array([idx[l] for l in train["label"]]), ecfg.caching_epochs)
    sf_list, sy_list = [rf.numpy()], [ry]
    if syn is not None and len(syn):
        blob_of = dict(zip(syn["synthetic_id"], syn["blob"]))
        ids = sorted(syn["synthetic_id"])
        sfe, _ = cached_features(ids, lambda i: images.synthetic(blob_of[i]), **kw)
        lab = dict(zip(syn["synthetic_id"], syn["label"]))
        sf_list.append(sfe.numpy())
        sy_list.append(np.array([idx[lab[i]] for i in ids]))
    accs = run_episodes(np.concatenate(sf_list), np.concatenate(sy_list), tf.numpy(), ty, eps)
    mean, ci = episode_ci(accs)
    rec = {"mean": mean, "ci95": ci, "std": float(np.std(accs)), "episodes": len(accs),
           "n_way": int(len(eps[0][0])), "shots": int(train.groupby("label").size().min()),
           "n_augmented": int(len(syn)) if syn is not None else 0, "accs": [round(float(a), 6) for a in accs],
           "encoder": ecfg.encoder, "seconds": time.perf_counter() - t0}
    rec = memo.put(key, rec)
    return {**rec, "episodes_digest": digest, "reused": False}
