"""GeNIe and GeNIe-Ada (METHODS.md §4): hard negatives by img2img of a *source* image of another class
with the *target* class prompt at noise ratio r, labelled as the target.

* ``genie``: for every target class T, every train image of every other class is a source ((C−1)·K per
  class). The "train images" are what ``inputs.split`` holds: the split's K shots for the split's own set, and
  under ``training.episodes.support: episode`` one episode's fresh support (``defs.assets.synthetic.episode_groups``),
  so the sources are the other N−1 classes' support images of that episode, (N−1)·K per class (the paper's 4 at
  5-way 1-shot, 20 at 5-shot). Or with ``sources: confusion_topk`` only images of the k classes the real classifier confuses
  most with T (the paper's *train* confusion matrix, computed before planning; ``confusion_split: val`` uses
  the real classifier's val matrix). r = 0.8 by default. Prompt "a photo of a {label}", or with
  ``prompt_style: fine_grained`` the paper's "A photo of a {label}, a type of {metaclass}". Source images are
  brought to the square by Resize + CenterCrop (the protocol's ``preprocess``), not squashed.
* ``genie_ada``: the r grid {0.5,…,0.9} is generated for every (source, target) pair in one batched pass;
  each candidate is embedded with the real classifier's L2-normalised penultimate features (``encoder:
  classifier``, METHODS §14) or the CLIP image tower (``encoder: clip``) and projected
  onto Z_T − Z_S; the image just after the largest jump of the projection is kept (Algorithm 1). Every
  candidate's projection is kept in the manifest (``params_json``) so the choice can be audited.
"""
from __future__ import annotations

import json
from typing import Literal, Sequence

import numpy as np
from pydantic import Field, field_validator

from .base import MethodInputs, MethodParams, MethodSpec, SynthUnit, unit_seed
from .protocol import Protocol


def select_ratio(projections: Sequence[float], ratios: Sequence[float]) -> int:
    """GeNIe-Ada's rule: the index of the ratio just *after* the largest jump |d_m − d_{m−1}|.

    ``projections[i]`` is d at ``ratios[i]`` (ratios ascending). Ties pick the first (lowest-r) jump;
    a flat trajectory (all jumps equal, e.g. zero) picks index 1. Needs at least two ratios."""
    d = np.asarray(projections, dtype=np.float64)
    if len(d) != len(ratios):
        raise ValueError(f"{len(d)} projections for {len(ratios)} ratios")
    if len(d) < 2:
        raise ValueError("select_ratio needs at least two ratios")
    if any(b <= a for a, b in zip(ratios, ratios[1:])):
        raise ValueError("ratios must be strictly increasing")
    jumps = np.abs(np.diff(d))
    return int(np.argmax(jumps)) + 1


def projection(z: np.ndarray, z_source: np.ndarray, z_target: np.ndarray) -> np.ndarray:
    """d = (Z − Z_S)ᵀ(Z_T − Z_S) / ‖Z_T − Z_S‖₂ for each row of z."""
    v = z_target - z_source
    n = np.linalg.norm(v)
    return (z - z_source) @ v / (n if n > 0 else 1.0)


class GenieParams(MethodParams):
    ratio: float = Field(0.8, gt=0.0, le=1.0, description="noise ratio r in (0, 1]: noise to t=⌊1000r⌋, run the "
                                                         "schedule's steps with t−1 ≤ 1000r (r > 0.999: pure noise)")
    sources: Literal["all", "confusion_topk"] = "all"
    topk: int = Field(4, ge=1, description="with sources=confusion_topk: the k most confused classes")
    confusion_split: Literal["train", "val"] = Field("train", description="confusion_topk: the real classifier's "
                                                                          "confusion matrix on the train split (paper) or val")
    prompt_template: str = "a photo of a {label}"
    prompt_style: Literal["template", "fine_grained"] = Field(
        "template", description="fine_grained: 'A photo of a {label}, a type of {metaclass}' (paper, fine-grained sets)")
    max_per_class: int | None = Field(None, ge=1, description="cap on images per target class (long-tail: 50)")


