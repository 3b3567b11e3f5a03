"""Quality checks over manifests and blobs, without Dagster: each returns :class:`Outcome` (passed, severity,
description, plain metadata). ``augment_dagster/defs/checks.py`` turns them into Dagster asset checks.

Severity (README "Asset checks"): ERROR where the output is wrong and downstream GPU work would be wasted or
misleading (empty/overlapping split, a synthetic set with missing, unreadable, blank or NaN images, non-finite
weights, a best epoch not chosen on val, a report missing a method); the ERROR checks on the split, the
synthetic sets and the weights are *blocking*, so a failure stops the assets downstream. WARN where the output
is valid but suspicious (a class below K shots, unbalanced classes, low label consistency, accuracy at chance).
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

ERROR, WARN = "ERROR", "WARN"


@dataclass
class Outcome:
    name: str
    passed: bool
    severity: str  # ERROR | WARN: how a failure is reported
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _f(x) -> float:
    return float(x) if x is not None else float("nan")


# ---------------------------------------------------------------- raw_images / few_shot_split
def check_raw_images(df: pd.DataFrame) -> Outcome:
    train = df[df["pool"] == "train"] if len(df) else df
    per_class = train.groupby("label").size().to_dict() if len(train) else {}
    ok = len(per_class) >= 2 and min(per_class.values()) >= 1
    return Outcome("classes_have_images", ok, ERROR,
                   f"{len(per_class)} train classes, {len(train)} train images" if ok else
                   f"need at least 2 train classes with images, found {per_class}",
                   {"train_per_class": {str(k): int(v) for k, v in per_class.items()},
                    "pools": df.groupby("pool").size().astype(int).to_dict() if len(df) else {}})


def check_split(df: pd.DataFrame, shots: int, val_per_class: int) -> list[Outcome]:
    """``split_integrity`` (ERROR, blocking): train and val non-empty, no image in two roles.
    ``k_shots_per_class`` (WARN): every class has K train and V val images (only a class short of images under
    ``splits.fewer_than_k: use_all`` can fail)."""
    roles = df.groupby("role")["image_id"].apply(set).to_dict() if len(df) else {}
    empty = [r for r in ("train", "val") if not roles.get(r)]
    overlap = {}
    names = sorted(roles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = roles[a] & roles[b]
            if both:
                overlap[f"{a}&{b}"] = sorted(both)[:5]
    ok = not empty and not overlap
    desc = ("train/val/test/ood are non-empty where required and disjoint" if ok else
            "; ".join(([f"empty role(s): {empty}"] if empty else []) + ([f"images in two roles: {overlap}"] if overlap else [])))
    integrity = Outcome("split_integrity", ok, ERROR, desc,
                        {"images_per_role": {r: len(v) for r, v in roles.items()}, "overlap": overlap})
    counts = df[df["role"].isin(["train", "val"])].groupby(["label", "role"]).size().unstack(fill_value=0) if len(df) else pd.DataFrame()
    short = {}
    for label, row in counts.iterrows():
        tr, va = int(row.get("train", 0)), int(row.get("val", 0))
        if tr != shots or va != val_per_class:
            short[str(label)] = {"train": tr, "val": va}
    k_ok = not short and len(counts) > 0
    kshots = Outcome("k_shots_per_class", k_ok, WARN,
                     f"every class has {shots} train + {val_per_class} val images" if k_ok else
                     f"classes off the {shots}+{val_per_class} plan (splits.fewer_than_k: use_all): {short}",
                     {"classes": len(counts), "short_classes": short})
    return [integrity, kshots]


# ---------------------------------------------------------------- synthetic/<m>
def image_stats(data: bytes) -> dict[str, Any]:
    """Decode an image blob: {'ok', 'reason', 'std', 'mean'} (std/mean over all pixels and channels, 0..255)."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        a = np.asarray(im.convert("RGB"), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad image
        return {"ok": False, "reason": f"unreadable ({type(e).__name__})", "std": float("nan"), "mean": float("nan")}
    if a.size == 0 or not np.isfinite(a).all():
        return {"ok": False, "reason": "empty or NaN pixels", "std": float("nan"), "mean": float("nan")}
    std, mean = float(a.std()), float(a.mean())
    if std < 1.0:  # constant image (blank black/white/grey): less than one grey level of variation
        return {"ok": False, "reason": f"constant image (std {std:.2f}, mean {mean:.0f})", "std": std, "mean": mean}
    return {"ok": True, "reason": "", "std": std, "mean": mean}


