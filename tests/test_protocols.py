"""The papers' classifier recipes, the tiny-pretrained backbone, DIAGen's own filter and GeNIe's episodic
evaluation (METHODS.md §1–§5, §14)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from augment_dagster.config import ClassifierModelConfig, ConfigError, TrainingConfig, parse_config
from augment_dagster.data.builtin import SHAPES, generate_pool
from augment_dagster.metrics import accuracy, episode_ci, mean_per_class_accuracy
from augment_dagster.training.backbones import PRETRAINED_BACKBONE_FILE, TinyCNN, build_classifier
from augment_dagster.training.loop import build_train_transform, extract_features, predict_logits, train_classifier
from augment_dagster.training.recipes import RECIPES

CLASSES = ["circle", "square", "triangle"]


def _pool(pool: str, n: int, classes=CLASSES):
    items = [(im, k) for k, c in enumerate(classes) for im, _ in generate_pool(pool, c, n, 0, 32)]
    x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i, _ in items])).permute(0, 3, 1, 2)
    return x.contiguous(), torch.tensor([k for _, k in items])


@pytest.fixture(scope="module")
def shapes():
    tx, ty = _pool("train", 4)
    vx, vy = _pool("test", 6)
    # imbalanced evaluation set: 6 / 3 / 1 per class, so top-1 and mean per-class accuracy differ in general
    keep = torch.cat([torch.nonzero(vy == 0)[:6, 0], torch.nonzero(vy == 1)[:3, 0], torch.nonzero(vy == 2)[:1, 0]])
    return tx, ty, vx[keep], vy[keep]


# ---------------------------------------------------------------- recipes: resolution
def test_recipe_tables_and_key_by_key_overrides():
    t = TrainingConfig(recipe="dafusion", epochs=3)  # explicit key wins over the recipe table
    r = t.resolved()
    assert (r.optimizer, r.lr, r.schedule, r.train_aug, r.linear_probe, r.headline, r.class_balanced) == \
        ("adam", 1e-4, "constant", "dafusion", True, "mean_per_class", False)
    assert r.epochs == 3 and r.steps_per_epoch == 200
    d = TrainingConfig(epochs=4).resolved({"recipe": "diff_ii", "steps_per_epoch": 2})  # per-entry recipe + key
    assert (d.optimizer, d.momentum, d.weight_decay, d.label_smoothing, d.schedule, d.train_aug) == \
        ("sgd", 0.9, 5e-4, 0.1, "cosine", "pad_crop")
    assert d.epochs == 4 and d.steps_per_epoch == 2 and d.recipe == "diff_ii"
    assert TrainingConfig().resolved() == TrainingConfig().resolved().resolved()  # idempotent
    assert TrainingConfig().resolved(None, "genie").evaluation == ["classifier", "few_shot_episodes"]
    assert TrainingConfig(evaluation=["classifier"]).resolved(None, "genie").evaluation == ["classifier"]
    assert set(RECIPES) == {"project", "dafusion", "diagen", "diff_ii", "sgid", "sgid_probe"}


def test_config_and_trainer_agree_on_names():
    from augment_dagster.config import TRAIN_AUG_NAMES
    from augment_dagster.training.loop import OPTIMIZERS, SCHEDULES, TRAIN_AUGS

    assert set(TRAIN_AUG_NAMES) == set(TRAIN_AUGS)
    fields = TrainingConfig.model_fields
    assert set(fields["optimizer"].annotation.__args__) == set(OPTIMIZERS)
    assert set(fields["schedule"].annotation.__args__) == set(SCHEDULES)
    assert set(fields["train_aug"].annotation.__args__) == set(TRAIN_AUGS)
    assert set(fields["recipe"].annotation.__args__) == set(RECIPES)


def test_method_training_override_errors_name_the_key():
    base = {"experiment": "x", "methods": {"dafusion": {"training": {"recipe": "dafusion", "epochs": 2}}}}
    cfg = parse_config(base)
    assert cfg.training_for("dafusion").optimizer == "adam" and cfg.training_for("dafusion").epochs == 2
    assert cfg.training_for(None).optimizer == "adamw"  # the real_only classifier keeps the experiment's recipe
    with pytest.raises(ConfigError, match=r"methods\.dafusion\.training\.optimzer: unknown key"):
        parse_config({"experiment": "x", "methods": {"dafusion": {"training": {"optimzer": "sgd"}}}})
    with pytest.raises(ConfigError, match=r"methods\.dafusion\.training\.schedule"):
        parse_config({"experiment": "x", "methods": {"dafusion": {"training": {"schedule": "linear"}}}})
    with pytest.raises(ConfigError, match=r"training: .*weight_views moved to training\.diagen_filter\.views"):
        parse_config({"experiment": "x", "training": {"weight_views": 3}})
    with pytest.raises(ConfigError, match=r"training\.recipe"):
        parse_config({"experiment": "x", "training": {"recipe": "alia"}})


# ---------------------------------------------------------------- recipes: training (the papers' recipes, few steps)
EXPECTED = {  # recipe -> (optimizer class, schedule shape)
    "project": ("AdamW", "onecycle"), "dafusion": ("Adam", "constant"), "diagen": ("Adam", "constant"),
    "diff_ii": ("SGD", "cosine"), "sgid": ("SGD", "cosine"), "sgid_probe": ("AdamW", "cosine"),
}


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_each_recipe_trains_tiny_model(recipe, shapes):
    tx, ty, vx, vy = shapes
    # the recipe at small step counts (2 CPU cores): same optimizer, schedule, transform, sampling (what each
    # recipe's values are is checked against the papers in test_paper_presets.py, through `augment plan`)
    training = TrainingConfig(recipe=recipe).resolved({"epochs": 2, "steps_per_epoch": 10, "batch_size": 12,
                                                        "epoch_unit": "steps"})
    clf = ClassifierModelConfig(source="tiny-pretrained")
    res = train_classifier(tx, ty, vx, vy, 3, training, clf, seed=0, device="cpu")
    opt_cls, shape = EXPECTED[recipe]
    assert res.optimizer == opt_cls
    lrs = np.array(res.lr_curve)
    assert len(lrs) == 20
    if shape == "constant":
        assert np.all(lrs == training.lr)
    else:
        peak = int(np.argmax(lrs))
        assert 0 < peak < len(lrs) - 1
        assert np.all(np.diff(lrs[:peak + 1]) > 0) and np.all(np.diff(lrs[peak:]) < 0)  # warm up, then decay
        assert lrs[-1] < 0.05 * lrs[peak]
        if shape == "cosine":  # linear warmup over warmup_frac of the steps
            assert peak == round(training.warmup_frac * len(lrs))
            assert lrs[peak] == pytest.approx(training.lr)
    # the recipe's online transform is applied: without it the same seed gives other weights
    plain = train_classifier(tx, ty, vx, vy, 3, training.model_copy(update={"train_aug": "none"}), clf, seed=0,
                             device="cpu")
    assert not torch.equal(plain.model.head.weight, res.model.head.weight)
    assert plain.optimizer == res.optimizer and plain.lr_curve == res.lr_curve
    # a random online transform prevents feature caching; the linear probe keeps the backbone fixed
    assert not res.features_cached
    assert plain.features_cached == bool(training.linear_probe)
    if training.linear_probe:
        ref = build_classifier("tiny-pretrained", 3, freeze_backbone=True)
        assert all(torch.equal(v, ref.backbone.state_dict()[k]) for k, v in res.model.backbone.state_dict().items())
    # both metrics are recorded; they differ on this imbalanced set when the per-class accuracies differ
    preds = predict_logits(res.model, vx).argmax(1)
    top1, mpca = accuracy(preds, vy), mean_per_class_accuracy(preds, vy, 3)
    pc = [float((preds[vy == k] == k).float().mean()) for k in range(3)]
    assert mpca == pytest.approx(np.mean(pc)) and top1 == pytest.approx(float((preds == vy).float().mean()))
    assert training.headline == RECIPES[recipe].get("headline", "top1")


@pytest.mark.parametrize("name", ["crop", "weak", "dafusion", "pad_crop", "strong", "randaugment"])
def test_train_transforms_change_images_keep_shape(name):
    x, _ = _pool("train", 2)
    aug = build_train_transform(name, (32, 32))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = aug(x).reshape(x.shape)
        b = aug(x).reshape(x.shape)
    assert a.shape == x.shape and not torch.allclose(a, x) and not torch.allclose(a, b)
    assert build_train_transform("none", (32, 32)) is None


def test_dafusion_transform_rotates_within_15_degrees():
    import kornia.augmentation as K

    aug = build_train_transform("dafusion", (32, 32))
    rot = [m for m in aug.children() if isinstance(m, K.RandomRotation)]
    assert len(rot) == 1 and any(isinstance(m, K.RandomHorizontalFlip) for m in aug.children())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        aug(torch.rand(64, 3, 32, 32))
    degrees = rot[0]._params["degrees"]
    assert float(degrees.abs().max()) <= 15.0 and float(degrees.abs().max()) > 5.0


def test_class_balanced_flag_reaches_the_sampler(monkeypatch):
    """train_classifier builds its MixingSampler with the config's class_balanced flag: the sampler it actually
    used (recorded here) draws the rare class with probability 1/2 (balanced) or 1/5 (uniform over images)."""
    tx, ty = _pool("train", 4)
    x = torch.cat([tx[ty == 0], tx[ty == 1][:1]])
    y = torch.cat([ty[ty == 0], ty[ty == 1][:1]])  # 4 : 1
    from augment_dagster.training import loop

    used = []

    class Recording(loop.MixingSampler):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            used.append(self)

    monkeypatch.setattr(loop, "MixingSampler", Recording)
    for balanced, expect in ((True, 0.5), (False, 0.2)):
        cfg = TrainingConfig(epochs=1, steps_per_epoch=1, batch_size=4, class_balanced=balanced)
        train_classifier(x, y, x, y, 2, cfg, ClassifierModelConfig(), device="cpu")
        p = used[-1].probabilities()[0]
        assert p[y.numpy() == 1].sum() == pytest.approx(expect)
    assert len(used) == 2


# ---------------------------------------------------------------- tiny-pretrained backbone
def test_pretrained_backbone_is_shipped_small_and_better_than_random(shapes):
    assert PRETRAINED_BACKBONE_FILE.is_file() and PRETRAINED_BACKBONE_FILE.stat().st_size < 1_000_000
    tx, ty, vx, vy = shapes
    pre = build_classifier("tiny-pretrained", 3, freeze_backbone=True)
    torch.manual_seed(0)
    rnd = TinyCNN(3, width=pre.width, freeze_backbone=True)
    from sklearn.linear_model import LogisticRegression

    accs = {}
    for name, m in (("pre", pre), ("rnd", rnd)):
        f_tr, f_te = extract_features(m, tx, normalize=True), extract_features(m, vx, normalize=True)
        accs[name] = LogisticRegression(C=1.0, max_iter=1000).fit(f_tr, ty).score(f_te, vy)
    assert accs["pre"] >= 0.7 and accs["pre"] > accs["rnd"]


def test_pretrained_backbone_pool_is_disjoint_from_demo_pools():
    def arrays(pool, n):
        return {np.asarray(im).tobytes() for c in SHAPES for im, _ in generate_pool(pool, c, n, 0, 32)}

    pre = arrays("pretrain", 200)
    for pool in ("train", "test", "ood"):
        assert not (pre & arrays(pool, 24)), pool


def test_linear_probe_caches_features_and_trains_fast(shapes):
    import time

    tx, ty, vx, vy = shapes
    cfg = TrainingConfig(linear_probe=True, train_aug="none", epochs=20, steps_per_epoch=50, batch_size=32,
                         optimizer="adam", lr=1e-2, schedule="constant")
    t = time.perf_counter()
    res = train_classifier(tx, ty, vx, vy, 3, cfg, ClassifierModelConfig(source="tiny-pretrained"), device="cpu")
    assert res.features_cached and time.perf_counter() - t < 10  # 1000 head steps on cached features
    # the cached path is the same model: its val accuracy is what predict_logits gives
    assert float((predict_logits(res.model, vx).argmax(1) == vy).float().mean()) == pytest.approx(res.best_val_acc)


# ---------------------------------------------------------------- DIAGen filter pieces
def test_val_split_halves_are_disjoint_and_per_class():
    from augment_dagster.training.filter import split_val

    val = pd.DataFrame({"image_id": [f"{c}{i}" for c in "ab" for i in range(4)] + ["c0"],
                        "label": list("aaaabbbb") + ["c"], "rank": list(range(4)) * 2 + [0]})
    es, t = split_val(val)
    assert set(es["image_id"]).isdisjoint(t["image_id"]) and len(es) + len(t) == len(val)
    assert list(es.groupby("label").size()) == [2, 2, 1] and list(t.groupby("label").size()) == [2, 2]


def test_degenerate_temperature_reasons():
    from augment_dagster.training.filter import degenerate_reason

    assert degenerate_reason(1.3, 0.6, 10, 0.05, 20) == ""
    assert "100 %" in degenerate_reason(0.01, 1.0, 10, 0.05, 20)
    assert "< 0.05" in degenerate_reason(0.01, 0.5, 10, 0.05, 20)
    assert "> 20" in degenerate_reason(40.0, 0.5, 10, 0.05, 20)
    assert "no temperature set" in degenerate_reason(1.0, float("nan"), 0, 0.05, 20)


# ---------------------------------------------------------------- episodes
def test_episodes_sampling_fit_and_ci():
    from augment_dagster.training.episodes import run_episodes, sample_episodes

    ty = np.repeat(np.arange(6), 20)
    eps = sample_episodes(ty, 6, 5, 16, 30, seed=3)
    again = sample_episodes(ty, 6, 5, 16, 30, seed=3)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(eps, again))
    assert all(len(c) == 5 and len(q) == 80 and set(ty[q]) == set(c) for c, q in eps)
    assert len({tuple(c) for c, _ in eps}) > 1  # classes vary between episodes
    rng = np.random.default_rng(0)
    centers = np.eye(6, 16) * 5
    sf = np.repeat(centers, 4, axis=0) + rng.normal(size=(24, 16)) * 0.1
    sy = np.repeat(np.arange(6), 4)
    tf = centers[ty] + rng.normal(size=(120, 16)) * 0.1
    accs = run_episodes(sf, sy, tf, ty, eps)
    assert accs.shape == (30,) and np.all(accs == 1.0)
    noisy = run_episodes(sf, sy, rng.normal(size=(120, 16)), ty, eps)
    m, ci = episode_ci(noisy)
    assert m == pytest.approx(noisy.mean()) and ci == pytest.approx(1.96 * noisy.std() / np.sqrt(30))


def test_two_methods_of_a_split_meet_identical_episodes(tmp_path, monkeypatch):
    """The episodes (classes, query rows) depend on the split and the episode config only: two methods of one
    split — one without synthetic images, one with — are evaluated on the very same list (what the report's
    episode-by-episode pairing relies on); their digests agree, and another split seed gives other episodes."""
    from augment_dagster.config import EpisodesConfig
    from augment_dagster.store import BlobStore, Memo
    from augment_dagster.training import episodes as E

    ims = {f"{c}{p}{i}": im for c in CLASSES for p in ("train", "test")
           for i, (im, _) in enumerate(generate_pool(p, c, 2 if p == "train" else 5, 0, 32))}
    split = pd.DataFrame([{"image_id": k, "label": c, "rank": i, "role": p}
                          for c in CLASSES for p in ("train", "test") for i in range(2 if p == "train" else 5)
                          for k in [f"{c}{p}{i}"]])
    syn_ims = {f"syn-{c}-{i}": im for c in CLASSES for i, (im, _) in enumerate(generate_pool("ood", c, 3, 1, 32))}
    synth = pd.DataFrame([{"synthetic_id": k, "label": k.split("-")[1], "blob": k} for k in syn_ims])

    class Images:
        def real(self, i):
            return ims[i]

        def synthetic(self, b):
            return syn_ims[b]

    seen = []
    real_run = E.run_episodes
    monkeypatch.setattr(E, "run_episodes", lambda sf, sy, tf, ty, eps: seen.append((len(sf), eps)) or real_run(sf, sy, tf, ty, eps))
    ecfg = EpisodesConfig(episodes=12, n_way=2, queries_per_class=3, caching_epochs=1)
    kw = dict(images=Images(), blobs=BlobStore(tmp_path), memo=Memo(tmp_path), ecfg=ecfg, image_size=32)
    a = E.episodic_eval(split, None, split_seed=0, **kw)  # real_only
    b = E.episodic_eval(split, synth, split_seed=0, **kw)  # a method with 9 synthetic images
    (n_a, eps_a), (n_b, eps_b) = seen
    assert n_b == n_a + len(synth)  # the support differs ...
    assert len(eps_a) == len(eps_b) == 12  # ... the episodes do not
    assert all(np.array_equal(ca, cb) and np.array_equal(qa, qb) for (ca, qa), (cb, qb) in zip(eps_a, eps_b))
    assert a["episodes_digest"] == b["episodes_digest"] == E.episodes_digest(eps_a)
    assert len({tuple(c) for c, _ in eps_a}) > 1
    c = E.episodic_eval(split, synth, split_seed=0, **kw)  # reused from the store: same digest, no new episodes
    assert c["reused"] and c["episodes_digest"] == a["episodes_digest"] and len(seen) == 2
    other = E.episodic_eval(split, None, split_seed=1, **kw)
    assert other["episodes_digest"] != a["episodes_digest"]


# ---------------------------------------------------------------- in the pipeline
PIPE = {
    "experiment": "proto",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "star"], "train_per_class": 8,
                                                  "test_per_class": 6, "ood_per_class": 2}},
    "splits": {"shots": [2], "seeds": [0], "val_per_class": 4},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 1, "steps": 4, "batch_size": 32},
    "concepts": {"steps": 2, "batch_size": 2},
    "prompts": {"per_class": 2},
    "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8,
                 "episodes": {"episodes": 40, "caching_epochs": 2, "n_way": 2, "queries_per_class": 4},
                 "diagen_filter": {"epochs": 8, "steps_per_epoch": 3, "batch_size": 16, "patience": 2}},
    "methods": {"diagen": {}, "genie": {}, "txt2img": {}, "img2img_low": {"training": {"evaluation": ["classifier", "few_shot_episodes"]}},
                "dafusion": {"training": {"recipe": "dafusion", "epochs": 1, "steps_per_epoch": 2}}},
    "mlflow": {"enabled": False},
}


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    import os

    import dagster as dg

    from augment_dagster.definitions import build_definitions
    from augment_dagster.running import materialize_experiment

    root = tmp_path_factory.mktemp("proto")
    old = os.environ.get("AUGMENT_DATA_DIR")
    os.environ["AUGMENT_DATA_DIR"] = str(root / "data")
    cfg = parse_config(PIPE)
    defs = build_definitions([cfg])
    (root / "dh").mkdir()
    try:
        with dg.instance_for_test(temp_dir=str(root / "dh")) as inst:
            meta = materialize_experiment(defs, cfg, inst)
            yield cfg, {k.split("[")[0].split("/", 1)[1]: md for k, md in meta.items()}, root / "data"
    finally:
        if old is None:
            os.environ.pop("AUGMENT_DATA_DIR", None)
        else:
            os.environ["AUGMENT_DATA_DIR"] = old


def _manifest(data, *path):
    return pd.read_parquet(data.joinpath("manifests", "proto", *path[:-1], f"{path[-1]}.parquet"))


@pytest.mark.slow
def test_pipeline_filter_temperature_and_q_views(piped):
    """T is fitted on the odd val half by the filter asset, and q averages the filter's own train-transform views."""
    from augment_dagster.data.images import ImageSource, label_index, to_tensor
    from augment_dagster.store import BlobStore
    from augment_dagster.training.backbones import load_classifier
    from augment_dagster.training.filter import split_val
    from augment_dagster.training.temperature import fit_temperature

    cfg, md, data = piped
    assert "confidence_weights/txt2img" in md and "diagen_filter" in md
    frec = _manifest(data, "diagen_filter", "2shot-s0").iloc[0]
    assert float(md["diagen_filter"]["temperature"]) == pytest.approx(float(frec["temperature"]))
    blobs = BlobStore(data)
    model, meta = load_classifier(blobs.get(frec["blob"]))
    assert meta["train_aug"] == "randaugment" and frec["views"] == 5
    split = _manifest(data, "few_shot_split", "2shot-s0")
    from augment_dagster.store.manifests import resolve_root

    images = ImageSource(resolve_root(split["dataset_root"].iloc[0], data), split, blobs)
    es, tset = split_val(split[split["role"] == "val"])
    assert len(es) == len(tset) == 6 and frec["n_t"] == 6
    idx = label_index(meta["classes"])
    tx = to_tensor([images.real(i) for i in tset["image_id"]], 32)
    with torch.no_grad():
        logits = model(tx)
    T = fit_temperature(logits, torch.tensor([idx[l] for l in tset["label"]]))
    assert T == pytest.approx(float(frec["temperature_fitted"]), rel=1e-4)
    if not frec["degenerate"]:
        assert float(frec["temperature"]) == pytest.approx(T, rel=1e-4)
    else:
        assert float(frec["temperature"]) == 1.0 and frec["fallback"]
    # q by hand: 5 seeded views of RandAugment, softmax(z / T) at the label
    w = _manifest(data, "confidence_weights", "diagen", "2shot-s0")
    syn = _manifest(data, "synthetic", "diagen", "2shot-s0").set_index("synthetic_id").loc[w["synthetic_id"]]
    x = to_tensor([images.synthetic(b) for b in syn["blob"]], 32)
    y = torch.tensor([idx[l] for l in syn["label"]])
    aug = build_train_transform("randaugment", (32, 32))
    qs = []
    with torch.random.fork_rng(), torch.no_grad():
        for v in range(5):
            torch.manual_seed(0 * 1000 + v)
            qs.append(torch.softmax(model(aug(x).reshape(x.shape).clamp(0, 1)) / float(frec["temperature"]), 1)[torch.arange(len(y)), y])
    np.testing.assert_allclose(w["q"].to_numpy(), torch.stack(qs).mean(0).numpy(), rtol=1e-4, atol=1e-6)
    assert np.allclose(w["weight"], w["q"])  # rule 'paper'
    wm = md["confidence_weights/diagen"]
    assert wm["min_weight"] <= wm["median_weight"] <= wm["max_weight"] and wm["max_weight"] > wm["min_weight"]
    assert (_manifest(data, "confidence_weights", "genie", "2shot-s0")["weight"] == 1.0).all()  # no weighting


