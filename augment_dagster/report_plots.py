"""The report's plots, grouped by method family (no Dagster): each family has its own colour ramp, each method
its own (colour, marker); legends sit outside the axes; accuracy error bars are 95% percentile-bootstrap
intervals over seeds (inside [0, 1]; none below 3 seeds, said on the plot); differences are 95% paired t-intervals.

* ``accuracy_plot_png``: accuracy vs shots (ID, OOD), methods dodged around each K so the bars stay apart.
* ``difference_plot_png``: each method minus real_only, paired over seeds, with its 95% CI; filled markers
  where the difference is significant (Holm-adjusted paired t-test), hollow where not.
* ``episodic_plot_png`` / ``episodic_difference_plot_png``: the same two plots for GeNIe's episodic accuracy
  (CI over the pooled episodes; differences paired over episodes within seeds, and over seeds).
* ``scatter_png``: fidelity (precision) vs diversity (recall).
"""
from __future__ import annotations

import io

import pandas as pd

# the families of the shipped methods, in legend order, each with its colour ramp (``MethodSpec.family``); a family
# no shipped method has (a new method's) follows them, in name order, on the ramps of _MORE_CMAPS
FAMILIES = ["baselines", "DA-Fusion/DIAGen", "Diff-II", "GeNIe", "SGID"]
_CMAPS = {"baselines": "Greys", "DA-Fusion/DIAGen": "Blues", "Diff-II": "Greens", "GeNIe": "Oranges", "SGID": "Purples"}
_MORE_CMAPS = ["Reds", "YlOrBr", "PuRd", "BuGn", "RdPu", "YlGn", "PuBu", "OrRd"]
_UNFILLED = {"x", "+", "1", "2", "3", "4", "|", "_"}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "H", "8", "x", "+", "1", "2", "3", "4"]


def family(algorithm: str) -> str:
    """The report family of an algorithm (a method entry's ``method``, or its name): its ``MethodSpec.family``;
    ``real_only`` (no method) is a baseline."""
    from .methods.registry import available_methods, get_method

    if algorithm not in available_methods():
        return "baselines"
    return get_method(algorithm).family or algorithm


def families(present) -> list[str]:
    """The families in ``present``, in legend order: the shipped ones first, then the others by name."""
    present = set(present)
    return [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES))


def _cmap_name(f: str, order: list[str]) -> str:
    extra = [x for x in order if x not in _CMAPS]
    return _CMAPS.get(f) or _MORE_CMAPS[extra.index(f) % len(_MORE_CMAPS)]


def styles(methods: list[str], algorithms: dict[str, str] | None = None) -> dict[str, dict]:
    """``{method: {family, color, marker, order}}``: methods sorted by family then name (real_only first);
    colours from the family's ramp (distinct within it), markers distinct over all methods."""
    import matplotlib

    algorithms = algorithms or {}
    fam = {m: family(algorithms.get(m, m)) for m in methods}
    order = families(fam.values())
    ordered = sorted(methods, key=lambda m: (order.index(fam[m]), m != "real_only", m))
    out: dict[str, dict] = {}
    for f in order:
        ms = [m for m in ordered if fam[m] == f]
        cmap = matplotlib.colormaps[_cmap_name(f, order)]
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
    order = families(st[m]["family"] for m in methods)
    for f in order:
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
        if text.get_text() in order:
            text.set_fontweight("bold")


_ACC_PANELS = (("acc_id_mean", "acc_id_ci95", "in-distribution test", None),
               ("acc_ood_mean", "acc_ood_ci95", "OOD (uncommon settings)", None))
_DIFF_PANELS = (("acc_id_diff", "acc_id_diff_ci95", "ID accuracy − real_only", "acc_id_sig"),
                ("acc_ood_diff", "acc_ood_diff_ci95", "OOD accuracy − real_only", "acc_ood_sig"))


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _is_sig(r: pd.DataFrame, col: str | None) -> bool:
    if not col or col not in r or not len(r):
        return False
    v = r[col].iloc[0]
    return isinstance(v, str) and bool(v.strip())


def _axes(fig, n: int):
    axes = [fig.add_subplot(1, n, 1)]
    for i in range(2, n + 1):
        axes.append(fig.add_subplot(1, n, i, sharey=axes[0]))
    return axes


