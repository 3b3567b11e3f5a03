"""GeNIe's episodic few-shot evaluation (METHODS §4), available to every method.

Frozen encoder (``tiny-pretrained`` by default), L2-normalised pooled features. Per episode (seeded; the same
episodes for every method of a split, so methods are compared on paired episodes):

* N classes drawn from the evaluation classes (``episodes.classes``, default every class of the split;
  N = ``n_way``, capped at the number of eligible classes);
* ``support: episode`` (the paper's protocol): a fresh support of K images per class (K = the split's shots)
  and ``queries_per_class`` queries, disjoint, both drawn from the evaluation classes' test-pool images; every
  method generates its synthetic images *from that episode's support* (``synthetic/<m>`` rows with
  ``episode = e``), ``augmented_per_class`` of them per class for every method of the comparison
  (default (N−1)·K, GeNIe's count);
* ``support: split`` (a cheaper variant): the support is the split's K real shots, the synthetic images are the
  split's (``episode = -1``), and episodes sample only classes and queries;
* support features: each real support image under GeNIe's weak transform (RRC(0.2–1) + HFlip)
  ``caching_epochs`` times, plus every augmented image of the episode's classes once;
* scikit-learn ``LogisticRegression(C=1, lbfgs, max_iter=1000)`` (multinomial), accuracy on the queries.

Reported as mean ± 1.96·std/√episodes; ``episodes_digest`` identifies the episode list (classes, queries and
supports), so the report pairs methods episode by episode only where the digests agree. Features are cached in
the store (memo + tensor blobs) per (encoder, image set, views), so the test pool and the real supports are
encoded once per split and shared by every method; the per-episode fits are the only per-method cost.
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

EPISODES_VERSION = "episodes-1"  # support: split (unchanged)
EPISODE_SUPPORT_VERSION = "episodes-support-1"  # support: episode
FEATURES_VERSION = "feats-1"


@lru_cache(maxsize=4)
def encoder_fingerprint(source: str) -> str:
    """The encoder's identity for memo keys: the weights' digest for the shipped backbone, else the source."""
    from .backbones import PRETRAINED_BACKBONE, PRETRAINED_BACKBONE_FILE

    if source == PRETRAINED_BACKBONE and Path(PRETRAINED_BACKBONE_FILE).is_file():
        return f"{source}@{hashlib.sha256(Path(PRETRAINED_BACKBONE_FILE).read_bytes()).hexdigest()[:16]}"
    return source


@lru_cache(maxsize=4)
def load_encoder(source: str):
    from .backbones import build_classifier

    return build_classifier(source, 1, freeze_backbone=True).eval()


def cached_features(ids: list[str], load, *, encoder: str, image_size: int, blobs: BlobStore, memo: Memo,
                    views: int = 0, seed: int = 0, normalize: bool = True):
    """Features [len(ids)·max(1, views), D] (L2-normalised rows when ``normalize``) of the images ``load(id)``
    (PIL) under the frozen ``encoder``, cached in the store. ``views`` = 0: the plain image; > 0: that many
    weak-transform views per image (view-major order)."""
    import torch

    from ..store.tensors import tensor_bytes, tensor_from_bytes
    from .loop import build_train_transform, extract_features

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


def sample_episodes(test_labels: np.ndarray, num_classes: int, n_way: int, queries: int, episodes: int, seed: int,
                    *, shots: int = 0, classes: list[int] | None = None):
    """Seeded, method-independent episodes over a pool of images labelled ``test_labels`` (class indices).

    ``shots`` = 0 (``support: split``): [(class indices [N], query rows)]. ``shots`` = K > 0 (``support:
    episode``): [(class indices [N], query rows, support rows [N·K, class-major])], support and queries disjoint
    (queries = min(Q, images of the class − K)). ``classes``: the evaluation classes (default: all)."""
    rng = np.random.default_rng(seed)
    pool = range(num_classes) if classes is None else sorted(int(c) for c in classes)
    by_class = {c: np.nonzero(test_labels == c)[0] for c in pool}
    eligible = [c for c in pool if len(by_class[c]) > shots]
    if len(eligible) < 2:
        need = f"at least {shots + 1} test images in each of" if shots else "test images of"
        raise ValueError(f"training.evaluation few_shot_episodes needs {need} at least 2 evaluation classes (the "
                         "dataset's test pool); drop few_shot_episodes, lower the shots, or add test images")
    n_way = min(n_way, len(eligible))
    out = []
    for _ in range(episodes):
        cls = np.sort(rng.choice(eligible, n_way, replace=False))
        if not shots:
            q = np.concatenate([rng.choice(by_class[c], min(queries, len(by_class[c])), replace=False) for c in cls])
            out.append((cls, q))
            continue
        draws = [rng.choice(by_class[c], shots + min(queries, len(by_class[c]) - shots), replace=False) for c in cls]
        out.append((cls, np.concatenate([d[shots:] for d in draws]), np.concatenate([d[:shots] for d in draws])))
    return out


def episodes_digest(episodes) -> str:
    """A short digest of an episode list (classes, query rows and, under ``support: episode``, support rows, in
    order): equal digests = the same episodes, which is what makes two methods' per-episode accuracies pairable."""
    h = hashlib.sha256()
    for ep in episodes:
        h.update(b"|".join(np.asarray(x, np.int64).tobytes() for x in ep) + b";")
    return h.hexdigest()[:16]