class GenieAdaParams(GenieParams):
    ratios: list[float] = Field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    encoder: Literal["classifier", "clip"] = Field(
        "classifier", description="features Z for Algorithm 1: the real classifier's penultimate layer or CLIP's image tower")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v):
        if len(v) < 2 or any(not 0 < r <= 1 for r in v) or sorted(v) != v or len(set(v)) != len(v):
            raise ValueError("ratios must be >= 2 strictly increasing values in (0, 1]")
        return v


def _confusion(inputs: MethodInputs) -> tuple[list[str], np.ndarray]:
    p: GenieParams = inputs.params  # type: ignore[assignment]
    if p.confusion_split == "train":
        if "train_confusion" not in inputs.extra:
            raise ValueError("sources: confusion_topk needs the real classifier's train confusion matrix "
                             "(computed by genie's prepare step before planning)")
        classes, cm = inputs.extra["train_confusion"]
        return list(classes), np.asarray(cm, dtype=float)
    rc = inputs.real_classifier
    if rc is None or "val_confusion" not in rc or rc.iloc[0]["val_confusion"] is None:
        raise ValueError("sources: confusion_topk with confusion_split: val needs the real_classifier's validation "
                         "confusion matrix")
    rec = rc.iloc[0]
    return list(rec["classes"]), np.asarray(json.loads(rec["val_confusion"]), dtype=float)


def prepare_genie(inputs: MethodInputs, services) -> dict:
    """Before planning: the real classifier's confusion matrix on the train split (confusion_topk sources)."""
    p: GenieParams = inputs.params  # type: ignore[assignment]
    if p.sources != "confusion_topk" or p.confusion_split != "train":
        return {}
    train = inputs.train
    blob = inputs.real_classifier.iloc[0]["blob"]
    classes, cm = services.classifier_confusion(blob, list(train["image_id"]), list(train["label"]))
    return {"train_confusion": (classes, cm.tolist())}


def _confused_with(inputs: MethodInputs, target: str, k: int) -> list[str]:
    classes, cm = _confusion(inputs)
    t = classes.index(target)
    # how often images of class s are predicted as target t (s != t)
    scores = [(cm[s, t] + cm[t, s], classes[s]) for s in range(len(classes)) if s != t]
    scores.sort(key=lambda x: (-x[0], x[1]))
    return [c for _, c in scores[:k]]


def pairs(inputs: MethodInputs) -> list[tuple[str, str, str]]:
    """(target class, source image id, source class) for every pair the method generates."""
    p: GenieParams = inputs.params  # type: ignore[assignment]
    train = inputs.train
    out = []
    for target in inputs.class_names:
        allowed = set(_confused_with(inputs, target, p.topk)) if p.sources == "confusion_topk" else None
        src = train[(train["label"] != target) & (train["label"].isin(allowed) if allowed is not None else True)]
        rows = [(target, r.image_id, r.label) for r in src.itertuples()]
        out += rows[: p.max_per_class] if p.max_per_class else rows
    return out


def _unit(inputs, target, sid, scls, r, seed, extra=None) -> SynthUnit:
    p: GenieParams = inputs.params  # type: ignore[assignment]
    template = "A photo of a {label}, a type of {metaclass}" if p.prompt_style == "fine_grained" else p.prompt_template
    return SynthUnit(label=target, seed=seed, mode="img2img", prompt=template.format(label=target, metaclass=inputs.metaclass),
                     guide_ids=(sid,), strength=float(r), **inputs.protocol.unit_fields("img2img"),
                     negative_prompt=inputs.negative_prompt, init_image_id=sid,
                     params={"source_class": scls, "target_class": target, "ratio": float(r), **(extra or {})})


def plan_genie(inputs: MethodInputs) -> list[SynthUnit]:
    p: GenieParams = inputs.params  # type: ignore[assignment]
    return [_unit(inputs, t, sid, scls, p.ratio, unit_seed(inputs, t, sid)) for t, sid, scls in pairs(inputs)]


def plan_genie_ada(inputs: MethodInputs) -> list[SynthUnit]:
    p: GenieAdaParams = inputs.params  # type: ignore[assignment]
    units = []
    for t, sid, scls in pairs(inputs):
        seed = unit_seed(inputs, t, sid)  # same noise for every r of a pair: the trajectory varies r only
        units += [_unit(inputs, t, sid, scls, r, seed, {"candidate": i}) for i, r in enumerate(p.ratios)]
    return units