def accuracy_plot_png(summary: pd.DataFrame, algorithms: dict[str, str] | None = None, panels=_ACC_PANELS,
                      ylabel: str = "top-1 accuracy (mean, 95% bootstrap CI over seeds)") -> bytes:
    """Accuracy vs K, one panel per ``(mean column, CI column, title, significance column or None)`` (default:
    ID and OOD); error bars = the CI column (none where NaN); a ``*`` above a point whose significance column is
    set (a difference to real_only that survives Holm)."""
    methods = sorted(summary["method"].unique())
    st = styles(methods, algorithms)
    shots = sorted(int(k) for k in summary["shots"].unique())
    fig = _fig(5.5 * len(panels) + (1.5 if len(panels) == 1 else 0.0), 4.6)
    axes = _axes(fig, len(panels))
    width = 0.45 * (min(b - a for a, b in zip(shots, shots[1:])) if len(shots) > 1 else 1.0)
    n = len(methods)
    for ax, (mcol, ccol, title, scol) in zip(axes, panels):
        for m in methods:
            g = summary[summary["method"] == m].sort_values("shots")
            if mcol not in g or pd.to_numeric(g[mcol], errors="coerce").isna().all():
                continue
            off = ((st[m]["order"] - (n - 1) / 2) / max(1, n - 1)) * width if n > 1 else 0.0
            y = pd.to_numeric(g[mcol], errors="coerce")
            err = pd.to_numeric(g[ccol], errors="coerce").fillna(0.0) if ccol in g else None
            lo_col, hi_col = mcol.replace("_mean", "_lo"), mcol.replace("_mean", "_hi")
            if lo_col != mcol and lo_col in g and hi_col in g:  # a bounded (asymmetric) interval: inside [0, 1]
                lo, hi = pd.to_numeric(g[lo_col], errors="coerce"), pd.to_numeric(g[hi_col], errors="coerce")
                below, above = (y - lo).clip(lower=0).fillna(0.0), (hi - y).clip(lower=0).fillna(0.0)
                err = pd.concat([below, above], axis=1).T.to_numpy()
                err_up = above
            else:
                err_up = err
            ax.errorbar(g["shots"] + off, y, yerr=err, color=st[m]["color"], marker=st[m]["marker"], markersize=5,
                        capsize=2, linewidth=1.0, elinewidth=0.8, alpha=0.95)
            if scol and scol in g:
                for k, v, e, sg in zip(g["shots"], y, err_up if err_up is not None else [0.0] * len(g), g[scol]):
                    if isinstance(sg, str) and sg.strip() and v == v:
                        ax.annotate("*", (k + off, v + e), xytext=(0, 1), textcoords="offset points", ha="center",
                                    va="bottom", fontsize=10, fontweight="bold", color=st[m]["color"])
        ax.set_xlabel("shots per class (K)")
        ax.set_xticks(shots)
        ax.set_title(title)
        if mcol.endswith("_mean") and "seeds" in summary and (pd.to_numeric(summary["seeds"]) < 3).any():
            ax.text(0.5, 0.02, "no interval where a (method, K) has < 3 seeds", transform=ax.transAxes,
                    ha="center", va="bottom", fontsize=7, color="0.35")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    _legend(fig, axes[-1], st, methods)
    return _png(fig)


