"""Stage-level work with the unit memo, shared by the assets (no Dagster).

Each function takes manifests (DataFrames) and the store, does only the units that are not in the
memo, and returns manifest rows + counts. Torch is imported inside functions.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..data.imagefolder import decode_image
from ..store import BlobStore, Memo, memo_key
from .base import concept_token

CONCEPT_VERSION = "ti-1"
CLASSIFIER_VERSION = "clf-1"
WEIGHTS_VERSION = "w-1"


@dataclass
class StageStats:
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- tensors & images
def tensor_bytes(t) -> bytes:
    from safetensors.torch import save

    return save({"tensor": t.detach().cpu().contiguous()})


def tensor_from_bytes(b: bytes):
    from safetensors.torch import load

    return load(b)["tensor"]


def tensor_dict_bytes(d: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in d.items()})


def tensor_dict_from_bytes(b: bytes) -> dict:
    from safetensors.torch import load

    return load(b)


class ImageSource:
    """Resolves image ids to PIL images: real ones from the dataset tree, synthetic ones from blobs."""

    def __init__(self, dataset_root: str | Path, images: pd.DataFrame, blobs: BlobStore, max_pixels: int = 40_000_000):
        self.root = Path(dataset_root)
        self.paths = dict(zip(images["image_id"], images["path"]))
        self.blobs = blobs
        self.max_pixels = max_pixels
        self._cache: dict[str, Any] = {}

    def real(self, image_id: str):
        if image_id not in self._cache:
            if image_id not in self.paths:
                raise KeyError(f"real image {image_id} is not in the raw_images manifest; rematerialize raw_images")
            p = self.root / self.paths[image_id]
            self._cache[image_id] = decode_image(p.read_bytes(), str(p), self.max_pixels)
        return self._cache[image_id]

    def synthetic(self, blob: str):
        return decode_image(self.blobs.get(blob), f"blob {blob}")

    def tensor(self, blob: str):
        return tensor_from_bytes(self.blobs.get(blob))


def to_tensor(images: list, size: int):
    """PIL images -> float tensor [N,3,size,size] in [0,1] (bilinear resize)."""
    import torch
    from PIL import Image

    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def label_index(class_names: list[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(class_names)}


# ---------------------------------------------------------------- concepts (textual inversion)
def learn_concepts(
    split: pd.DataFrame,
    *,
    images: ImageSource,
    blobs: BlobStore,
    memo: Memo,
    model_fp: str,
    bundle_factory: Callable[[], Any],
    steps: int,
    lr: float,
    batch_size: int,
    init_word: str,
    seed: int,
    checkpoint_dir: Path,
    checkpoint_every: int = 50,
    progress: bool = False,
) -> tuple[list[dict], StageStats]:
    """One textual-inversion token per class; a class whose train images did not change is reused."""
    t0 = time.perf_counter()
    stats = StageStats()
    train = split[split["role"] == "train"]
    rows = []
    for label, grp in sorted(train.groupby("label"), key=lambda kv: kv[0]):
        ids = sorted(grp["image_id"])
        token = concept_token(label)
        params = {"steps": steps, "lr": lr, "batch_size": batch_size, "init_word": init_word, "token": token}
        key = memo_key("concept_embeddings", CONCEPT_VERSION, model=model_fp, params=params, inputs=ids, seed=seed)
        rec = memo.get(key)
        if rec is None or not blobs.exists(rec["blob"]):
            from .concepts import learn_concept

            res = learn_concept(bundle_factory(), [images.real(i) for i in ids], token=token, init_word=init_word,
                                steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                checkpoint_path=checkpoint_dir / f"{key}.pt", checkpoint_every=checkpoint_every,
                                progress=progress)
            digest = blobs.put(tensor_bytes(res.vector), "safetensors")
            losses = [float(x) for x in res.losses]
            k = max(1, len(losses) // 10)
            rec = {"blob": digest, "first_loss": float(np.mean(losses[:k])), "last_loss": float(np.mean(losses[-k:])),
                   "steps": int(res.steps_done), "resumed_from": int(getattr(res, "resumed_from", 0)),
                   "vector_norm": float(res.vector.norm()), "moved": float((res.vector - res.init_vector).norm())}
            rec = memo.put(key, rec)
            ck = checkpoint_dir / f"{key}.pt"
            if ck.exists():
                ck.unlink()
            stats.computed += 1
            reused = False
        else:
            stats.reused += 1
            reused = True
        rows.append({"label": label, "token": token, "variant": "base", "embedding_id": rec["blob"],
                     "first_loss": rec["first_loss"], "last_loss": rec["last_loss"], "steps": rec["steps"],
                     "vector_norm": rec.get("vector_norm"), "moved": rec.get("moved"),
                     "train_image_ids": ids, "model_fingerprint": model_fp, "memo_key": key, "reused": reused})
    stats.seconds = time.perf_counter() - t0
    return rows, stats


# ---------------------------------------------------------------- classifiers
def _train_cfg(training, classifier_cfg, seed: int, device: str):
    from ..training.classifier import TrainConfig

    return TrainConfig(
        backbone=classifier_cfg.source, freeze_backbone=classifier_cfg.freeze_backbone, epochs=training.epochs,
        steps_per_epoch=training.steps_per_epoch, batch_size=training.batch_size, lr=training.lr,
        weight_decay=training.weight_decay, label_smoothing=training.label_smoothing, train_aug=training.train_aug,
        cutmix_prob=training.cutmix_prob, mixup_alpha=training.mixup_alpha, seed=seed, device=device,
    )


def synthetic_groups(train: pd.DataFrame, synth: pd.DataFrame) -> list[np.ndarray]:
    """For each real train image n: the synthetic rows that belong to it (Eq. 2's m index).

    A synthetic image belongs to real image n when n is its guide and they share the label
    (DA-Fusion/DIAGen/real-guidance). Synthetics with no same-class guide (txt2img, GeNIe's hard
    negatives) form a per-class pool shared by every real image of that class."""
    by_guide: dict[str, list[int]] = {}
    pool: dict[str, list[int]] = {}
    train_label = dict(zip(train["image_id"], train["label"]))
    for j, r in enumerate(synth.itertuples()):
        guides = list(r.guide_ids) if r.guide_ids is not None else []
        g = guides[0] if guides else None
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
    """Train (or reuse) one classifier; returns a record with the model blob, T and history."""
    t0 = time.perf_counter()
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
    key = memo_key(name, CLASSIFIER_VERSION, model=classifier_cfg.source,
                   params={"training": training.model_dump(mode="json"), "freeze": classifier_cfg.freeze_backbone,
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

        from ..training.classifier import predict_logits, save_classifier, train_classifier

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
        cfg = _train_cfg(training, classifier_cfg, seed, device)
        res = train_classifier(rx, ry, vx, vy, len(classes), cfg, **kw)
        T = 1.0
        nll_before = nll_after = None
        val_confusion = None
        if fit_temperature:
            from ..metrics import confusion_matrix
            from ..training.temperature import fit_temperature as fit_t, nll

            logits = predict_logits(res.model, vx)
            val_confusion = json.dumps(np.asarray(confusion_matrix(logits.argmax(1), vy, len(classes))).tolist())
            T = float(fit_t(logits, vy))
            nll_before, nll_after = float(nll(logits, vy, 1.0)), float(nll(logits, vy, T))
        blob = blobs.put(save_classifier(res.model, {"classes": classes, "temperature": T, "backbone": classifier_cfg.source,
                                                    "image_size": size}), "pt")
        rec = {"blob": blob, "temperature": T, "best_epoch": int(res.best_epoch), "best_val_acc": float(res.best_val_acc),
               "history": res.history, "n_real_draws": int(res.n_real_draws), "n_syn_draws": int(res.n_syn_draws),
               "val_nll_before_T": nll_before, "val_nll_after_T": nll_after, "val_confusion": val_confusion,
               "train_seconds": time.perf_counter() - t0}
        rec = memo.put(key, rec)
        stats.computed = 1
    out = {**rec, "classes": classes, "memo_key": key, "n_train": len(train), "n_val": len(val),
           "n_synthetic": int(len(synth)) if use_synth else 0, "alpha": alpha if use_synth else 0.0}
    out["history"] = json.dumps(rec["history"], default=float)
    stats.seconds = time.perf_counter() - t0
    return out, stats


@lru_cache(maxsize=16)
def _load_classifier_cached(blob_path: str):
    from ..training.classifier import load_classifier

    return load_classifier(Path(blob_path).read_bytes())


def load_classifier_blob(blobs: BlobStore, blob: str):
    model, meta = _load_classifier_cached(str(blobs.find(blob)))
    model.eval()
    return model, meta


def evaluate(model, meta, images: ImageSource, rows: pd.DataFrame, image_size: int) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of a classifier on rows (image_id, label)."""
    import torch

    from ..metrics import accuracy, confusion_matrix, per_class_accuracy
    from ..training.classifier import predict_logits

    classes = meta["classes"]
    idx = label_index(classes)
    rows = rows[rows["label"].isin(classes)]
    if len(rows) == 0:
        return {"n": 0, "accuracy": float("nan"), "per_class": {}, "confusion": np.zeros((len(classes), len(classes)), int)}
    x = to_tensor([images.real(i) for i in rows["image_id"]], image_size)
    y = torch.tensor([idx[l] for l in rows["label"]])
    with torch.no_grad():
        logits = predict_logits(model, x)
    preds = logits.argmax(1)
    pc = per_class_accuracy(preds, y, len(classes))
    return {"n": int(len(rows)), "accuracy": float(accuracy(preds, y)),
            "per_class": {c: float(v) for c, v in zip(classes, pc)},
            "confusion": confusion_matrix(preds, y, len(classes))}


def confidence_weights(
    synth: pd.DataFrame, *, images: ImageSource, blobs: BlobStore, classifier_rec: dict, image_size: int,
    views: int, rule: str, seed: int,
) -> pd.DataFrame:
    """DIAGen weighting: q = mean over ``views`` augmented views of softmax(z/T)[label];
    w = q (rule 'paper') or 1 if q >= .5 else 2q (rule 'code'); rule 'none' gives uniform weights."""
    out = pd.DataFrame({"synthetic_id": synth["synthetic_id"].values, "label": synth["label"].values})
    if rule == "none" or len(synth) == 0:
        out["q"] = np.nan
        out["weight"] = 1.0
        out["rule"] = "none"
        return out
    import torch

    from ..methods.standard_aug import augment_images
    from ..training.classifier import predict_logits

    model, meta = load_classifier_blob(blobs, classifier_rec["blob"])
    T = float(meta.get("temperature", 1.0))
    idx = label_index(meta["classes"])
    x = to_tensor([images.synthetic(b) for b in synth["blob"]], image_size)
    y = torch.tensor([idx[l] for l in synth["label"]])
    qs = []
    with torch.no_grad():
        for v in range(views):
            xv = augment_images(x, "weak", seed=seed * 1000 + v) if views > 1 else x
            p = torch.softmax(predict_logits(model, xv) / T, dim=1)
            qs.append(p[torch.arange(len(y)), y])
    q = torch.stack(qs).mean(0).numpy()
    out["q"] = q
    out["weight"] = weight_rule(q, rule)
    out["rule"] = rule
    return out


def weight_rule(q: np.ndarray, rule: str) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if rule == "paper":
        return q
    if rule == "code":
        return np.where(q >= 0.5, 1.0, 2.0 * q)
    if rule == "none":
        return np.ones_like(q)
    raise ValueError(f"unknown weighting rule {rule!r}: use none | paper | code")


# ---------------------------------------------------------------- DIAGen embedding noise
def noisy_vector(base, sigma: float, noise_seed: int):
    """S* + σ·ε with ε ~ N(0, I) drawn from ``noise_seed`` (float32). Shared by the fixed draws below and by
    DIAGen's ``resample_per_image`` option, where the runner applies it per unit."""
    import torch

    g = torch.Generator().manual_seed(int(noise_seed))
    eps = torch.randn(base.shape, generator=g, dtype=torch.float32)
    return base.float() + float(sigma) * eps


def noise_variants(base_rows: list[dict], *, blobs: BlobStore, sigmas: list[float], seed: int) -> list[dict]:
    """DIAGen (METHODS §2a): S_v = S* + σ·ε, ε ~ N(0, I), one fixed draw per σ per class, stored as extra
    concept vectors (tokens ``<cls_σ>``). Deterministic in (seed, class, σ)."""
    from ..util import stable_int

    out = []
    for r in base_rows:
        base = tensor_from_bytes(blobs.get(r["embedding_id"]))
        for sigma in sigmas:
            v = noisy_vector(base, sigma, stable_int("diagen-noise", seed, r["label"], float(sigma), 0))
            digest = blobs.put(tensor_bytes(v), "safetensors")
            out.append({**r, "variant": "noise", "token": f"{r['token'][:-1]}_{sigma}>", "embedding_id": digest,
                        "sigma": float(sigma), "draw": 0, "base_embedding_id": r["embedding_id"],
                        "noise_norm": float((v - base.float()).norm()), "reused": r["reused"]})
    return out


# ---------------------------------------------------------------- services for post-filters
class FilterServices:
    """What a method's post_filter may use: images, classifier features, CLIP zero-shot."""

    def __init__(self, images: ImageSource, blobs: BlobStore, image_size: int, clip_factory: Callable[[], Any] | None = None):
        self.images, self.blobs, self.image_size, self.clip_factory = images, blobs, image_size, clip_factory

    def real_image(self, image_id: str):
        return self.images.real(image_id)

    def synthetic_image(self, blob: str):
        return self.images.synthetic(blob)

    def classifier_features(self, classifier_blob: str, pil_images: list) -> np.ndarray:
        """L2-normalised penultimate features of a stored classifier."""
        import torch

        from ..training.classifier import extract_features

        model, _ = load_classifier_blob(self.blobs, classifier_blob)
        with torch.no_grad():
            f = extract_features(model, to_tensor(pil_images, self.image_size))
        f = torch.nn.functional.normalize(f.float(), dim=1)
        return f.numpy()

    def clip_zero_shot(self, pil_images: list, class_names: list[str], template: str = "a photo of a {}") -> np.ndarray:
        """Softmax over class prompts of CLIP image-text similarity, [N, C]."""
        from ..models.clip_ops import zero_shot_probs

        return zero_shot_probs(self.clip_factory(), pil_images, [template.format(c) for c in class_names])
