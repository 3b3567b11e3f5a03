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
    from augment_dagster.defs.assets.report import ci_note, md_table, pretty, summarize

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
    from augment_dagster.defs.assets.report import summarize
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


# ---------------------------------------------------------------- episodic evaluation (GeNIe protocol)
EP_EFFECTS = {"real_only": 0.0, "dafusion": 0.06, "txt2img": 0.0, "diff_ii": -0.06, "genie": 0.004}


def episodic_frame(seeds=3, episodes=200, effects=EP_EFFECTS, noise=0.03):
    """Per (seed, episode) a difficulty shared by every method (the same episodes), plus the method's effect and
    a little noise; a classifier-only method ("standard") has no episodes."""
    import json

    rng = np.random.default_rng(7)
    rows = []
    for k in (2, 4):
        for s in range(seeds):
            base = np.clip(rng.normal(0.5 + 0.03 * k, 0.15, episodes), 0.05, 0.95)
            for m, eff in effects.items():
                accs = np.clip(base + eff + (0 if m == "real_only" else rng.normal(0, noise, episodes)), 0, 1)
                rows.append({"method": m, "split": f"{k}shot-s{s}", "shots": k, "seed": s, "acc_id": accs.mean(),
                             "acc_ood": accs.mean() - 0.1, "n_synthetic": 0 if m == "real_only" else 24,
                             "episodic_accs": json.dumps(accs.round(6).tolist()), "episodic_digest": f"d{k}-{s}"})
            rows.append({"method": "standard", "split": f"{k}shot-s{s}", "shots": k, "seed": s, "acc_id": 0.5,
                         "acc_ood": 0.4, "n_synthetic": 24, "episodic_accs": "[]", "episodic_digest": ""})
    return pd.DataFrame(rows)


def _accs(df, m, k):
    import json

    g = df[(df.method == m) & (df.shots == k)].sort_values("seed")
    return {int(s): np.array(json.loads(a)) for s, a in zip(g.seed, g.episodic_accs)}


def test_episodic_compare_matches_scipy_and_pairs_episodes():
    sps = pytest.importorskip("scipy.stats")
    df = episodic_frame()
    ep = S.episodic_compare(df)
    assert set(ep.method) == set(EP_EFFECTS)  # the classifier-only method has no episodic row
    row = lambda m, k: ep[(ep.method == m) & (ep.shots == k)].iloc[0]  # noqa: E731
    for k in (2, 4):
        ref = _accs(df, "real_only", k)
        for m in EP_EFFECTS:
            a = _accs(df, m, k)
            pooled = np.concatenate([a[s] for s in sorted(a)])
            r = row(m, k)
            lo, hi = sps.t.interval(0.95, len(pooled) - 1, loc=pooled.mean(), scale=sps.sem(pooled))
            assert r["episodes"] == 600 and r["seeds"] == 3
            assert r["episodic_acc"] == pytest.approx(pooled.mean()) and r["episodic_ci95"] == pytest.approx((hi - lo) / 2)
            assert r["episodic_ci95"] <= 0.03  # 600 pooled episodes: the power target holds for every method
            if m == "real_only":
                assert np.isnan(r["p"]) and r["sig"] == "" and r["n_pairs"] == 0
                continue
            b = np.concatenate([ref[s] for s in sorted(ref)])
            d = pooled - b  # episode e of seed s vs episode e of seed s
            tt = sps.ttest_rel(pooled, b)
            assert r["n_pairs"] == 600 and r["diff"] == pytest.approx(d.mean()) and r["p"] == pytest.approx(tt.pvalue, rel=1e-6)
            lo, hi = sps.t.interval(0.95, 599, loc=d.mean(), scale=sps.sem(d))
            assert r["diff_ci95"] == pytest.approx((hi - lo) / 2)
            # seed level: per-seed mean differences and a paired t over seeds
            sd = [a[s].mean() - ref[s].mean() for s in sorted(a)]
            assert r["seed_diffs"] == pytest.approx(sd) and r["seed_n"] == 3
            assert r["seed_p"] == pytest.approx(sps.ttest_rel([a[s].mean() for s in sorted(a)],
                                                              [ref[s].mean() for s in sorted(a)]).pvalue, rel=1e-6)
        assert row("dafusion", k)["sig"] == "+" and row("diff_ii", k)["sig"] == "-"
        assert row("txt2img", k)["sig"] == "" and row("dafusion", k)["diff"] == pytest.approx(0.06, abs=0.01)
    # Holm over every method × K of the table, separately for the episode- and the seed-level test
    assert ep["p_holm"].tolist() == pytest.approx(S.holm(ep["p"].tolist()), nan_ok=True)
    assert ep["seed_p_holm"].tolist() == pytest.approx(S.holm(ep["seed_p"].tolist()), nan_ok=True)
    # pairing is what gives the power: the same accuracies with episode order scrambled pair wrongly -> wider CI
    import json

    shuffled = df.copy()
    rng = np.random.default_rng(0)
    mask = shuffled.method == "dafusion"
    shuffled.loc[mask, "episodic_accs"] = [json.dumps(rng.permutation(json.loads(a)).tolist())
                                           for a in shuffled.loc[mask, "episodic_accs"]]
    sh = S.episodic_compare(shuffled)
    r0, r1 = row("dafusion", 2), sh[(sh.method == "dafusion") & (sh.shots == 2)].iloc[0]
    assert r1["episodic_acc"] == pytest.approx(r0["episodic_acc"]) and r1["diff"] == pytest.approx(r0["diff"])
    assert r1["diff_ci95"] > 3 * r0["diff_ci95"]


