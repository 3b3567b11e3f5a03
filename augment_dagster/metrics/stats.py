"""Confidence intervals and paired tests for the report (no Dagster, no torch).

* ``t_interval``: mean and 95% t-interval half-width over independent samples (episodes).
* ``bootstrap_mean_interval``: the seed-level accuracy interval (percentile bootstrap of the mean: stays inside
  [0, 1]); ``wilson_interval`` for a single proportion. Seed-level intervals and tests need ``MIN_SEEDS_FOR_CI``
  (3) seeds; with fewer none is given (the report says why).
* ``paired_t``: a method vs the reference (real_only) paired by seed (same split, same test set): mean
  difference, its 95% half-width and the two-sided p-value of the paired t-test.
* ``holm``: Holm-Bonferroni adjusted p-values, so "significant" holds for the whole table, not per cell.
* ``episodic_compare``: GeNIe's episodic accuracy per (method, K) with its t-interval over the pooled episodes,
  the difference to real_only paired episode by episode within each seed, and the seed-level paired test.

scipy's t distribution is used when scipy is importable (it comes with scikit-learn); otherwise the same
quantities come from the regularized incomplete beta function below (same numbers to ~1e-10).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

try:  # pragma: no cover - exercised in the fallback test by monkeypatching
    from scipy import stats as _sps
except ImportError:  # pragma: no cover
    _sps = None


# ---------------------------------------------------------------- t distribution (fallback without scipy)
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_sf_two_sided(t: float, df: float, use_scipy: bool = True) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if use_scipy and _sps is not None:
        return float(2 * _sps.t.sf(abs(t), df))
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float, use_scipy: bool = True) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t: bisection on the two-sided tail in the fallback."""
    if use_scipy and _sps is not None:
        return float(_sps.t.ppf(q, df))
    tail = 2 * (1 - q)
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf_two_sided(mid, df, use_scipy=False) > tail:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---------------------------------------------------------------- the report's quantities
def t_interval(values: Iterable[float], conf: float = 0.95, use_scipy: bool = True) -> tuple[float, float, int]:
    """(mean, half-width of the ``conf`` t-interval, n) over the non-NaN values; half-width NaN when n < 2."""
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n < 2:
        return float(v.mean()), float("nan"), 1
    sem = float(v.std(ddof=1)) / math.sqrt(n)
    return float(v.mean()), t_quantile(0.5 + conf / 2, n - 1, use_scipy) * sem, n


MIN_SEEDS_FOR_CI = 3  # a seed-level interval from 2 values has 1 degree of freedom: t = 12.7, uninformative


def paired_t(a: Mapping, b: Mapping, conf: float = 0.95, use_scipy: bool = True, min_n: int = 2) -> dict[str, float]:
    """``a`` vs ``b`` (each {pair key, e.g. seed: value}) on their common keys: mean of a-b, half-width of its
    ``conf`` interval, p-value of the two-sided paired t-test, n pairs. Interval and p are NaN where n < ``min_n``
    (at least 2). A zero-variance difference (every pair differs by the same amount) has no t-test: interval and
    p are NaN and ``zero_var`` is True — the report says so instead of printing "± 0.000, p < 0.001"."""
    keys = sorted(k for k in a if k in b and a[k] == a[k] and b[k] == b[k])
    d = np.asarray([a[k] - b[k] for k in keys], dtype=np.float64)
    n = len(d)
    out = {"diff": float(d.mean()) if n else float("nan"), "diff_ci95": float("nan"), "p": float("nan"), "n": n,
           "zero_var": False}
    if n < max(2, min_n):
        return out
    sd = float(d.std(ddof=1))
    sem = sd / math.sqrt(n)
    if sem <= 1e-12 * max(1.0, abs(out["diff"])):
        out["zero_var"] = True
        return out
    out["diff_ci95"] = t_quantile(0.5 + conf / 2, n - 1, use_scipy) * sem
    out["p"] = t_sf_two_sided(out["diff"] / sem, n - 1, use_scipy)
    return out


def bootstrap_mean_interval(values: Iterable[float], conf: float = 0.95, n_boot: int = 4000, seed: int = 0,
                            min_n: int = MIN_SEEDS_FOR_CI) -> tuple[float, float, float, int]:
    """(mean, lower, upper, n): the percentile bootstrap interval of the mean over the non-NaN values (e.g. one
    accuracy per seed). It never leaves the range of the values, so an accuracy interval stays inside [0, 1]
    (a t-interval over 2-3 accuracies does not). lower/upper are NaN when n < ``min_n``."""
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if n < min_n:
        return float(v.mean()), float("nan"), float("nan"), n
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - conf) / 2, 1 - (1 - conf) / 2])
    return float(v.mean()), float(lo), float(hi), n


