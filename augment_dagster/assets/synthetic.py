"""synthetic/<method>: one asset per method enabled in the config, built from the method registry.

Deps come from the method's declared ``needs``; the asset plans units, reuses memoized ones and sends
the rest through the one generation core (batched), then writes the lineage manifest.
"""

import dagster as dg
import pandas as pd

from ..config import parse_split_key
from ..methods.registry import get_method, method_params
from ..methods.runner import SYNTH_COLUMNS
from .common import (GPU_AUTOMATION, CHEAP_AUTOMATION, Experiment, clip_bundle, diffusion_fingerprint, generation_core,
                     image_source, output, sample_grid_metadata)

# stage name in MethodSpec.needs -> asset name
STAGE_ASSETS = {
    "concepts": "concept_embeddings", "captions": "captions", "class_prompts": "class_prompts",
    "prompt_suffixes": "prompt_suffixes", "concept_lora": "concept_lora", "inversion_pool": "inversion_pool",
    "real_classifier": "real_classifier",
}


def build_one(exp: Experiment, name: str) -> dg.AssetsDefinition:
    cfg = exp.cfg
    entry = cfg.methods[name]
    spec = get_method(cfg.method_algorithm(name))
    params = method_params(name, entry)
    ins = {"split": dg.AssetIn(key=exp.key("few_shot_split"))}
    for need in spec.needs:
        ins[need] = dg.AssetIn(key=exp.key(STAGE_ASSETS[need]))
    sections = [("methods", name), "generation"] + ([("models", "diffusion")] if spec.uses_diffusion else [])
    kinds = {"pytorch", "diffusers"} if spec.uses_diffusion else {"pytorch", "kornia"}

    @dg.asset(
        key=exp.key("synthetic", name), group_name=exp.name, io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions, ins=ins, code_version=f"{spec.version}-" + exp.code_version(*sections),
        pool="gpu" if spec.uses_diffusion else None, kinds=kinds,
        automation_condition=GPU_AUTOMATION if spec.uses_diffusion else CHEAP_AUTOMATION,
        description=f"Synthetic set: {spec.description}. One row per image with its full lineage.",
        metadata={"method": name, "algorithm": spec.name},
    )
    def synthetic(context: dg.AssetExecutionContext, split: pd.DataFrame, **upstream) -> dg.Output:
        from ..methods.base import MethodInputs
        from ..methods.runner import run_units

        _, seed = parse_split_key(context.partition_key)
        g = cfg.generation
        images = image_source(exp, split)
        inputs = MethodInputs(
            method=name, split=split, params=params,
            images_per_real=params.images_per_real or g.images_per_real,
            guidance_scale=params.guidance_scale if params.guidance_scale is not None else g.guidance_scale,
            steps=params.steps or g.steps, seed=cfg.seed * 1000 + seed, metaclass=cfg.dataset.metaclass,
            negative_prompt=g.negative_prompt, extra={"load_tensor": images.tensor}, **upstream,
        )
        units = spec.plan(inputs)
        model_fp = diffusion_fingerprint(exp) if spec.uses_diffusion else ""
        rows, stats = run_units(
            spec, name, units, blobs=exp.blobs, memo=exp.memo(), model_fp=model_fp, load_image=images.real,
            load_tensor=images.tensor, core_factory=lambda lora=None: generation_core(exp, lora), render_params=params,
            batch_size=g.batch_size, run_id=context.run_id, progress=True,
            on_batch_done=lambda done, total: context.log.debug(f"{name}: {done}/{total} computed"),
        )
        filter_md = {}
        if spec.post_filter is not None:
            from ..methods.stages import FilterServices

            services = FilterServices(images, exp.blobs, cfg.training.image_size, clip_factory=lambda: clip_bundle(exp))
            rows, filter_md = spec.post_filter(rows, inputs, services)
        df = pd.DataFrame(rows, columns=None if rows else SYNTH_COLUMNS)
        df["split"] = context.partition_key
        # sample grid: the first image of the first guides of each class
        sample = df.groupby("label").head(4).head(32)
        md = {
            "computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
            "unet_forward_passes": dg.MetadataValue.int(stats.unet_forward_passes),
            "gpu_seconds": dg.MetadataValue.float(round(stats.compute_seconds, 3)),
            "images": dg.MetadataValue.int(len(df)),
            "per_class": dg.MetadataValue.json(df.groupby("label").size().to_dict()),
        }
        if filter_md:
            md["filter"] = dg.MetadataValue.json(filter_md)
        md.update(sample_grid_metadata(exp, [images.synthetic(b) for b in sample["blob"]], f"synthetic/{name} {context.partition_key}"))
        return output(df, md)

    return synthetic


def build(exp: Experiment) -> list:
    return [build_one(exp, name) for name in exp.cfg.enabled_methods()]
