"""DIAGen (METHODS.md §2): DA-Fusion + (a) embedding noise, (b) LLM prompt sets, (c) confidence weights.

Assignment is DIAGen's deterministic round-robin: per class a counter c increments per generated image
(looping over real images, then repeats m); prompt = prompts[c mod P], concept = names[c mod |names|] with
names = [S*, S*+σ1ε1, S*+σ2ε2, S*+σ3ε3]. Ablations are config entries with use_noise/use_llm/weighting.

``resample_per_image: true`` (METHODS.md §14 option) keeps the σ round-robin but draws a fresh ε for every image:
the unit references the base vector S* and carries (σ, noise seed); the runner adds σ·ε at generation time.
The lineage row then has embedding_id = S* and params.noise_seed (params.noise_draw = -2 marks a per-image draw)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import MethodInputs, MethodParams, MethodSpec, SynthUnit, unit_seed
from .protocol import Protocol
from ..store.tensors import tensor_bytes, tensor_from_bytes
from ..util import stable_int


class DIAGenParams(MethodParams):
    strength: float = Field(0.7, ge=0.0, le=1.0, description="SDEdit t0 (README example: 0.7)")
    use_noise: bool = Field(True, description="(a) round-robin over the noisy concept vectors")
    use_llm: bool = Field(True, description="(b) round-robin over the class's LLM prompt set")
    weighting: Literal["none", "paper", "code"] = Field("paper", description="(c) w = q (paper) or the code rule")
    resample_per_image: bool = Field(False, description="(a) draw a fresh noise vector per image instead of the "
                                                        "three fixed draws per class")


def plan(inputs: MethodInputs) -> list[SynthUnit]:
    p: DIAGenParams = inputs.params  # type: ignore[assignment]
    if inputs.concepts is None:
        raise ValueError("diagen needs the concept_embeddings stage")
    con = inputs.concepts
    prompts = inputs.class_prompts
    units = []
    for label, grp in inputs.train.groupby("label", sort=True):
        cls = con[con["label"] == label]
        if cls.empty:
            raise ValueError(f"no concept embedding for class {label!r}: rematerialize concept_embeddings")
        base = cls[cls["variant"] == "base"]
        noise = cls[cls["variant"] == "noise"].sort_values("sigma")
        names = [base.iloc[0]] + ([r for _, r in noise.iterrows()] if p.use_noise else [])
        if p.use_llm:
            if prompts is None or prompts[prompts["label"] == label].empty:
                raise ValueError(f"no LLM prompts for class {label!r}: rematerialize class_prompts")
            pr = prompts[prompts["label"] == label].sort_values("idx")
            templates = list(zip(pr["template"], pr["prompt_source"]))
        else:
            templates = [("a photo of a {name}", "template")]
        c = 0
        for row in grp.itertuples():
            for m in range(inputs.images_per_real):
                tok = names[c % len(names)]
                tmpl, src = templates[c % len(templates)]
                seed = unit_seed(inputs, row.image_id, m)
                sigma = float(tok["sigma"])
                params = {"m": m, "counter": c, "sigma": sigma, "noise_draw": int(tok["draw"]), "template": tmpl}
                eid, noise = tok["embedding_id"], {}
                if p.resample_per_image and tok["variant"] == "noise":
                    eid = base.iloc[0]["embedding_id"]
                    nseed = stable_int("diagen-noise-per-image", seed, label, sigma, bits=31)
                    noise = {tok["token"]: (sigma, nseed)}
                    params.update(noise_draw=-2, noise_seed=nseed)
                units.append(SynthUnit(
                    label=label, seed=seed, mode="img2img",
                    prompt=tmpl.replace("{name}", tok["token"]), guide_ids=(row.image_id,), strength=p.strength,
                    negative_prompt=inputs.negative_prompt, **inputs.protocol.unit_fields("img2img"),
                    init_image_id=row.image_id, concepts={tok["token"]: eid}, concept_noise=noise,
                    embedding_id=eid, prompt_source=src, params=params,
                ))
                c += 1
    return units


SPECS = (
    # version 2: img2img z0 is a posterior sample (vae_encode "sample": DIAGen's code runs DA-Fusion's pipeline)
    MethodSpec("diagen", "2", "DIAGen: DA-Fusion + embedding noise + LLM prompts + confidence weighting (t0=0.7, w=15)",
               DIAGenParams, plan, needs=("concepts", "class_prompts"), default_alpha=0.7,
               recipe="diagen", family="DA-Fusion/DIAGen",
               protocol=Protocol(scheduler="pndm", steps=50, guidance_scale=15.0, images_per_real=10, vae_encode="sample",
                                 note="SD v1-4 img2img at t0 0.7 (⌊50·0.7⌋ = 35 steps), α 0.7")),
)


# ---------------------------------------------------------------- embedding noise (§2a)
def noise_variants(base_rows: list[dict], *, blobs, sigmas: list[float], seed: int) -> list[dict]:
    """DIAGen (METHODS §2a): S_v = S* + σ·ε, ε ~ N(0, I), one fixed draw per σ per class, stored as extra
    concept vectors (tokens ``<cls_σ>``). Deterministic in (seed, class, σ)."""
    from ..models.text import noisy_vector

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
