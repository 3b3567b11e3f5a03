"""``standard``: classic augmentation as a synthetic set (METHODS.md §10) — M kornia-augmented copies of
each real image (policy weak | strong | randaugment). CutMix/MixUp are batch-level options of the
classifier (``training.cutmix_prob`` / ``training.mixup_alpha``), not images."""
from __future__ import annotations

from typing import Literal

from .base import MethodInputs, MethodParams, MethodSpec, SynthUnit, unit_seed


class StandardParams(MethodParams):
    policy: Literal["weak", "strong", "randaugment"] = "strong"


def plan(inputs: MethodInputs) -> list[SynthUnit]:
    p: StandardParams = inputs.params  # type: ignore[assignment]
    return [
        SynthUnit(label=row.label, seed=unit_seed(inputs, row.image_id, m), mode="transform",
                  guide_ids=(row.image_id,), init_image_id=row.image_id, prompt_source="none",
                  **inputs.protocol.unit_fields("transform"),
                  params={"m": m, "policy": p.policy})
        for row in inputs.train.itertuples() for m in range(inputs.images_per_real)
    ]


def render(units: list[SynthUnit], images_by_id: dict, params: StandardParams) -> list:
    import numpy as np
    import torch
    from PIL import Image

    from ..data.augment import augment_images

    out = []
    for u in units:
        im = images_by_id[u.init_image_id]
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        y = augment_images(x, params.policy, seed=u.seed)[0].clamp(0, 1)
        out.append(Image.fromarray((y.permute(1, 2, 0).numpy() * 255.0).round().astype("uint8")))
    return out


SPECS = (
    MethodSpec("standard", "1", "Standard augmentation (kornia): weak/strong/RandAugment copies of each real image",
               StandardParams, plan, uses_diffusion=False, render=render, family="baselines"),
)
