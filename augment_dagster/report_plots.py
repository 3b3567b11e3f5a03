"""The report's plots, grouped by method family (no Dagster): each family has its own colour ramp, each method
its own (colour, marker); legends sit outside the axes; error bars are 95% t-intervals over seeds.

* ``accuracy_plot_png``: accuracy vs shots (ID, OOD), methods dodged around each K so the bars stay apart.
* ``difference_plot_png``: each method minus real_only, paired over seeds, with its 95% CI; filled markers
  where the difference is significant (Holm-adjusted paired t-test), hollow where not.
* ``scatter_png``: fidelity (precision) vs diversity (recall).
"""
from __future__ import annotations

import io

import pandas as pd

FAMILIES = ["baselines", "DA-Fusion/DIAGen", "Diff-II", "GeNIe", "SGID"]
_FAMILY_OF_ALGORITHM = {
    "dafusion": "DA-Fusion/DIAGen", "diagen": "DA-Fusion/DIAGen", "diff_ii": "Diff-II", "genie": "GeNIe",
    "genie_ada": "GeNIe", "sgid": "SGID",
}
_CMAPS = {"baselines": "Greys", "DA-Fusion/DIAGen": "Blues", "Diff-II": "Greens", "GeNIe": "Oranges", "SGID": "Purples"}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "H", "8", "x", "+", "1", "2", "3", "4"]


def family(algorithm: str) -> str:
    """The family of an algorithm (a method entry's ``method``, or its name): everything not listed is a baseline."""
    return _FAMILY_OF_ALGORITHM.get(algorithm, "baselines")


def styles(methods: list[str], algorithms: dict[str, str] | None = None) -> dict[str, dict]:
    """``{method: {family, color, marker, order}}``: methods sorted by family then name (real_only first);
    colours from the family's ramp (distinct within it), markers distinct over all methods."""
    import matplotlib

    algorithms = algorithms or {}
    fam = {m: family(algorithms.get(m, m)) for m in methods}
    ordered = sorted(methods, key=lambda m: (FAMILIES.index(fam[m]), m != "real_only", m))
    out: dict[str, dict] = {}
    for f in FAMILIES:
        ms = [m for m in ordered if fam[m] == f]
        cmap = matplotlib.colormaps[_CMAPS[f]]
        for j, m in enumerate(ms):
            shade = 0.9 if len(ms) == 1 else 0.95 - 0.5 * j / (len(ms) - 1)  # dark to mid, never near-white
            out[m] = {"family": f, "color": (0.0, 0.0, 0.0, 1.0) if m == "real_only" else cmap(shade)}
    for i, m in enumerate(ordered):
        out[m].update(marker=_MARKERS[i % len(_MARKERS)], order=i)
    return out


def _fig(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")  # room for super-labels; legends outside via bbox tight


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _legend(fig, ax, st: dict[str, dict], methods: list[str]) -> None:
    """One legend right of the axes, a bold header per family."""
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for f in FAMILIES:
        ms = sorted((m for m in methods if st[m]["family"] == f), key=lambda m: st[m]["order"])
        if not ms:
            continue
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(f)
        for m in ms:
            handles.append(Line2D([], [], color=st[m]["color"], marker=st[m]["marker"], linestyle="-", markersize=6))
            labels.append(m)
    leg = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                    borderaxespad=0.0, handlelength=2.2)
    for text in leg.get_texts():
        if text.get_text() in FAMILIES:
            text.set_fontweight("bold")


