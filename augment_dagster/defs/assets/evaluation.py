"""real_classifier, diagen_filter, confidence_weights/<m>, classifier/<m>, metrics/<m> (incl. metrics/real_only).

Every classifier follows its resolved training recipe (``cfg.training_for(entry)``); metrics record top-1 and
mean per-class accuracy (``acc_id``/``acc_ood`` = the recipe's headline), and, where the entry's
``training.evaluation`` lists ``few_shot_episodes``, GeNIe's episodic accuracy with its 95 % CI."""

import json

import dagster as dg
import numpy as np
import pandas as pd

from ...config import parse_split_key
from ...methods.registry import get_method, method_params
from ..tracking import asset_datasets
from ..resources import Models, StoreResource
from ..tracking import MlflowTracker
from .common import Experiment, md_table, output, stage_asset

REAL_ONLY = "real_only"


def classifier_md(rec: dict) -> dict:
    hist = json.loads(rec["history"]) if isinstance(rec["history"], str) else rec["history"]
    return {
        "best_epoch": dg.MetadataValue.int(int(rec["best_epoch"])),
        "best_val_acc": dg.MetadataValue.float(float(rec["best_val_acc"])),
        "temperature": dg.MetadataValue.float(float(rec["temperature"])),
        "history": dg.MetadataValue.md(md_table(pd.DataFrame(hist))) if hist else dg.MetadataValue.text("-"),
        "n_synthetic": dg.MetadataValue.int(int(rec["n_synthetic"])),
        "alpha": dg.MetadataValue.float(float(rec["alpha"])),
    }


def rec_df(rec: dict, context, method: str) -> pd.DataFrame:
    row = {"method": method, **{k: v for k, v in rec.items() if k not in ("classes",)}}
    row["classes"] = list(rec["classes"])
    row["split"] = context.partition_key
    row["created_by_run"] = context.run_id
    return pd.DataFrame([row])


def _weighting(cfg, name: str) -> str:
    return getattr(method_params(name, cfg.methods[name]), "weighting", "none")


def weighting_methods(cfg) -> list[str]:
    return [m for m in cfg.enabled_methods() if _weighting(cfg, m) != "none"]


def build_diagen_filter(exp: Experiment) -> dg.AssetsDefinition:
    cfg = exp.cfg

    @stage_asset(exp, "diagen_filter", ins={"split": "few_shot_split"}, resources=("store",),
        code_version=exp.code_version(("training", "diagen_filter"), ("training", "image_size")), kinds={"pytorch"},
        description="DIAGen's own filter (METHODS §2c), shared by every method that weights: frozen backbone + linear "
                    "head on the K real shots with RandAugment, early stopping on val loss (patience 6) on the even "
                    "half of the val pool, T by LBFGS on the odd half; degenerate T -> T = 1 with a warning.",
    )
    def diagen_filter(context: dg.AssetExecutionContext, split: pd.DataFrame, store: StoreResource) -> dg.Output:
        from ...training.filter import train_diagen_filter

        rec, reused = train_diagen_filter(split, images=store.images(split, cfg.dataset), blobs=store.blobs,
                                          memo=store.memo(), fcfg=cfg.training.diagen_filter,
                                          image_size=cfg.training.image_size, seed=exp.seed(context.partition_key),
                                          device=exp.device)
        if rec["degenerate"]:
            context.log.warning(f"diagen_filter {context.partition_key}: degenerate temperature ({rec['degenerate']}); "
                                f"using {rec['fallback']}")
        md = {"temperature": dg.MetadataValue.float(float(rec["temperature"])),
              "temperature_fitted": dg.MetadataValue.float(float(rec["temperature_fitted"])),
              "degenerate": dg.MetadataValue.text(rec["degenerate"] or "no"),
              "fallback": dg.MetadataValue.text(rec["fallback"] or "-"),
              "best_epoch": dg.MetadataValue.int(int(rec["best_epoch"])),
              "epochs_run": dg.MetadataValue.int(int(rec["epochs_run"])),
              "stopped_early": dg.MetadataValue.bool(bool(rec["stopped_early"])),
              "es_val_acc": dg.MetadataValue.float(float(rec["es_val_acc"])),
              "t_val_acc": dg.MetadataValue.float(float(rec["t_val_acc"])),
              "split_of_val": dg.MetadataValue.text(f"early stopping {rec['n_es']} / temperature {rec['n_t']} images "
                                                    "(per class by rank: even / odd)"),
              "history": dg.MetadataValue.md(md_table(pd.DataFrame(rec["history"]))),
              "computed": dg.MetadataValue.int(0 if reused else 1), "reused": dg.MetadataValue.int(1 if reused else 0)}
        row = {k: v for k, v in rec.items() if k != "history"}
        row.update(history=json.dumps(rec["history"], default=float), classes=list(rec["classes"]),
                   split=context.partition_key, created_by_run=context.run_id)
        return output(pd.DataFrame([row]), md)

    return diagen_filter