@pytest.mark.slow
def test_pipeline_episodes_and_recipe_metrics(piped):
    cfg, md, data = piped
    rows = {m: _manifest(data, "metrics", m, "2shot-s0").iloc[0] for m in ("genie", "txt2img", "img2img_low", "diagen", "dafusion", "real_only")}
    for m in ("genie", "img2img_low"):  # genie: the preset's default; img2img_low: asked for per entry
        r = rows[m]
        assert r["episodic_episodes"] == 40 and 0 <= r["episodic_acc"] <= 1 and r["episodic_ci95"] >= 0
        accs = np.array(json.loads(r["episodic_accs"]))
        assert r["episodic_acc"] == pytest.approx(accs.mean()) and r["episodic_ci95"] == pytest.approx(1.96 * accs.std() / np.sqrt(40))
    assert rows["txt2img"]["episodic_episodes"] == 0  # not asked for
    assert rows["real_only"]["episodic_episodes"] == 40  # the un-augmented baseline runs whenever a method does
    d = rows["dafusion"]
    assert d["recipe"] == "dafusion" and d["headline"] == "mean_per_class" and d["acc_id"] == d["mpca_id"]
    assert rows["real_only"]["headline"] == "top1" and rows["real_only"]["acc_id"] == rows["real_only"]["top1_id"]
    report = (data / "report" / "proto" / "report.md").read_text()
    assert "Episodic few-shot evaluation" in report and "genie" in report.split("Episodic")[1]
    ep = pd.read_csv(data / "report" / "proto" / "episodic.csv")
    assert set(ep["method"]) == {"genie", "img2img_low", "real_only"}
    assert (ep["episodes"] == 40).all() and (ep["ci95"] >= 0).all()
    assert (ep["ci95"] > 0).any()  # 2-way episodes of 3 classes differ (a method at 100 % everywhere has CI 0)
    assert "±" in report.split("Episodic")[1]