def accuracy_plot_png(summary: pd.DataFrame, algorithms: dict[str, str] | None = None) -> bytes:
    """Accuracy vs K, ID and OOD panels; error bars = ``acc_*_ci95`` (or none for a single seed)."""
    methods = sorted(summary["method"].unique())
    st = styles(methods, algorithms)
    shots = sorted(int(k) for k in summary["shots"].unique())
    fig = _fig(11, 4.6)
    axes = [fig.add_subplot(1, 2, 1)]
    axes.append(fig.add_subplot(1, 2, 2, sharey=axes[0]))
    width = 0.45 * (min(b - a for a, b in zip(shots, shots[1:])) if len(shots) > 1 else 1.0)
    n = len(methods)
    for ax, col, title in ((axes[0], "acc_id", "in-distribution test"), (axes[1], "acc_ood", "OOD (uncommon settings)")):
        for m in methods:
            g = summary[summary["method"] == m].sort_values("shots")
            if g[f"{col}_mean"].isna().all():
                continue
            off = ((st[m]["order"] - (n - 1) / 2) / max(1, n - 1)) * width if n > 1 else 0.0
            err = g[f"{col}_ci95"] if f"{col}_ci95" in g else None
            ax.errorbar(g["shots"] + off, g[f"{col}_mean"], yerr=None if err is None else err.fillna(0.0),
                        color=st[m]["color"], marker=st[m]["marker"], markersize=5, capsize=2, linewidth=1.0,
                        elinewidth=0.8, alpha=0.95)
        ax.set_xlabel("shots per class (K)")
        ax.set_xticks(shots)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (mean, 95% CI over seeds)")
    _legend(fig, axes[1], st, methods)
    return _png(fig)


def difference_plot_png(cmp: pd.DataFrame, algorithms: dict[str, str] | None = None, reference: str = "real_only") -> bytes:
    """Forest plot of method - real_only per K (rows) for ID and OOD (panels)."""
    d = cmp[cmp["method"] != reference]
    methods = sorted(d["method"].unique())
    st = styles(methods + [reference], algorithms)
    ordered = sorted(methods, key=lambda m: st[m]["order"])
    shots = sorted(int(k) for k in d["shots"].unique()) if len(d) else []
    fig = _fig(11, 0.9 + 0.28 * max(1, len(ordered)) * max(1, len(shots)))
    axes = [fig.add_subplot(1, 2, 1)]
    axes.append(fig.add_subplot(1, 2, 2, sharey=axes[0]))
    ticks, labels = [], []
    for ax, col, title in ((axes[0], "acc_id", "ID accuracy − real_only"), (axes[1], "acc_ood", "OOD accuracy − real_only")):
        y = 0
        for k in shots:
            for m in ordered:
                r = d[(d["method"] == m) & (d["shots"] == k)]
                if len(r) and r[f"{col}_diff"].iloc[0] == r[f"{col}_diff"].iloc[0]:
                    diff, half = float(r[f"{col}_diff"].iloc[0]), float(r[f"{col}_diff_ci95"].iloc[0])
                    sig = bool(r.get(f"{col}_sig", pd.Series([""])).iloc[0])
                    c = st[m]["color"]
                    ax.errorbar([diff], [y], xerr=None if half != half else [half], color=c, marker=st[m]["marker"],
                                markersize=6, capsize=2, linewidth=0, elinewidth=1.0,
                                markerfacecolor=c if sig else "white", markeredgecolor=c)
                if ax is axes[0]:
                    ticks.append(y)
                    labels.append(f"{m}  K={k}")
                y += 1
            y += 0.6
        from matplotlib.ticker import MaxNLocator

        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
        ax.xaxis.set_major_locator(MaxNLocator(6))
    fig.supxlabel("accuracy difference to real_only, paired over seeds (95% CI); filled marker = significant "
                  "(paired t-test, Holm-adjusted p < 0.05)", fontsize=9)
    axes[0].set_yticks(ticks)
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[0].invert_yaxis()
    for lab in axes[1].get_yticklabels():
        lab.set_visible(False)
    if ordered:
        _legend(fig, axes[1], st, ordered)
    return _png(fig)


def scatter_png(summary: pd.DataFrame, algorithms: dict[str, str] | None = None) -> bytes:
    """Fidelity (precision) vs diversity (recall) per method; the label next to a point is K."""
    fig = _fig(6.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    d = summary.dropna(subset=["precision", "recall"]) if {"precision", "recall"} <= set(summary) else summary.iloc[0:0]
    methods = sorted(d["method"].unique()) if len(d) else []
    st = styles(methods, algorithms) if methods else {}
    for m in methods:
        g = d[d["method"] == m]
        ax.scatter(g["recall"], g["precision"], color=st[m]["color"], marker=st[m]["marker"], s=36, edgecolors="black",
                   linewidths=0.4)
        for r in g.itertuples():
            ax.annotate(f"{r.shots}", (r.recall, r.precision), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("recall (diversity)")
    ax.set_ylabel("precision (fidelity)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    if methods:
        _legend(fig, ax, st, methods)
    else:
        ax.text(0.5, 0.5, "no precision/recall yet", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)
