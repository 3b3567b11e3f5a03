"""The faithful episodic benchmark (GeNIe §4.1, METHODS §4): a fresh seeded support per episode, every method's
synthetic images generated from that episode's support, the same number of augmented images per class for
every method of the comparison, and the episode recorded in each synthetic image's lineage row."""
import json

import numpy as np
import pandas as pd
import pytest

from augment_dagster.config import parse_config
from augment_dagster.config import ConfigError

SIX = ["circle", "cross", "ring", "square", "star", "triangle"]


# ---------------------------------------------------------------- the sampler
def test_fresh_support_per_episode_disjoint_from_queries_and_seeded():
    from augment_dagster.training.episodes import episodes_digest, sample_episodes

    ty = np.repeat(np.arange(6), 12)
    eps = sample_episodes(ty, 6, 5, 4, 20, seed=7, shots=3)
    again = sample_episodes(ty, 6, 5, 4, 20, seed=7, shots=3)
    assert episodes_digest(eps) == episodes_digest(again)
    for cls, q, s in eps:
        assert len(cls) == 5 and len(s) == 15 and len(q) == 20
        assert not set(q) & set(s)  # support and queries are disjoint images
        assert [int(ty[r]) for r in s] == [int(c) for c in cls for _ in range(3)]  # K per class, class-major
        assert set(ty[q]) == set(cls)
    assert len({tuple(s) for _, _, s in eps}) == 20  # every episode has its own support
    assert episodes_digest(sample_episodes(ty, 6, 5, 4, 20, seed=8, shots=3)) != episodes_digest(eps)


def test_episodes_draw_only_from_the_evaluation_classes():
    from augment_dagster.training.episodes import sample_episodes

    ty = np.repeat(np.arange(8), 10)
    eps = sample_episodes(ty, 8, 5, 3, 30, seed=1, shots=1, classes=[2, 3, 5, 6, 7])
    assert all(set(cls) == {2, 3, 5, 6, 7} and set(ty[s]) <= {2, 3, 5, 6, 7} for cls, _, s in eps)
    with pytest.raises(ValueError, match="at least 2 evaluation classes"):
        sample_episodes(ty, 8, 5, 3, 2, seed=1, shots=10)  # 10 images per class leave no query after 10 shots


def test_split_support_episodes_are_unchanged():
    """support: split draws the same episodes as before per-episode supports existed (memo keys and digests of
    existing runs stay valid)."""
    import hashlib

    from augment_dagster.training.episodes import episodes_digest, sample_episodes

    ty = np.repeat(np.arange(6), 20)
    eps = sample_episodes(ty, 6, 5, 16, 30, seed=3)
    rng = np.random.default_rng(3)  # the former sampler, step by step
    h = hashlib.sha256()
    for cls, q in eps:
        c = np.sort(rng.choice(range(6), 5, replace=False))
        qq = np.concatenate([rng.choice(np.nonzero(ty == k)[0], 16, replace=False) for k in c])
        assert np.array_equal(c, cls) and np.array_equal(qq, q)
        h.update(cls.astype(np.int64).tobytes() + b"|" + q.astype(np.int64).tobytes() + b";")
    assert episodes_digest(eps) == h.hexdigest()[:16]


# ---------------------------------------------------------------- the equal-count rule
def _cfg(methods, episodes=None, shots=(1, 5), **training):
    return {"experiment": "eq", "dataset": {"source": "builtin"}, "splits": {"shots": list(shots), "seeds": [0]},
            "training": {"evaluation": ["classifier", "few_shot_episodes"],
                         "episodes": {"support": "episode", **(episodes or {})}, **training},
            "methods": methods, "mlflow": {"enabled": False}}


def test_comparison_rule_accepts_genie_and_its_baselines():
    cfg = parse_config(_cfg({"genie": {}, "genie_ada": {}, "img2img_low": {}, "img2img_high": {}, "txt2img": {},
                             "dafusion": {}, "standard": {}}))
    from augment_dagster.training.episode_rules import natural_episode_count
    from augment_dagster.training.episodes import augmented_per_class

    e = cfg.training.episodes
    assert [augmented_per_class(e, k) for k in (1, 5)] == [4, 20]  # GeNIe: 4 at 5-way 1-shot, 20 at 5-shot
    assert natural_episode_count(cfg, "genie", 5, 5)[0] == 20 and natural_episode_count(cfg, "txt2img", 5, 5)[0] is None