def build_method_chain(exp: Experiment, name: str) -> list:
    cfg = exp.cfg
    entry = cfg.methods[name]
    spec = get_method(cfg.method_algorithm(name))
    alpha = next(a for a in (entry.synthetic_probability, spec.default_alpha, cfg.training_for(name).synthetic_probability)
                 if a is not None)

    weighting = _weighting(cfg, name)
    w_ins = {"synthetic": ("synthetic", name)}
    if weighting != "none":
        w_ins["filt"] = "diagen_filter"

    @stage_asset(exp, "confidence_weights", name, ins=w_ins, resources=("store",),
        code_version=exp.code_version(("methods", name), ("training", "diagen_filter")), kinds={"pytorch"},
        description=f"Sampling weight per synthetic image of {name}: uniform, or DIAGen confidence q (mean over the "
                    "filter's train-transform views of softmax(z/T)[y]) under the diagen_filter (w=q, or the code rule).",
    )
    def weights(context: dg.AssetExecutionContext, synthetic: pd.DataFrame, store: StoreResource, **rest) -> dg.Output:
        from ...training.episodes import split_level
        from ...training.filter import confidence_weights

        synthetic = split_level(synthetic)  # per-episode images (support: episode) serve the episodes only
        _, seed = parse_split_key(context.partition_key)
        filt = rest.get("filt")
        frec = filt.iloc[0].to_dict() if filt is not None and len(filt) else {}
        df = confidence_weights(synthetic, images=store.images(pd.DataFrame({"image_id": [], "path": []}), cfg.dataset),
                                blobs=store.blobs, filter_rec=frec, image_size=cfg.training.image_size,
                                rule=weighting if frec else "none", seed=seed)
        w = df["weight"].to_numpy(dtype=float) if len(df) else np.zeros(0)
        md = {"rule": dg.MetadataValue.text(weighting),
              "mean_weight": dg.MetadataValue.float(float(w.mean()) if len(w) else 0.0),
              "min_weight": dg.MetadataValue.float(float(w.min()) if len(w) else float("nan")),
              "median_weight": dg.MetadataValue.float(float(np.median(w)) if len(w) else float("nan")),
              "max_weight": dg.MetadataValue.float(float(w.max()) if len(w) else float("nan")),
              "mean_q": dg.MetadataValue.float(float(np.nanmean(df["q"])) if len(df) and df["q"].notna().any() else float("nan"))}
        if "weight_fallback" in df and bool(df["weight_fallback"].any()):
            fb = sorted(df.loc[df["weight_fallback"], "label"].unique())
            md["uniform_fallback_classes"] = dg.MetadataValue.json(fb)
            context.log.warning(f"confidence_weights/{name} {context.partition_key}: every weight of class(es) {fb} is 0; "
                                "those synthetic images get uniform weights (column weight_fallback)")
        if frec:
            md.update({"temperature": dg.MetadataValue.float(float(frec["temperature"])),
                       "filter_degenerate": dg.MetadataValue.text(frec.get("degenerate") or "no"),
                       "views": dg.MetadataValue.text(f"{frec['views']} x {frec['train_aug']}")})
        return output(df, md)

    @stage_asset(exp, "classifier", name, resources=("store",),
        ins={"split": "few_shot_split", "synthetic": ("synthetic", name), "weights": ("confidence_weights", name)},
        code_version=exp.code_version(("methods", name), "training", ("models", "classifier")), kinds={"pytorch"},
        description=f"Classifier trained on real images (prob 1-α) mixed with {name} synthetic images (prob α={alpha}), "
                    "synthetic drawn ∝ weight within each real image's group (DIAGen Eq. 2); best epoch on val.",
    )
    def classifier(context: dg.AssetExecutionContext, split: pd.DataFrame, synthetic: pd.DataFrame, weights: pd.DataFrame,
                   store: StoreResource) -> dg.Output:
        from ...training.episodes import split_level
        from ...training.stage import train_classifier_stage

        synthetic = split_level(synthetic)  # the classifier protocol: the images made from the split's shots
        rec, stats = train_classifier_stage(split, images=store.images(split, cfg.dataset), blobs=store.blobs,
                                            memo=store.memo(), training=cfg.training_for(name),
                                            classifier_cfg=cfg.models.classifier, seed=exp.seed(context.partition_key),
                                            device=exp.device, synth=synthetic,
                                            weights=weights, alpha=alpha, name="classifier")
        md = classifier_md(rec)
        md.update({"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                   "synthetic_draw_fraction": dg.MetadataValue.float(
                       rec["n_syn_draws"] / max(1, rec["n_syn_draws"] + rec["n_real_draws"]))})
        return output(rec_df(rec, context, name), md)

    @stage_asset(exp, "set_metrics", name, resources=("store", "models"),
        ins={"split": "few_shot_split", "synthetic": ("synthetic", name), "real_clf": "real_classifier"},
        code_version=exp.code_version(("models", "clip")) + "-t2", kinds={"pytorch", "transformers"},  # t2: compute_seconds + device
        description=f"Synthetic-set metrics of {name} on CLIP image features: improved precision/recall (k=3) vs the real "
                    "ID test images, diversity, CLIP score, label consistency, original-vs-augmented similarity.",
    )
    def set_metrics(context: dg.AssetExecutionContext, split: pd.DataFrame, synthetic: pd.DataFrame, real_clf: pd.DataFrame,
                    store: StoreResource, models: Models) -> dg.Output:
        from ...metrics.set_metrics import set_metrics as compute
        from ...stages.services import FilterServices
        from ...store import memo_key
        from ...training.episodes import split_level

        synthetic = split_level(synthetic)
        images = store.images(split, cfg.dataset)
        services = FilterServices(images, store.blobs, cfg.training.image_size)
        key = memo_key("set_metrics", "sm-1", model=models.clip_fingerprint(),
                       inputs={"synthetic": sorted(synthetic["synthetic_id"]) if len(synthetic) else [],
                               "test": sorted(split.loc[split["role"] == "test", "image_id"]),
                               "classifier": real_clf.iloc[0]["blob"]})
        memo = store.memo()
        rec = memo.get(key)
        if rec is None:
            summary, per_class = compute(synthetic, split, images=images, clip=models.clip(),
                                         classifier_blob=real_clf.iloc[0]["blob"], services=services)
            rec = memo.put(key, {"summary": summary, "per_class": json.loads(per_class.to_json(orient="records"))})
        summary, per_class = dict(rec["summary"]), pd.DataFrame(rec["per_class"])
        from ...util import pick_device

        summary.update({"method": name, "split": context.partition_key, "device": pick_device(exp.device),
                        "compute_seconds": float(synthetic["compute_seconds"].sum()) if "compute_seconds" in synthetic and len(synthetic) else 0.0})
        df = pd.DataFrame([summary])
        md = {k: dg.MetadataValue.float(float(v)) for k, v in summary.items() if isinstance(v, float) and v == v}
        if len(per_class):
            md["per_class"] = dg.MetadataValue.md(md_table(per_class))
        return output(df, md)

    return [weights, classifier, set_metrics,
            build_metrics(exp, name, exp.key("classifier", name), exp.key("synthetic", name))]


