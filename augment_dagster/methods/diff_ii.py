"""Diff-II, Inversion Circle Interpolation (METHODS.md §3).

Per class, ``expansion_rate`` × #real images are generated; each draws a random unordered intra-class pair of
DDIM-inverted latents (z1, z2), θ = ∠(z1, z2), α ~ U(0, 2π/θ) and starts from the circle interpolation
z = [sin((1+α)θ)·z1 − sin(αθ)·z2]/sin θ. Two-stage denoising (DDIM, 25 steps, CFG 7.5): timesteps
t ≥ 1000(1−s) use "a photo of a <cls> <metaclass> <suffix>", later ones "a photo of a <cls> <metaclass>".
Classes with a single image start from N(0, I) (the paper's rule; recorded in lineage as start=noise).
Ablations (paper table): use_concepts, interpolation, suffixes, two_stage. ``use_concepts: false`` is the paper's
"without concept learning": no TI token, no LoRA and no inversion — every image starts from N(0, I) with the
template prompt "a photo of a <label> <metaclass>" (lineage start=noise, ablation=no_concepts)."""
from __future__ import annotations

import random
from typing import ClassVar

from pydantic import Field

from ..util import hash_obj
from .base import MethodInputs, MethodParams, MethodSpec, SynthUnit, unit_seed
from ..models.interpolation import angle, sample_alpha
from .protocol import Protocol


class DiffIIParams(MethodParams):
    M_ALIAS: ClassVar[str] = "expansion_rate"  # methods/protocol.py: expansion_rate is this method's M
    expansion_rate: int | None = Field(None, ge=1, description="synthetic images per real image of a class, i.e. "
                                                                "this method's M (None: methods.<entry>.images_per_real, "
                                                                "generation.images_per_real, paper 5)")
    split_ratio: float = Field(0.3, ge=0.0, le=1.0, description="s: suffixed prompt for t >= 1000(1-s)")
    split_ratio_by_shots: dict[int, float] = Field(
        default_factory=dict, description="s per K (paper: {5: 0.3, 10: 0.1}); a K not listed uses split_ratio")
    use_concepts: bool = Field(True, description="TI tokens + shared LoRA + inverted starts (else the paper's ablation: "
                                                   "N(0, I) start, template prompt with the class name, base UNet)")
    interpolation: bool = Field(True, description="start from the circle interpolation (else from one inverted latent)")
    suffixes: bool = Field(True, description="use LLM/caption suffixes")
    two_stage: bool = Field(True, description="switch to the plain prompt after the first s·T timesteps (else suffix all along)")


def split_ratio_for(p: DiffIIParams, shots: int) -> float:
    """The two-stage split ratio s of a K-shot split: ``split_ratio_by_shots[K]``, else ``split_ratio``."""
    for k, v in p.split_ratio_by_shots.items():
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"split_ratio_by_shots[{k}] = {v}: must be in [0, 1]")
    return float(p.split_ratio_by_shots.get(int(shots), p.split_ratio))


def plan(inputs: MethodInputs) -> list[SynthUnit]:
    p: DiffIIParams = inputs.params  # type: ignore[assignment]
    inv, lora, suf = inputs.inversion_pool, inputs.concept_lora, inputs.prompt_suffixes
    if inv is None or lora is None or suf is None:
        raise ValueError("diff_ii needs inversion_pool, concept_lora and prompt_suffixes")
    load_tensor = inputs.extra.get("load_tensor")
    tokens = {r.label: r for r in lora[lora["kind"] == "token"].itertuples()} if p.use_concepts else {}
    lora_blob = lora[lora["kind"] == "lora"]["blob"].iloc[0] if p.use_concepts else None
    suffixes = list(suf.sort_values("idx")["suffix"]) if p.suffixes and len(suf) else []
    shots = int(inputs.train.groupby("label").size().max()) if len(inputs.train) else 0
    ratio = split_ratio_for(p, shots)
    switch_t = int(1000 * (1.0 - ratio))
    rate = p.expansion_rate or inputs.images_per_real  # the resolved M is expansion_rate when set (M_ALIAS)
    units = []
    for label, grp in inputs.train.groupby("label", sort=True):
        if p.use_concepts and label not in tokens:
            raise ValueError(f"no concept token for class {label!r}: rematerialize concept_lora")
        name = tokens[label].token if p.use_concepts else label
        concepts = {name: tokens[label].blob} if p.use_concepts else {}
        base = f"a photo of a {name} {inputs.metaclass}".strip()
        pool = inv[inv["label"] == label].sort_values("image_id")
        lat = dict(zip(pool["image_id"], pool["latent_blob"]))
        ids = [i for i in grp["image_id"] if i in lat]
        for i in range(rate * len(grp)):
            seed = unit_seed(inputs, label, i)
            if not p.use_concepts:  # the paper's "w/o concept learning": txt2img from the template prompt
                units.append(SynthUnit(
                    label=label, seed=seed, mode="txt2img", prompt=base, **inputs.protocol.unit_fields("txt2img"),
                    negative_prompt=inputs.negative_prompt, prompt_source="template",
                    params={"index": i, "metaclass": inputs.metaclass, "start": "noise", "ablation": "no_concepts"}))
                continue
            rng = random.Random(hash_obj("diffii", seed))
            suffix = rng.choice(suffixes) if suffixes else ""
            prompt = f"{base} {suffix}".strip()
            params = {"index": i, "suffix": suffix, "split_ratio": ratio, "metaclass": inputs.metaclass}
            common = dict(label=label, seed=seed, prompt=prompt, negative_prompt=inputs.negative_prompt, concepts=concepts, lora_blob=lora_blob,
                          embedding_id=concepts.get(name), prompt_source="suffix" if suffix else "template")
            if p.two_stage and suffix and switch_t > 0:
                common.update(switch_prompt=base, switch_t=switch_t)
            if (p.interpolation and len(ids) < 2) or not ids:
                units.append(SynthUnit(mode="txt2img", params={**params, "start": "noise"}, **common,
                                       **inputs.protocol.unit_fields("txt2img")))
                continue
            if p.interpolation:
                z1, z2 = rng.sample(ids, 2)
                theta = angle(load_tensor(lat[z1]), load_tensor(lat[z2])) if load_tensor else float("nan")
                alpha = sample_alpha(theta, rng)
                recipe = {"op": "circle", "z1": lat[z1], "z2": lat[z2], "alpha": alpha}
                params.update(start="circle", alpha=alpha, theta=theta)
                guides = (z1, z2)
            else:
                z1 = rng.choice(ids)
                recipe, guides = {"op": "copy", "z1": lat[z1]}, (z1,)
                params.update(start="inversion")
            units.append(SynthUnit(mode="latents", guide_ids=guides, latent_recipe=recipe, params=params, **common,
                                   **inputs.protocol.unit_fields("latents")))
    return units


SPECS = (
    MethodSpec("diff_ii", "1", "Diff-II: circle interpolation of DDIM-inverted latents + two-stage suffix denoising with TI+LoRA concepts",
               DiffIIParams, plan, needs=("concept_lora", "inversion_pool", "prompt_suffixes"),
               recipe="diff_ii", family="Diff-II",
               protocol=Protocol(scheduler="ddim", steps=25, guidance_scale=7.5, images_per_real=5,
                                 note="SD v1-5 + TI/LoRA; start = circle interpolation of DDIM inversions "
                                      "(inversion.steps, paper 200, at g 1); M = expansion rate per class-image")),
)