def select_ada(rows: list[dict], features: dict[str, np.ndarray], real_features: dict[str, np.ndarray],
               train_labels: dict[str, str], ratios: Sequence[float]) -> list[dict]:
    """Keep one candidate per (target, source) pair by ``select_ratio``; record all projections.

    ``features``: synthetic_id -> L2-normalised feature; ``real_features``: real image id -> feature."""
    by_label: dict[str, list[np.ndarray]] = {}
    for iid, lab in train_labels.items():
        by_label.setdefault(lab, []).append(real_features[iid])
    z_t_mean = {lab: np.mean(v, axis=0) for lab, v in by_label.items()}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["guide_ids"][0]), []).append(r)
    kept = []
    for (target, sid), cand in groups.items():
        cand = sorted(cand, key=lambda r: r["strength"])
        z = np.stack([features[r["synthetic_id"]] for r in cand])
        d = projection(z, real_features[sid], z_t_mean[target])
        i = select_ratio(d.tolist(), [r["strength"] for r in cand])
        chosen = dict(cand[i])
        params = json.loads(chosen["params_json"])
        params.update({"ada_ratios": [r["strength"] for r in cand], "ada_projections": [round(float(x), 6) for x in d],
                       "ada_candidates": [r["synthetic_id"] for r in cand], "ada_choice": i})
        chosen["params_json"] = json.dumps(params, sort_keys=True)
        kept.append(chosen)
    return kept


def post_filter_ada(rows: list[dict], inputs: MethodInputs, services) -> tuple[list[dict], dict]:
    """Embed every candidate and the real train images with the real classifier, keep one per pair."""
    p: GenieAdaParams = inputs.params  # type: ignore[assignment]
    if not rows:
        return rows, {"candidates": 0, "kept": 0}
    train = inputs.train
    syn_images = [services.synthetic_image(r["blob"]) for r in rows]
    real_images = [services.real_image(i) for i in train["image_id"]]
    if p.encoder == "clip":
        syn, real = services.clip_image_features(syn_images), services.clip_image_features(real_images)
    else:
        clf_blob = inputs.real_classifier.iloc[0]["blob"]
        syn, real = services.classifier_features(clf_blob, syn_images), services.classifier_features(clf_blob, real_images)
    kept = select_ada(rows, dict(zip([r["synthetic_id"] for r in rows], syn)), dict(zip(train["image_id"], real)),
                      dict(zip(train["image_id"], train["label"])), p.ratios)
    chosen = [json.loads(r["params_json"])["ada_choice"] for r in kept]
    hist = {str(p.ratios[i]): chosen.count(i) for i in range(len(p.ratios))}
    return kept, {"candidates": len(rows), "kept": len(kept), "chosen_ratio_histogram": hist, "encoder": p.encoder}


GENIE_PROTOCOL = Protocol(scheduler="dpmsolver", steps=50, guidance_scale=7.5, start_rule="genie", count="(C−1)·K per class",
                          preprocess="center_crop",
                          note="SD v1-5, r 0.8: noise to t=800, the 40 steps with t−1 ≤ 800; sources: every train image "
                               "of every other class")

SPECS = (
    MethodSpec("genie", "1", "GeNIe: hard negatives — img2img of other classes' images with the target prompt at r=0.8",
               GenieParams, plan_genie, needs=("real_classifier",), protocol=GENIE_PROTOCOL, prepare=prepare_genie,
               family="GeNIe"),
    MethodSpec("genie_ada", "1", "GeNIe-Ada: per pair, the r in {.5,...,.9} just after the largest feature jump toward the target",
               GenieAdaParams, plan_genie_ada, needs=("real_classifier",), post_filter=post_filter_ada, prepare=prepare_genie,
               family="GeNIe",
               protocol=Protocol(scheduler="dpmsolver", steps=50, guidance_scale=7.5, start_rule="genie", preprocess="center_crop",
                                 count="5 candidates, 1 kept per (source, target)", note="r grid {0.5,…,0.9} per pair, the r after the largest feature jump kept")),
)
