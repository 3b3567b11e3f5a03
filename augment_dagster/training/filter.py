"""DIAGen's own filter classifier (METHODS §2c), separate from the real-only downstream classifier.

* a frozen backbone (``tiny-pretrained`` by default) + linear head, trained on the K real shots with the
  filter's train transform (RandAugment), Adam, class-balanced draws, early stopping on validation loss
  (patience 6; best weights deep-copied);
* the split's validation pool is split in two, per class by rank: even positions -> the early-stopping set,
  odd positions -> the temperature set (so T is never fitted on the set that picked the epoch). A class with
  a single val image only feeds early stopping; with no temperature set at all, T falls back to 1;
* T by LBFGS on NLL(softmax(z/T), y) over the temperature set; a degenerate fit (T < t_min, T > t_max, or a
  temperature set the filter gets 100 % right, which drives T toward 0 and turns weighting into hard
  filtering) is reported with the fallback T = 1 (plain softmax);
* q = mean over ``views`` draws of the filter's *train transform* of softmax(z/T)[y] (``confidence_weights``).

No Dagster here; torch is imported inside functions."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from ..data.images import ImageSource, label_index, to_tensor
from ..store import BlobStore, Memo, memo_key

FILTER_VERSION = "diagen-filter-1"


def split_val(val: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(early-stopping rows, temperature rows): per class, sorted by rank, even positions / odd positions."""
    val = val.sort_values(["label", "rank"]).reset_index(drop=True)
    pos = val.groupby("label").cumcount()
    return val[pos % 2 == 0].reset_index(drop=True), val[pos % 2 == 1].reset_index(drop=True)


def degenerate_reason(T: float, t_acc: float, n_t: int, t_min: float, t_max: float) -> str:
    if n_t == 0:
        return "no temperature set (every class has a single val image)"
    if t_acc >= 1.0:
        return f"the filter gets the temperature set 100 % right (fitted T {T:.4g} would harden the weights)"
    if T < t_min:
        return f"T {T:.4g} < {t_min}"
    if T > t_max:
        return f"T {T:.4g} > {t_max}"
    return ""


def train_diagen_filter(split: pd.DataFrame, *, images: ImageSource, blobs: BlobStore, memo: Memo, fcfg,
                        image_size: int, seed: int, device: str = "auto") -> tuple[dict, bool]:
    """Train (or reuse) the filter of one split -> (record, reused). ``fcfg`` is a DiagenFilterConfig."""
    train = split[split["role"] == "train"].sort_values(["label", "rank"]).reset_index(drop=True)
    es, tset = split_val(split[split["role"] == "val"])
    classes = sorted(train["label"].unique())
    from .episodes import encoder_fingerprint

    key = memo_key("diagen_filter", FILTER_VERSION, model=encoder_fingerprint(fcfg.backbone),
                   params={"filter": fcfg.model_dump(mode="json"), "image_size": image_size},
                   inputs={"train": list(zip(train["image_id"], train["label"])),
                           "es": list(zip(es["image_id"], es["label"])), "t": list(zip(tset["image_id"], tset["label"]))},
                   seed=seed)
    rec = memo.get(key)
    if rec is not None and blobs.exists(rec["blob"]):
        return {**rec, "memo_key": key}, True
    import torch

    from ..config import ClassifierModelConfig, TrainingConfig
    from ..metrics import accuracy
    from .backbones import save_classifier
    from .loop import predict_logits, train_classifier
    from .temperature import fit_temperature, nll

    t0 = time.perf_counter()
    idx = label_index(classes)
    rx = to_tensor([images.real(i) for i in train["image_id"]], image_size)
    ry = torch.tensor([idx[l] for l in train["label"]])
    ex = to_tensor([images.real(i) for i in es["image_id"]], image_size) if len(es) else rx
    ey = torch.tensor([idx[l] for l in es["label"]]) if len(es) else ry
    training = TrainingConfig(linear_probe=True, epochs=fcfg.epochs, steps_per_epoch=fcfg.steps_per_epoch,
                              batch_size=fcfg.batch_size, lr=fcfg.lr, weight_decay=fcfg.weight_decay,
                              optimizer=fcfg.optimizer, schedule="constant", train_aug=fcfg.train_aug, class_balanced=True)
    res = train_classifier(rx, ry, ex, ey, len(classes), training, ClassifierModelConfig(source=fcfg.backbone),
                           seed=seed, device=device, select_on="val_loss", patience=fcfg.patience)
    T_fit, t_acc, nll_before, nll_after = 1.0, float("nan"), None, None
    if len(tset):
        tx = to_tensor([images.real(i) for i in tset["image_id"]], image_size)
        ty = torch.tensor([idx[l] for l in tset["label"]])
        logits = predict_logits(res.model, tx)
        T_fit = float(fit_temperature(logits, ty))
        t_acc = float(accuracy(logits, ty))
        nll_before, nll_after = float(nll(logits, ty, 1.0)), float(nll(logits, ty, T_fit))
    reason = degenerate_reason(T_fit, t_acc, len(tset), fcfg.t_min, fcfg.t_max)
    T = 1.0 if reason else T_fit
    blob = blobs.put(save_classifier(res.model, {"classes": classes, "temperature": T, "train_aug": fcfg.train_aug,
                                                "image_size": image_size, "role": "diagen_filter"}), "pt")
    rec: dict[str, Any] = {
        "blob": blob, "classes": classes, "temperature": T, "temperature_fitted": T_fit,
        "degenerate": reason, "fallback": "T = 1 (plain softmax)" if reason else "",
        "train_aug": fcfg.train_aug, "views": int(fcfg.views), "backbone": fcfg.backbone,
        "best_epoch": int(res.best_epoch), "epochs_run": len(res.history), "stopped_early": bool(res.stopped_early),
        "es_val_loss": float(min(h["val_loss"] for h in res.history)), "es_val_acc": float(res.best_val_acc),
        "t_val_acc": t_acc, "n_train": len(train), "n_es": len(es), "n_t": len(tset),
        "t_nll_before": nll_before, "t_nll_after": nll_after, "history": res.history,
        "train_seconds": time.perf_counter() - t0,
    }
    rec = memo.put(key, rec)
    return {**rec, "memo_key": key}, False