def evaluation_classes(classes: list[str], ecfg) -> list[str]:
    """The classes episodes draw from: ``episodes.classes`` (each must be a class of the split), default all."""
    if not getattr(ecfg, "classes", None):
        return list(classes)
    missing = sorted(set(ecfg.classes) - set(classes))
    if missing:
        raise ValueError(f"training.episodes.classes: {missing} are not classes of the split {sorted(classes)}; "
                         "list only classes the dataset has")
    return sorted(ecfg.classes)


def split_episodes(split: pd.DataFrame, ecfg, split_seed: int):
    """(classes, train rows, test rows, test label indices, episodes) of one split: the episodes depend only on
    the split's train classes, shots and test pool and on the episode config (support, n_way, queries_per_class,
    episodes, classes, seed) — never on the method or its synthetic set, so every method of a split meets the
    same episodes. Under ``support: episode`` each episode carries its support rows (rows of ``test``)."""
    train = split[split["role"] == "train"].sort_values(["label", "rank"]).reset_index(drop=True)
    test = split[split["role"] == "test"].sort_values(["label", "image_id"]).reset_index(drop=True)
    classes = sorted(train["label"].unique())
    idx = label_index(classes)
    test = test[test["label"].isin(classes)].reset_index(drop=True)
    ty = np.array([idx[l] for l in test["label"]])
    seed = int(ecfg.seed) * 1000 + int(split_seed)
    shots = int(train.groupby("label").size().min()) if getattr(ecfg, "support", "split") == "episode" else 0
    eval_idx = [idx[c] for c in evaluation_classes(classes, ecfg)] if getattr(ecfg, "classes", None) else None
    eps = sample_episodes(ty, len(classes), ecfg.n_way, ecfg.queries_per_class, ecfg.episodes, seed, shots=shots,
                          classes=eval_idx)
    return classes, train, test, ty, eps


def augmented_per_class(ecfg, shots: int, n_way: int | None = None) -> int:
    """Augmented images per class in every episode (``support: episode``): ``augmented_per_class``, default
    (N−1)·K — GeNIe's count (every other class's support image is a source once)."""
    if ecfg.augmented_per_class is not None:
        return int(ecfg.augmented_per_class)
    return (int(n_way if n_way is not None else ecfg.n_way) - 1) * int(shots)


