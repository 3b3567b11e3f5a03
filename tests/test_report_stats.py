"""Report statistics (95% t-intervals over seeds, paired t-tests vs real_only with Holm correction) and the
family-grouped plots; checked against scipy and against the hand-rolled t distribution."""
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from augment_dagster.metrics import stats as S


def test_fallback_t_distribution_matches_scipy():
    sps = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30):
        for t in (0.1, 1.0, 2.5, 7.0):
            assert S.t_sf_two_sided(t, df, use_scipy=False) == pytest.approx(2 * sps.t.sf(t, df), rel=1e-8, abs=1e-12)
        assert S.t_quantile(0.975, df, use_scipy=False) == pytest.approx(sps.t.ppf(0.975, df), rel=1e-7)


def test_t_interval_and_paired_t_match_scipy():
    sps = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.05, 6)
    b = a - 0.03 + rng.normal(0, 0.01, 6)
    m, half, n = S.t_interval(a)
    lo, hi = sps.t.interval(0.95, 5, loc=a.mean(), scale=sps.sem(a))
    assert n == 6 and m == pytest.approx(a.mean()) and half == pytest.approx((hi - lo) / 2)
    for use in (True, False):
        r = S.paired_t(dict(enumerate(a)), dict(enumerate(b)), use_scipy=use)
        assert r["n"] == 6 and r["diff"] == pytest.approx((a - b).mean())
        assert r["p"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-6)
    # pairs are matched by key, not position; unmatched keys are dropped
    r = S.paired_t({0: 0.5, 1: 0.6, 2: 0.7, 9: 0.1}, {2: 0.6, 1: 0.5, 0: 0.45})
    assert r["n"] == 3 and r["diff"] == pytest.approx((0.05 + 0.1 + 0.1) / 3)
    # one seed: no interval, no test
    assert np.isnan(S.t_interval([0.3])[1]) and np.isnan(S.paired_t({0: 1.0}, {0: 0.5})["p"])


def test_holm():
    assert S.holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(S.holm([float("nan")])[0])


def metrics_frame(seeds=6, effect=0.08):
    rng = np.random.default_rng(1)
    rows = []
    for k in (2, 4):
        base = rng.normal(0.4 + 0.05 * k, 0.04, seeds)  # seed-level difficulty shared by every method (pairing)
        for m, eff, noise in (("real_only", 0.0, 0.0), ("dafusion", effect, 0.01), ("txt2img", 0.0, 0.01),
                              ("diff_ii", -effect, 0.01), ("sgid", 0.001, 0.03), ("genie", 0.01, 0.02)):
            for s in range(seeds):
                v = base[s] + eff + rng.normal(0, noise)
                rows.append({"method": m, "split": f"{k}shot-s{s}", "shots": k, "seed": s, "acc_id": v, "acc_ood": v - 0.1,
                             "n_synthetic": 0 if m == "real_only" else 24})
    return pd.DataFrame(rows)


def test_compare_to_reference_marks_real_effects_only():
    cmp = S.compare_to_reference(metrics_frame())
    row = lambda m, k: cmp[(cmp.method == m) & (cmp.shots == k)].iloc[0]  # noqa: E731
    for k in (2, 4):
        assert row("dafusion", k)["acc_id_sig"] == "+" and row("diff_ii", k)["acc_id_sig"] == "-"
        assert row("txt2img", k)["acc_id_sig"] == "" and row("sgid", k)["acc_id_sig"] == ""
        assert row("real_only", k)["acc_id_sig"] == "" and np.isnan(row("real_only", k)["acc_id_p"])
        assert row("dafusion", k)["acc_id_diff"] == pytest.approx(0.08, abs=0.02)
        assert 0 < row("dafusion", k)["acc_id_ci95"] < 0.1 and row("dafusion", k)["acc_id_n"] == 6


def test_report_table_prints_ci_and_dashes_for_missing():
    from augment_dagster.assets.report import ci_note, md_table, pretty, summarize

    df = metrics_frame()
    df.loc[df.method == "genie", "acc_ood"] = float("nan")  # a column without data
    summ = summarize(df)
    table = md_table(pretty(summ))
    assert "nan" not in table
    assert "| genie | 2 | 6 |" in table and table.count(" - ") >= 2
    dafusion = [line for line in table.splitlines() if line.startswith("| dafusion | 2 |")][0]
    assert " ± " in dafusion and " *" in dafusion  # mean ± half-width; significant difference marked
    note = ci_note(summ)
    assert "Widest half-width" in note and "Holm" in note
    one_seed = summarize(metrics_frame(seeds=1))
    t1 = md_table(pretty(one_seed))
    assert "nan" not in t1 and " ± " not in t1


def _png_ok(data, min_w=500):
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.size[0] >= min_w
    return im


def test_plots_distinct_styles_and_legend_outside(tmp_path):
    from augment_dagster.assets.report import summarize
    from augment_dagster.report_plots import accuracy_plot_png, difference_plot_png, family, scatter_png, styles

    methods = ["real_only", "standard", "real_guidance", "txt2img", "img2img_low", "img2img_high", "real_filter",
               "dafusion", "diagen", "diagen_noise", "diagen_llm", "diagen_noise_llm", "diff_ii", "diff_ii_no_concepts",
               "genie", "genie_ada", "sgid"]
    algos = {m: m for m in methods} | {"diagen_noise": "diagen", "diagen_llm": "diagen", "diagen_noise_llm": "diagen",
                                        "diff_ii_no_concepts": "diff_ii"}
    st = styles(methods, algos)
    assert len({(tuple(v["color"]), v["marker"]) for v in st.values()}) == len(methods)
    assert len({v["marker"] for v in st.values()}) == len(methods)  # markers alone tell them apart
    assert len({tuple(v["color"]) for v in st.values()}) == len(methods)  # and so do colours
    assert family("diagen") == "DA-Fusion/DIAGen" and family("genie_ada") == "GeNIe" and family("txt2img") == "baselines"
    assert st["diagen_llm"]["family"] == "DA-Fusion/DIAGen" and st["diff_ii_no_concepts"]["family"] == "Diff-II"
    base = metrics_frame()
    rows = [base[base.method == "real_only"]]
    for i, m in enumerate(methods[1:]):
        d = base[base.method == "txt2img"].copy()
        d["method"], d["acc_id"] = m, d["acc_id"] + 0.004 * i
        rows.append(d)
    summ = summarize(pd.concat(rows, ignore_index=True))
    summ["precision"], summ["recall"] = np.linspace(0.1, 0.9, len(summ)), np.linspace(0.9, 0.2, len(summ))
    for name, data in (("acc", accuracy_plot_png(summ, algos)), ("diff", difference_plot_png(summ, algos)),
                       ("scatter", scatter_png(summ, algos))):
        im = _png_ok(data)
        (tmp_path / f"{name}.png").write_bytes(data)
        # legend outside the axes: the right part of the figure holds the legend, not plot area
        assert im.size[0] > im.size[1] * (0.6 if name == "diff" else 1.2)