@pytest.mark.parametrize("methods, episodes, match", [
    ({"genie": {"params": {"max_per_class": 4}}}, {}, r"methods.genie: 4 augmented images per class per episode at 5-shot"),
    ({"genie": {"params": {"sources": "confusion_topk", "topk": 2}}}, {}, r"methods.genie: 2 augmented .* at 1-shot"),
    ({"img2img_low": {"images_per_real": 2}}, {}, r"img2img_low: 2 augmented .*images_per_real 2"),
    ({"genie": {}}, {"augmented_per_class": 30}, r"but the comparison uses 30"),
    ({"diff_ii": {}}, {}, r"needs inversion_pool"),
    ({"sgid": {}}, {}, r"needs captions"),
    ({"real_filter": {}}, {}, r"post-filter drops"),
    ({"genie": {"training": {"episodes": {"episodes": 7}}}}, {}, r"methods.genie.training.episodes differs .*'episodes'"),
])
def test_comparison_rule_rejects_unequal_counts(methods, episodes, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_cfg(methods, episodes))


def test_augmented_per_class_needs_episode_support():
    raw = _cfg({"genie": {}}, {"augmented_per_class": 4, "support": "split"})
    with pytest.raises(ConfigError, match="augmented_per_class applies to support: episode"):
        parse_config(raw)
    parse_config(_cfg({"real_filter": {}, "sgid": {}}, {"support": "split"}))  # the split variant has no such rule


# ---------------------------------------------------------------- in the pipeline: 5-way 1-shot and 5-shot
PIPE = {
    "experiment": "epi",
    # 5 classes: every 5-way episode has all of them, the supports (5 of 8 test images per class) differ
    "dataset": {"source": "builtin", "builtin": {"classes": SIX[:5], "train_per_class": 7, "test_per_class": 8,
                                                  "ood_per_class": 1}},
    "splits": {"shots": [1, 5], "seeds": [0], "val_per_class": 2},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"steps": 2, "batch_size": 64, "images_per_real": 1},
    "training": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 8, "evaluation": ["classifier", "few_shot_episodes"],
                 "episodes": {"support": "episode", "episodes": 2, "n_way": 5, "queries_per_class": 3,
                              "caching_epochs": 1}},
    "methods": {"genie": {}, "img2img_low": {}, "txt2img": {}},
    "checks": {"enabled": False},
    "mlflow": {"enabled": False},
}


# the full graph on 2 splits (3 methods × 2 episodes, classifiers, set metrics, report): ~1.5–3 min on 2 shared cores
@pytest.fixture(scope="module")
def epi(tmp_path_factory):
    import os

    import dagster as dg

    from augment_dagster.definitions import build_definitions
    from augment_dagster.running import materialize_experiment

    root = tmp_path_factory.mktemp("epi")
    old = os.environ.get("AUGMENT_DATA_DIR")
    os.environ["AUGMENT_DATA_DIR"] = str(root / "data")
    cfg = parse_config(PIPE)
    (root / "dh").mkdir()
    try:
        with dg.instance_for_test(temp_dir=str(root / "dh")) as inst:
            meta = materialize_experiment(build_definitions([cfg]), cfg, inst)
            yield cfg, meta, root / "data"
    finally:
        if old is None:
            os.environ.pop("AUGMENT_DATA_DIR", None)
        else:
            os.environ["AUGMENT_DATA_DIR"] = old


