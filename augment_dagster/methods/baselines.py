"""Baselines that need nothing but the base model (METHODS.md §10).

* ``real_guidance`` (He et al.): img2img of each real image at t0=0.5 with "a photo of a {class}".
* ``img2img_low`` / ``img2img_high`` (GeNIe's Img2Img^L / ^H): the same at r=0.3 / 0.7.
* ``txt2img``: text-to-image from "a photo of a {class}" alone, M images per real image of the class.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from pydantic import Field

from .base import MethodInputs, MethodParams, MethodSpec, SynthUnit, unit_seed


class Img2ImgParams(MethodParams):
    strength: float = Field(0.5, ge=0.0, le=1.0, description="SDEdit noise ratio t0")
    prompt_template: str = Field("a photo of a {label}", description="'{label}' is replaced by the class name")


def plan_img2img(inputs: MethodInputs) -> list[SynthUnit]:
    p: Img2ImgParams = inputs.params  # type: ignore[assignment]
    units = []
    for row in inputs.train.itertuples():
        for m in range(inputs.images_per_real):
            units.append(SynthUnit(
                label=row.label, seed=unit_seed(inputs, row.image_id, m), mode="img2img",
                prompt=p.prompt_template.format(label=row.label), guide_ids=(row.image_id,),
                strength=p.strength, negative_prompt=inputs.negative_prompt, init_image_id=row.image_id,
                params={"m": m}, **inputs.protocol.unit_fields("img2img"),
            ))
    return units


class Txt2ImgParams(MethodParams):
    prompt_template: str = Field("a photo of a {label}", description="'{label}' is replaced by the class name")


def plan_txt2img(inputs: MethodInputs) -> list[SynthUnit]:
    p: Txt2ImgParams = inputs.params  # type: ignore[assignment]
    units = []
    train = inputs.train
    for label, grp in train.groupby("label", sort=True):
        for i in range(len(grp) * inputs.images_per_real):
            units.append(SynthUnit(
                label=label, seed=unit_seed(inputs, label, i), mode="txt2img",
                prompt=p.prompt_template.format(label=label), negative_prompt=inputs.negative_prompt,
                params={"index": i}, **inputs.protocol.unit_fields("txt2img"),
            ))
    return units


class RealGuidanceParams(Img2ImgParams):
    strength: float = Field(0.5, ge=0.0, le=1.0, description="SDEdit noise ratio t0")


class Img2ImgLowParams(Img2ImgParams):
    strength: float = Field(0.3, ge=0.0, le=1.0, description="SDEdit noise ratio r")


class Img2ImgHighParams(Img2ImgParams):
    strength: float = Field(0.7, ge=0.0, le=1.0, description="SDEdit noise ratio r")


class RealFilterParams(Txt2ImgParams):
    zero_shot_template: str = Field("a photo of a {}", description="CLIP zero-shot class prompt")
    keep_at_least: int = Field(1, ge=0, description="a class the filter would leave with fewer images keeps its "
                                                    "images CLIP scores highest for the label, up to this many "
                                                    "(project decision; 0: drop freely, a class may end up empty)")


def filter_by_clip(rows: list[dict], inputs: MethodInputs, services) -> tuple[list[dict], dict]:
    """Real-Filter: drop synthetic images that CLIP zero-shot assigns to another class.

    Project decision: a class CLIP cannot recognise on the split's own real train images (it assigns none of them
    to the class, e.g. a class name CLIP never learned) cannot be judged, so its images pass unfiltered instead of
    the class silently losing every synthetic image. A class the filter would leave with fewer than
    ``keep_at_least`` images keeps its highest-scoring ones (CLIP's probability of the label) up to that many, so
    no class is emptied by the filter (``keep_at_least: 0`` drops freely). Each row's ``filter_decision`` says
    which rule kept it; the unjudged and the topped-up classes are in the asset's ``filter`` metadata."""
    if not rows:
        return rows, {"dropped": 0, "kept": 0}
    p: RealFilterParams = inputs.params  # type: ignore[assignment]
    classes = inputs.class_names
    train = inputs.train
    real_pred = services.clip_zero_shot([services.real_image(i) for i in train["image_id"]], classes,
                                        p.zero_shot_template).argmax(1)
    real_recall = {}
    for c in classes:
        hits = [classes[int(k)] == c for k, lb in zip(real_pred, train["label"]) if lb == c]
        real_recall[c] = float(np.mean(hits)) if hits else 0.0
    unjudged = sorted(c for c, r in real_recall.items() if r == 0.0)
    probs = services.clip_zero_shot([services.synthetic_image(r["blob"]) for r in rows], classes, p.zero_shot_template)
    decision: list[str | None] = []
    for r, pr in zip(rows, probs):
        if r["label"] in unjudged:
            decision.append("kept: CLIP recognises no real image of the class (not judged)")
        elif classes[int(pr.argmax())] == r["label"]:
            decision.append("kept: CLIP zero-shot agrees")
        else:
            decision.append(None)
    topped_up: dict[str, int] = {}
    for c in classes:  # keep_at_least: the best-scored of the dropped images of a class left short
        idx = [i for i, r in enumerate(rows) if r["label"] == c]
        short = min(p.keep_at_least, len(idx)) - sum(decision[i] is not None for i in idx)
        if short > 0:
            k = classes.index(c)
            for i in sorted((i for i in idx if decision[i] is None), key=lambda i: -float(probs[i][k]))[:short]:
                decision[i] = (f"kept: best CLIP score of a class the filter would leave with fewer than "
                               f"{p.keep_at_least} (keep_at_least)")
            topped_up[c] = short
    kept = [{**r, "filter_decision": d} for r, d in zip(rows, decision) if d is not None]
    dropped = dict(Counter(r["label"] for r, d in zip(rows, decision) if d is None))
    return kept, {"dropped": len(rows) - len(kept), "kept": len(kept), "dropped_per_class": dropped,
                  "unjudged_classes": unjudged, "clip_recall_on_real_train": real_recall,
                  "topped_up_classes": topped_up, "keep_at_least": p.keep_at_least}


SPECS = (
    MethodSpec("real_guidance", "1", "Real-Guidance: img2img of each real image, prompt 'a photo of a {class}', t0=0.5 (He et al.)",
               RealGuidanceParams, plan_img2img, family="baselines"),
    MethodSpec("img2img_low", "1", "Img2Img^L: same-class SDEdit at r=0.3 with the class name (GeNIe baseline)",
               Img2ImgLowParams, plan_img2img, family="baselines"),
    MethodSpec("img2img_high", "1", "Img2Img^H: same-class SDEdit at r=0.7 with the class name (GeNIe baseline)",
               Img2ImgHighParams, plan_img2img, family="baselines"),
    MethodSpec("txt2img", "1", "Txt2Img: generation from 'a photo of a {class}' alone, M per real image",
               Txt2ImgParams, plan_txt2img, family="baselines"),
    MethodSpec("real_filter", "3", "Real-Filter: txt2img from class-name prompts, minus images CLIP zero-shot assigns to another class",
               RealFilterParams, plan_txt2img, post_filter=filter_by_clip, family="baselines"),
)
