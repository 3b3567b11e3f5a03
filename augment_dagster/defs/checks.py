"""Asset checks of one experiment, shown in each asset's Checks tab and run with every materialization.

Most checks are evaluated in the asset's own step (``check_specs`` on the asset, :func:`asset_with_checks`): they
read only the output the step just produced, and a separate step per asset and partition would cost a Dagster
step (events, an input load) for a few milliseconds of checking. The checks of ``synthetic/<m>`` run as one
``multi_asset_check`` per asset after it: ``label_consistency`` judges with the split's real-only classifier,
which the synthetic step does not wait for, and reads every image back. A failing blocking check fails its step
either way, so nothing downstream runs. The checking logic lives in ``augment_dagster.metrics.checks``;
severities and which checks block are listed in README "Asset checks"; this file is wiring.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import dagster as dg
import pandas as pd

from ..metrics import checks as q
from ..stages import STAGES
from .assets.common import Experiment

# partitioned asset checks are a preview feature in dagster 1.13 (AssetCheckSpec(partitions_def=...))
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

_SEVERITY = {q.ERROR: dg.AssetCheckSeverity.ERROR, q.WARN: dg.AssetCheckSeverity.WARN}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item"):  # numpy scalars
        return _clean(v.item())
    return v


def metadata_value(v: Any) -> dg.MetadataValue:
    v = _clean(v)
    if isinstance(v, bool):
        return dg.MetadataValue.bool(v)
    if isinstance(v, int):
        return dg.MetadataValue.int(v)
    if isinstance(v, float):
        return dg.MetadataValue.float(v)
    if isinstance(v, (dict, list)):
        return dg.MetadataValue.json(v)
    return dg.MetadataValue.text("-" if v is None else str(v))


def check_result(key: dg.AssetKey, o: q.Outcome) -> dg.AssetCheckResult:
    md = {k: metadata_value(v) for k, v in o.metadata.items()}
    md["severity_on_failure"] = dg.MetadataValue.text(o.severity)
    return dg.AssetCheckResult(asset_key=key, check_name=o.name, passed=bool(o.passed), severity=_SEVERITY[o.severity],
                               description=o.description, metadata=md)


def _op_name(key: dg.AssetKey) -> str:
    return "__".join(key.path).replace("-", "_") + "__checks"


def _checks(key: dg.AssetKey, partitions_def, specs: list[tuple[str, bool, str]], fn: Callable[..., list[q.Outcome]],
            extra_ins: dict[str, dg.AssetKey] | None = None, kinds: str = "python",
            extra_deps: list[dg.AssetKey] | None = None,
            required_resource_keys: set[str] | None = None) -> dg.AssetChecksDefinition:
    """One step that evaluates ``fn(context, df=<manifest>, **extra) -> [Outcome]`` and reports every spec.
    ``extra_deps``: assets the step runs after (in a run that has them) but reads itself, as they may be absent."""
    ins = {"df": dg.AssetIn(key=key), **{k: dg.AssetIn(key=v) for k, v in (extra_ins or {}).items()}}
    deps = [*(extra_ins or {}).values(), *(extra_deps or [])]

    @dg.multi_asset_check(
        name=_op_name(key), compute_kind=kinds, ins=ins, required_resource_keys=required_resource_keys or set(),
        specs=[dg.AssetCheckSpec(name, asset=key, blocking=blocking, description=desc, partitions_def=partitions_def,
                                 additional_deps=deps)
               for name, blocking, desc in specs],
    )
    def _run(context, **inputs):
        outcomes = {o.name: o for o in fn(context, **inputs)}
        for name, _, _ in specs:
            yield check_result(key, outcomes[name])

    return _run


def _pk(context) -> str | None:
    return context.partition_key if context.has_partition_key else None


def latest_metadata(context, key: dg.AssetKey) -> dict[str, Any]:
    """Metadata of the asset's latest materialization of this step's partition (plain values)."""
    pk = _pk(context)
    res = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk] if pk else None), limit=1)
    if not res.records:
        return {}
    mat = res.records[0].asset_materialization
    return {k: getattr(v, "value", v) for k, v in (mat.metadata or {}).items()} if mat else {}


def dropped_per_class(md: dict[str, Any]) -> dict[str, int] | None:
    """Per-class images a method's post-filter dropped (the ``filter`` metadata), None without a dropping filter."""
    filt = md.get("filter")
    if isinstance(filt, dict) and isinstance(filt.get("dropped_per_class"), dict):
        return {str(k): int(v) for k, v in filt["dropped_per_class"].items()}
    return None


