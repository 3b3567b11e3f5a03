"""Implementations of `augment status | lineage | report | export` (imported lazily by cli.py)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

from .config import ExperimentConfig
from .store.manifests import manifest_path, read_manifest


def stale_resolver(instance, asset_graph):
    """Dagster's stale-status resolver (what the UI's Unsynced badge uses). Internal API of dagster 1.13."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=asset_graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)


def status(cfg: ExperimentConfig, args) -> int:
    """Per asset and partition: missing / unsynced / fresh, with the reason Dagster gives."""
    import dagster as dg
    from dagster._core.definitions.data_version import StaleStatus

    from .definitions import build_definitions

    defs = build_definitions([cfg])
    instance = dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    resolver = stale_resolver(instance, graph)
    rows = []
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        parts = list(node.partitions_def.get_partition_keys()) if node.partitions_def else [None]
        for pk in parts:
            st = resolver.get_status(key, pk)
            causes = resolver.get_stale_root_causes(key, pk) if st == StaleStatus.STALE else []
            state = {StaleStatus.MISSING: "missing", StaleStatus.STALE: "unsynced", StaleStatus.FRESH: "fresh"}.get(st, str(st))
            why = "; ".join(f"{c.key.to_user_string()}{'[' + c.partition_key + ']' if c.partition_key else ''}: {c.reason}"
                            for c in causes[:3])
            rows.append((key.to_user_string(), pk or "-", state, why))
    w = max(len(r[0]) for r in rows) if rows else 10
    for k, pk, state, why in rows:
        print(f"{k:<{w}}  {pk:<10}  {state:<8}  {why}")
    counts = pd.Series([r[2] for r in rows]).value_counts().to_dict()
    print(f"\n{counts}")
    from .methods.registry import protocol_lines

    print("\ngeneration protocol per method (method entry > generation block > paper default):")
    for line in protocol_lines(cfg):
        print(f"  {line}")
    return 0


def lineage(cfg: ExperimentConfig, args) -> int:
    from .store.lineage import LineageError, format_lineage, lineage as chain

    try:
        ch = chain(cfg.resolved_data_dir(), args.ident)
    except LineageError as e:
        from .errors import UnknownNameError

        raise UnknownNameError(str(e), hint="give a synthetic id (or a unique prefix) from a manifest, "
                                            "e.g. from `augment export` or the Dagster UI") from None
    print(json.dumps(ch, indent=2, default=str) if args.json else format_lineage(ch))
    return 0


def report(cfg: ExperimentConfig, args) -> int:
    root = cfg.resolved_data_dir()
    rep = root / "report" / cfg.experiment / "report.md"
    if args.relog:
        return relog(cfg)
    if not rep.exists():
        print(f"no report yet at {rep}: run `augment run` first", file=sys.stderr)
        return 1
    print(rep.read_text())
    return 0


def relog(cfg: ExperimentConfig) -> int:
    """Log to MLflow every metrics row whose logging failed (``mlflow_error`` set) — e.g. server was down."""
    from .defs.tracking import MlflowTracker

    root = cfg.resolved_data_dir()
    tracker = MlflowTracker(tracking_uri=cfg.mlflow.tracking_uri, default_root=str(root / "mlflow"), enabled=True)
    n_ok = n_fail = 0
    for p in sorted((root / "manifests" / cfg.experiment / "metrics").glob("*/*.parquet")):
        df = read_manifest(p)
        changed = False
        for i, r in df.iterrows():
            if r.get("mlflow_run_id"):
                continue
            rid, err = tracker.log_run(
                cfg.mlflow.experiment_name or cfg.experiment, f"{r['method']}/{r['split']}",
                params={"method": r["method"], "split": r["split"], "shots": r["shots"], "seed": r["seed"],
                        "config_hash": cfg.config_hash(), "relogged": True},
                metrics={"acc_id": r["acc_id"], "acc_ood": r["acc_ood"], "best_val_acc": r["best_val_acc"]},
                tags={"augment.experiment": cfg.experiment, "augment.method": r["method"], "dagster.partition": r["split"],
                      "augment.classifier_blob": r["classifier_blob"]},
                find_existing={"augment.classifier_blob": r["classifier_blob"], "augment.method": r["method"],
                               "dagster.partition": r["split"]},
                datasets=_training_datasets(cfg, r["method"], r["split"]))
            if rid:
                df.at[i, "mlflow_run_id"] = rid
                df.at[i, "mlflow_error"] = ""
                changed = True
                n_ok += 1
            else:
                n_fail += 1
                print(f"still failing for {p}: {err}", file=sys.stderr)
        if changed:
            from .store.manifests import write_manifest

            write_manifest(p, df)
    print(f"relogged {n_ok} run(s); {n_fail} still failing")
    return 0 if n_fail == 0 else 1


