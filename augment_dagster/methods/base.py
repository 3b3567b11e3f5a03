"""The method extension contract (no Dagster, no torch at import time).

A method is one module declaring a ``MethodSpec``: its name and version, the upstream stages it ``needs`` (names
of the stage table, ``augment_dagster/stages``), a pydantic model of its parameters, its paper's generation
``protocol`` (sampler, steps, CFG, M, start rule), its paper's training ``recipe``, its report ``family``, and a
``plan`` function that, given its inputs, returns the synthetic *units* to produce (what to generate + the
lineage fields of each; seeds from ``unit_seed``, protocol fields from ``inputs.protocol.unit_fields(mode)``).
Everything a unit's ``identity()`` holds enters its memo key. The runner (``methods/runner.py``) looks each unit
up in the memo and sends the misses, batched, through the one generation core. Methods with no diffusion
(classic augmentation) supply ``render`` instead. Adding one: the module + one line in ``registry._MODULES``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from .. import stages
from ..util import stable_int
from .protocol import PROJECT_DEFAULT, Protocol, ResolvedProtocol


class MethodParams(BaseModel):
    """Parameters every method accepts; methods subclass this. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    # the generation protocol (sampler, steps, CFG, M, ...) is not a parameter: methods.<entry>.<key> and
    # MethodSpec.protocol (methods/protocol.py)
    weighting: Literal["none", "paper", "code"] = Field("none", description="confidence weights (DIAGen): none=uniform, paper: w=q, code: w=1 if q>=.5 else 2q")


@dataclass(kw_only=True)
class SynthUnit:
    """One synthetic image to produce. Its fields are the lineage row (plus ``params``).

    The protocol fields (guidance_scale, steps, scheduler, start_rule, resolution, preprocess, vae_encode) have no
    default: a plan passes ``**inputs.protocol.unit_fields(mode)`` (methods/protocol.py), overriding a key only
    where the method computes its own (SGID's per-image guidance)."""

    label: str
    seed: int
    mode: Literal["img2img", "txt2img", "latents", "transform"]
    prompt: str | list[tuple[str, float]] = ""
    guide_ids: tuple[str, ...] = ()
    strength: float | None = None
    guidance_scale: float
    negative_prompt: str = ""
    steps: int
    scheduler: str  # resolved sampler
    start_rule: str  # img2img start: "sdedit" | "genie"
    resolution: int | None  # None = the model's native size
    preprocess: str  # init image -> square: "resize" | "center_crop"
    vae_encode: str  # img2img z0: posterior "mode" (mean) | a posterior "sample" (diffusers' img2img pipeline)
    init_image_id: str | None = None
    init_latents_blob: str | None = None
    # Diff-II: start latents computed from stored ones, e.g. {"op": "circle", "z1": blob, "z2": blob, "alpha": a}
    latent_recipe: dict[str, Any] | None = None
    lora_blob: str | None = None  # a LoRA (safetensors state dict) applied to the UNet for this unit
    switch_prompt: str | list[tuple[str, float]] | None = None
    switch_t: int | None = None
    concepts: dict[str, str] = field(default_factory=dict)  # placeholder token -> embedding blob id
    # token -> (sigma, noise seed): the runner adds sigma * N(0, I) (drawn from the seed) to that concept vector
    concept_noise: dict[str, tuple[float, int]] = field(default_factory=dict)
    embedding_id: str | None = None
    prompt_source: str = "template"
    weighting: str = "output"
    params: dict[str, Any] = field(default_factory=dict)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return "".join(t for t, _ in self.prompt)

    def identity(self) -> dict[str, Any]:
        """Everything that determines the output image (goes into the memo key)."""
        return {
            "label": self.label, "seed": self.seed, "mode": self.mode, "prompt": self.prompt,
            "guide_ids": list(self.guide_ids), "strength": self.strength, "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt, "steps": self.steps, "init_image_id": self.init_image_id,
            "init_latents_blob": self.init_latents_blob, "latent_recipe": self.latent_recipe, "lora_blob": self.lora_blob,
            "switch_prompt": self.switch_prompt, "switch_t": self.switch_t,
            "concepts": self.concepts, **({"concept_noise": {k: list(v) for k, v in self.concept_noise.items()}}
                                          if self.concept_noise else {}),
            "weighting": self.weighting, "params": self.params,
            # the protocol keys enter only when they differ from what every unit used before they existed, so
            # memo keys of DDIM / SDEdit / native-resolution units stay as they were
            **({"scheduler": self.scheduler} if self.scheduler != "ddim" else {}),
            **({"start_rule": self.start_rule} if self.start_rule != "sdedit" else {}),
            **({"resolution": self.resolution} if self.resolution is not None else {}),
            **({"preprocess": self.preprocess} if self.preprocess != "resize" else {}),
            **({"vae_encode": self.vae_encode} if self.vae_encode != "mode" else {}),
        }


