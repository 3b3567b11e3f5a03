"""report: all methods × splits — accuracy (ID and OOD) mean ± std over seeds, as markdown in Dagster,
CSV + PNG + report.md under ``<data dir>/report/``, and an MLflow run."""

import dagster as dg
import numpy as np
import pandas as pd

from ...util import atomic_write_bytes, atomic_write_text, hash_obj
from ..resources import StoreResource
from ..tracking import MlflowTracker
from .common import Experiment, md_table, output, stage_asset
from .evaluation import REAL_ONLY


REPORT_VERSION = "rep-4"  # the report's layout: rep-4: protocol per table, compute_seconds, bounded intervals, <3 seeds notes (bump on change)
SET_COLS = ["precision", "recall", "diversity", "clip_score", "label_consistency", "compute_seconds"]


def summarize(metrics: pd.DataFrame, setm: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (method, shots): mean ± std over seeds of ID/OOD accuracy, plus the synthetic-set metrics
    (mean over seeds) when available."""
    from ...metrics import mean_std

    if setm is not None and len(setm):
        if "gpu_seconds" in setm and "compute_seconds" not in setm:  # written before the rename (set_metrics -t2)
            setm = setm.rename(columns={"gpu_seconds": "compute_seconds"})
        keep = ["method", "split"] + [c for c in SET_COLS if c in setm]
        metrics = metrics.merge(setm[keep], on=["method", "split"], how="left")
    rows = []
    for (method, shots), g in metrics.groupby(["method", "shots"], sort=True):
        m_id, s_id = mean_std(g["acc_id"].tolist())
        m_ood, s_ood = mean_std(g["acc_ood"].tolist())
        row = {"method": method, "shots": int(shots), "seeds": int(g["seed"].nunique()),
               "acc_id_mean": m_id, "acc_id_std": s_id, "acc_ood_mean": m_ood, "acc_ood_std": s_ood,
               "n_synthetic": int(g["n_synthetic"].mean())}
        for c in SET_COLS:
            row[c] = float(pd.to_numeric(g[c], errors="coerce").mean()) if c in g else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):  # 95% t-intervals over seeds, paired t-tests vs real_only (metrics/stats.py)
        from ...metrics.stats import compare_to_reference

        out = out.merge(compare_to_reference(metrics, reference=REAL_ONLY), on=["method", "shots"], how="left")
    return out


def episodic_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """GeNIe's episodic accuracy per (method, shots) with its 95% CI, the episode-paired difference to real_only
    (Holm) and the seed-level test (``metrics.stats.episodic_compare``); ``ci95`` = ``episodic_ci95``. Empty when
    no method ran few_shot_episodes."""
    from ...metrics.stats import episodic_compare

    if "episodic_accs" not in metrics or not len(metrics):
        return pd.DataFrame()
    out = episodic_compare(metrics, reference=REAL_ONLY)
    if not len(out):
        return pd.DataFrame()
    out["shots"] = out["shots"].astype(int)
    out["ci95"] = out["episodic_ci95"]
    order = sorted(range(len(out)), key=lambda i: (out["method"].iat[i] != REAL_ONLY, out["method"].iat[i], out["shots"].iat[i]))
    return out.iloc[order].reset_index(drop=True)


EPISODIC_PROTOCOL = (  # metrics manifests written before episodic_protocol existed (support: split)
    "Protocol: per split, N-way episodes (classes, then queries from the test pool) drawn with a fixed seed — the same "
    "episodes for every method of the split — and a logistic-regression probe on frozen features of the split's real "
    "shots (+ the method's synthetic images of those classes) per episode.")


def episodic_pretty(ep: pd.DataFrame) -> pd.DataFrame:
    """The episodic table as printed: mean ± 95% CI, Δ vs real_only paired over episodes (* = Holm-significant),
    its Holm p, and the seed-level view (per-seed Δ, Δ over seeds ± CI, Holm p)."""
    from ...metrics.stats import fmt_diff, fmt_p, fmt_pm

    if ep.empty:
        return ep
    out = ep[["method", "shots", "seeds", "episodes"]].copy()
    out["episodic acc (95% CI)"] = [fmt_pm(m, h) for m, h in zip(ep["episodic_acc"], ep["episodic_ci95"])]
    out["CI half-width"] = ["-" if h != h else f"{h:.3f}" for h in ep["episodic_ci95"]]
    zv, szv = ep.get("zero_var", [False] * len(ep)), ep.get("seed_zero_var", [False] * len(ep))
    out["Δ vs real_only (episodes)"] = [fmt_diff(d, h, sg, zero_var=z is True) for d, h, sg, z in
                                        zip(ep["diff"], ep["diff_ci95"], ep["sig"], zv)]
    out["p (Holm)"] = [fmt_p(p) for p in ep["p_holm"]]
    out["per-seed Δ"] = [", ".join(f"{x:+.3f}" for x in v) if len(v) else "-" for v in ep["seed_diffs"]]
    out["Δ over seeds (95% CI)"] = [fmt_diff(d, h, sg, zero_var=z is True) for d, h, sg, z in
                                    zip(ep["seed_diff"], ep["seed_diff_ci95"], ep["seed_sig"], szv)]
    out["p seeds (Holm)"] = [fmt_p(p) for p in ep["seed_p_holm"]]
    return out


def episodic_note(ep: pd.DataFrame, fresh_support: bool = False) -> str:
    """What the episodic numbers are, what their CI covers and what it does not, and the widest half-width
    (target <= 0.03): a markdown bullet list. ``fresh_support``: the episodes drew their own supports and each
    method generated from them (``support: episode``)."""
    if ep.empty:
        return ""
    parts = []
    h = ep["episodic_ci95"]
    if h.notna().any():
        r = ep.loc[h.idxmax()]
        parts.append(f"Widest 95% CI half-width: {r['episodic_ci95']:.3f} ({r['method']}, K={int(r['shots'])}); "
                     f"≤ 0.03 for {int((h <= 0.03).sum())} of {len(ep)} (method, K).")
    parts.append("Accuracy: mean ± 95% t-interval over all (seed, episode) accuracies pooled. Δ (episodes): method − "
                 "real_only paired episode by episode within each seed, paired t-test over the (seed, episode) "
                 "differences; * = significant after Holm correction over all methods × K (α = 0.05).")
    parts.append(("These intervals cover the sampling of episode classes, supports and queries, and each episode's "
                  "own synthetic set (generated from its support); they do NOT cover" if fresh_support else
                  "These intervals cover the sampling of episode classes and queries given each split's synthetic "
                  "set; they do NOT cover") + " the randomness of generation (or of the split) across seeds. Only the "
                 "seed-level columns do (per-seed mean Δ, paired t-test over seeds, Holm): with few seeds that test "
                 "has little power, and a difference significant over episodes but not over seeds may not survive "
                 "another generation run. With fewer than 3 seeds the seed-level columns give no interval and no "
                 "test (one degree of freedom says nothing).")
    unpaired = int(ep["unpaired_seeds"].sum()) if "unpaired_seeds" in ep else 0
    if unpaired:
        parts.append(f"{unpaired} (method, K, seed) cell(s) ran other episodes than real_only (a per-method episode "
                     "config) or lack real_only's, and are left out of the paired tests.")
    return "\n".join(f"- {p}" for p in parts)


CLASSIFIER_PROTOCOL = (
    "Protocol: per split (K shots, seed), a classifier trained on the split's K real shots (+ the method's synthetic "
    "images made from those shots, drawn with probability α) and tested on the ID and OOD test sets; mean ± std over "
    "seeds.")


def episodic_protocol_lines(metrics: pd.DataFrame | None) -> str:
    """Which episodic protocol the table's rows ran (``episodic_protocol`` of the metrics rows, per K)."""
    if metrics is None or "episodic_protocol" not in metrics or not len(metrics):
        return EPISODIC_PROTOCOL
    rows = metrics[(metrics.get("episodic_episodes", 0) > 0) & metrics["episodic_protocol"].fillna("").astype(bool)]
    if not len(rows):
        return EPISODIC_PROTOCOL
    lines = [f"- K={int(k)}: {p}" for k, p in sorted({(int(k), p) for k, p in zip(rows["shots"], rows["episodic_protocol"])})]
    fresh = (rows.get("episodic_support", pd.Series(dtype=str)) == "episode").any()
    tail = (" Every method of a K ran the same seeded episodes (classes, supports, queries), paired with real_only, "
            "which fits on the episode's real support alone." if fresh else
            " The same episodes (classes, then queries) for every method of the split; the support is the split's "
            "real shots (+ the method's synthetic images of those classes).")
    return "Protocol: a frozen encoder + logistic regression per episode." + tail + "\n\n" + "\n".join(lines)


def episodic_markdown(ep: pd.DataFrame, metrics: pd.DataFrame | None = None) -> str:
    """The report's episodic section: heading, the protocol (from the metrics rows), the table, the notes ('' when
    empty)."""
    if ep.empty:
        return ""
    fresh = metrics is not None and "episodic_support" in metrics and bool((metrics["episodic_support"] == "episode").any())
    return (f"## Episodic few-shot evaluation (GeNIe protocol, mean ± 95 % CI)\n\n{episodic_protocol_lines(metrics)}\n\n"
            f"{md_table(episodic_pretty(ep))}\n\n{episodic_note(ep, fresh)}\n\n")


def pretty(summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return summary
    from ...metrics.stats import fmt_diff, fmt_interval, fmt_p

    out = summary[["method", "shots", "seeds"]].copy()
    nan = [float("nan")] * len(summary)
    for c in ("acc_id", "acc_ood"):  # mean [95% bootstrap interval over seeds]; vs real_only: paired diff, Holm p
        lo, hi = summary.get(f"{c}_lo", nan), summary.get(f"{c}_hi", nan)
        out[f"{c} (95% CI)"] = [fmt_interval(m, a, b, n) for m, a, b, n in
                                zip(summary[f"{c}_mean"], lo, hi, summary.get(f"{c}_n", summary["seeds"]))]
        if f"{c}_diff" in summary:
            zv = summary.get(f"{c}_zero_var", [False] * len(summary))
            out[f"Δ{c[3:]} vs real_only"] = [
                fmt_diff(d, h, sg, zero_var=bool(z) if z == z else False)
                for d, h, sg, z in zip(summary[f"{c}_diff"], summary[f"{c}_diff_ci95"], summary[f"{c}_sig"], zv)]
            out[f"p{c[3:]} (Holm)"] = [fmt_p(p) for p in summary[f"{c}_p_holm"]]
    out["n_synthetic"] = summary["n_synthetic"]
    for c in SET_COLS:
        if c in summary:
            out[c] = [("-" if v != v else f"{v:.3f}") for v in summary[c]]
    return out


def comparison_grid(synth: dict[str, pd.DataFrame], split: pd.DataFrame, images, max_guides: int = 6):
    """Rows: the real guide images, then one row per method with a synthetic image of the same guide (or,
    for methods without a same-class guide, of the same class). Columns: one guide per class."""
    from PIL import Image, ImageDraw

    train = split[split["role"] == "train"].sort_values(["label", "rank"])
    guides = train.groupby("label").head(1).head(max_guides)
    cell = 64
    methods = [m for m, df in synth.items() if df is not None and len(df)]
    left = 88  # room for the method names
    grid = Image.new("RGB", (left + cell * len(guides), cell * (len(methods) + 1)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((2, cell // 2), "real", fill=(0, 0, 0))
    for j, g in enumerate(guides.itertuples()):
        grid.paste(images.real(g.image_id).resize((cell, cell)), (left + j * cell, 0))
    for i, m in enumerate(methods):
        df = synth[m]
        draw.text((2, (i + 1) * cell + cell // 2), m[:14], fill=(0, 0, 0))
        for j, g in enumerate(guides.itertuples()):
            guided = np.array([g.image_id in list(x) for x in df["guide_ids"]], dtype=bool)
            hit = df[guided & (df["label"] == g.label).to_numpy()]
            if hit.empty:
                hit = df[df["label"] == g.label]
            if len(hit):
                grid.paste(images.synthetic(hit.iloc[0]["blob"]).resize((cell, cell)), (left + j * cell, (i + 1) * cell))
    return grid


def missing_eval_note(metrics: pd.DataFrame, source: str) -> str:
    """Why an accuracy column is "-": the dataset has no test/ (ID) or ood/ (OOD) images ('' when both exist)."""
    parts = []
    for col, folder, what in (("n_test", "test", "acc_id"), ("n_ood", "ood", "acc_ood")):
        if col in metrics and len(metrics) and (pd.to_numeric(metrics[col], errors="coerce").fillna(0) == 0).all():
            where = "the built-in dataset" if source == "builtin" else f"{source}"
            parts.append(f"{what} is \"-\": {where} has no {folder}/ images (expected {folder}/<class>/*); add them "
                         f"{'(dataset.builtin.' + folder + '_per_class)' if source == 'builtin' else 'to the dataset folder'} "
                         "to measure it.")
    return " ".join(parts)


def ci_note(summary: pd.DataFrame) -> str:
    """The widest 95% CI half-width per accuracy column (the statistical-power target is <= 0.03)."""
    parts = []
    for c in ("acc_id", "acc_ood"):
        col = f"{c}_ci95"
        if col in summary and summary[col].notna().any():
            r = summary.loc[summary[col].idxmax()]
            parts.append(f"{c}: {r[col]:.3f} ({r['method']}, K={int(r['shots'])})")
    from ...metrics.stats import MIN_SEEDS_FOR_CI

    few = ""
    if "seeds" in summary and (summary["seeds"] < MIN_SEEDS_FOR_CI).any():
        few = (f"No interval and no test where a (method, K) has fewer than {MIN_SEEDS_FOR_CI} seeds (here "
               f"{int(summary['seeds'].min())}): a 95% interval from 2 values has one degree of freedom (t = 12.7) and "
               "says nothing about the accuracy; add seeds under splits.seeds for intervals and paired tests.")
    if not parts:
        return few or f"95% intervals need at least {MIN_SEEDS_FOR_CI} seeds per (method, K)."
    return ("Accuracy: mean [95% percentile-bootstrap interval over seeds; it stays inside [0, 1]]. Widest half-width — "
            + "; ".join(parts) + ". Δ: method − real_only paired over seeds (95% t-interval); * = significant after "
            "Holm correction (paired t-test, α = 0.05, over all methods × K); a Δ that is the same in every seed has "
            "no variance and is not tested." + (" " + few if few else ""))


def build(exp: Experiment) -> list:
    cfg = exp.cfg
    methods = [REAL_ONLY] + list(cfg.enabled_methods())
    ins = {f"m_{m}": ("metrics", m) for m in methods}
    ins.update({f"s_{m}": ("set_metrics", m) for m in cfg.enabled_methods()})
    ins.update({f"y_{m}": ("synthetic", m) for m in cfg.enabled_methods()})
    first_split = cfg.splits.keys()[-1]
    ins["split"] = "few_shot_split"

    @stage_asset(exp, "report", ins=ins, partitioned=False, resources=("store", "mlflow"),
        code_version=f"{exp.code_version('splits')}-{hash_obj(methods)[:8]}-{REPORT_VERSION}", kinds={"pandas", "mlflow"},
        description="Comparison of all methods × splits: accuracy (ID, OOD) mean ± std over seeds; table, CSV, plot, MLflow run.",
    )
    def report(context: dg.AssetExecutionContext, split: pd.DataFrame, store: StoreResource, mlflow: MlflowTracker,
               **inputs) -> dg.Output:
        from ...util import png_bytes

        def frames(prefix):
            fs = [df for k, df in inputs.items() if k.startswith(prefix) and df is not None and len(df)]
            return pd.concat(fs, ignore_index=True) if fs else pd.DataFrame()

        allm, setm = frames("m_"), frames("s_")
        summary = summarize(allm, setm) if len(allm) else pd.DataFrame()
        table = md_table(pretty(summary))
        episodic = episodic_table(allm)
        fresh = bool(len(allm)) and "episodic_support" in allm and bool((allm["episodic_support"] == "episode").any())
        ep_note, ep_md = episodic_note(episodic, fresh), episodic_markdown(episodic, allm)
        out_dir = store.path / "report" / exp.name
        from ...report_plots import (
            accuracy_plot_png,
            difference_plot_png,
            episodic_difference_plot_png,
            episodic_plot_png,
            scatter_png,
        )

        algos = {REAL_ONLY: REAL_ONLY} | {m: cfg.method_algorithm(m) for m in cfg.enabled_methods()}
        png = accuracy_plot_png(summary, algos) if len(summary) else b""
        scatter = scatter_png(summary, algos) if len(summary) else b""
        diff_png = difference_plot_png(summary, algos) if len(summary) and "acc_id_diff" in summary else b""
        ep_png = episodic_plot_png(episodic, algos) if len(episodic) else b""
        ep_diff_png = episodic_difference_plot_png(episodic, algos) if len(episodic) else b""
        grid_png = b""
        sp = split[split["partition"] == first_split] if "partition" in split else split
        if len(sp):
            from ...training.episodes import split_level

            synth = {k[2:]: split_level(df[df["partition"] == first_split] if "partition" in df else df)
                     for k, df in inputs.items() if k.startswith("y_") and df is not None and len(df)}
            grid_png = png_bytes(comparison_grid(synth, sp, store.images(sp, cfg.dataset)))
        if len(summary):
            atomic_write_text(out_dir / "report.csv", summary.to_csv(index=False))
            atomic_write_text(out_dir / "metrics_all.csv", allm.drop(columns=[c for c in allm.columns if c.startswith("confusion")]).to_csv(index=False))
            atomic_write_bytes(out_dir / "accuracy_vs_shots.png", png)
            atomic_write_bytes(out_dir / "fidelity_diversity.png", scatter)
            if diff_png:
                atomic_write_bytes(out_dir / "difference_to_real_only.png", diff_png)
        if grid_png:
            atomic_write_bytes(out_dir / "samples.png", grid_png)
        ep_files = ("episodic.csv", "episodic_accuracy.png", "episodic_difference.png")
        if len(episodic):
            atomic_write_text(out_dir / "episodic.csv", episodic.to_csv(index=False))
            atomic_write_bytes(out_dir / "episodic_accuracy.png", ep_png)
            atomic_write_bytes(out_dir / "episodic_difference.png", ep_diff_png)
        else:  # no episodes this time: an older run's episodic files would be stale
            for f in ep_files:
                (out_dir / f).unlink(missing_ok=True)
        note = ci_note(summary) if len(summary) else ""
        why = missing_eval_note(allm, cfg.dataset.source)
        note = f"{note}\n\n{why}" if why else note
        # the episodic section first when present: it is the statistically powered comparison
        head = (f"{ep_md}![episodic accuracy](episodic_accuracy.png)\n"
                "![episodic difference to real_only](episodic_difference.png)\n\n"
                "## Classifier accuracy (over seeds)\n\n") if len(episodic) else ""
        atomic_write_text(out_dir / "report.md", f"# {exp.name}: methods × shots\n\n{head}{CLASSIFIER_PROTOCOL}\n\n"
                          f"{table}\n\n{note}\n\n"
                          "![accuracy](accuracy_vs_shots.png)\n![difference to real_only](difference_to_real_only.png)\n"
                          "![fidelity vs diversity](fidelity_diversity.png)\n"
                          f"![samples ({first_split})](samples.png)\n")
        missing = [m for m in methods if m not in set(allm.get("method", pd.Series(dtype=str)))]
        run_id, err = (None, None)
        if len(summary):
            run_id, err = mlflow.log_run(
                cfg.mlflow.experiment_name or exp.name, "report",
                params={"methods": ",".join(methods), "splits": ",".join(cfg.splits.keys()), "config_hash": cfg.config_hash()},
                metrics={f"{r.method}.{r.shots}shot.acc_id": r.acc_id_mean for r in summary.itertuples()}
                | {f"{r.method}.{r.shots}shot.acc_ood": r.acc_ood_mean for r in summary.itertuples()}
                | {f"{r.method}.{r.shots}shot.episodic_acc": r.episodic_acc for r in episodic.itertuples()}
                | {f"{r.method}.{r.shots}shot.episodic_ci95": r.ci95 for r in episodic.itertuples()}
                | {f"{r.method}.{r.shots}shot.episodic_{c}": getattr(r, c) for r in episodic.itertuples()
                   for c in ("diff", "p_holm", "seed_diff", "seed_p_holm") if getattr(r, c) == getattr(r, c)}
                | {f"{r['method']}.{r['shots']}shot.{c}": r[c] for _, r in summary.iterrows()
                   for c in ("acc_id_ci95", "acc_ood_ci95", "acc_id_diff", "acc_ood_diff", "acc_id_p_holm", "acc_ood_p_holm")
                   if c in summary},
                tags={"dagster.run_id": context.run_id, "dagster.asset_key": context.asset_key.to_user_string(),
                      "augment.experiment": exp.name, "augment.kind": "report"},
                artifacts={"report.md": (out_dir / "report.md").read_bytes(), "report.csv": (out_dir / "report.csv").read_bytes(),
                           "accuracy_vs_shots.png": png, "fidelity_diversity.png": scatter, "samples.png": grid_png,
                           "difference_to_real_only.png": diff_png, "episodic_accuracy.png": ep_png,
                           "episodic_difference.png": ep_diff_png}
                | ({"episodic.csv": (out_dir / "episodic.csv").read_bytes()} if len(episodic) else {}),
            )
        md = {"report": dg.MetadataValue.md(ep_md + table), "report_dir": dg.MetadataValue.path(str(out_dir)),
              "missing_methods": dg.MetadataValue.json(missing), "mlflow_run_id": dg.MetadataValue.text(run_id or f"(none: {err})")}
        from .common import mlflow_links  # each method × split row -> its MLflow run

        md["mlflow_runs"] = mlflow_links(mlflow, allm)
        if png:
            import base64

            md["ci_note"] = dg.MetadataValue.text(note)
            if ep_note:
                md["episodic_note"] = dg.MetadataValue.text(ep_note)
            for name, data in (("episodic_accuracy", ep_png), ("episodic_difference", ep_diff_png),
                               ("accuracy_plot", png), ("difference_to_real_only", diff_png),
                               ("fidelity_diversity", scatter), ("samples", grid_png)):
                if data:
                    md[name] = dg.MetadataValue.md(f"![{name}](data:image/png;base64,{base64.b64encode(data).decode()})")
            for f in ("episodic_accuracy.png", "episodic_difference.png", "accuracy_vs_shots.png",
                      "difference_to_real_only.png", "fidelity_diversity.png"):
                if (out_dir / f).exists():
                    md[f"file_{f[:-4]}"] = dg.MetadataValue.path(str(out_dir / f))
        summary = summary.copy()
        summary["created_by_run"] = context.run_id
        return output(summary, md)

    return [report]
