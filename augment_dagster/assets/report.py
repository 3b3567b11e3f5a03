"""report: all methods × splits — accuracy (ID and OOD) mean ± std over seeds, as markdown in Dagster,
CSV + PNG + report.md under ``<data dir>/report/``, and an MLflow run."""

import dagster as dg
import pandas as pd

from ..resources import MlflowTracker
from ..util import atomic_write_bytes, atomic_write_text
from .common import CHEAP_AUTOMATION, Experiment, md_table, output
from .evaluation import REAL_ONLY


def summarize(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, shots): mean ± std over seeds of ID/OOD accuracy."""
    from ..metrics import mean_std

    rows = []
    for (method, shots), g in metrics.groupby(["method", "shots"], sort=True):
        m_id, s_id = mean_std(g["acc_id"].tolist())
        m_ood, s_ood = mean_std(g["acc_ood"].tolist())
        rows.append({"method": method, "shots": int(shots), "seeds": int(g["seed"].nunique()),
                     "acc_id_mean": m_id, "acc_id_std": s_id, "acc_ood_mean": m_ood, "acc_ood_std": s_ood,
                     "n_synthetic": int(g["n_synthetic"].mean())})
    return pd.DataFrame(rows)


def pretty(summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return summary
    out = summary[["method", "shots", "seeds"]].copy()
    out["acc_id"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(summary.acc_id_mean, summary.acc_id_std)]
    out["acc_ood"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(summary.acc_ood_mean, summary.acc_ood_std)]
    out["n_synthetic"] = summary["n_synthetic"]
    return out


def accuracy_plot_png(summary: pd.DataFrame) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, col, title in ((axes[0], "acc_id", "in-distribution test"), (axes[1], "acc_ood", "OOD (uncommon settings)")):
        for method, g in summary.groupby("method"):
            g = g.sort_values("shots")
            ax.errorbar(g["shots"], g[f"{col}_mean"], yerr=g[f"{col}_std"], marker="o", capsize=3, label=method)
        ax.set_xlabel("shots per class (K)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy")
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def build(exp: Experiment) -> list:
    cfg = exp.cfg
    methods = [REAL_ONLY] + list(cfg.enabled_methods())
    ins = {f"m_{m}": dg.AssetIn(key=exp.key("metrics", m)) for m in methods}

    @dg.asset(
        key=exp.key("report"), group_name=exp.name, io_manager_key=exp.io_manager_key, ins=ins,
        code_version=exp.code_version("splits", "methods"), kinds={"pandas", "mlflow"},
        automation_condition=CHEAP_AUTOMATION,
        description="Comparison of all methods × splits: accuracy (ID, OOD) mean ± std over seeds; table, CSV, plot, MLflow run.",
    )
    def report(context: dg.AssetExecutionContext, mlflow: MlflowTracker, **metrics) -> dg.Output:
        frames = [df for df in metrics.values() if df is not None and len(df)]
        allm = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        summary = summarize(allm) if len(allm) else pd.DataFrame()
        table = md_table(pretty(summary))
        out_dir = exp.data_dir / "report" / exp.name
        png = accuracy_plot_png(summary) if len(summary) else b""
        if len(summary):
            atomic_write_text(out_dir / "report.csv", summary.to_csv(index=False))
            atomic_write_text(out_dir / "metrics_all.csv", allm.drop(columns=[c for c in allm.columns if c.startswith("confusion")]).to_csv(index=False))
            atomic_write_bytes(out_dir / "accuracy_vs_shots.png", png)
        atomic_write_text(out_dir / "report.md", f"# {exp.name}: methods × shots\n\n{table}\n\n![accuracy](accuracy_vs_shots.png)\n")
        missing = [m for m in methods if m not in set(allm.get("method", pd.Series(dtype=str)))]
        run_id, err = (None, None)
        if len(summary):
            run_id, err = mlflow.log_run(
                cfg.mlflow.experiment_name or exp.name, "report",
                params={"methods": ",".join(methods), "splits": ",".join(cfg.splits.keys()), "config_hash": cfg.config_hash()},
                metrics={f"{r.method}.{r.shots}shot.acc_id": r.acc_id_mean for r in summary.itertuples()}
                | {f"{r.method}.{r.shots}shot.acc_ood": r.acc_ood_mean for r in summary.itertuples()},
                tags={"dagster.run_id": context.run_id, "dagster.asset_key": context.asset_key.to_user_string(),
                      "augment.experiment": exp.name, "augment.kind": "report"},
                artifacts={"report.md": (out_dir / "report.md").read_bytes(), "report.csv": (out_dir / "report.csv").read_bytes(),
                           "accuracy_vs_shots.png": png},
            )
        md = {"report": dg.MetadataValue.md(table), "report_dir": dg.MetadataValue.path(str(out_dir)),
              "missing_methods": dg.MetadataValue.json(missing), "mlflow_run_id": dg.MetadataValue.text(run_id or f"(none: {err})")}
        if png:
            import base64

            md["accuracy_plot"] = dg.MetadataValue.md(f"![accuracy](data:image/png;base64,{base64.b64encode(png).decode()})")
        summary = summary.copy()
        summary["created_by_run"] = context.run_id
        return output(summary, md)

    return [report]