def test_episodic_compare_pairs_only_matching_episodes():
    df = episodic_frame()
    # seed 1 of txt2img at K=2 ran other episodes (a per-method episode config): that seed is not paired
    df.loc[(df.method == "txt2img") & (df.shots == 2) & (df.seed == 1), "episodic_digest"] = "other"
    df = df[~((df.method == "genie") & (df.shots == 4) & (df.seed == 2))]  # genie lacks a seed at K=4
    ep = S.episodic_compare(df)
    t = ep[(ep.method == "txt2img") & (ep.shots == 2)].iloc[0]
    assert t["n_pairs"] == 400 and t["unpaired_seeds"] == 1 and t["seed_n"] == 2 and t["episodes"] == 600
    g = ep[(ep.method == "genie") & (ep.shots == 4)].iloc[0]
    assert g["n_pairs"] == 400 and g["seeds"] == 2 and g["unpaired_seeds"] == 0 and len(g["seed_diffs"]) == 2
    one = S.episodic_compare(episodic_frame(seeds=1))  # one seed: the episode-level test still runs, seeds cannot
    d = one[(one.method == "dafusion") & (one.shots == 2)].iloc[0]
    assert d["sig"] == "+" and np.isnan(d["seed_p"]) and d["seed_sig"] == "" and len(d["seed_diffs"]) == 1
    assert S.episodic_compare(df.drop(columns=["episodic_accs"])).empty


def test_episodic_report_table_note_and_order():
    from augment_dagster.defs.assets.report import episodic_note, episodic_pretty, episodic_table, md_table

    df = episodic_frame()
    ep = episodic_table(df)
    assert (ep["ci95"] == ep["episodic_ci95"]).all()
    table = md_table(episodic_pretty(ep))
    assert "nan" not in table.lower()
    line = lambda m, k: [x for x in table.splitlines() if x.startswith(f"| {m} | {k} |")][0]  # noqa: E731
    assert " ± " in line("dafusion", 2) and "+0.06" in line("dafusion", 2) and " *" in line("dafusion", 2)
    assert " *" in line("diff_ii", 4) and "-0.06" in line("diff_ii", 4)
    assert " *" not in line("txt2img", 2)
    ro = line("real_only", 2).split(" | ")
    assert ro[-4:-1] == ["-", "-", "-"] and ro[-1].strip(" |") == "-"  # no difference to itself: dashes, not nan
    per_seed = line("dafusion", 2).split(" | ")[8]
    assert per_seed.count(",") == 2 and per_seed.count("+") == 3  # three per-seed differences
    note = episodic_note(ep)
    assert "do NOT cover" in note and "seed" in note and "Holm" in note
    assert "Widest 95% CI half-width" in note and f"≤ 0.03 for {len(ep)} of {len(ep)}" in note
    assert episodic_table(df.drop(columns=["episodic_accs"])).empty


