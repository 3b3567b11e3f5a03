"""synthetic/<method>: one asset per method enabled in the config, built from the method registry.

Deps come from the method's declared ``needs``; the asset plans units, reuses memoized ones and sends
the rest through the one generation core (batched), then writes the lineage manifest.
"""

import dagster as dg
import pandas as pd

from ..config import parse_split_key
from ..methods.registry import get_method, method_params
from ..methods.runner import SYNTH_COLUMNS
from .common import (CONTENT_AUTOMATION, Experiment, clip_bundle, diffusion_fingerprint, generation_core,
                     image_source, output, sample_grid_metadata)

# stage name in MethodSpec.needs -> asset name
STAGE_ASSETS = {
    "concepts": "concept_embeddings", "captions": "captions", "class_prompts": "class_prompts",
    "prompt_suffixes": "prompt_suffixes", "concept_lora": "concept_lora", "inversion_pool": "inversion_pool",
    "real_classifier": "real_classifier",
}


def _spec_and_params(exp: Experiment, name: str):
    return get_method(exp.cfg.method_algorithm(name)), method_params(name, exp.cfg.methods[name])


def compute_synthetic(exp: Experiment, name: str, partition_key: str, split: pd.DataFrame, upstream: dict,
                      run_id: str, log=None) -> tuple[pd.DataFrame, dict]:
    """The body of ``synthetic/<name>`` for one split partition: plan units, reuse memoized ones, generate the
    rest through the one generation core, post-filter, build the manifest and its metadata.

    Used both by the asset in the run process and by ``augment_dagster.pipes_worker`` out of process."""
    from ..methods.base import MethodInputs
    from ..methods.runner import run_units

    from ..methods.protocol import apply_protocol, resolve_protocol

    cfg = exp.cfg
    spec, params = _spec_and_params(exp, name)
    _, seed = parse_split_key(partition_key)
    g = cfg.generation
    proto = resolve_protocol(cfg, name)
    images = image_source(exp, split)
    inputs = MethodInputs(
        method=name, split=split, params=params, images_per_real=proto.images_per_real,
        guidance_scale=proto.guidance_scale, steps=proto.steps, seed=cfg.seed * 1000 + seed,
        metaclass=cfg.dataset.metaclass, negative_prompt=g.negative_prompt, protocol=proto,
        extra={"load_tensor": images.tensor}, **upstream,
    )
    services = None
    if spec.prepare is not None or spec.post_filter is not None:
        from ..methods.services import FilterServices

        services = FilterServices(images, exp.blobs, cfg.training.image_size, clip_factory=lambda: clip_bundle(exp))
    if spec.prepare is not None:
        inputs.extra.update(spec.prepare(inputs, services))
    units = spec.plan(inputs)
    if spec.uses_diffusion:
        apply_protocol(units, proto)
    model_fp = diffusion_fingerprint(exp) if spec.uses_diffusion else ""
    rows, stats = run_units(
        spec, name, units, blobs=exp.blobs, memo=exp.memo(), model_fp=model_fp, load_image=images.real,
        load_tensor=images.tensor, core_factory=lambda lora=None: generation_core(exp, lora), render_params=params,
        batch_size=g.batch_size if isinstance(g.batch_size, int) else g.max_batch_size, run_id=run_id, progress=True,
        on_batch_done=(lambda done, total: log(f"{name}: {done}/{total} computed")) if log else None,
    )
    filter_md = {}
    if spec.post_filter is not None:
        rows, filter_md = spec.post_filter(rows, inputs, services)
    df = pd.DataFrame(rows, columns=None if rows else SYNTH_COLUMNS)
    df["split"] = partition_key
    # sample grid: the first image of the first guides of each class
    sample = df.groupby("label").head(4).head(32)
    md = {
        "computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
        "unet_forward_passes": dg.MetadataValue.int(stats.unet_forward_passes),
        **({"unet_batch_size": dg.MetadataValue.int(stats.unet_batch_size),
            "oom_backoffs": dg.MetadataValue.int(stats.oom_backoffs)} if stats.unet_batch_size else {}),
        "compute_seconds": dg.MetadataValue.float(round(stats.compute_seconds, 3)),
        "device": dg.MetadataValue.text(_device(exp) if spec.uses_diffusion else "cpu"),
        "images": dg.MetadataValue.int(len(df)),
        "diffusion": dg.MetadataValue.bool(spec.uses_diffusion),
        **({"protocol": dg.MetadataValue.json({**{k: v for k, v in proto.as_dict().items() if k != "sources"},
                                                "sources": proto.sources})} if spec.uses_diffusion else {}),
        "per_class": dg.MetadataValue.json(df.groupby("label").size().to_dict()),
    }
    if filter_md:
        md["filter"] = dg.MetadataValue.json(filter_md)
    from .common import lineage_metadata  # the UI's lineage table + planned units (checked by synthetic_integrity)
    md.update(lineage_metadata(exp, df, planned_units=len(units)))
    md.update(sample_grid_metadata(exp, [images.synthetic(b) for b in sample["blob"]], f"synthetic/{name} {partition_key}"))
    return df, md


