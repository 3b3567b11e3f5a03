"""SGID (METHODS.md §5, paper only): img2img of each real image with the prompt
"A picture of a <label>, <caption>", where the caption is picked per image by strategy (nucleus | beam |
clip_filter), the label tokens weighted ×1.5 and the caption tokens ×0.9 (text-encoder output states, mean
restored — or input embeddings), and the guidance g = −4s² + 2s + 1 from the chosen caption's CLIP
similarity s (verbatim, optional clamp_min; logged per row). Noise rate n = 0.5, M per real image."""
from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from ..util import hash_obj
from .base import MethodInputs, MethodParams, MethodSpec, SynthUnit, unit_seed
from .protocol import Protocol


def guidance_from_similarity(s: float, clamp_min: float | None = None) -> float:
    """SGID's guidance map g = f(s) = −4s² + 2s + 1 (max 1.25 at s = 0.25). In diffusers g ≤ 1 disables
    CFG, so ``clamp_min`` (e.g. 1.0) is offered; by default the paper's formula is used verbatim."""
    g = -4.0 * s * s + 2.0 * s + 1.0
    return max(g, clamp_min) if clamp_min is not None else g


class SGIDParams(MethodParams):
    strength: float = Field(0.5, ge=0.0, le=1.0, description="noise rate n ∈ {0.3, 0.5, 0.7} (chosen on val)")
    caption_strategy: Literal["nucleus", "beam", "clip_filter"] = "clip_filter"
    label_weight: float = Field(1.5, gt=0)
    caption_weight: float = Field(0.9, gt=0)
    token_weighting: Literal["output", "input_embeddings"] = Field(
        "output", description="where the label/caption token weights apply: text-encoder output states (mean restored) or input embeddings")
    clamp_min: float | None = Field(None, ge=0, description="lower bound on g (None = verbatim)")
    label_template: str = "A picture of a {label}"


def pick_caption(cands: list[dict], strategy: str, seed: int) -> dict:
    """nucleus: a random nucleus candidate; beam: the beam caption; clip_filter: the candidate with the
    highest CLIP similarity (c*, s*)."""
    if strategy == "beam":
        pool = [c for c in cands if c["strategy"] == "beam"] or cands
        return pool[0]
    if strategy == "nucleus":
        pool = [c for c in cands if c["strategy"] == "nucleus"] or cands
        return random.Random(seed).choice(pool)
    return max(cands, key=lambda c: (c["clip_score"], -c["idx"]))


def plan(inputs: MethodInputs) -> list[SynthUnit]:
    p: SGIDParams = inputs.params  # type: ignore[assignment]
    caps = inputs.captions
    if caps is None:
        raise ValueError("sgid needs the captions stage")
    by_image = {iid: g.sort_values("idx").to_dict("records") for iid, g in caps.groupby("image_id")}
    units = []
    for row in inputs.train.itertuples():
        cands = by_image.get(row.image_id)
        if not cands:
            raise ValueError(f"no captions for image {row.image_id}: rematerialize captions")
        for m in range(inputs.images_per_real):
            seed = unit_seed(inputs, row.image_id, m)
            c = pick_caption(cands, p.caption_strategy, int(hash_obj(seed)[:8], 16))
            s = float(c["clip_score"])
            g = guidance_from_similarity(s, p.clamp_min)
            label_text = p.label_template.format(label=row.label)
            caption = c["caption"].strip()
            segments = [(label_text, p.label_weight)] + ([(", " + caption, p.caption_weight)] if caption else [])
            units.append(SynthUnit(
                label=row.label, seed=seed, mode="img2img", prompt=segments, guide_ids=(row.image_id,),
                strength=p.strength, **{**inputs.protocol.unit_fields("img2img"), "guidance_scale": g},
                negative_prompt=inputs.negative_prompt,
                init_image_id=row.image_id, prompt_source=f"blip:{c['strategy']}", weighting=p.token_weighting,
                params={"m": m, "caption": caption, "caption_strategy": p.caption_strategy, "clip_score": s,
                        "guidance_raw": guidance_from_similarity(s), "guidance": g, "cfg_active": g > 1.0},
            ))
    return units


SPECS = (
    MethodSpec("sgid", "2", "SGID: img2img with 'A picture of a <label>, <BLIP caption>', weighted tokens, CLIP-similarity guidance",
               SGIDParams, plan, needs=("captions",), recipe="sgid", family="SGID",
               protocol=Protocol(scheduler="pndm", steps=50, images_per_real=1, guidance="f(s*) per image",
                                 note="SD v1-5 (diffusers default sampler) img2img at n 0.5; g = f(s*) per image")),
)
