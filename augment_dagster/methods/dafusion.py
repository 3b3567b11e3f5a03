"""DA-Fusion (Trabucco et al.; METHODS.md §1): img2img from each real image with the class's textual-
inversion token, "a photo of a <cls>", t0 drawn per image from {0.25, 0.5, 0.75, 1.0} ("stacking")
or fixed, M per real image, guidance 7.5."""
from __future__ import annotations

import random

from pydantic import Field, model_validator

import pandas as pd

from .base import MethodInputs, MethodParams, MethodSpec, SynthUnit, unit_seed
from .protocol import Protocol


class DAFusionParams(MethodParams):
    strengths: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
                                   description="t0 drawn uniformly per synthetic image (ComposeParallel)")
    fixed_strength: float | None = Field(None, ge=0.0, le=1.0, description="use one t0 for all images (paper's single-t0 variant: 0.5)")
    prompt_template: str = "a photo of a {token}"

    @model_validator(mode="after")
    def _check(self):
        if not self.strengths or any(not 0.0 <= s <= 1.0 for s in self.strengths):
            raise ValueError("strengths must be a non-empty list of values in [0, 1]")
        return self


def base_concepts(concepts: pd.DataFrame) -> dict:
    """label -> manifest row of the class's learned (un-noised) concept."""
    base = concepts[concepts["variant"] == "base"] if "variant" in concepts else concepts
    return {r.label: r for r in base.itertuples()}


def plan(inputs: MethodInputs) -> list[SynthUnit]:
    p: DAFusionParams = inputs.params  # type: ignore[assignment]
    if inputs.concepts is None:
        raise ValueError("dafusion needs the concept_embeddings stage")
    emb = base_concepts(inputs.concepts)
    units = []
    for row in inputs.train.itertuples():
        c = emb.get(row.label)
        if c is None:
            raise ValueError(f"no concept embedding for class {row.label!r}: rematerialize concept_embeddings")
        for m in range(inputs.images_per_real):
            seed = unit_seed(inputs, row.image_id, m)
            t0 = p.fixed_strength if p.fixed_strength is not None else random.Random(seed).choice(p.strengths)
            units.append(SynthUnit(
                label=row.label, seed=seed, mode="img2img", prompt=p.prompt_template.format(token=c.token),
                guide_ids=(row.image_id,), strength=float(t0), **inputs.protocol.unit_fields("img2img"),
                negative_prompt=inputs.negative_prompt, init_image_id=row.image_id,
                concepts={c.token: c.embedding_id}, embedding_id=c.embedding_id, prompt_source="template",
                params={"m": m},
            ))
    return units


SPECS = (
    # version 2: img2img z0 is a posterior sample (vae_encode "sample", diffusers' img2img pipeline): other images
    MethodSpec("dafusion", "2", "DA-Fusion: img2img with a per-class textual-inversion token, t0 in {.25,.5,.75,1}",
               DAFusionParams, plan, needs=("concepts",), recipe="dafusion", family="DA-Fusion/DIAGen",
               protocol=Protocol(scheduler="pndm", steps=50, guidance_scale=7.5, images_per_real=10, vae_encode="sample",
                                 note="SD v1-4 img2img, t0 drawn per image from {0.25, 0.5, 0.75, 1.0}: ⌊50·t0⌋ steps")),
)