def wilson_interval(correct: float, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (``correct`` of ``n``): inside [0, 1], sensible at 0 % and 100 %."""
    if n <= 0:
        return float("nan"), float("nan")
    z = float(_sps.norm.ppf(0.5 + conf / 2)) if _sps is not None else 1.959963984540054
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def holm(pvalues: Iterable[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted)."""
    p = list(pvalues)
    idx = sorted((i for i, x in enumerate(p) if x == x), key=lambda i: p[i])
    m, out, run = len(idx), [float("nan")] * len(p), 0.0
    for rank, i in enumerate(idx):
        run = max(run, min(1.0, (m - rank) * p[i]))
        out[i] = run
    return out


def compare_to_reference(metrics: pd.DataFrame, cols: Iterable[str] = ("acc_id", "acc_ood"), reference: str = "real_only",
                         by: str = "shots", pair: str = "seed", alpha: float = 0.05,
                         min_n: int = MIN_SEEDS_FOR_CI) -> pd.DataFrame:
    """One row per (method, ``by``): for each column ``c``: ``c_lo``/``c_hi`` (95% percentile-bootstrap interval
    of the mean over ``pair``, inside the values' range; NaN with fewer than ``min_n`` of them), ``c_ci95``
    (half its width), ``c_n``, ``c_zero_var`` (the difference is the same in every pair: no test), and vs ``reference`` at the same ``by``: ``c_diff``, ``c_diff_ci95``, ``c_p`` (paired t over
    ``pair``), ``c_p_holm`` (Holm over every method × ``by`` of that column) and ``c_sig`` (Holm p < alpha:
    "+" better, "-" worse, "" not significant or not testable)."""
    rows = []
    for (method, level), g in metrics.groupby(["method", by], sort=True):
        ref = metrics[(metrics["method"] == reference) & (metrics[by] == level)]
        row = {"method": method, by: level}
        for c in cols:
            if c not in g:
                continue
            vals = pd.to_numeric(g[c], errors="coerce")
            _, lo, hi, n = bootstrap_mean_interval(vals, min_n=min_n)
            row[f"{c}_lo"], row[f"{c}_hi"], row[f"{c}_n"] = lo, hi, n
            row[f"{c}_ci95"] = (hi - lo) / 2 if lo == lo else float("nan")  # half the width (for a ± summary)
            if method == reference or c not in ref:
                row.update({f"{c}_diff": float("nan"), f"{c}_diff_ci95": float("nan"), f"{c}_p": float("nan"),
                            f"{c}_zero_var": False})
                continue
            t = paired_t(dict(zip(g[pair], vals)), dict(zip(ref[pair], pd.to_numeric(ref[c], errors="coerce"))),
                         min_n=min_n)
            row.update({f"{c}_diff": t["diff"], f"{c}_diff_ci95": t["diff_ci95"], f"{c}_p": t["p"],
                        f"{c}_zero_var": t["zero_var"]})
        rows.append(row)
    out = pd.DataFrame(rows)
    for c in cols:
        if f"{c}_p" not in out:
            continue
        out[f"{c}_p_holm"] = holm(out[f"{c}_p"].tolist())
        out[f"{c}_sig"] = ["" if not (ph == ph and ph < alpha) else ("+" if d > 0 else "-")
                           for ph, d in zip(out[f"{c}_p_holm"], out[f"{c}_diff"])]
    return out


def fmt_interval(mean: float, lo: float, hi: float, n: int | None = None, digits: int = 3,
                 min_n: int = MIN_SEEDS_FOR_CI) -> str:
    """``0.412 [0.380, 0.444]``; ``0.412 (n=2: no interval)`` below ``min_n`` values; ``-`` without a mean."""
    if mean is None or mean != mean:
        return "-"
    if lo is None or lo != lo or hi is None or hi != hi:
        return f"{mean:.{digits}f}" + (f" (n={int(n)}: no interval)" if n is not None and n == n and 0 < n < min_n else "")
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_pm(mean: float, half: float, digits: int = 3) -> str:
    """``0.412 ± 0.021``; ``0.412`` when the half-width is unknown (one sample); ``-`` when there is no mean."""
    if mean is None or mean != mean:
        return "-"
    if half is None or half != half:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def fmt_p(p: float) -> str:
    if p is None or p != p:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# ---------------------------------------------------------------- episodic evaluation (GeNIe protocol)
def _episode_accs(cell) -> list[float]:
    """Per-episode accuracies of one metrics row: a JSON list (the manifest's ``episodic_accs``) or a sequence."""
    import json

    if isinstance(cell, str):
        cell = json.loads(cell) if cell.strip() else []
    if cell is None or (isinstance(cell, float) and cell != cell):
        return []
    return [float(x) for x in cell]


def episodic_compare(metrics: pd.DataFrame, reference: str = "real_only", by: str = "shots", pair: str = "seed",
                     accs_col: str = "episodic_accs", digest_col: str = "episodic_digest", conf: float = 0.95,
                     alpha: float = 0.05, use_scipy: bool = True) -> pd.DataFrame:
    """Episodic accuracy per (method, ``by``), one row each (methods without episodes are left out):

    * ``episodic_acc``, ``episodic_ci95``: mean and ``conf`` t-interval half-width over every (seed, episode)
      accuracy pooled, ``episodes`` = their number, ``seeds`` = the seeds with episodes;
    * vs ``reference`` at the same ``by``, paired episode by episode within each seed (episode e of seed s of the
      method vs episode e of seed s of the reference; a seed is paired only when both rows have the same episode
      count and, where recorded, the same episode digest): ``diff``, ``diff_ci95``, ``p`` (paired t-test over
      the (seed, episode) differences), ``n_pairs``, ``p_holm`` (Holm over every method × ``by``) and ``sig``
      ("+"/"-" where Holm p < ``alpha``);
    * the seed-level view: ``seed_diffs`` (per-seed mean differences, seed order), ``seed_diff``,
      ``seed_diff_ci95``, ``seed_p`` (paired t-test over seeds of the per-seed means), ``seed_p_holm``,
      ``seed_sig`` — the only test here that covers the generation randomness across seeds.
    """
    cols = ["method", by, "seeds", "episodes", "episodic_acc", "episodic_ci95", "diff", "diff_ci95", "p", "n_pairs",
            "unpaired_seeds", "seed_diffs", "seed_diff", "seed_diff_ci95", "seed_p", "seed_n", "zero_var", "seed_zero_var"]
    if accs_col not in metrics or not len(metrics):
        return pd.DataFrame(columns=cols + ["p_holm", "sig", "seed_p_holm", "seed_sig"])

    def cells(g: pd.DataFrame) -> dict:
        """{seed: (accs, digest)} of the rows with episodes (a duplicate seed keeps its last row)."""
        out = {}
        for _, r in g.iterrows():
            a = _episode_accs(r[accs_col])
            if a:
                dg = r[digest_col] if digest_col in g else ""
                out[r[pair]] = (a, dg if isinstance(dg, str) else "")
        return out

    rows = []
    for (method, level), g in metrics.groupby(["method", by], sort=True):
        mine = cells(g)
        if not mine:
            continue
        pooled = [a for s in sorted(mine) for a in mine[s][0]]
        mean, half, n = t_interval(pooled, conf, use_scipy)
        row = {"method": method, by: level, "seeds": len(mine), "episodes": n, "episodic_acc": mean,
               "episodic_ci95": half, "diff": float("nan"), "diff_ci95": float("nan"), "p": float("nan"), "n_pairs": 0,
               "unpaired_seeds": 0, "seed_diffs": [], "seed_diff": float("nan"), "seed_diff_ci95": float("nan"),
               "seed_p": float("nan"), "seed_n": 0, "zero_var": False, "seed_zero_var": False}
        if method != reference:
            ref = cells(metrics[(metrics["method"] == reference) & (metrics[by] == level)])
            a_ep, b_ep, a_seed, b_seed = {}, {}, {}, {}
            for s in sorted(set(mine) & set(ref)):
                (a, da), (b, db) = mine[s], ref[s]
                if len(a) != len(b) or (da and db and da != db):
                    continue  # other episodes (a per-method episode config): not pairable
                a_ep.update({(s, e): x for e, x in enumerate(a)})
                b_ep.update({(s, e): x for e, x in enumerate(b)})
                a_seed[s], b_seed[s] = float(np.mean(a)), float(np.mean(b))
            row["unpaired_seeds"] = len(mine) - len(a_seed)
            t = paired_t(a_ep, b_ep, conf, use_scipy)
            row.update(diff=t["diff"], diff_ci95=t["diff_ci95"], p=t["p"], n_pairs=t["n"], zero_var=t["zero_var"])
            ts = paired_t(a_seed, b_seed, conf, use_scipy, min_n=MIN_SEEDS_FOR_CI)
            row.update(seed_diffs=[a_seed[s] - b_seed[s] for s in sorted(a_seed)], seed_diff=ts["diff"],
                       seed_diff_ci95=ts["diff_ci95"], seed_p=ts["p"], seed_n=ts["n"], seed_zero_var=ts["zero_var"])
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    for p_col, sig_col, d_col in (("p", "sig", "diff"), ("seed_p", "seed_sig", "seed_diff")):
        out[f"{p_col}_holm"] = holm(out[p_col].tolist()) if len(out) else []
        out[sig_col] = ["" if not (ph == ph and ph < alpha) else ("+" if d > 0 else "-")
                        for ph, d in zip(out[f"{p_col}_holm"], out[d_col])]
    return out


def fmt_diff(diff: float, half: float, sig: str = "", digits: int = 3, zero_var: bool = False) -> str:
    """``+0.021 ± 0.010 *`` (signed; ``*`` when ``sig``); ``-`` when there is no difference; ``+0.000 (same in
    every pair: no variance, no test)`` when ``zero_var``."""
    if diff is None or diff != diff:
        return "-"
    if zero_var is True:
        return f"{diff:+.{digits}f} (same in every pair: no variance, no test)"
    s = f"{diff:+.{digits}f}" if half is None or half != half else f"{diff:+.{digits}f} ± {half:.{digits}f}"
    return s + (" *" if sig else "")
