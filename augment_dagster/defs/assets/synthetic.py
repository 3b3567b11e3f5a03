"""synthetic/<method>: one asset per method enabled in the config, built from the method registry.

Deps come from the method's declared ``needs``; the asset plans units, reuses memoized ones and sends
the rest through the one generation core (batched), then writes the lineage manifest.
"""

import time

import dagster as dg
import pandas as pd

from ...config import parse_split_key
from ...methods.registry import get_method, method_params
from ...methods.runner import SYNTH_COLUMNS
from ...stages import STAGES
from ..resources import Models, StoreResource
from .common import Experiment, lineage_metadata, output, sample_grid_metadata, stage_asset


def _spec_and_params(exp: Experiment, name: str):
    return get_method(exp.cfg.method_algorithm(name)), method_params(name, exp.cfg.methods[name])


def compute_synthetic(exp: Experiment, name: str, partition_key: str, split: pd.DataFrame, upstream: dict,
                      run_id: str, log=None, *, store: StoreResource | None = None,
                      models: Models | None = None) -> tuple[pd.DataFrame, dict]:
    """The body of ``synthetic/<name>`` for one split partition: plan units, reuse memoized ones, generate the
    rest through the one generation core, post-filter, build the manifest and its metadata.

    Used both by the asset in the run process (with its resources) and by ``augment_dagster.defs.pipes_worker`` out
    of process; without ``store``/``models`` (a script) they are made from the config."""
    from ...methods.base import MethodInputs
    from ...methods.registry import resolve_protocol

    cfg = exp.cfg
    store = store or StoreResource(root=str(exp.data_dir))
    models = models or Models(cfg, store)
    spec, params = _spec_and_params(exp, name)
    _, seed = parse_split_key(partition_key)
    g = cfg.generation
    proto = resolve_protocol(cfg, name)
    images = store.images(split, cfg.dataset)
    inputs = MethodInputs(
        method=name, split=split, params=params, images_per_real=proto.images_per_real,
        seed=exp.seed(partition_key),
        metaclass=cfg.dataset.metaclass, negative_prompt=g.negative_prompt, protocol=proto,
        extra={"load_tensor": images.tensor}, **upstream,
    )
    services = None
    if spec.prepare is not None or spec.post_filter is not None:
        from ...stages.services import FilterServices

        services = FilterServices(images, store.blobs, cfg.training.image_size, clip_factory=models.clip)
    if spec.prepare is not None:
        inputs.extra.update(spec.prepare(inputs, services))
    units = spec.plan(inputs)
    model_fp = models.diffusion_fingerprint() if spec.uses_diffusion else ""
    t_plan = time.perf_counter()
    groups = [(-1, inputs, units)] + episode_groups(exp, name, spec, proto, inputs, split, seed, services)
    rows_by_group, stats, planned = run_groups(exp, store, models, name, spec, groups, model_fp, images, params,
                                               run_id, log)
    rows, filter_md = [], {}
    ep_kept = ep_candidates = 0
    filter_seconds = 0.0
    for (e, g_inputs, g_units), g_rows in zip(groups, rows_by_group):
        if spec.post_filter is not None:
            n_in = len(g_rows)
            tf = time.perf_counter()
            g_rows, md_g = spec.post_filter(g_rows, g_inputs, services)
            filter_seconds += time.perf_counter() - tf
            if e < 0:
                filter_md = md_g
            else:
                g_rows = trim_per_class(g_rows, g_inputs.extra["augmented_per_class"])
                ep_candidates, ep_kept = ep_candidates + n_in, ep_kept + len(g_rows)
        rows += [{**r, "episode": e} for r in g_rows]
    if filter_md and ep_candidates:  # the integrity check compares the rows with "kept": episodes included
        filter_md = {**filter_md, "kept": int(filter_md.get("kept", 0)) + ep_kept,
                     "episode_candidates": ep_candidates, "episode_kept": ep_kept}
    # planning, deduplication and row assembly: the per-episode overhead next to generation and filters
    plan_seconds = time.perf_counter() - t_plan - stats.seconds - filter_seconds
    df = pd.DataFrame(rows, columns=None if rows else SYNTH_COLUMNS + ["episode"])
    df["episode"] = df["episode"].astype("int64")
    df["split"] = partition_key
    split_df = df[df["episode"] < 0]
    # sample grid: the first image of the first guides of each class
    sample = split_df.groupby("label").head(4).head(32)
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
        "per_class": dg.MetadataValue.json(split_df.groupby("label").size().to_dict()),
    }
    if len(groups) > 1:  # support: episode (training.episodes): images made from each episode's fresh support
        ep_df = df[df["episode"] >= 0]
        per_ep = ep_df.groupby(["episode", "label"]).size()
        md.update({"episodes": dg.MetadataValue.int(len(groups) - 1),
                   "episode_images": dg.MetadataValue.int(len(ep_df)),
                   "episode_per_class": dg.MetadataValue.json(sorted({int(v) for v in per_ep}) if len(per_ep) else []),
                   "episode_orchestration_seconds": dg.MetadataValue.float(round(plan_seconds, 3))})
    if filter_md:
        md["filter"] = dg.MetadataValue.json(filter_md)
    md.update(lineage_metadata(exp, store, df, planned_units=planned))  # the UI's lineage table + planned units
    md.update(sample_grid_metadata(store, [images.synthetic(b) for b in sample["blob"]], f"synthetic/{name} {partition_key}"))
    return df, md


