"""Synthetic-set metrics (METHODS.md §12), all on one feature encoder (CLIP image features by default):

* improved precision / recall (Kynkäänniemi et al. 2019, k=3, exact distances) of the synthetic set against
  the real in-distribution test images of the same classes, per class and mean;
* diversity: mean pairwise feature distance within class, averaged over classes;
* faithfulness: CLIP image–text score against "a photo of a <class>" (cosine ×100) and label consistency
  under the temperature-scaled real classifier (argmax == label);
* SGID's original-vs-augmented similarity: mean cosine between a synthetic image and its guide image.
LPIPS is not used: the ``lpips`` package downloads AlexNet weights from the internet on first use.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def set_metrics(synth: pd.DataFrame, split: pd.DataFrame, *, images, clip, classifier_blob: str | None, services,
                k: int = 3, max_per_class: int = 200) -> tuple[dict, pd.DataFrame]:
    from . import diversity, precision_recall
    from ..models.clip_ops import image_features, text_features

    if synth is None or len(synth) == 0:
        return {"n_synthetic": 0}, pd.DataFrame()
    syn = synth.groupby("label", group_keys=False).head(max_per_class).reset_index(drop=True)
    real = split[split["role"] == "test"]
    real = real[real["label"].isin(set(syn["label"]))].groupby("label", group_keys=False).head(max_per_class)
    f_syn = image_features(clip, [images.synthetic(b) for b in syn["blob"]]).numpy()
    f_real = image_features(clip, [images.real(i) for i in real["image_id"]]).numpy()
    classes = sorted(syn["label"].unique())
    f_txt = text_features(clip, [f"a photo of a {c}" for c in classes]).numpy()
    tix = {c: i for i, c in enumerate(classes)}
    clip_score = 100.0 * (f_syn * f_txt[[tix[l] for l in syn["label"]]]).sum(1)
    rows = []
    for c in classes:
        ms, mr = (syn["label"] == c).values, (real["label"] == c).values
        p, r = precision_recall(f_real[mr], f_syn[ms], k=k) if mr.sum() > k and ms.sum() > k else (np.nan, np.nan)
        rows.append({"label": c, "n_synthetic": int(ms.sum()), "n_real": int(mr.sum()), "precision": p, "recall": r,
                     "diversity": float(diversity(f_syn[ms])) if ms.sum() > 1 else np.nan,
                     "clip_score": float(clip_score[ms].mean())})
    per_class = pd.DataFrame(rows)
    out = {"n_synthetic": int(len(synth)), "precision": float(np.nanmean(per_class["precision"])) if per_class["precision"].notna().any() else None,
           "recall": float(np.nanmean(per_class["recall"])) if per_class["recall"].notna().any() else None,
           "diversity": float(np.nanmean(per_class["diversity"])) if per_class["diversity"].notna().any() else None,
           "clip_score": float(clip_score.mean()), "feature_encoder": "clip:" + getattr(clip, "fingerprint", "")[:12]}
    # label consistency under the real classifier
    if classifier_blob is not None:
        import torch

        from ..data.images import to_tensor
        from ..training.loop import predict_logits
        from ..training.stage import load_classifier_blob

        model, meta = load_classifier_blob(services.blobs, classifier_blob)
        cidx = {c: i for i, c in enumerate(meta["classes"])}
        with torch.no_grad():
            from ..data.images import map_image_batches  # one chunk of decoded images at a time

            pred = map_image_batches(lambda x: predict_logits(model, x), list(syn["blob"]), images.synthetic,
                                     services.image_size).argmax(1).numpy()
        out["label_consistency"] = float(np.mean([pred[i] == cidx.get(l, -1) for i, l in enumerate(syn["label"])]))
    # original-vs-augmented similarity (only where a guide image exists)
    guided = [(i, g[0]) for i, g in enumerate(syn["guide_ids"]) if g is not None and len(g) > 0]
    if guided:
        gid = sorted({g for _, g in guided})
        f_g = dict(zip(gid, image_features(clip, [images.real(g) for g in gid]).numpy()))
        out["orig_aug_similarity"] = float(np.mean([float(f_syn[i] @ f_g[g]) for i, g in guided]))
    return out, per_class