def _training_datasets(cfg: ExperimentConfig, method: str, split: str) -> list:
    """The MLflow dataset inputs of a classifier run rebuilt from the manifests (for ``--relog``): the real split and,
    except for real_only, the synthetic set, with the data versions the Dagster instance recorded."""
    from .defs.tracking import DatasetRef
    from .store.manifests import manifest_version

    refs = []
    for path in (["few_shot_split"], ["synthetic", method]):
        p = manifest_path(cfg.resolved_data_dir(), [cfg.experiment, *path], split)
        if not p.exists():
            continue
        df = read_manifest(p)
        rec = _materialization(cfg, path, split) or {}
        refs.append(DatasetRef(name=f"{cfg.experiment}/{'/'.join(path)}[{split}]", digest=rec.get("data_version") or manifest_version(df),
                               source=str(p.resolve()), df=df))
    return refs


def export(cfg: ExperimentConfig, args) -> int:
    """Write a synthetic set as a Hugging Face ``imagefolder`` (train/<label>/<id>.png + metadata.jsonl, README.md
    with ``label`` as a ClassLabel) described by ``croissant.json`` (Croissant 1.1 with PROV-O lineage)."""
    from .store import BlobStore
    from .store.manifests import manifest_version
    from .util import atomic_path

    from .cli import check_names

    check_names(cfg, partitions=[args.split], methods=[args.method])
    root = cfg.resolved_data_dir()
    p = manifest_path(root, [cfg.experiment, "synthetic", args.method], args.split)
    if not p.exists():
        print(f"no synthetic set {args.method} for split {args.split} (expected {p}); materialize it first", file=sys.stderr)
        return 1
    df = read_manifest(p)
    if "episode" in df and (df["episode"] >= 0).any():
        # support: episode rows are made from episode supports (test-pool images): never a training set
        from .training.episodes import split_level

        print(f"note: {int((df['episode'] >= 0).sum())} per-episode images (made from the evaluation episodes' "
              "supports) are left out; the export is the split's own set", file=sys.stderr)
        df = split_level(df)
    sp_path = manifest_path(root, [cfg.experiment, "few_shot_split"], args.split)
    sp = read_manifest(sp_path)
    raw_path = manifest_path(root, [cfg.experiment, "raw_images"], None)
    known = pd.concat([sp, read_manifest(raw_path)] if raw_path.exists() else [sp], ignore_index=True)
    guide_path = dict(zip(known["image_id"], known["path"]))
    wp = manifest_path(root, [cfg.experiment, "confidence_weights", args.method], args.split)
    weights = dict(zip(*read_manifest(wp)[["synthetic_id", "weight"]].T.values)) if wp.exists() else {}
    spec, code_version = _synthetic_spec(cfg, args.method)
    syn_rec = _materialization(cfg, ["synthetic", args.method], args.split)
    split_rec = _materialization(cfg, ["few_shot_split"], args.split)
    if syn_rec is None or split_rec is None:
        print(f"note: no Dagster materialization of {cfg.experiment}/synthetic/{args.method}[{args.split}] in DAGSTER_HOME "
              f"{os.environ.get('DAGSTER_HOME')}; the export's version is the manifest's content hash", file=sys.stderr)
    data_version = (syn_rec or {}).get("data_version") or manifest_version(df)
    code_version = (syn_rec or {}).get("code_version") or code_version
    # the sampler is resolved per method (methods/protocol.py) and recorded per unit in the lineage row
    unit_sampler = [str(x) if spec.uses_diffusion and isinstance(x, str) else None
                    for x in (df["scheduler"] if "scheduler" in df else [cfg.models.diffusion.scheduler] * len(df))]
    sampler = ",".join(sorted({x for x in unit_sampler if x})) or None
    blobs = BlobStore(root)
    out = Path(args.out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(df.itertuples()):
        rel = Path("train") / _safe(r.label) / f"{r.synthetic_id[:24]}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blobs.find(r.blob), out / rel)
        guides = [str(g) for g in r.guide_ids]
        lines.append(_record(file_name=rel.relative_to("train").as_posix(), label=r.label, synthetic=True, synthetic_id=r.synthetic_id,
                             method=r.method, algorithm=r.algorithm, guide_ids=guides, guide_paths=[guide_path.get(g) for g in guides],
                             prompt=r.prompt, prompt_source=r.prompt_source, seed=int(r.seed),
                             strength=None if pd.isna(r.strength) else float(r.strength),
                             guidance_scale=float(r.guidance_scale), steps=None if pd.isna(r.steps) else int(r.steps),
                             sampler=unit_sampler[i], embedding_id=r.embedding_id, model_fingerprint=r.model_fingerprint,
                             params_json=r.params_json, weight=float(weights.get(r.synthetic_id, 1.0)),
                             dagster_run_id=r.created_by_run, code_version=code_version))
    if args.with_real:
        hf_rows = "hf_row" in sp.columns and str(sp["dataset_root"].iloc[0]).startswith("hf:")
        if hf_rows:  # rows of a Hugging Face dataset: written as PNG, one row read at a time
            from .data.images import ImageSource
            from .util import png_bytes

            src = ImageSource(sp["dataset_root"].iloc[0], sp, blobs, cfg.dataset.max_image_pixels,
                              hf_image_column=cfg.dataset.hf.image_column, cache_size=1)
        for r in sp[sp.role == "train"].itertuples():
            rel = Path("train") / _safe(r.label) / f"real-{r.image_id[:24]}{'.png' if hf_rows else Path(r.path).suffix}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            if hf_rows:
                (out / rel).write_bytes(png_bytes(src.real(r.image_id)))
            else:
                from .store.manifests import resolve_root

                shutil.copyfile(resolve_root(r.dataset_root, root) / r.path, out / rel)
            lines.append(_record(file_name=rel.relative_to("train").as_posix(), label=r.label, synthetic=False,
                                 image_id=r.image_id, weight=1.0))
    with atomic_path(out / "train" / "metadata.jsonl") as tmp:
        tmp.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    classes = sorted(sp.loc[sp.role == "train", "label"].unique())
    _write_croissant(cfg, args, out, df, sp, spec, code_version, sampler, classes, data_version=data_version,
                     split_version=(split_rec or {}).get("data_version") or manifest_version(sp), n=len(lines))
    print(f"exported {len(lines)} images to {out} (Hugging Face imagefolder layout, also readable by torchvision ImageFolder; "
          f"Croissant 1.1 metadata in {out / 'croissant.json'})")
    return 0


def _record(**kw) -> dict:
    """One metadata.jsonl line: every column of the Croissant RecordSet, ``None`` where it does not apply."""
    from .croissant import COLUMNS

    rec = {c: kw.pop(c, [] if arr else None) for c, _, arr, _ in COLUMNS}
    assert not kw, f"unknown export columns {sorted(kw)}"
    return rec


def _materialization(cfg: ExperimentConfig, path: list[str], partition: str) -> dict | None:
    """Data version, code version and run of the latest Dagster materialization of an asset partition (None if the
    instance in DAGSTER_HOME has none)."""
    import dagster as dg

    try:
        inst = dg.DagsterInstance.get()
        flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey([cfg.experiment, *path]), asset_partitions=[partition])
        recs = inst.fetch_materializations(flt, limit=1).records
    except Exception:  # noqa: BLE001 - no usable instance: the caller falls back to content hashes
        return None
    if not recs:
        return None
    tags = recs[0].asset_materialization.tags or {}
    return {"data_version": tags.get("dagster/data_version"), "code_version": tags.get("dagster/code_version"),
            "run_id": recs[0].run_id}


