"""real_classifier, confidence_weights/<m>, classifier/<m>, metrics/<m> (incl. metrics/real_only)."""

import json

import dagster as dg
import numpy as np
import pandas as pd

from ..config import parse_split_key
from ..methods.registry import get_method, method_params
from ..resources import MlflowTracker, asset_datasets
from .common import CONTENT_AUTOMATION, Experiment, image_source, md_table, output

REAL_ONLY = "real_only"


def _classifier_md(rec: dict) -> dict:
    hist = json.loads(rec["history"]) if isinstance(rec["history"], str) else rec["history"]
    return {
        "best_epoch": dg.MetadataValue.int(int(rec["best_epoch"])),
        "best_val_acc": dg.MetadataValue.float(float(rec["best_val_acc"])),
        "temperature": dg.MetadataValue.float(float(rec["temperature"])),
        "history": dg.MetadataValue.md(md_table(pd.DataFrame(hist))) if hist else dg.MetadataValue.text("-"),
        "n_synthetic": dg.MetadataValue.int(int(rec["n_synthetic"])),
        "alpha": dg.MetadataValue.float(float(rec["alpha"])),
    }


def _rec_df(rec: dict, context, method: str) -> pd.DataFrame:
    row = {"method": method, **{k: v for k, v in rec.items() if k not in ("classes",)}}
    row["classes"] = list(rec["classes"])
    row["split"] = context.partition_key
    row["created_by_run"] = context.run_id
    return pd.DataFrame([row])


def build_real_classifier(exp: Experiment) -> dg.AssetsDefinition:
    cfg = exp.cfg

    @dg.asset(
        key=exp.key("real_classifier"), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions, ins={"split": dg.AssetIn(key=exp.key("few_shot_split"))},
        code_version=exp.code_version("training", ("models", "classifier")), kinds={"pytorch"},
        automation_condition=CONTENT_AUTOMATION,
        description="Classifier trained on the real train split only (the real_only baseline), best epoch on val, "
                    "with temperature T fitted on val (min NLL of softmax(z/T)).",
    )
    def real_classifier(context: dg.AssetExecutionContext, split: pd.DataFrame) -> dg.Output:
        from ..training.stage import train_classifier_stage

        _, seed = parse_split_key(context.partition_key)
        rec, stats = train_classifier_stage(split, images=image_source(exp, split), blobs=exp.blobs, memo=exp.memo(),
                                            training=cfg.training, classifier_cfg=cfg.models.classifier,
                                            seed=cfg.seed * 1000 + seed, device=exp.device, fit_temperature=True,
                                            name="real_classifier")
        md = _classifier_md(rec)
        md.update({"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                   "val_nll_before_T": dg.MetadataValue.float(float(rec["val_nll_before_T"] or float("nan"))),
                   "val_nll_after_T": dg.MetadataValue.float(float(rec["val_nll_after_T"] or float("nan")))})
        return output(_rec_df(rec, context, REAL_ONLY), md)

    return real_classifier