def check_synthetic_integrity(df: pd.DataFrame, expected_rows: int | None, load_bytes: Callable[[str], bytes],
                              classes: Iterable[str]) -> Outcome:
    """ERROR, blocking: rows = planned units (after the method's post-filter), every blob reads back with its
    hash, decodes, is finite and not constant, every label is a class of the split."""
    bad: list[dict] = []
    for sid, blob in zip(df.get("synthetic_id", pd.Series(dtype=str)), df.get("blob", pd.Series(dtype=str))):
        try:
            st = image_stats(load_bytes(blob))
        except Exception as e:  # noqa: BLE001 - a missing or corrupt blob (hash mismatch) is a bad image
            st = {"ok": False, "reason": f"{type(e).__name__}: {str(e)[:120]}"}
        if not st["ok"]:
            bad.append({"synthetic_id": str(sid)[:16], "blob": str(blob)[:16], "reason": st["reason"]})
    unknown = sorted(set(df["label"]) - set(classes)) if len(df) else []
    problems = []
    if expected_rows is not None and len(df) != expected_rows:
        problems.append(f"{len(df)} rows but {expected_rows} planned units")
    if bad:
        problems.append(f"{len(bad)} bad image(s), e.g. {bad[0]['blob']}: {bad[0]['reason']}")
    if unknown:
        problems.append(f"labels not in the split: {unknown}")
    ok = not problems
    return Outcome("synthetic_integrity", ok, ERROR,
                   f"{len(df)} rows = planned units; every image decodes and is not blank/constant/NaN" if ok else "; ".join(problems),
                   {"rows": len(df), "planned_units": expected_rows, "bad_images": len(bad), "bad": bad[:20]})


def check_class_balance(df: pd.DataFrame, train_per_class: dict[str, int], tolerance: float,
                        dropped_per_class: dict[str, int] | None = None) -> Outcome:
    """WARN: synthetic images per real train image of the class, max/min across classes ≤ 1 + tolerance, and
    every class of the split has synthetic images.

    ``dropped_per_class``: what a method's post-filter removed (Real-Filter). Then the balance is that of the
    generated images (kept + dropped) and the kept counts are reported, not judged: which images a filter keeps is
    the method, and the classifier's mixing sampler draws the real image class-balanced first (training/sampler.py),
    so uneven kept counts do not change class frequencies. A class the filter emptied still fails."""
    counts = df.groupby("label").size().to_dict() if len(df) else {}
    made = {c: counts.get(c, 0) + int((dropped_per_class or {}).get(c, 0)) for c in train_per_class}

    def spread(cnt: dict) -> float:
        rate = {c: cnt.get(c, 0) / max(1, n) for c, n in train_per_class.items()}
        lo, hi = (min(rate.values()), max(rate.values())) if rate else (0.0, 0.0)
        return hi / lo if lo > 0 else float("inf")

    missing = sorted(c for c in train_per_class if counts.get(c, 0) == 0)
    ratio, kept_ratio = spread(made), spread(counts)
    ok = not missing and ratio <= 1.0 + tolerance
    what = "generated images" if dropped_per_class is not None else "images"
    kept = f"; kept after the filter ×{kept_ratio:.2f} (not judged)" if dropped_per_class is not None and math.isfinite(kept_ratio) else ""
    md = {"per_class": {str(k): int(v) for k, v in counts.items()},
          "max_over_min": ratio if math.isfinite(ratio) else -1.0}
    if dropped_per_class is not None:
        md.update({"generated_per_class": {str(k): int(v) for k, v in made.items()},
                   "kept_max_over_min": kept_ratio if math.isfinite(kept_ratio) else -1.0})
    return Outcome("class_balance", ok, WARN,
                   f"per-class {what} per real image within ×{ratio:.2f} (≤ ×{1 + tolerance:.2f}){kept}" if ok else
                   (f"classes without synthetic images: {missing}" if missing else
                    f"per-class {what} per real image differ ×{ratio:.2f} > ×{1 + tolerance:.2f} (checks.balance_tolerance)"),
                   md)