def uniform_fallback(labels: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A class whose weights are all 0 (or not finite) could never be drawn by the mixing sampler: its synthetic
    images get uniform weights. Returns (weights, fallback flag per row); the flag is kept in the manifest
    (``weight_fallback``) and the asset metadata names the classes."""
    w = np.asarray(w, dtype=np.float64)
    fallback = np.zeros(len(w), dtype=bool)
    for lab in np.unique(labels):
        m = labels == lab
        if not np.isfinite(w[m]).all() or float(np.sum(w[m])) <= 0.0:
            fallback[m] = True
    return np.where(fallback, 1.0, w), fallback


def confidence_weights(synth: pd.DataFrame, *, images: ImageSource, blobs: BlobStore, filter_rec: dict,
                       image_size: int, rule: str, seed: int) -> pd.DataFrame:
    """q = mean over the filter's ``views`` draws of its train transform of softmax(z/T)[label];
    w = q (rule 'paper') or 1 if q >= .5 else 2q ('code'); 'none' gives uniform weights."""
    from .stage import load_classifier_blob, weight_rule

    out = pd.DataFrame({"synthetic_id": synth["synthetic_id"].values, "label": synth["label"].values})
    if rule == "none" or len(synth) == 0:
        weight_rule(np.ones(0), rule)  # an unknown rule is an error even for an empty set
        out["q"] = np.nan
        out["weight"] = 1.0
        out["rule"] = rule
        return out
    import torch

    from .loop import build_train_transform, predict_logits

    model, meta = load_classifier_blob(blobs, filter_rec["blob"])
    T = float(meta.get("temperature", 1.0))
    idx = label_index(meta["classes"])
    x = to_tensor([images.synthetic(b) for b in synth["blob"]], image_size)
    y = torch.tensor([idx[l] for l in synth["label"]])
    views = int(filter_rec.get("views", 5))
    aug = build_train_transform(meta.get("train_aug", "randaugment"), tuple(x.shape[-2:]))
    qs = []
    with torch.random.fork_rng(), torch.no_grad():
        for v in range(views):
            torch.manual_seed(int(seed) * 1000 + v)
            xv = aug(x).reshape(x.shape).clamp(0.0, 1.0) if aug is not None else x
            p = torch.softmax(predict_logits(model, xv) / T, dim=1)
            qs.append(p[torch.arange(len(y)), y])
    q = torch.stack(qs).mean(0).numpy()
    out["q"] = q
    out["weight"], out["weight_fallback"] = uniform_fallback(out["label"].to_numpy(), weight_rule(q, rule))
    out["rule"] = rule
    return out