def difference_plot_png(cmp: pd.DataFrame, algorithms: dict[str, str] | None = None, reference: str = "real_only",
                        panels=_DIFF_PANELS,
                        xlabel: str = "accuracy difference to real_only, paired over seeds (95% CI); filled marker "
                                      "and * = significant (paired t-test, Holm-adjusted p < 0.05)") -> bytes:
    """Forest plot of method - real_only per K (rows), one panel per ``(diff column, CI column, title,
    significance column)`` (default: ID and OOD); filled marker and ``*`` where significant, hollow where not."""
    from matplotlib.ticker import MaxNLocator

    d = cmp[cmp["method"] != reference]
    methods = sorted(d["method"].unique())
    st = styles(methods + [reference], algorithms)
    ordered = sorted(methods, key=lambda m: st[m]["order"])
    shots = sorted(int(k) for k in d["shots"].unique()) if len(d) else []
    fig = _fig(5.5 * len(panels) + (1.5 if len(panels) == 1 else 0.0),
               1.6 + 0.28 * max(1, len(ordered)) * max(1, len(shots)))
    axes = _axes(fig, len(panels))
    ticks, labels = [], []
    for ax, (dcol, ccol, title, scol) in zip(axes, panels):
        y = 0
        for k in shots:
            for m in ordered:
                r = d[(d["method"] == m) & (d["shots"] == k)]
                diff = _num(r[dcol].iloc[0]) if len(r) and dcol in r else float("nan")
                if diff == diff:
                    half = _num(r[ccol].iloc[0]) if ccol in r else float("nan")
                    sig = _is_sig(r, scol)
                    c = st[m]["color"]
                    ax.errorbar([diff], [y], xerr=None if half != half else [half], color=c, marker=st[m]["marker"],
                                markersize=6, capsize=2, linewidth=0, elinewidth=1.0,
                                markerfacecolor=c if sig else "white", markeredgecolor=c)
                    if sig:
                        ax.annotate("*", (diff + (0.0 if half != half else half), y), xytext=(3, 0),
                                    textcoords="offset points", ha="left", va="center", fontsize=10,
                                    fontweight="bold", color=c)
                if ax is axes[0]:
                    ticks.append(y)
                    labels.append(f"{m}  K={k}")
                y += 1
            y += 0.6
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_ylim(y - 0.9, -0.7)  # rows run downwards, 0.7 of padding above the first and below the last
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
        ax.xaxis.set_major_locator(MaxNLocator(6))
    fig.supxlabel(xlabel, fontsize=9)
    axes[0].set_yticks(ticks)
    axes[0].set_yticklabels(labels, fontsize=7)
    for ax in axes[1:]:
        for lab in ax.get_yticklabels():
            lab.set_visible(False)
    if ordered:
        _legend(fig, axes[-1], st, ordered)
    return _png(fig)


_EP_TITLE = "episodic accuracy (GeNIe protocol); * = differs from real_only (episode-paired t-test, Holm p < 0.05)"


def episodic_plot_png(ep: pd.DataFrame, algorithms: dict[str, str] | None = None) -> bytes:
    """GeNIe's episodic accuracy vs K (``metrics.stats.episodic_compare`` rows): 95% CI over the pooled episodes;
    ``*`` = the episode-paired difference to real_only survives Holm."""
    return accuracy_plot_png(ep, algorithms, panels=(("episodic_acc", "episodic_ci95", _EP_TITLE, "sig"),),
                             ylabel="episodic accuracy (mean, 95% CI over episodes)")


def episodic_difference_plot_png(ep: pd.DataFrame, algorithms: dict[str, str] | None = None,
                                 reference: str = "real_only") -> bytes:
    """Episodic accuracy − real_only: left paired episode by episode within seeds, right paired over seeds (the
    per-seed means; the only view that covers the generation randomness across seeds)."""
    return difference_plot_png(
        ep, algorithms, reference,
        panels=(("diff", "diff_ci95", "paired over episodes (within seeds)", "sig"),
                ("seed_diff", "seed_diff_ci95", "paired over seeds (per-seed means)", "seed_sig")),
        xlabel="episodic accuracy difference to real_only (95% CI); filled marker and * = significant "
               "(paired t-test, Holm-adjusted p < 0.05)")


def scatter_png(summary: pd.DataFrame, algorithms: dict[str, str] | None = None) -> bytes:
    """Fidelity (precision) vs diversity (recall) per method; the label next to a point is K."""
    fig = _fig(6.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    d = summary.dropna(subset=["precision", "recall"]) if {"precision", "recall"} <= set(summary) else summary.iloc[0:0]
    methods = sorted(d["method"].unique()) if len(d) else []
    st = styles(methods, algorithms) if methods else {}
    for m in methods:
        g = d[d["method"] == m]
        unfilled = st[m]["marker"] in _UNFILLED  # line markers take no edge colour (matplotlib warns)
        ax.scatter(g["recall"], g["precision"], color=st[m]["color"], marker=st[m]["marker"], s=36,
                   **({} if unfilled else {"edgecolors": "black", "linewidths": 0.4}))
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