def test_episodic_plots(tmp_path):
    from augment_dagster.defs.assets.report import episodic_table
    from augment_dagster.report_plots import episodic_difference_plot_png, episodic_plot_png

    ep = episodic_table(episodic_frame())
    ep.loc[(ep.method == "genie") & (ep.shots == 4), ["episodic_acc", "diff", "seed_diff"]] = float("nan")  # a gap
    algos = {m: m for m in EP_EFFECTS}
    for name, data in (("episodic_accuracy", episodic_plot_png(ep, algos)),
                       ("episodic_difference", episodic_difference_plot_png(ep, algos))):
        im = _png_ok(data, min_w=450)
        (tmp_path / f"{name}.png").write_bytes(data)
        assert im.size[0] > im.size[1]  # legend right of the axes


def test_report_asset_puts_the_episodic_section_first(tmp_path, monkeypatch):
    """The report asset on synthetic metrics frames (no diffusion): report.md opens with the episodic section
    and its protocol line, the episodic plots are files, asset metadata and MLflow artifacts."""
    import dagster as dg

    from augment_dagster.defs.assets import report as R
    from augment_dagster.defs.assets.common import Experiment
    from augment_dagster.config import parse_config
    from augment_dagster.defs.resources import StoreResource
    from augment_dagster.defs.tracking import MlflowTracker

    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_config({"experiment": "eprep", "dataset": {"source": "builtin"},
                        "splits": {"shots": [2, 4], "seeds": [0, 1, 2]},
                        "methods": {"dafusion": {}, "txt2img": {}, "diff_ii": {}, "genie": {}}})
    (asset,) = R.build(Experiment(cfg))
    df = episodic_frame()
    df = df[df.method != "standard"]
    inputs = {f"m_{m}": g.reset_index(drop=True) for m, g in df.groupby("method")}
    inputs |= {f"{p}_{m}": pd.DataFrame() for m in cfg.enabled_methods() for p in ("s", "y")}
    tracker = MlflowTracker(default_root=str(tmp_path / "mlflow"))
    ctx = dg.build_asset_context(resources={"mlflow_eprep": tracker, "store_eprep": StoreResource(root=str(tmp_path / "data"))})
    out, *checks = list(asset(ctx, split=pd.DataFrame(), **inputs))  # the output, then its checks (same step)
    assert [(c.check_name, c.passed) for c in checks] == [("all_methods_present", True)]
    md = out.metadata
    rep = (tmp_path / "data" / "report" / "eprep" / "report.md").read_text()
    assert rep.index("## Episodic few-shot evaluation") < rep.index("## Classifier accuracy") < rep.index("| acc_id")
    assert "Protocol:" in rep.split("## Classifier accuracy")[0] and "do NOT cover" in rep
    assert "nan" not in rep.split("## Classifier accuracy")[0].lower()
    head = rep.split("## Classifier accuracy")[0]
    assert [x for x in head.splitlines() if x.startswith("| dafusion | 2 |")][0].count(" *") == 2  # episodes + seeds
    assert md["report"].value.startswith("## Episodic few-shot evaluation") and "episodic_note" in md
    for name in ("episodic_accuracy", "episodic_difference"):
        assert md[name].value.startswith(f"![{name}](data:image/png;base64,")
        assert (tmp_path / "data" / "report" / "eprep" / f"{name}.png").stat().st_size > 10_000
    ep = pd.read_csv(tmp_path / "data" / "report" / "eprep" / "episodic.csv")
    assert ep["method"].iloc[0] == "real_only" and (ep["episodic_ci95"] <= 0.03).all()
    rid = md["mlflow_run_id"].value
    client = tracker.client()
    arts = {a.path for a in client.list_artifacts(rid)}
    assert {"episodic_accuracy.png", "episodic_difference.png", "episodic.csv", "report.md"} <= arts
    run = client.get_run(rid)
    assert run.data.metrics["dafusion.2shot.episodic_diff"] == pytest.approx(0.06, abs=0.01)
    assert run.data.metrics["dafusion.2shot.episodic_p_holm"] < 0.05