def pipes_extras(exp: Experiment, name: str, partition_key: str, run_id: str) -> dict:
    """What the out-of-process worker needs to rebuild the same inputs: the validated config, the method, the
    partition, the store root and the manifest keys of the asset and its upstreams."""
    spec, _ = _spec_and_params(exp, name)
    return {
        "config": exp.cfg.model_dump(mode="json"), "config_path": exp.cfg.source_path, "method": name,
        "partition": partition_key, "data_dir": str(exp.data_dir), "run_id": run_id,
        "asset_key": list(exp.key("synthetic", name).path),
        "inputs": {"split": list(exp.key("few_shot_split").path),
                   **{need: list(exp.key(STAGE_ASSETS[need]).path) for need in spec.needs}},
    }


def run_out_of_process(context: dg.AssetExecutionContext, exp: Experiment, name: str) -> dg.MaterializeResult:
    """Run ``compute_synthetic`` in ``augment_dagster.pipes_worker`` through Dagster Pipes; the worker writes the
    manifest parquet (same path as the IO manager) and reports the materialization with its data version."""
    import sys

    ex = exp.cfg.execution
    extras = pipes_extras(exp, name, context.partition_key, context.run_id)
    env = {"AUGMENT_DATA_DIR": str(exp.data_dir), "OMP_WAIT_POLICY": "PASSIVE"}
    if ex.mode == "pipes_subprocess":
        client: dg.PipesSubprocessClient = context.resources.pipes_subprocess_client
        command = [ex.python or sys.executable, "-m", "augment_dagster.pipes_worker"]
        inv = client.run(context=context, command=command, extras=extras, env=env)
    else:  # pipes_k8s
        from ..scaleout import pipes_pod_spec

        client = context.resources.pipes_k8s_client
        inv = client.run(context=context, image=ex.k8s.image, namespace=ex.k8s.namespace, extras=extras, env=env,
                         command=["python", "-m", "augment_dagster.pipes_worker"], base_pod_spec=pipes_pod_spec(exp.cfg))
    return inv.get_materialize_result()


def build_one(exp: Experiment, name: str) -> dg.AssetsDefinition:
    from ..scaleout import gpu_op_tags

    cfg = exp.cfg
    spec, _ = _spec_and_params(exp, name)
    ins = {"split": dg.AssetIn(key=exp.key("few_shot_split"))}
    for need in spec.needs:
        ins[need] = dg.AssetIn(key=exp.key(STAGE_ASSETS[need]))
    sections = [("methods", name), "generation"] + ([("models", "diffusion")] if spec.uses_diffusion else [])
    proto_version = ""
    if spec.uses_diffusion:  # the resolved protocol includes the paper defaults, which live in code, not config
        from ..methods.protocol import resolve_protocol
        from ..util import hash_obj

        p = resolve_protocol(cfg, name).as_dict()
        p.pop("sources")
        proto_version = "-p" + hash_obj(p)[:8]
    kinds = {"pytorch", "diffusers"} if spec.uses_diffusion else {"pytorch", "kornia"}
    mode = cfg.execution.mode if spec.uses_diffusion else "in_process"
    resource_keys = {"pipes_subprocess": {"pipes_subprocess_client"}, "pipes_k8s": {"pipes_k8s_client"}}.get(mode, set())

    @dg.asset(
        key=exp.key("synthetic", name), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions, ins=ins, code_version=f"{spec.version}-" + exp.code_version(*sections) + proto_version,
        pool="gpu" if spec.uses_diffusion else None, kinds=kinds, op_tags=gpu_op_tags(spec.uses_diffusion, cfg),
        automation_condition=CONTENT_AUTOMATION,
        description=f"Synthetic set: {spec.description}. One row per image with its full lineage.",
        metadata={"method": name, "algorithm": spec.name,
                  **({"protocol": resolve_protocol(cfg, name).summary()} if spec.uses_diffusion else {})},
        required_resource_keys=resource_keys,
    )
    def synthetic(context: dg.AssetExecutionContext, split: pd.DataFrame, **upstream):
        if mode != "in_process":
            return run_out_of_process(context, exp, name)
        df, md = compute_synthetic(exp, name, context.partition_key, split, upstream, context.run_id, log=context.log.debug)
        return output(df, md)

    return synthetic


def build(exp: Experiment) -> list:
    return [build_one(exp, name) for name in exp.cfg.enabled_methods()]


def _device(exp: Experiment) -> str:
    """The device the generation ran on (models.device resolved: 'auto' -> cuda or cpu)."""
    from ..util import pick_device

    return pick_device(exp.device)