def _synthetic_spec(cfg: ExperimentConfig, method: str):
    """The method's registry spec and the Dagster code version of its synthetic/<method> asset."""
    import dagster as dg

    from .config import ConfigError
    from .definitions import build_definitions
    from .methods.registry import get_method

    if method not in cfg.methods:
        raise ConfigError(f"method {method!r} is not in the experiment config (methods: {', '.join(cfg.methods)})")
    key = dg.AssetKey([cfg.experiment, "synthetic", method])
    node = build_definitions([cfg]).resolve_asset_graph().get(key)
    return get_method(cfg.method_algorithm(method)), node.code_version


def _write_croissant(cfg, args, out: Path, df, sp, spec, code_version, sampler, classes, *, data_version, split_version, n):
    from importlib.metadata import PackageNotFoundError, version

    from . import croissant

    try:
        pkg = version("augment-dagster")
    except PackageNotFoundError:
        pkg = "0+unknown"
    exp, m, split = cfg.experiment, args.method, args.split
    d = cfg.models.diffusion
    real_id = f"urn:augment:{exp}:few_shot_split:{split}"
    fps = sorted(set(df["model_fingerprint"].astype(str)) - {""})
    model = {"@type": "prov:Entity", "@id": f"urn:augment:model:{fps[0]}", "name": f"diffusion model {d.source}",
             "description": f"fingerprint {fps[0]}, revision {d.revision or '-'}, scheduler {sampler}"} if fps else None
    real = {"@type": "prov:Entity", "@id": real_id, "name": f"{exp}/few_shot_split[{split}]",
            "description": f"the real few-shot split {split} of dataset {cfg.dataset.source!r} (content ids = sha256 of the files)",
            "version": f"1.0.0+{split_version}"}
    props = {"method": m, "algorithm": spec.name, "split": split, "config_hash": cfg.config_hash(),
             "code_version": code_version, "sampler": sampler, "steps": sorted({int(s) for s in df["steps"].dropna()}),
             "guidance_scale": sorted({float(g) for g in df["guidance_scale"].dropna()}),
             "strength": sorted({float(s) for s in df["strength"].dropna()}),
             "seeds": f"{int(df['seed'].min())}..{int(df['seed'].max())}" if len(df) else "-",
             "dagster_run_ids": sorted(set(df["created_by_run"].astype(str))),
             "model_fingerprints": fps}
    activity = {"@type": "prov:Activity", "@id": f"urn:augment:{exp}:synthetic:{m}:{split}",
                "name": f"{exp}/synthetic/{m}[{split}]", "description": spec.description,
                "prov:used": [e for e in (real, model) if e], "prov:wasAssociatedWith": {
                    "@type": "prov:SoftwareAgent", "name": "augment-dagster", "version": pkg},
                "additionalProperty": [{"@type": "PropertyValue", "name": k, "value": json.dumps(v) if isinstance(v, list) else v}
                                       for k, v in props.items() if v is not None]}
    n_syn = len(df)
    rai = dict(
        data_collection=f"Synthetic: {n_syn} images generated by method {m} ({spec.name}: {spec.description}) from the real "
                        f"few-shot split {split} of {cfg.dataset.source!r}, with augment-dagster {pkg}"
                        + (f" and the diffusion model {d.source}" if spec.uses_diffusion else "") + ".",
        data_collection_type=["Synthetic data (generated by a model)"],
        data_collection_raw_data=f"Real guide images: the train role of {exp}/few_shot_split[{split}] (record field guide_ids/guide_paths).",
        data_preprocessing_protocol=[("Images are the generator's outputs at the recorded seed/prompt/strength/guidance, kept or "
                                      "dropped by the method's own filter; no manual edits."),
                                     "'weight' is the classifier's sampling weight (1.0, or the DIAGen confidence)."],
        data_use_cases=["Training-data augmentation for few-shot image classification (research).",
                        "Not validated for evaluation/test sets or for deployment decisions."],
        data_limitations=["Generated images can carry the wrong class or artifacts; labels are the intended class, not verified by a human.",
                          "Coverage is limited to the guide images and prompts; diversity is bounded by the generator."],
        data_biases=["Inherits the biases of the real guide images and of the generator's training data."],
        personal_sensitive_information=["None intended; depends on the source dataset."],
    )
    croissant.write(out, name=f"{exp}-{m}-{split}", version=f"1.0.0+{data_version}",
                    description=f"{n} images: the synthetic set {m} of experiment {exp}, split {split} (data version "
                                f"{data_version})" + (", with the real train images" if args.with_real else "") + ".",
                    cite_as=f"augment-dagster export {exp}/synthetic/{m}[{split}], data version {data_version}",
                    classes=classes, activity=activity, derived_from=[real], rai=rai, license=getattr(args, "license", None))
    card = croissant.hf_card(classes, f"{exp} / {m} / {split}",
                             f"Synthetic set exported by augment-dagster ({n} images, data version {data_version}). "
                             "Lineage per image in train/metadata.jsonl; Croissant 1.1 + PROV-O in croissant.json.")
    from .util import atomic_path

    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(card)


def _safe(label: str) -> str:
    return label.replace("/", "_").replace("\\", "_")