@dataclass
class JudgeReading:
    """One judge's class probabilities on the scored synthetic images and on held-out real images of the split."""
    synth_probs: np.ndarray
    synth_labels: list[str]
    real_probs: np.ndarray
    real_labels: list[str]


JUDGE_TEXT = {"clip": "CLIP zero-shot", "classifier": "the real-only classifier"}


def check_label_consistency(readings: dict[str, JudgeReading], classes: list[str], floor: float, alpha: float = 0.05,
                            judge: str = "auto") -> Outcome:
    """WARN: a judge's accuracy on the synthetic images ≥ ``floor`` × its accuracy on held-out real images of the
    split (the judge's own accuracy on real data calibrates the floor, so a weak judge is judged fairly).

    ``judge``: one of ``readings`` (``clip``: zero-shot; ``classifier``: the split's real-only classifier, whose
    held-out images are the val role), or ``auto``: the judge more accurate on the real images (first on a tie).
    A shortfall fails only when it is significant: a one-sided exact binomial test of the synthetic hits against
    ``floor × real accuracy`` gives p < ``alpha`` (with a few dozen images one image moves the accuracy by several
    points; ``alpha: 1`` fails on any shortfall). Every judge's reading is in the metadata."""
    from scipy.stats import binomtest

    idx = {c: i for i, c in enumerate(classes)}

    def hits(p, labels) -> int:
        return sum(int(np.asarray(p[i]).argmax()) == idx[lb] for i, lb in enumerate(labels))

    def rate(k: int, n: int) -> float:
        return k / n if n else float("nan")

    counts = {name: (hits(r.synth_probs, r.synth_labels), hits(r.real_probs, r.real_labels)) for name, r in readings.items()}
    acc = {name: (rate(counts[name][0], len(r.synth_labels)), rate(counts[name][1], len(r.real_labels)))
           for name, r in readings.items()}
    if judge == "auto":
        judge = max(readings, key=lambda n: (np.nan_to_num(acc[n][1], nan=-1.0), -list(readings).index(n)))
    r = readings[judge]
    syn, real = acc[judge]
    chance = 1.0 / max(1, len(classes))
    n = len(r.synth_labels)
    md: dict[str, Any] = {"judge": judge, "synthetic_acc": syn, "real_acc": real, "chance": chance, "floor": floor,
                          "alpha": alpha, "scored": n, "real_scored": len(r.real_labels),
                          "judges": {k: {"synthetic_acc": v[0], "real_acc": v[1]} for k, v in acc.items()}}
    what = JUDGE_TEXT.get(judge, judge)
    if not n:
        return Outcome("label_consistency", True, WARN, "no synthetic images to score", md)
    if not real > chance:
        return Outcome("label_consistency", True, WARN,
                       f"not informative: {what} is at chance on the real images ({real:.2f} ≤ {chance:.2f})", md)
    need = floor * real
    p_value = float(binomtest(counts[judge][0], n, min(need, 1.0), alternative="less").pvalue) if syn < need else 1.0
    md.update({"need": need, "p_value": p_value})
    ok = not (syn < need and p_value < alpha)
    if ok:
        tail = "" if syn >= need else f"; below it by {need - syn:.2f}, not significant (p = {p_value:.2f} ≥ {alpha})"
        text = f"{what}: accuracy {syn:.2f} on {n} synthetic vs {real:.2f} on real images (floor {need:.2f}{tail})"
    else:
        text = (f"synthetic images look like their label less often: {what} {syn:.2f} on {n} images < {floor} × "
                f"{real:.2f} on real images (p = {p_value:.3f}; checks.label_consistency_floor)")
    return Outcome("label_consistency", ok, WARN, text, md)