def episode_splits(split: pd.DataFrame, ecfg, split_seed: int) -> list[tuple[int, pd.DataFrame]]:
    """(episode index, the episode's support as a split manifest: its N·K support images as role ``train``,
    ranked as drawn) for every episode of ``support: episode`` — what a method plans its synthetic images from."""
    classes, train, test, ty, eps = split_episodes(split, ecfg, split_seed)
    out = []
    for e, (_, _, s) in enumerate(eps):
        sup = test.iloc[s].copy()
        sup["role"] = "train"
        sup["rank"] = sup.groupby("label").cumcount()
        out.append((e, sup.reset_index(drop=True)))
    return out


def split_level(synth: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of a synthetic manifest made from the split's shots (``episode`` = -1 or no column): what the
    classifier, the confidence weights, the set metrics and the checks use."""
    if synth is None or "episode" not in synth.columns:
        return synth
    return synth[synth["episode"] < 0].reset_index(drop=True)


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


def episode_config_identity(ecfg) -> dict:
    """The episode config as it enters memo keys: the keys added with ``support: episode`` only when set, so a
    ``support: split`` run keeps the memo keys it had before they existed."""
    d = ecfg.model_dump(mode="json")
    for k, default in (("support", "split"), ("augmented_per_class", None), ("classes", None)):
        if d.get(k, default) == default:
            d.pop(k, None)
    return d


def protocol_text(ecfg, shots: int | None = None) -> str:
    """One line naming the episodic protocol (the report prints it above each episodic table)."""
    cls = f" from {len(ecfg.classes)} evaluation classes" if getattr(ecfg, "classes", None) else ""
    k = f"{shots}-shot" if shots else "K-shot"
    if getattr(ecfg, "support", "split") == "episode":
        a = (f"{ecfg.augmented_per_class}" if ecfg.augmented_per_class is not None
             else f"{augmented_per_class(ecfg, shots)}" if shots else "(N−1)·K")
        return (f"fresh support per episode: {ecfg.n_way}-way {k}{cls}, {ecfg.queries_per_class} queries per class "
                f"(disjoint, test pool), {a} augmented images per class generated from the episode's support by "
                f"every method, {ecfg.episodes} episodes")
    return (f"split support: {ecfg.n_way}-way{cls} episodes over the split's fixed {k} support (+ the method's "
            f"synthetic images of those classes), {ecfg.queries_per_class} queries per class, {ecfg.episodes} episodes")


def _fit(sf, sy, qf, qy) -> float:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(sy)) < 2:
        return float(np.mean(qy == (sy[0] if len(sy) else -1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000).fit(sf, sy)
    return float((clf.predict(qf) == qy).mean())


def _episode_support_eval(split, synth, *, images, blobs, memo, ecfg, image_size, split_seed) -> dict:
    """``support: episode``: per episode, the fresh support (weak views) + the method's images of that episode."""
    from ..metrics import episode_ci

    t0 = time.perf_counter()
    classes, train, test, ty, eps = split_episodes(split, ecfg, split_seed)
    digest = episodes_digest(eps)
    idx = label_index(classes)
    shots = int(train.groupby("label").size().min())
    syn = None
    if synth is not None and len(synth) and "episode" in synth.columns:
        syn = synth[(synth["episode"] >= 0) & synth["label"].isin(classes)].reset_index(drop=True)
    seed = int(ecfg.seed) * 1000 + int(split_seed)
    key = memo_key("episodes", EPISODE_SUPPORT_VERSION, model=encoder_fingerprint(ecfg.encoder),
                   params={"episodes": episode_config_identity(ecfg), "image_size": image_size, "shots": shots},
                   inputs={"test": list(zip(test["image_id"], test["label"])),
                           "synth": sorted((int(e), str(i)) for e, i in zip(syn["episode"], syn["synthetic_id"]))
                           if syn is not None else []},
                   seed=seed)
    rec = memo.get(key)
    if rec is not None:
        return {**rec, "episodes_digest": digest, "reused": True}
    kw = dict(encoder=ecfg.encoder, image_size=image_size, blobs=blobs, memo=memo)
    t_feat = time.perf_counter()
    tf, _ = cached_features(list(test["image_id"]), images.real, **kw)
    sup_rows = sorted({int(r) for _, _, s in eps for r in s})
    sf, _ = cached_features([test["image_id"][r] for r in sup_rows], images.real, views=ecfg.caching_epochs,
                            seed=seed, **kw)
    sf = sf.numpy().reshape(ecfg.caching_epochs, len(sup_rows), -1)
    pos = {r: i for i, r in enumerate(sup_rows)}
    by_ep: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if syn is not None and len(syn):
        ids = sorted(set(syn["synthetic_id"]))
        blob_of = dict(zip(syn["synthetic_id"], syn["blob"]))
        fe, _ = cached_features(ids, lambda i: images.synthetic(blob_of[i]), **kw)
        row_of = {i: n for n, i in enumerate(ids)}
        fe = fe.numpy()
        for e, grp in syn.groupby("episode"):
            by_ep[int(e)] = (fe[[row_of[i] for i in grp["synthetic_id"]]], np.array([idx[l] for l in grp["label"]]))
    t_feat = time.perf_counter() - t_feat
    tf = np.asarray(tf.numpy(), np.float64)
    accs, per_class = np.zeros(len(eps)), []
    for e, (cls, q, s) in enumerate(eps):
        cols = [pos[int(r)] for r in s]
        xs = [sf[:, cols].reshape(-1, sf.shape[-1])]
        ys = [np.tile(ty[s], ecfg.caching_epochs)]
        if e in by_ep:
            f, y = by_ep[e]
            keep = np.isin(y, cls)
            xs.append(f[keep])
            ys.append(y[keep])
        aug = ys[1] if len(ys) > 1 else np.zeros(0, int)
        per_class.append([int((aug == c).sum()) for c in cls])
        accs[e] = _fit(np.concatenate(xs).astype(np.float64), np.concatenate(ys), tf[q], ty[q])
    mean, ci = episode_ci(accs)
    counts = sorted({c for pc in per_class for c in pc})
    rec = {"mean": mean, "ci95": ci, "std": float(np.std(accs)), "episodes": len(accs),
           "n_way": int(len(eps[0][0])), "shots": shots, "support": "episode",
           "n_augmented": int(sum(map(sum, per_class))), "augmented_per_class": counts,
           "accs": [round(float(a), 6) for a in accs], "encoder": ecfg.encoder,
           "protocol": protocol_text(ecfg, shots), "seconds": time.perf_counter() - t0,
           "feature_seconds": t_feat}
    rec = memo.put(key, rec)
    return {**rec, "episodes_digest": digest, "reused": False}


def episodic_eval(split: pd.DataFrame, synth: pd.DataFrame | None, *, images: ImageSource, blobs: BlobStore,
                  memo: Memo, ecfg, image_size: int, split_seed: int) -> dict:
    """Run (or reuse) the episodes of one method on one split -> {mean, ci95, std, episodes, accs, ...}."""
    from ..metrics import episode_ci

    if getattr(ecfg, "support", "split") == "episode":
        return _episode_support_eval(split, synth, images=images, blobs=blobs, memo=memo, ecfg=ecfg,
                                     image_size=image_size, split_seed=split_seed)
    t0 = time.perf_counter()
    synth = split_level(synth)
    classes, train, test, ty, eps = split_episodes(split, ecfg, split_seed)
    digest = episodes_digest(eps)
    idx = label_index(classes)
    syn = synth[synth["label"].isin(classes)].reset_index(drop=True) if synth is not None and len(synth) else None
    seed = int(ecfg.seed) * 1000 + int(split_seed)
    key = memo_key("episodes", EPISODES_VERSION, model=encoder_fingerprint(ecfg.encoder),
                   params={"episodes": episode_config_identity(ecfg), "image_size": image_size},
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
    rec = {**rec, "support": "split", "protocol": protocol_text(ecfg, rec["shots"])}
    return {**rec, "episodes_digest": digest, "reused": False}