def build_method_chain(exp: Experiment, name: str) -> list:
    cfg = exp.cfg
    entry = cfg.methods[name]
    spec = get_method(cfg.method_algorithm(name))
    params = method_params(name, entry)
    alpha = next(a for a in (entry.synthetic_probability, spec.default_alpha, cfg.training.synthetic_probability) if a is not None)

    @dg.asset(
        key=exp.key("confidence_weights", name), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions,
        ins={"synthetic": dg.AssetIn(key=exp.key("synthetic", name)), "real_clf": dg.AssetIn(key=exp.key("real_classifier"))},
        code_version=exp.code_version(("methods", name), "training"), kinds={"pytorch"},
        automation_condition=CONTENT_AUTOMATION,
        description=f"Sampling weight per synthetic image of {name}: uniform, or DIAGen confidence q under the "
                    "temperature-scaled real classifier (w=q, or the code rule).",
    )
    def weights(context: dg.AssetExecutionContext, synthetic: pd.DataFrame, real_clf: pd.DataFrame) -> dg.Output:
        from ..training.stage import confidence_weights

        _, seed = parse_split_key(context.partition_key)
        df = confidence_weights(synthetic, images=image_source(exp, pd.DataFrame({"image_id": [], "path": []})),
                                blobs=exp.blobs, classifier_rec=real_clf.iloc[0].to_dict(),
                                image_size=cfg.training.image_size, views=cfg.training.weight_views,
                                rule=params.weighting, seed=seed)
        return output(df, {"rule": dg.MetadataValue.text(params.weighting),
                           "mean_weight": dg.MetadataValue.float(float(df["weight"].mean()) if len(df) else 0.0),
                           "mean_q": dg.MetadataValue.float(float(np.nanmean(df["q"])) if len(df) and df["q"].notna().any() else float("nan"))})

    @dg.asset(
        key=exp.key("classifier", name), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions,
        ins={"split": dg.AssetIn(key=exp.key("few_shot_split")), "synthetic": dg.AssetIn(key=exp.key("synthetic", name)),
             "weights": dg.AssetIn(key=exp.key("confidence_weights", name))},
        code_version=exp.code_version(("methods", name), "training", ("models", "classifier")), kinds={"pytorch"},
        automation_condition=CONTENT_AUTOMATION,
        description=f"Classifier trained on real images (prob 1-α) mixed with {name} synthetic images (prob α={alpha}), "
                    "synthetic drawn ∝ weight within each real image's group (DIAGen Eq. 2); best epoch on val.",
    )
    def classifier(context: dg.AssetExecutionContext, split: pd.DataFrame, synthetic: pd.DataFrame, weights: pd.DataFrame) -> dg.Output:
        from ..training.stage import train_classifier_stage

        _, seed = parse_split_key(context.partition_key)
        rec, stats = train_classifier_stage(split, images=image_source(exp, split), blobs=exp.blobs, memo=exp.memo(),
                                            training=cfg.training, classifier_cfg=cfg.models.classifier,
                                            seed=cfg.seed * 1000 + seed, device=exp.device, synth=synthetic,
                                            weights=weights, alpha=alpha, name="classifier")
        md = _classifier_md(rec)
        md.update({"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                   "synthetic_draw_fraction": dg.MetadataValue.float(
                       rec["n_syn_draws"] / max(1, rec["n_syn_draws"] + rec["n_real_draws"]))})
        return output(_rec_df(rec, context, name), md)

    @dg.asset(
        key=exp.key("set_metrics", name), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions,
        ins={"split": dg.AssetIn(key=exp.key("few_shot_split")), "synthetic": dg.AssetIn(key=exp.key("synthetic", name)),
             "real_clf": dg.AssetIn(key=exp.key("real_classifier"))},
        code_version=exp.code_version(("models", "clip")), kinds={"pytorch", "transformers"},
        automation_condition=CONTENT_AUTOMATION,
        description=f"Synthetic-set metrics of {name} on CLIP image features: improved precision/recall (k=3) vs the real "
                    "ID test images, diversity, CLIP score, label consistency, original-vs-augmented similarity.",
    )
    def set_metrics(context: dg.AssetExecutionContext, split: pd.DataFrame, synthetic: pd.DataFrame, real_clf: pd.DataFrame) -> dg.Output:
        from ..methods.set_metrics import set_metrics as compute
        from ..methods.services import FilterServices
        from .common import clip_bundle

        images = image_source(exp, split)
        services = FilterServices(images, exp.blobs, cfg.training.image_size)
        from ..models.loading import clip_fingerprint
        from ..store import memo_key

        c = cfg.models.clip
        key = memo_key("set_metrics", "sm-1", model=clip_fingerprint(c.source, exp.data_dir, c.revision),
                       inputs={"synthetic": sorted(synthetic["synthetic_id"]) if len(synthetic) else [],
                               "test": sorted(split.loc[split["role"] == "test", "image_id"]),
                               "classifier": real_clf.iloc[0]["blob"]})
        memo = exp.memo()
        rec = memo.get(key)
        if rec is None:
            summary, per_class = compute(synthetic, split, images=images, clip=clip_bundle(exp),
                                         classifier_blob=real_clf.iloc[0]["blob"], services=services)
            rec = memo.put(key, {"summary": summary, "per_class": json.loads(per_class.to_json(orient="records"))})
        summary, per_class = dict(rec["summary"]), pd.DataFrame(rec["per_class"])
        summary.update({"method": name, "split": context.partition_key,
                        "gpu_seconds": float(synthetic["compute_seconds"].sum()) if "compute_seconds" in synthetic and len(synthetic) else 0.0})
        df = pd.DataFrame([summary])
        md = {k: dg.MetadataValue.float(float(v)) for k, v in summary.items() if isinstance(v, float) and v == v}
        if len(per_class):
            md["per_class"] = dg.MetadataValue.md(md_table(per_class))
        return output(df, md)

    return [weights, classifier, set_metrics,
            build_metrics(exp, name, exp.key("classifier", name), exp.key("synthetic", name))]