def expected_synthetic_rows(md: dict[str, Any]) -> int | None:
    """Rows the synthetic manifest must have: the planned units, or what the method's post-filter kept."""
    filt = md.get("filter")
    if isinstance(filt, dict) and "kept" in filt:
        return int(filt["kept"])
    return int(md["planned_units"]) if "planned_units" in md else None


def synthetic_outcomes(exp: Experiment, store, models, df: pd.DataFrame, split: pd.DataFrame, expected: int | None,
                       real_classifier: pd.DataFrame | None = None,
                       dropped_per_class: dict[str, int] | None = None) -> list[q.Outcome]:
    """The three checks of synthetic/<m> (also used by tests without Dagster). ``real_classifier``: the split's
    real_classifier manifest, the second label judge (``checks.label_judge``); ``dropped_per_class``: what the
    method's post-filter removed (from the asset's ``filter`` metadata)."""
    from ..stages.services import FilterServices
    from ..training.episodes import split_level

    cfg = exp.cfg.checks
    all_rows, df = df, split_level(df)  # balance and labels: the split's set (per-episode rows: the episodes')
    train = split[split["role"] == "train"]
    held_out = split[split["role"] == "val"]
    classes = sorted(train["label"].unique())
    out = [q.check_synthetic_integrity(all_rows, expected, lambda b: store.blobs.get(b, verify=True), classes),
           q.check_class_balance(df, train.groupby("label").size().to_dict(), cfg.balance_tolerance, dropped_per_class)]
    integrity_ok = out[0].passed
    if not (len(df) and integrity_ok and len(classes) >= 2 and len(held_out)):
        out.append(q.Outcome("label_consistency", True, q.WARN,
                             "skipped: " + ("no images" if not len(df) else "integrity failed" if not integrity_ok
                                            else "fewer than 2 classes" if len(classes) < 2 else "no val images"), {}))
        return out
    services = FilterServices(store.images(split, exp.cfg.dataset), store.blobs, exp.cfg.training.image_size,
                              clip_factory=models.clip)
    per = max(1, cfg.max_images // len(classes))
    sample = df.groupby("label", group_keys=False).head(per)
    syn_images = [services.synthetic_image(b) for b in sample["blob"]]
    real_images = [services.real_image(i) for i in held_out["image_id"]]
    syn_labels, real_labels = list(sample["label"]), list(held_out["label"])
    readings: dict[str, q.JudgeReading] = {}
    clf_blob = (real_classifier.iloc[0]["blob"] if real_classifier is not None and len(real_classifier) else None)
    if cfg.label_judge in ("auto", "classifier") and clf_blob:
        readings["classifier"] = q.JudgeReading(services.classifier_probs(clf_blob, syn_images, classes), syn_labels,
                                                services.classifier_probs(clf_blob, real_images, classes), real_labels)
    if cfg.label_judge in ("auto", "clip") or not readings:
        readings["clip"] = q.JudgeReading(services.clip_zero_shot(syn_images, classes), syn_labels,
                                          services.clip_zero_shot(real_images, classes), real_labels)
    judge = cfg.label_judge if cfg.label_judge in readings else "auto"
    out.append(q.check_label_consistency(readings, classes, cfg.label_consistency_floor, cfg.label_consistency_alpha,
                                         judge))
    return out


def real_classifier_manifest(exp: Experiment, store, context) -> pd.DataFrame | None:
    """The split's real_classifier manifest when it exists (the check runs after it in a run with both)."""
    p = store.manifest_path(exp.key("real_classifier").path, _pk(context))
    return store.read_manifest(exp.key("real_classifier").path, _pk(context)) if p.exists() else None


SPECS = {
    "raw_images": [("classes_have_images", False, "ERROR: at least 2 train classes, each with images")],
    "few_shot_split": [("split_integrity", True, "ERROR, blocking: train and val non-empty; no image in two roles"),
                       ("k_shots_per_class", False, "WARN: every class has K train + V val images")],
    "synthetic": [("synthetic_integrity", True, "ERROR, blocking: rows = planned units; every image reads back "
                                                "with its hash and is not blank/constant/NaN; labels are split classes"),
                  ("class_balance", False, "WARN: per-class synthetic images per real image within checks.balance_tolerance"),
                  ("label_consistency", False, "WARN: a judge's accuracy on synthetic images ≥ checks.label_consistency_floor "
                                               "× its accuracy on the split's val images (judge: checks.label_judge, "
                                               "the real-only classifier or CLIP zero-shot; significant shortfalls only)")],
    "diagen_filter": [("filter_temperature", False, "WARN: DIAGen's filter fitted a non-degenerate temperature (else T = 1)")],
    "confidence_weights": [("weights_finite", True, "ERROR, blocking: weights finite, ≥ 0, positive per class; spread reported")],
    "classifier": [("above_chance", False, "WARN: best val accuracy above chance (1/C)"),
                   ("best_epoch_on_val", False, "ERROR: the kept epoch has the best val accuracy of the history")],
    "metrics": [("accuracy_valid", False, "ERROR: ID accuracy in [0, 1] on a non-empty test set")],
    "report": [("all_methods_present", False, "ERROR: every enabled method and real_only, for every K, over every seed")],
}
# stages with an ERROR check "<asset>_present" (a non-empty manifest): the stage table's, and set_metrics
_ROWS = {s.asset for s in STAGES.values() if s.present_check} | {"set_metrics"}


def _in_step(exp: Experiment, stage: str) -> tuple[list[tuple[str, bool, str]], Callable[..., list[q.Outcome]]] | None:
    """(spec rows, ``fn(context, df) -> [Outcome]``) of the checks evaluated in a ``stage`` asset's own step
    (None: the stage has none there)."""
    cfg = exp.cfg
    if stage == "raw_images":
        return SPECS[stage], lambda c, df: [q.check_raw_images(df)]
    if stage == "few_shot_split":
        return SPECS[stage], lambda c, df: q.check_split(df, _shots(c), cfg.splits.val_per_class)
    if stage == "diagen_filter":
        return SPECS[stage], lambda c, df: [q.check_filter(df.iloc[0].to_dict())]
    if stage == "confidence_weights":
        return SPECS[stage], lambda c, df: [q.check_weights(df)]
    if stage in ("classifier", "real_classifier"):
        return SPECS["classifier"], lambda c, df: q.check_classifier(df.iloc[0].to_dict())
    if stage == "metrics":
        return SPECS[stage], lambda c, df: [q.check_metrics_row(df.iloc[0].to_dict())]
    if stage == "report":
        methods = ["real_only", *cfg.enabled_methods()]
        return SPECS[stage], lambda c, df: [q.check_report(df, methods, list(cfg.splits.shots), len(cfg.splits.seeds))]
    if stage in _ROWS:
        name = f"{stage}_present"
        return [(name, False, "ERROR: a non-empty manifest")], lambda c, df: [q.check_rows(df, name)]
    return None


def asset_with_checks(exp: Experiment, *, key: dg.AssetKey, **asset_kwargs):
    """``dg.asset(key=key, **asset_kwargs)`` whose step also evaluates its stage's checks on the output it returns
    (``check_specs``; a blocking one that fails fails the step after the output is stored). The decorated body
    returns the ``dg.Output`` as before. Without checks (``checks.enabled: false``) it is a plain ``dg.asset``."""
    checks = _in_step(exp, key.path[1]) if exp.cfg.checks.enabled else None

    def decorate(body):
        if checks is None:
            return dg.asset(key=key, **asset_kwargs)(body)
        rows, fn = checks
        specs = [dg.AssetCheckSpec(name, asset=key, blocking=blocking, description=desc,
                                   partitions_def=asset_kwargs.get("partitions_def"))
                 for name, blocking, desc in rows]

        @functools.wraps(body)
        def step(context, *args, **kwargs):
            out = body(context, *args, **kwargs)
            yield out
            outcomes = {o.name: o for o in fn(context, out.value)}
            for name, _, _ in rows:
                yield check_result(key, outcomes[name])

        return dg.asset(key=key, check_specs=specs, **asset_kwargs)(step)

    return decorate


def build(exp: Experiment, assets: list) -> list[dg.AssetChecksDefinition]:
    """The checks that run in a step of their own: those of every ``synthetic/<m>`` (built from the assets, so they
    follow the enabled methods). Every other stage's checks run in its asset's step (:func:`asset_with_checks`)."""
    cfg = exp.cfg
    out = []
    for a in assets:
        for key in a.keys:
            if key.path[1] != "synthetic":
                continue

            def syn(c, df, split, _key=key):
                md = latest_metadata(c, _key)
                store, models = (getattr(c.resources, exp.resource_key(k)) for k in ("store", "models"))
                return synthetic_outcomes(exp, store, models, df, split, expected_synthetic_rows(md),
                                          real_classifier=real_classifier_manifest(exp, store, c),
                                          dropped_per_class=dropped_per_class(md))

            judge_deps = [exp.key("real_classifier")] if cfg.checks.label_judge != "clip" else []
            out.append(_checks(key, a.partitions_def, SPECS["synthetic"], syn, {"split": exp.key("few_shot_split")},
                               kinds="pytorch", extra_deps=judge_deps,
                               required_resource_keys={exp.resource_key("store"), exp.resource_key("models")}))
    return out


def _shots(context) -> int:
    from ..config import parse_split_key

    return parse_split_key(context.partition_key)[0]
