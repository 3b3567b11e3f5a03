"""Implementations of `augment status | lineage | report | export` (imported lazily by cli.py)."""
from __future__ import annotations

import json
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
    from .methods.protocol import protocol_lines

    print("\ngeneration protocol per method (method entry > generation block > paper default):")
    for line in protocol_lines(cfg):
        print(f"  {line}")
    return 0


def lineage(cfg: ExperimentConfig, args) -> int:
    from .store.lineage import LineageError, format_lineage, lineage as chain

    try:
        ch = chain(cfg.resolved_data_dir(), args.ident)
    except LineageError as e:
        print(str(e), file=sys.stderr)
        return 1
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
    from .resources import MlflowTracker

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
                               "dagster.partition": r["split"]})
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


def export(cfg: ExperimentConfig, args) -> int:
    """Write a synthetic set as a Hugging Face ``imagefolder`` (train/<label>/<id>.png + metadata.jsonl)."""
    from .store import BlobStore

    root = cfg.resolved_data_dir()
    p = manifest_path(root, [cfg.experiment, "synthetic", args.method], args.split)
    if not p.exists():
        print(f"no synthetic set {args.method} for split {args.split} (expected {p}); materialize it first", file=sys.stderr)
        return 1
    df = read_manifest(p)
    wp = manifest_path(root, [cfg.experiment, "confidence_weights", args.method], args.split)
    weights = dict(zip(*read_manifest(wp)[["synthetic_id", "weight"]].T.values)) if wp.exists() else {}
    blobs = BlobStore(root)
    out = Path(args.out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    lines = []
    for r in df.itertuples():
        rel = Path("train") / _safe(r.label) / f"{r.synthetic_id[:24]}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blobs.find(r.blob), out / rel)
        rec = {"file_name": rel.relative_to("train").as_posix(), "label": r.label, "synthetic": True, "synthetic_id": r.synthetic_id,
               "method": r.method, "guide_ids": list(r.guide_ids), "prompt": r.prompt, "prompt_source": r.prompt_source,
               "seed": int(r.seed), "strength": None if pd.isna(r.strength) else float(r.strength),
               "guidance_scale": float(r.guidance_scale), "embedding_id": r.embedding_id,
               "model_fingerprint": r.model_fingerprint, "params_json": r.params_json, "weight": float(weights.get(r.synthetic_id, 1.0))}
        lines.append(json.dumps(rec))
    if args.with_real:
        sp = read_manifest(manifest_path(root, [cfg.experiment, "few_shot_split"], args.split))
        for r in sp[sp.role == "train"].itertuples():
            rel = Path("train") / _safe(r.label) / f"real-{r.image_id[:24]}{Path(r.path).suffix}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(r.dataset_root) / r.path, out / rel)
            lines.append(json.dumps({"file_name": rel.relative_to("train").as_posix(), "label": r.label, "synthetic": False, "image_id": r.image_id,
                                     "weight": 1.0}))
    (out / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    print(f"exported {len(lines)} images to {out} (Hugging Face imagefolder layout; also readable by torchvision ImageFolder)")
    return 0


def _safe(label: str) -> str:
    return label.replace("/", "_").replace("\\", "_")