def build_metrics(exp: Experiment, name: str, clf_key: dg.AssetKey, synth_key: dg.AssetKey | None) -> dg.AssetsDefinition:
    cfg = exp.cfg
    ins = {"split": dg.AssetIn(key=exp.key("few_shot_split")), "clf": dg.AssetIn(key=clf_key)}
    if synth_key is not None:
        ins["synthetic"] = dg.AssetIn(key=synth_key)

    @dg.asset(
        key=exp.key("metrics", name), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions, ins=ins, code_version=exp.code_version("training", "mlflow"),
        kinds={"pytorch", "mlflow"}, automation_condition=CONTENT_AUTOMATION,
        description=f"Metrics of the {name} classifier: top-1 accuracy on the ID test set and the OOD set, "
                    "per-class accuracy, confusion matrix; logged as an MLflow run.",
    )
    def metrics(context: dg.AssetExecutionContext, mlflow: MlflowTracker, split: pd.DataFrame, clf: pd.DataFrame,
                **rest) -> dg.Output:
        from ..training.stage import evaluate, load_classifier_blob
        from ..metrics import confusion_plot_png

        synthetic = rest.get("synthetic")
        shots, seed = parse_split_key(context.partition_key)
        rec = clf.iloc[0].to_dict()
        model, meta = load_classifier_blob(exp.blobs, rec["blob"])
        images = image_source(exp, split)
        from ..store import memo_key

        memo = exp.memo()
        key = memo_key("evaluate", "ev-1", model=rec["blob"], params={"image_size": cfg.training.image_size},
                       inputs={r: [[str(i), str(l)] for i, l in split.loc[split["role"] == r, ["image_id", "label"]].itertuples(index=False)]
                               for r in ("test", "ood")})
        cached = memo.get(key)
        if cached is None:
            res = {role: evaluate(model, meta, images, split[split["role"] == role], cfg.training.image_size)
                   for role in ("test", "ood")}
            cached = memo.put(key, {r: {**v, "confusion": np.asarray(v["confusion"]).tolist()} for r, v in res.items()})
        res = cached
        classes = meta["classes"]
        row = {
            "method": name, "split": context.partition_key, "shots": shots, "seed": seed,
            "acc_id": res["test"]["accuracy"], "acc_ood": res["ood"]["accuracy"],
            "n_test": res["test"]["n"], "n_ood": res["ood"]["n"], "best_val_acc": float(rec["best_val_acc"]),
            "best_epoch": int(rec["best_epoch"]), "n_synthetic": int(rec["n_synthetic"]),
            "per_class_id": json.dumps(res["test"]["per_class"]), "per_class_ood": json.dumps(res["ood"]["per_class"]),
            "confusion_id": json.dumps(np.asarray(res["test"]["confusion"]).tolist()),
            "classifier_blob": rec["blob"], "synthetic_gpu_seconds": float("nan"),
        }
        cm_png = confusion_plot_png(np.asarray(res["test"]["confusion"]), classes)
        artifacts = {"confusion_matrix_id.png": cm_png}
        if synthetic is not None and len(synthetic):
            artifacts["synthetic_manifest.parquet"] = synthetic.to_parquet(index=False)
            grid_imgs = [images.synthetic(b) for b in synthetic.groupby("label").head(4)["blob"].head(32)]
            from .common import image_grid
            from ..util import png_bytes

            artifacts["sample_grid.png"] = png_bytes(image_grid(grid_imgs))
        params = {"method": name, "split": context.partition_key, "shots": shots, "seed": seed,
                  "config_hash": cfg.config_hash(), **_flatten({"config": cfg.model_dump(mode="json", exclude={"methods"})})}
        if name in cfg.methods:
            params.update(_flatten({"method_params": method_params(name, cfg.methods[name]).model_dump(mode="json")}))
        tags = {"dagster.run_id": context.run_id, "dagster.asset_key": context.asset_key.to_user_string(),
                "dagster.partition": context.partition_key, "augment.experiment": exp.name, "augment.method": name,
                "augment.classifier_blob": rec["blob"], "augment.config_hash": cfg.config_hash()}
        run_id, err = mlflow.log_run(
            exp.cfg.mlflow.experiment_name or exp.name, f"{name}/{context.partition_key}",
            params=params, metrics={"acc_id": row["acc_id"], "acc_ood": row["acc_ood"], "best_val_acc": row["best_val_acc"],
                                    **{f"acc_id_{c}": v for c, v in res["test"]["per_class"].items()}},
            tags=tags, artifacts=artifacts, model=model if cfg.mlflow.log_models else None,
            find_existing={"augment.classifier_blob": rec["blob"], "augment.method": name, "dagster.partition": context.partition_key},
            datasets=asset_datasets(context, exp.data_dir, {exp.key("few_shot_split"): split,
                                                            **({synth_key: synthetic} if synthetic is not None else {})}),
        )
        row["mlflow_run_id"] = run_id or ""
        row["mlflow_error"] = err or ""
        if err:
            context.log.warning(f"MLflow logging failed (the asset still materialized; relog with `augment report --relog`): {err}")
        df = pd.DataFrame([row])
        md = {"acc_id": dg.MetadataValue.float(row["acc_id"]), "acc_ood": dg.MetadataValue.float(row["acc_ood"]),
              "per_class_id": dg.MetadataValue.json(res["test"]["per_class"]),
              "mlflow_run_id": dg.MetadataValue.text(run_id or f"(failed: {err})")}
        return output(df, md)

    return metrics


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def build(exp: Experiment) -> list:
    assets = [build_real_classifier(exp), build_metrics(exp, REAL_ONLY, exp.key("real_classifier"), None)]
    for name in exp.cfg.enabled_methods():
        assets.extend(build_method_chain(exp, name))
    return assets