def check_filter(row: dict) -> Outcome:
    """WARN: DIAGen's filter fitted a usable temperature (not degenerate: within [t_min, t_max] and its
    temperature half not classified 100 % right); a degenerate T falls back to T = 1, named in the metadata."""
    t = float(row.get("temperature", float("nan")))
    fitted = float(row.get("temperature_fitted", t))
    degenerate = str(row.get("degenerate") or "")
    ok = not degenerate and math.isfinite(t) and t > 0
    return Outcome("filter_temperature", ok, WARN,
                   f"T = {fitted:.3f} fitted on {int(row.get('n_t', 0))} images, not degenerate" if ok else
                   f"degenerate temperature ({degenerate or 'not finite'}); fallback {row.get('fallback') or 'T = 1'}",
                   {"temperature": t if math.isfinite(t) else -1.0, "temperature_fitted": fitted if math.isfinite(fitted) else -1.0,
                    "t_val_acc": float(row.get("t_val_acc", float("nan"))), "epochs_run": int(row.get("epochs_run", 0))})


def check_weights(df: pd.DataFrame) -> Outcome:
    """ERROR, blocking: every weight finite and ≥ 0, and each class with synthetic images has positive total
    weight (else the sampler cannot draw it). Reports the spread."""
    w = pd.to_numeric(df["weight"], errors="coerce").to_numpy(dtype=float) if len(df) else np.zeros(0)
    nonfinite = int((~np.isfinite(w)).sum())
    negative = int((w[np.isfinite(w)] < 0).sum())
    dead = []
    if len(df) and "label" in df:
        tot = pd.Series(np.where(np.isfinite(w), w, 0.0)).groupby(df["label"].to_numpy()).sum()
        dead = sorted(str(c) for c, v in tot.items() if not v > 0)
    fw = w[np.isfinite(w)]
    spread = {"n": len(w), "min": float(fw.min()) if len(fw) else float("nan"), "max": float(fw.max()) if len(fw) else float("nan"),
              "mean": float(fw.mean()) if len(fw) else float("nan"), "std": float(fw.std()) if len(fw) else float("nan"),
              "p10": float(np.percentile(fw, 10)) if len(fw) else float("nan"),
              "p90": float(np.percentile(fw, 90)) if len(fw) else float("nan"),
              # effective sample size / n: 1 = uniform, small = a few images carry the weight
              "ess_fraction": float(fw.sum() ** 2 / (len(fw) * (fw ** 2).sum())) if len(fw) and (fw ** 2).sum() > 0 else float("nan")}
    problems = ([f"{nonfinite} non-finite weight(s)"] if nonfinite else []) + ([f"{negative} negative weight(s)"] if negative else []) \
        + ([f"classes with zero total weight: {dead}"] if dead else [])
    ok = not problems
    return Outcome("weights_finite", ok, ERROR,
                   f"{len(w)} finite weights, spread {spread['min']:.3f}..{spread['max']:.3f} (ESS {spread['ess_fraction']:.2f})"
                   if ok and len(w) else ("no synthetic images" if ok else "; ".join(problems)), spread)


def _history(rec: dict) -> list[dict]:
    import json

    h = rec.get("history")
    return json.loads(h) if isinstance(h, str) else ([] if h is None else list(h))