@dataclass(kw_only=True)
class MethodInputs:
    """What a method's ``plan`` sees. Only the stages it declared in ``needs`` are filled."""

    method: str  # the config entry name (a variant may differ from the algorithm name)
    split: pd.DataFrame  # few_shot_split manifest (role == train rows are the guides)
    params: MethodParams
    protocol: ResolvedProtocol  # this entry's generation protocol: units take their fields from it (unit_fields)
    images_per_real: int  # M: the protocol's, or an episode's ⌈A/K⌉ (training/episodes.py)
    seed: int
    metaclass: str = "shape"
    negative_prompt: str = ""
    concepts: pd.DataFrame | None = None  # label, token, embedding_id (+ noise rows for DIAGen)
    captions: pd.DataFrame | None = None
    class_prompts: pd.DataFrame | None = None
    prompt_suffixes: pd.DataFrame | None = None
    concept_lora: pd.DataFrame | None = None
    inversion_pool: pd.DataFrame | None = None
    real_classifier: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> pd.DataFrame:
        return self.split[self.split["role"] == "train"].sort_values(["label", "rank"]).reset_index(drop=True)

    @property
    def class_names(self) -> list[str]:
        return sorted(self.split.loc[self.split["role"] == "train", "label"].unique())


@dataclass(frozen=True)
class MethodSpec:
    name: str
    version: str
    description: str
    Params: type[MethodParams]
    plan: Callable[[MethodInputs], list[SynthUnit]]
    needs: tuple[str, ...] = ()
    uses_diffusion: bool = True
    # for non-diffusion methods: render(units, images_by_id, params) -> list[PIL.Image]
    render: Callable[..., list] | None = None
    # optional post-filter after generation: post_filter(rows, inputs, services) -> (kept rows, metadata);
    # services: stages.services.FilterServices (classifier features, CLIP zero-shot, image access)
    post_filter: Callable[..., Any] | None = None
    # synthetic probability α when the config entry sets none (DIAGen: 0.7); None = training default
    default_alpha: float | None = None
    # the paper's generation protocol (sampler, steps, CFG, M, start rule); unset keys use the project default
    protocol: Protocol = PROJECT_DEFAULT
    # optional, before plan: prepare(inputs, services) -> dict merged into inputs.extra (e.g. GeNIe's train
    # confusion matrix); services: stages.services.FilterServices
    prepare: Callable[..., dict] | None = None
    # the paper's downstream classifier recipe: a key of the training RECIPES table (None: the project's); a paper
    # preset selects it with ``training.recipe`` (METHODS.md §1–§5)
    recipe: str | None = None
    # the report's plot family (legend group, colour ramp), e.g. "baselines", "DA-Fusion/DIAGen"; None: the method's
    # own name (a new method is its own family, never filed under the baselines)
    family: str | None = None

    def __post_init__(self):
        bad = stages.unknown(self.needs)
        if bad:
            raise ValueError(f"method {self.name}: unknown needs {bad}; valid: {list(stages.STAGES)}")


def unit_seed(inputs: MethodInputs, *parts) -> int:
    """Seed of one unit: depends only on the method entry, split seed and the unit's own identity,
    so adding an image never changes the seeds of other units."""
    return stable_int("unit", inputs.method, inputs.seed, *parts, bits=31)


def concept_token(label: str) -> str:
    """Placeholder token of a class concept, e.g. '<circle>' (spaces -> '_')."""
    return "<" + "_".join(label.split()) + ">"