def build_metrics(exp: Experiment, name: str, clf_key: dg.AssetKey, synth_key: dg.AssetKey | None) -> dg.AssetsDefinition:
    cfg = exp.cfg
    ins = {"split": "few_shot_split", "clf": tuple(clf_key.path[1:])}
    if synth_key is not None:
        ins["synthetic"] = tuple(synth_key.path[1:])

    @stage_asset(exp, "metrics", name, ins=ins, resources=("store", "mlflow"),
        code_version=exp.code_version("training", "mlflow"), kinds={"pytorch", "mlflow"},
        description=f"Metrics of the {name} classifier: top-1 and mean per-class accuracy on the ID test set and the "
                    "OOD set (acc_id/acc_ood = the recipe's headline), per-class accuracy, confusion matrix, and GeNIe's "
                    "episodic accuracy ± 95 % CI when training.evaluation lists few_shot_episodes; logged as an MLflow run.",
    )
    def metrics(context: dg.AssetExecutionContext, split: pd.DataFrame, clf: pd.DataFrame, store: StoreResource,
                mlflow: MlflowTracker, **rest) -> dg.Output:
        from ...training.stage import evaluate, load_classifier_blob
        from ...metrics import confusion_plot_png

        synthetic = rest.get("synthetic")
        shots, seed = parse_split_key(context.partition_key)
        rec = clf.iloc[0].to_dict()
        blobs = store.blobs
        model, meta = load_classifier_blob(blobs, rec["blob"])
        images = store.images(split, cfg.dataset)
        from ...store import memo_key

        training = cfg.training_for(name if name in cfg.methods else None)
        episodic = "few_shot_episodes" in training.evaluation or (
            name == REAL_ONLY and any("few_shot_episodes" in cfg.training_for(m).evaluation for m in cfg.enabled_methods()))
        memo = store.memo()
        key = memo_key("evaluate", "ev-3", model=rec["blob"], params={"image_size": cfg.training.image_size},
                       inputs={r: [[str(i), str(l)] for i, l in split.loc[split["role"] == r, ["image_id", "label"]].itertuples(index=False)]
                               for r in ("test", "ood")})
        cached = memo.get(key)
        if cached is None:
            # a linear probe trained on the store's backbone features is evaluated on them too (one encoding of
            # the test/OOD images per split instead of one per classifier)
            stored = (dict(encoder=meta.get("backbone") or cfg.models.classifier.source, blobs=blobs, memo=memo)
                      if bool(rec.get("features_cached")) else None)
            res = {role: evaluate(model, meta, images, split[split["role"] == role], cfg.training.image_size, stored)
                   for role in ("test", "ood")}
            cached = memo.put(key, {r: {**v, "confusion": np.asarray(v["confusion"]).tolist()} for r, v in res.items()})
        res = cached
        classes = meta["classes"]
        head = "mean_per_class" if training.headline == "mean_per_class" else "accuracy"
        row = {
            "method": name, "split": context.partition_key, "shots": shots, "seed": seed,
            "acc_id": res["test"][head], "acc_ood": res["ood"][head], "headline": training.headline,
            "recipe": training.recipe, "top1_id": res["test"]["accuracy"], "top1_ood": res["ood"]["accuracy"],
            "mpca_id": res["test"]["mean_per_class"], "mpca_ood": res["ood"]["mean_per_class"],
            "n_test": res["test"]["n"], "n_ood": res["ood"]["n"], "best_val_acc": float(rec["best_val_acc"]),
            "best_epoch": int(rec["best_epoch"]), "n_synthetic": int(rec["n_synthetic"]),
            "per_class_id": json.dumps(res["test"]["per_class"]), "per_class_ood": json.dumps(res["ood"]["per_class"]),
            "confusion_id": json.dumps(np.asarray(res["test"]["confusion"]).tolist()),
            "classifier_blob": rec["blob"], "synthetic_compute_seconds": float("nan"),
        }
        ep = None
        if episodic:  # real_only runs them whenever a method does: the un-augmented baseline (GeNIe's "Weak")
            from ...training.episodes import episodic_eval

            ep = episodic_eval(split, synthetic, images=images, blobs=blobs, memo=memo, ecfg=training.episodes,
                               image_size=cfg.training.image_size, split_seed=seed)
        row.update({"episodic_acc": ep["mean"] if ep else float("nan"), "episodic_ci95": ep["ci95"] if ep else float("nan"),
                    "episodic_episodes": int(ep["episodes"]) if ep else 0,
                    "episodic_accs": json.dumps(ep["accs"]) if ep else "[]",
                    "episodic_digest": str(ep.get("episodes_digest", "")) if ep else "",
                    # which protocol the episodic numbers are (the report prints it above the table)
                    "episodic_support": str(ep.get("support", "split")) if ep else "",
                    "episodic_protocol": str(ep.get("protocol", "")) if ep else "",
                    "episodic_augmented_per_class": json.dumps(ep.get("augmented_per_class", [])) if ep else "[]"})
        cm_png = confusion_plot_png(np.asarray(res["test"]["confusion"]), classes)
        artifacts = {"confusion_matrix_id.png": cm_png}
        if synthetic is not None and len(synthetic):
            artifacts["synthetic_manifest.parquet"] = synthetic.to_parquet(index=False)
            from ...training.episodes import split_level

            grid_src = split_level(synthetic) if len(split_level(synthetic)) else synthetic
            grid_imgs = [images.synthetic(b) for b in grid_src.groupby("label").head(4)["blob"].head(32)]
            from .common import image_grid
            from ...util import png_bytes

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
                                    "top1_id": row["top1_id"], "top1_ood": row["top1_ood"], "mpca_id": row["mpca_id"],
                                    "mpca_ood": row["mpca_ood"],
                                    **({"episodic_acc": ep["mean"], "episodic_ci95": ep["ci95"]} if ep else {}),
                                    **{f"acc_id_{c}": v for c, v in res["test"]["per_class"].items()}},
            tags=tags, artifacts=artifacts, model=model if cfg.mlflow.log_models else None,
            find_existing={"augment.classifier_blob": rec["blob"], "augment.method": name, "dagster.partition": context.partition_key},
            datasets=asset_datasets(context, store.root, {exp.key("few_shot_split"): split,
                                                            **({synth_key: synthetic} if synthetic is not None else {})}),
        )
        row["mlflow_run_id"] = run_id or ""
        row["mlflow_error"] = err or ""
        if err and mlflow.enabled:  # disabled on purpose is not a failure (the row still says why it is not logged)
            context.log.warning(f"MLflow logging failed (the asset still materialized; relog with `augment report --relog`): {err}")
        df = pd.DataFrame([row])
        md = {"acc_id": dg.MetadataValue.float(row["acc_id"]), "acc_ood": dg.MetadataValue.float(row["acc_ood"]),
              "headline": dg.MetadataValue.text(f"{training.headline} (recipe {training.recipe})"),
              "top1_id": dg.MetadataValue.float(row["top1_id"]), "mpca_id": dg.MetadataValue.float(row["mpca_id"]),
              "per_class_id": dg.MetadataValue.json(res["test"]["per_class"]),
              "mlflow_run_id": dg.MetadataValue.text(run_id or f"(failed: {err})")}
        if ep:
            md["episodic_acc"] = dg.MetadataValue.text(
                f"{ep['mean']:.4f} ± {ep['ci95']:.4f} ({ep['episodes']} episodes, {ep['n_way']}-way {ep['shots']}-shot, "
                f"{ep['n_augmented']} augmented; {ep.get('protocol', '')})")
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
    """The evaluation assets (``real_classifier`` is a stage: ``real_classifier.py``)."""
    assets = [build_metrics(exp, REAL_ONLY, exp.key("real_classifier"), None)]
    if weighting_methods(exp.cfg):
        assets.append(build_diagen_filter(exp))
    for name in exp.cfg.enabled_methods():
        assets.extend(build_method_chain(exp, name))
    return assets