def _m(data, *path):
    return pd.read_parquet(data.joinpath("manifests", "epi", *path[:-1], f"{path[-1]}.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("shots", [1, 5])
def test_episodes_have_their_own_supports_and_genie_sources_come_from_them(epi, shots):
    from augment_dagster.training.episodes import episode_splits

    cfg, _, data = epi
    split = _m(data, "few_shot_split", f"{shots}shot-s0")
    eps = episode_splits(split, cfg.training.episodes, 0)
    supports = [set(s["image_id"]) for _, s in eps]
    assert len(eps) == 2 and supports[0] != supports[1]  # per-episode supports differ
    assert all(len(s) == 5 * shots for s in supports)
    test_ids = set(split.loc[split["role"] == "test", "image_id"])
    assert all(s <= test_ids for s in supports)  # drawn from the evaluation images, never the split's shots
    g = _m(data, "synthetic", "genie", f"{shots}shot-s0")
    for e, sup in eps:
        rows = g[g["episode"] == e]
        classes = sorted(sup["label"].unique())
        assert sorted(rows["label"].unique()) == classes
        assert (rows.groupby("label").size() == 4 * shots).all()  # (N−1)·K per class
        label_of = dict(zip(sup["image_id"], sup["label"]))
        for r in rows.itertuples():
            (src,) = r.guide_ids
            assert src in label_of and label_of[src] != r.label  # a source: the episode's other classes only
        # every (source, target) pair of the episode once
        assert len({(r.label, r.guide_ids[0]) for r in rows.itertuples()}) == len(rows) == 5 * 4 * shots
    # the split's own set (the classifier protocol) is still (C−1)·K per class from the split's shots
    split_rows = g[g["episode"] == -1]
    train_ids = set(split.loc[split["role"] == "train", "image_id"])
    assert len(split_rows) == 5 * 4 * shots and {r[0] for r in split_rows["guide_ids"]} <= train_ids


@pytest.mark.slow
@pytest.mark.parametrize("shots", [1, 5])
def test_every_method_has_the_same_per_class_count_per_episode(epi, shots):
    cfg, _, data = epi
    counts = {}
    for m in ("genie", "img2img_low", "txt2img"):
        df = _m(data, "synthetic", m, f"{shots}shot-s0")
        per = df[df["episode"] >= 0].groupby(["episode", "label"]).size()
        counts[m] = per.to_dict()
        assert set(per) == {4 * shots}, m
    assert counts["genie"] == counts["img2img_low"] == counts["txt2img"]
    low = _m(data, "synthetic", "img2img_low", f"{shots}shot-s0")
    split = _m(data, "few_shot_split", f"{shots}shot-s0")
    test = split[split["role"] == "test"].set_index("image_id")["label"]
    ep = low[low["episode"] >= 0]
    assert all(test[r.guide_ids[0]] == r.label for r in ep.itertuples())  # same-class edits of the episode support
    # the metrics record the protocol and the per-class count the episodes saw, equal for every method
    rows = {m: _m(data, "metrics", m, f"{shots}shot-s0").iloc[0] for m in ("genie", "img2img_low", "txt2img", "real_only")}
    assert len({r["episodic_digest"] for r in rows.values()}) == 1  # paired: the same episodes for every method
    for m, r in rows.items():
        assert r["episodic_support"] == "episode" and r["episodic_episodes"] == 2
        assert json.loads(r["episodic_augmented_per_class"]) == [0 if m == "real_only" else 4 * shots]
        assert "fresh support per episode" in r["episodic_protocol"]


@pytest.mark.slow
def test_lineage_and_report_name_the_episode_protocol(epi):
    from augment_dagster.store.lineage import lineage

    cfg, meta, data = epi
    g = _m(data, "synthetic", "genie", "1shot-s0")
    sid = g.loc[g["episode"] == 1, "synthetic_id"].iloc[0]
    assert 1 in set(g.loc[g["synthetic_id"] == sid, "episode"])
    ch = lineage(data, sid)
    assert 1 in ch["episodes"] and {"experiment": "epi", "split": "1shot-s0", "method": "genie", "episode": 1} in ch["appears_in"]
    from augment_dagster.store.lineage import format_lineage

    assert "episode(s) [" in format_lineage(ch)
    report = (data / "report" / "epi" / "report.md").read_text()
    assert "fresh support per episode: 5-way" in report
    md = next(v for k, v in meta.items() if k.startswith("epi/synthetic/genie[5shot"))
    assert md["episodes"] == 2 and md["episode_per_class"] == [20]


def _split_for(cfg, shots):
    from augment_dagster.defs.assets.common import Experiment
    from augment_dagster.defs.assets.data import dataset_root
    from augment_dagster.data.imagefolder import scan_imagefolder
    from augment_dagster.data.splits import few_shot_split

    exp = Experiment(cfg)
    root = dataset_root(exp)
    raw = scan_imagefolder(root).images.copy()
    raw["dataset_root"] = str(root)
    return exp, few_shot_split(raw, shots, 0, cfg.splits.val_per_class)


@pytest.mark.slow
def test_genie_ada_keeps_one_per_episode_pair_and_the_integrity_count_holds(tmp_path, monkeypatch):
    """GeNIe-Ada per episode: the r grid for each (source, target) pair of the episode, one kept per pair, Z_T from
    the episode's support; the synthetic_integrity check's expected rows include the episodes' kept images."""
    from augment_dagster.defs.checks import expected_synthetic_rows
    from augment_dagster.defs.assets.synthetic import compute_synthetic

    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path / "data"))
    cfg = parse_config({
        "experiment": "ada", "dataset": {"source": "builtin", "builtin": {"classes": SIX[:4], "train_per_class": 3,
                                                                           "test_per_class": 4, "ood_per_class": 1}},
        "splits": {"shots": [1], "seeds": [0], "val_per_class": 1}, "models": {"diffusion": {"source": "tiny-random"}},
        "generation": {"steps": 2, "batch_size": 64},
        "training": {"evaluation": ["few_shot_episodes"],
                     "episodes": {"support": "episode", "episodes": 2, "n_way": 3, "queries_per_class": 2}},
        "methods": {"genie_ada": {"params": {"encoder": "clip", "ratios": [0.5, 0.9]}}}, "mlflow": {"enabled": False}})
    exp, split = _split_for(cfg, 1)
    df, md = compute_synthetic(exp, "genie_ada", "1shot-s0", split, {"real_classifier": None}, "t")
    ep = df[df["episode"] >= 0]
    assert set(ep["episode"]) == {0, 1} and (ep.groupby(["episode", "label"]).size() == 2).all()  # (3−1)·1
    for _, g in ep.groupby("episode"):
        pairs = [(r.label, r.guide_ids[0]) for r in g.itertuples()]
        assert len(set(pairs)) == len(pairs) == 6
        assert all("ada_projections" in json.loads(p) for p in g["params_json"])
    assert md["filter"].value["episode_candidates"] == 2 * len(ep)  # two ratios per pair, one kept
    assert expected_synthetic_rows({"filter": md["filter"].value}) == len(df)