def episode_generation(cfg, name: str):
    """The method entry's episode config when it generates per episode (few_shot_episodes + support: episode)."""
    training = cfg.training_for(name)
    if "few_shot_episodes" in training.evaluation and training.episodes.support == "episode":
        return training.episodes
    return None


def trim_per_class(items: list, n: int, label=lambda x: x["label"] if isinstance(x, dict) else x.label) -> list:
    """The first ``n`` items of each class, in plan order (the equal-count rule of ``support: episode``)."""
    seen: dict[str, int] = {}
    out = []
    for it in items:
        c = label(it)
        if seen.get(c, 0) < n:
            seen[c] = seen.get(c, 0) + 1
            out.append(it)
    return out


def episode_groups(exp: Experiment, name: str, spec, proto, inputs, split: pd.DataFrame, split_seed: int,
                   services) -> list:
    """[(episode, inputs, units)] of ``support: episode``: the method plans from each episode's support (its N
    classes × K fresh shots) exactly as from a split, with M = ⌈A/K⌉ per real image and A =
    ``augmented_per_class`` images kept per class (a post-filter's survivors are trimmed after it). Units that
    recur across episodes (same guide, seed, prompt) have one memo key and are generated once."""
    from dataclasses import replace

    from ...training.episodes import augmented_per_class, episode_splits

    ecfg = episode_generation(exp.cfg, name)
    if ecfg is None:
        return []
    out = []
    for e, esplit in episode_splits(split, ecfg, split_seed):
        k = int(esplit.groupby("label").size().min())
        a = augmented_per_class(ecfg, k, esplit["label"].nunique())
        g = replace(inputs, split=esplit, images_per_real=-(-a // k),
                    extra={**inputs.extra, "episode": e, "augmented_per_class": a})
        if spec.prepare is not None:
            g.extra.update(spec.prepare(g, services))
        units = spec.plan(g)
        if spec.post_filter is None:
            units = trim_per_class(units, a)
        out.append((e, g, units))
    return out


def run_groups(exp: Experiment, store: StoreResource, models: Models, name: str, spec, groups: list, model_fp: str,
               images, params, run_id: str, log):
    """Run every group's units as one deduplicated batch list through ``run_units``; rows per group, stats and
    the planned row count (one row per planned unit of each group)."""
    from ...methods.runner import run_units, unit_key

    g = exp.cfg.generation
    keyed = [[(unit_key(spec, u, model_fp), u) for u in units] for _, _, units in groups]
    unique: dict[str, object] = {}
    for ku in keyed:
        for k, u in ku:
            unique.setdefault(k, u)
    rows, stats = run_units(
        spec, name, list(unique.values()), blobs=store.blobs, memo=store.memo(), model_fp=model_fp, load_image=images.real,
        load_tensor=images.tensor, core_factory=models.generation_core, render_params=params,
        batch_size=g.batch_size if isinstance(g.batch_size, int) else g.max_batch_size, run_id=run_id, progress=True,
        on_batch_done=(lambda done, total: log(f"{name}: {done}/{total} computed")) if log else None,
    )
    by_key = {r["memo_key"]: r for r in rows}
    return [[dict(by_key[k]) for k, _ in ku] for ku in keyed], stats, sum(len(ku) for ku in keyed)


def pipes_extras(exp: Experiment, name: str, partition_key: str, run_id: str) -> dict:
    """What the out-of-process worker needs to rebuild the same inputs: the validated config, the method, the
    partition, the store root and the manifest keys of the asset and its upstreams."""
    spec, _ = _spec_and_params(exp, name)
    return {
        "config": exp.cfg.model_dump(mode="json"), "config_path": exp.cfg.source_path, "method": name,
        "partition": partition_key, "data_dir": str(exp.data_dir), "run_id": run_id,
        "asset_key": list(exp.key("synthetic", name).path),
        "inputs": {"split": list(exp.key("few_shot_split").path),
                   **{need: list(exp.key(STAGES[need].asset).path) for need in spec.needs}},
    }


PIPES_WORKER = "augment_dagster.defs.pipes_worker"  # the module ``python -m`` runs out of process


def run_out_of_process(context: dg.AssetExecutionContext, exp: Experiment, name: str) -> dg.MaterializeResult:
    """Run ``compute_synthetic`` in ``augment_dagster.defs.pipes_worker`` through Dagster Pipes; the worker writes the
    manifest parquet (same path as the IO manager) and reports the materialization with its data version."""
    import sys

    ex = exp.cfg.execution
    extras = pipes_extras(exp, name, context.partition_key, context.run_id)
    env = {"AUGMENT_DATA_DIR": str(exp.data_dir), "OMP_WAIT_POLICY": "PASSIVE"}
    if ex.mode == "pipes_subprocess":
        client: dg.PipesSubprocessClient = context.resources.pipes_subprocess_client
        command = [ex.python or sys.executable, "-m", PIPES_WORKER]
        inv = client.run(context=context, command=command, extras=extras, env=env)
    else:  # pipes_k8s
        from ..scaleout import pipes_pod_spec

        client = context.resources.pipes_k8s_client
        inv = client.run(context=context, image=ex.k8s.image, namespace=ex.k8s.namespace, extras=extras, env=env,
                         command=["python", "-m", PIPES_WORKER], base_pod_spec=pipes_pod_spec(exp.cfg))
    return inv.get_materialize_result()


def build_one(exp: Experiment, name: str) -> dg.AssetsDefinition:
    from ..scaleout import gpu_op_tags

    cfg = exp.cfg
    spec, _ = _spec_and_params(exp, name)
    ins = {"split": "few_shot_split", **{need: STAGES[need].asset for need in spec.needs}}
    sections = [("methods", name), "generation"] + ([("models", "diffusion")] if spec.uses_diffusion else [])
    proto_version = ""
    if spec.uses_diffusion:  # the resolved protocol includes the paper defaults, which live in code, not config
        from ...methods.registry import resolve_protocol
        from ...util import hash_obj

        p = resolve_protocol(cfg, name).as_dict()
        p.pop("sources")
        proto_version = "-p" + hash_obj(p)[:8]
    ecfg = episode_generation(cfg, name)
    if ecfg is not None:  # support: episode: the episodes (and their supports) decide what is generated
        from ...training.episodes import episode_config_identity
        from ...util import hash_obj

        proto_version += "-e" + hash_obj(episode_config_identity(ecfg))[:8]
    kinds = {"pytorch", "diffusers"} if spec.uses_diffusion else {"pytorch", "kornia"}
    mode = cfg.execution.mode if spec.uses_diffusion else "in_process"
    resource_keys = {"pipes_subprocess": {"pipes_subprocess_client"}, "pipes_k8s": {"pipes_k8s_client"}}.get(mode, set())

    @stage_asset(exp, "synthetic", name, ins=ins, resources=("store", "models"),
        code_version=f"{spec.version}-" + exp.code_version(*sections) + proto_version,
        pool="gpu" if spec.uses_diffusion else None, kinds=kinds, op_tags=gpu_op_tags(spec.uses_diffusion, cfg),
        description=f"Synthetic set: {spec.description}. One row per image with its full lineage.",
        metadata={"method": name, "algorithm": spec.name,
                  **({"protocol": resolve_protocol(cfg, name).summary()} if spec.uses_diffusion else {})},
        required_resource_keys=resource_keys,
    )
    def synthetic(context: dg.AssetExecutionContext, split: pd.DataFrame, store: StoreResource, models: Models, **upstream):
        if mode != "in_process":
            return run_out_of_process(context, exp, name)
        df, md = compute_synthetic(exp, name, context.partition_key, split, upstream, context.run_id,
                                   log=context.log.debug, store=store, models=models)
        return output(df, md)

    return synthetic


def build(exp: Experiment) -> list:
    return [build_one(exp, name) for name in exp.cfg.enabled_methods()]


def _device(exp: Experiment) -> str:
    """The device the generation ran on (models.device resolved: 'auto' -> cuda or cpu)."""
    from ...util import pick_device

    return pick_device(exp.device)