@pytest.mark.slow
def test_pipeline_diagen_guidance_reaches_units(piped):
    """DIAGen's g = 15 (paper default) reaches its units with params/entry guidance unset (lineage row)."""
    from augment_dagster.store.lineage import lineage

    cfg, md, data = piped
    assert "guidance_scale" not in cfg.methods["diagen"].params
    sid = _manifest(data, "synthetic", "diagen", "2shot-s0")["synthetic_id"].iloc[0]
    assert lineage(data, sid)["generation"]["guidance_scale"] == 15.0


def test_linear_probe_features_come_from_the_store(tmp_path):
    """A frozen pretrained backbone with no random transform: the stage takes real/val features from the store
    (shared by every classifier of the split), and the result equals encoding in the trainer."""
    from augment_dagster.store import BlobStore, Memo
    from augment_dagster.training.episodes import load_encoder
    from augment_dagster.training.stage import train_classifier_stage

    ims = {f"{c}{i}": im for c in CLASSES for i, (im, _) in enumerate(generate_pool("train", c, 6, 0, 32))}

    class Images:
        def real(self, i):
            return ims[i]

    split = pd.DataFrame([{"image_id": k, "label": k.rstrip("0123456789"), "rank": int(k[-1]),
                           "role": "train" if int(k[-1]) < 4 else "val"} for k in ims])
    blobs, memo = BlobStore(tmp_path), Memo(tmp_path)
    training = TrainingConfig(recipe="dafusion", train_aug="none", epochs=3, steps_per_epoch=5)
    clf = ClassifierModelConfig(source="tiny-pretrained")
    kw = dict(images=Images(), blobs=blobs, memo=memo, training=training, classifier_cfg=clf, device="cpu")
    rec, _ = train_classifier_stage(split, seed=0, **kw)
    assert rec["features_cached"] and rec["optimizer"] == "Adam"
    hits = memo.hits
    rec2, _ = train_classifier_stage(split, seed=1, **kw)  # another classifier: its features are store hits
    assert memo.hits >= hits + 2 and rec2["blob"] != rec["blob"]
    # same weights as encoding inside the trainer
    from augment_dagster.data.images import to_tensor
    from augment_dagster.training.stage import load_classifier_blob

    tr, va = split[split.role == "train"].sort_values(["label", "rank"]), split[split.role == "val"].sort_values(["label", "rank"])
    idx = {c: k for k, c in enumerate(sorted(CLASSES))}
    rx, vx = to_tensor([ims[i] for i in tr.image_id], 32), to_tensor([ims[i] for i in va.image_id], 32)
    ry, vy = torch.tensor([idx[l] for l in tr.label]), torch.tensor([idx[l] for l in va.label])
    direct = train_classifier(rx, ry, vx, vy, 3, training, clf, seed=0, device="cpu")
    stored, _ = load_classifier_blob(blobs, rec["blob"])
    assert torch.allclose(direct.model.head.weight, stored.head.weight, atol=1e-5)
    assert isinstance(load_encoder("tiny-pretrained"), TinyCNN)
    # evaluated on the store's features of the rows (head only): the same accuracy and confusion as a full forward
    from augment_dagster.training.stage import evaluate

    test = pd.DataFrame([{"image_id": i, "label": i.rstrip("0123456789")} for i in ims])
    full = evaluate(stored, {"classes": sorted(CLASSES)}, Images(), test, 32)
    hits = memo.hits
    head_only = evaluate(stored, {"classes": sorted(CLASSES)}, Images(), test, 32,
                         dict(encoder="tiny-pretrained", blobs=blobs, memo=memo))
    assert head_only["n"] == full["n"] == len(ims) and head_only["accuracy"] == full["accuracy"]
    assert np.array_equal(head_only["confusion"], full["confusion"]) and head_only["per_class"] == full["per_class"]
    evaluate(stored, {"classes": sorted(CLASSES)}, Images(), test, 32, dict(encoder="tiny-pretrained", blobs=blobs, memo=memo))
    assert memo.hits == hits + 1  # the second classifier of the split reads the features back
