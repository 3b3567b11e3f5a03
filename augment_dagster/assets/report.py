"""report: all methods × splits — accuracy (ID and OOD) mean ± std over seeds, as markdown in Dagster,
CSV + PNG + report.md under ``<data dir>/report/``, and an MLflow run."""

import dagster as dg
import numpy as np
import pandas as pd

from ..resources import MlflowTracker
from ..util import atomic_write_bytes, atomic_write_text, hash_obj
from .common import CONTENT_AUTOMATION, Experiment, md_table, output
from .evaluation import REAL_ONLY


SET_COLS = ["precision", "recall", "diversity", "clip_score", "label_consistency", "gpu_seconds"]


def summarize(metrics: pd.DataFrame, setm: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (method, shots): mean ± std over seeds of ID/OOD accuracy, plus the synthetic-set metrics
    (mean over seeds) when available."""
    from ..metrics import mean_std

    if setm is not None and len(setm):
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
        from ..metrics.stats import compare_to_reference

        out = out.merge(compare_to_reference(metrics, reference=REAL_ONLY), on=["method", "shots"], how="left")
    return out


def episodic_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """GeNIe's episodic accuracy per (method, shots): mean ± 1.96·std/√n over the episodes of all seeds pooled
    (each seed's split has its own episodes). Empty when no method ran few_shot_episodes."""
    import json

    from ..metrics import episode_ci

    if "episodic_accs" not in metrics or not len(metrics):
        return pd.DataFrame()
    rows = []
    for (method, shots), g in metrics.groupby(["method", "shots"], sort=True):
        accs = [a for s in g["episodic_accs"] if isinstance(s, str) for a in json.loads(s)]
        if not accs:
            continue
        m, ci = episode_ci(accs)
        rows.append({"method": method, "shots": int(shots), "seeds": int(g["seed"].nunique()), "episodes": len(accs),
                     "episodic_acc": m, "ci95": ci, "episodic": f"{m:.3f} ± {ci:.3f}"})
    return pd.DataFrame(rows)


def pretty(summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return summary
    from ..metrics.stats import fmt_p, fmt_pm

    out = summary[["method", "shots", "seeds"]].copy()
    for c in ("acc_id", "acc_ood"):  # mean ± 95% CI half-width over seeds; vs real_only: paired diff, Holm p
        ci = summary[f"{c}_ci95"] if f"{c}_ci95" in summary else [float("nan")] * len(summary)
        out[f"{c} (95% CI)"] = [fmt_pm(m, h) for m, h in zip(summary[f"{c}_mean"], ci)]
        if f"{c}_diff" in summary:
            out[f"Δ{c[3:]} vs real_only"] = [
                "-" if d != d else fmt_pm(d, h).replace(f"{d:.3f}", f"{d:+.3f}", 1) + (" *" if sg else "")
                for d, h, sg in zip(summary[f"{c}_diff"], summary[f"{c}_diff_ci95"], summary[f"{c}_sig"])]
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


def ci_note(summary: pd.DataFrame) -> str:
    """The widest 95% CI half-width per accuracy column (the statistical-power target is <= 0.03)."""
    parts = []
    for c in ("acc_id", "acc_ood"):
        col = f"{c}_ci95"
        if col in summary and summary[col].notna().any():
            r = summary.loc[summary[col].idxmax()]
            parts.append(f"{c}: {r[col]:.3f} ({r['method']}, K={int(r['shots'])})")
    if not parts:
        return "95% CIs need at least 2 seeds per (method, K)."
    return ("Accuracy: mean ± 95% t-interval half-width over seeds. Widest half-width — " + "; ".join(parts)
            + ". Δ: method − real_only paired over seeds (95% CI); * = significant after Holm correction "
              "(paired t-test, α = 0.05, over all methods × K).")


def build(exp: Experiment) -> list:
    cfg = exp.cfg
    methods = [REAL_ONLY] + list(cfg.enabled_methods())
    ins = {f"m_{m}": dg.AssetIn(key=exp.key("metrics", m)) for m in methods}
    ins.update({f"s_{m}": dg.AssetIn(key=exp.key("set_metrics", m)) for m in cfg.enabled_methods()})
    ins.update({f"y_{m}": dg.AssetIn(key=exp.key("synthetic", m)) for m in cfg.enabled_methods()})
    first_split = cfg.splits.keys()[-1]
    ins["split"] = dg.AssetIn(key=exp.key("few_shot_split"))

    @dg.asset(
        key=exp.key("report"), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key, ins=ins,
        code_version=f"{exp.code_version('splits')}-{hash_obj(methods)[:8]}", kinds={"pandas", "mlflow"},
        automation_condition=CONTENT_AUTOMATION,
        description="Comparison of all methods × splits: accuracy (ID, OOD) mean ± std over seeds; table, CSV, plot, MLflow run.",
    )
    def report(context: dg.AssetExecutionContext, mlflow: MlflowTracker, split: pd.DataFrame, **inputs) -> dg.Output:
        from ..util import png_bytes
        from .common import image_source

        def frames(prefix):
            fs = [df for k, df in inputs.items() if k.startswith(prefix) and df is not None and len(df)]
            return pd.concat(fs, ignore_index=True) if fs else pd.DataFrame()

        allm, setm = frames("m_"), frames("s_")
        summary = summarize(allm, setm) if len(allm) else pd.DataFrame()
        table = md_table(pretty(summary))
        episodic = episodic_table(allm)
        ep_md = (f"\n\n## Episodic few-shot evaluation (GeNIe protocol, mean ± 95 % CI)\n\n"
                 f"{md_table(episodic[['method', 'shots', 'seeds', 'episodes', 'episodic']])}" if len(episodic) else "")
        out_dir = exp.data_dir / "report" / exp.name
        from ..report_plots import accuracy_plot_png, difference_plot_png, scatter_png

        algos = {REAL_ONLY: REAL_ONLY} | {m: cfg.method_algorithm(m) for m in cfg.enabled_methods()}
        png = accuracy_plot_png(summary, algos) if len(summary) else b""
        scatter = scatter_png(summary, algos) if len(summary) else b""
        diff_png = difference_plot_png(summary, algos) if len(summary) and "acc_id_diff" in summary else b""
        grid_png = b""
        sp = split[split["partition"] == first_split] if "partition" in split else split
        if len(sp):
            synth = {k[2:]: (df[df["partition"] == first_split] if "partition" in df else df)
                     for k, df in inputs.items() if k.startswith("y_") and df is not None and len(df)}
            grid_png = png_bytes(comparison_grid(synth, sp, image_source(exp, sp)))
        if len(summary):
            atomic_write_text(out_dir / "report.csv", summary.to_csv(index=False))
            atomic_write_text(out_dir / "metrics_all.csv", allm.drop(columns=[c for c in allm.columns if c.startswith("confusion")]).to_csv(index=False))
            atomic_write_bytes(out_dir / "accuracy_vs_shots.png", png)
            atomic_write_bytes(out_dir / "fidelity_diversity.png", scatter)
            if diff_png:
                atomic_write_bytes(out_dir / "difference_to_real_only.png", diff_png)
        if grid_png:
            atomic_write_bytes(out_dir / "samples.png", grid_png)
        if len(episodic):
            atomic_write_text(out_dir / "episodic.csv", episodic.to_csv(index=False))
        note = ci_note(summary) if len(summary) else ""
        atomic_write_text(out_dir / "report.md", f"# {exp.name}: methods × shots\n\n{table}\n\n{note}{ep_md}\n\n"
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
                | {f"{r['method']}.{r['shots']}shot.{c}": r[c] for _, r in summary.iterrows()
                   for c in ("acc_id_ci95", "acc_ood_ci95", "acc_id_diff", "acc_ood_diff", "acc_id_p_holm", "acc_ood_p_holm")
                   if c in summary},
                tags={"dagster.run_id": context.run_id, "dagster.asset_key": context.asset_key.to_user_string(),
                      "augment.experiment": exp.name, "augment.kind": "report"},
                artifacts={"report.md": (out_dir / "report.md").read_bytes(), "report.csv": (out_dir / "report.csv").read_bytes(),
                           "accuracy_vs_shots.png": png, "fidelity_diversity.png": scatter, "samples.png": grid_png,
                           "difference_to_real_only.png": diff_png},
            )
        md = {"report": dg.MetadataValue.md(table + ep_md), "report_dir": dg.MetadataValue.path(str(out_dir)),
              "missing_methods": dg.MetadataValue.json(missing), "mlflow_run_id": dg.MetadataValue.text(run_id or f"(none: {err})")}
        from .common import mlflow_links  # each method × split row -> its MLflow run

        md["mlflow_runs"] = mlflow_links(mlflow, allm)
        if png:
            import base64

            md["ci_note"] = dg.MetadataValue.text(note)
            for name, data in (("accuracy_plot", png), ("difference_to_real_only", diff_png),
                               ("fidelity_diversity", scatter), ("samples", grid_png)):
                if data:
                    md[name] = dg.MetadataValue.md(f"![{name}](data:image/png;base64,{base64.b64encode(data).decode()})")
            for f in ("accuracy_vs_shots.png", "difference_to_real_only.png", "fidelity_diversity.png"):
                if (out_dir / f).exists():
                    md[f"file_{f[:-4]}"] = dg.MetadataValue.path(str(out_dir / f))
        summary = summary.copy()
        summary["created_by_run"] = context.run_id
        return output(summary, md)

    return [report]