def check_classifier(rec: dict) -> list[Outcome]:
    """``above_chance`` (WARN): best val accuracy > 1/C. ``best_epoch_on_val`` (ERROR): the kept epoch has the
    highest val accuracy of the history (ties broken by val loss in training)."""
    cls = rec.get("classes")
    classes = list(cls) if cls is not None else []
    chance = 1.0 / max(1, len(classes))
    acc = _f(rec.get("best_val_acc"))
    above = Outcome("above_chance", acc > chance, WARN,
                    f"best val accuracy {acc:.3f} {'>' if acc > chance else '≤'} chance {chance:.3f}",
                    {"best_val_acc": acc, "chance": chance, "classes": len(classes)})
    hist = _history(rec)
    vals = [_f(h.get("val_acc")) for h in hist]
    best = int(rec.get("best_epoch", -1))
    kept = next((_f(h.get("val_acc")) for h in hist if int(h.get("epoch", -2)) == best), float("nan"))
    finite = [v for v in vals if v == v]
    if not finite:  # no val set: the last epoch is kept by construction
        ok, desc = True, "no val accuracy recorded (no val images); the last epoch is kept"
    else:
        ok = kept == kept and kept >= max(finite) - 1e-9 and abs(kept - acc) < 1e-6
        desc = (f"epoch {best} kept: val accuracy {kept:.3f} = the best of {len(finite)} epochs" if ok else
                f"epoch {best} kept (val {kept:.3f}, recorded {acc:.3f}) but the best val accuracy was {max(finite):.3f}")
    chosen = Outcome("best_epoch_on_val", ok, ERROR, desc, {"best_epoch": best, "val_acc_by_epoch": vals})
    return [above, chosen]


def check_metrics_row(row: dict) -> Outcome:
    """ERROR: ID accuracy finite in [0, 1] on a non-empty test set; OOD likewise when there are OOD images."""
    problems = []
    for k, n in (("acc_id", "n_test"), ("acc_ood", "n_ood")):
        a, cnt = _f(row.get(k)), int(row.get(n) or 0)
        if k == "acc_id" and cnt == 0:
            problems.append("the ID test set is empty (dataset root/test)")
        if cnt and not (0.0 <= a <= 1.0):
            problems.append(f"{k}={a} outside [0, 1]")
    ok = not problems
    return Outcome("accuracy_valid", ok, ERROR,
                   f"acc_id {_f(row.get('acc_id')):.3f} on {int(row.get('n_test') or 0)} test images" if ok else "; ".join(problems),
                   {"acc_id": _f(row.get("acc_id")), "acc_ood": _f(row.get("acc_ood")), "mlflow_run_id": str(row.get("mlflow_run_id") or "")})


def check_rows(df: pd.DataFrame, name: str, required: Iterable[str] = ()) -> Outcome:
    """ERROR: a non-empty manifest whose required columns have no nulls (concepts, captions, prompts, set metrics)."""
    nulls = {c: int(df[c].isna().sum()) for c in required if c in df and df[c].isna().any()}
    absent = [c for c in required if c not in df]
    ok = len(df) > 0 and not nulls and not absent
    return Outcome(name, ok, ERROR,
                   f"{len(df)} rows, no missing values in {list(required)}" if ok else
                   ("empty manifest" if not len(df) else f"missing columns {absent}, nulls {nulls}"),
                   {"rows": len(df), "nulls": nulls})


def check_report(summary: pd.DataFrame, methods: list[str], shots: list[int], n_seeds: int) -> Outcome:
    """ERROR: every enabled method (and real_only) has a row for every K, averaged over every seed."""
    have = {(str(r.method), int(r.shots)): int(r.seeds) for r in summary.itertuples()} if len(summary) else {}
    missing = [f"{m}@{k}shot" for m in methods for k in shots if (m, k) not in have]
    partial = [f"{m}@{k}shot ({have[(m, k)]}/{n_seeds} seeds)" for m in methods for k in shots
               if (m, k) in have and have[(m, k)] != n_seeds]
    ok = not missing and not partial
    return Outcome("all_methods_present", ok, ERROR,
                   f"{len(methods)} methods × {len(shots)} K, {n_seeds} seed(s) each" if ok else
                   "; ".join(([f"missing: {missing}"] if missing else []) + ([f"partial: {partial}"] if partial else [])),
                   {"methods": methods, "missing": missing, "partial": partial})