@pytest.mark.slow
def test_export_leaves_the_episode_images_out(epi, tmp_path, capsys):
    """Per-episode images come from test-pool supports: `augment export` writes the split's own set only."""
    import yaml

    from augment_dagster.cli import main

    cfg, _, data = epi
    path = tmp_path / "epi.yaml"
    path.write_text(yaml.safe_dump({**PIPE, "data_dir": str(data)}))
    out = tmp_path / "export"
    assert main(["export", "--config", str(path), "--method", "genie", "--split", "1shot-s0", "--out", str(out)]) == 0
    lines = (out / "train" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 5 * 4  # (C−1)·K per class of the split's shots, no episode rows
    assert "per-episode images" in capsys.readouterr().err


def test_split_episodes_take_the_evaluation_classes_and_the_split_shots():
    """episodes.classes restricts the classes episodes draw from (a class-split benchmark's test classes); the
    support size is the split's K; an unknown class is a clear error."""
    from augment_dagster.config import EpisodesConfig
    from augment_dagster.training.episodes import episode_splits, split_episodes

    rows = [{"image_id": f"{c}-{r}-{i}", "label": c, "rank": i, "role": r}
            for c in SIX for r, n in (("train", 2), ("test", 6)) for i in range(n)]
    split = pd.DataFrame(rows)
    e = EpisodesConfig(support="episode", episodes=10, n_way=3, queries_per_class=2, classes=["ring", "star", "cross"])
    classes, _, test, ty, eps = split_episodes(split, e, 0)
    assert all([classes[c] for c in cls] == ["cross", "ring", "star"] and len(s) == 6 for cls, _, s in eps)
    sup = episode_splits(split, e, 0)
    assert all(set(d["label"]) == {"cross", "ring", "star"} and (d["role"] == "train").all()
               and d.groupby("label").size().eq(2).all() for _, d in sup)
    with pytest.raises(ValueError, match=r"\['moon'\] are not classes of the split"):
        split_episodes(split, EpisodesConfig(support="episode", classes=["moon", "star"]), 0)
