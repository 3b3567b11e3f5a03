"""Training: α-mixing sampler (DIAGen Eq. 2), temperature scaling, classifiers, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from augment_dagster.config import ClassifierModelConfig, TrainingConfig
from augment_dagster.training.backbones import (
    HFBackboneClassifier,
    TinyCNN,
    build_classifier,
    load_classifier,
    save_classifier,
)
from augment_dagster.training.loop import _mix, extract_features, predict_logits, train_classifier
from augment_dagster.training.sampler import MixingSampler
from augment_dagster.training.temperature import fit_temperature, nll


# ---------------------------------------------------------------- sampler
def _hand_sampler(alpha=0.4, seed=0, class_balanced=True):
    # real labels [0, 0, 1]; groups: n0 -> {0, 1}, n1 -> {}, n2 -> {1, 2}; weights [1, 3, 1]
    return MixingSampler(np.array([0, 0, 1]), [np.array([0, 1]), np.array([], dtype=int), np.array([1, 2])],
                         np.array([1.0, 3.0, 1.0]), alpha=alpha, seed=seed, class_balanced=class_balanced)


def test_probabilities_match_eq2_by_hand():
    p_real, p_syn = _hand_sampler().probabilities()
    # class-balanced P(n) = [1/4, 1/4, 1/2]; n1 has no synthetics and always stays real
    # P_real = (1-α)P(n) = [.25*.6, .25, .5*.6]
    np.testing.assert_allclose(p_real, [0.15, 0.25, 0.30], atol=1e-15)
    # P_syn(m0) = .25*.4*1/4; P_syn(m1) = .25*.4*3/4 + .5*.4*3/4 (shared by two groups); P_syn(m2) = .5*.4*1/4
    np.testing.assert_allclose(p_syn, [0.025, 0.225, 0.05], atol=1e-15)
    assert p_real.sum() + p_syn.sum() == pytest.approx(1.0, abs=1e-15)

    p_real_u, p_syn_u = _hand_sampler(class_balanced=False).probabilities()  # uniform P(n) = 1/3
    np.testing.assert_allclose(p_real_u, [0.6 / 3, 1 / 3, 0.6 / 3])
    np.testing.assert_allclose(p_syn_u, [0.4 / 3 / 4, 0.4 / 3 * 3 / 4 * 2, 0.4 / 3 / 4])


def test_draw_frequencies_match_probabilities():
    s = _hand_sampler(seed=3)
    k = 20000
    is_syn, idx = s.draw(k)
    p_real, p_syn = s.probabilities()
    for flag, p in ((False, p_real), (True, p_syn)):
        counts = np.bincount(idx[is_syn == flag], minlength=len(p))
        sigma = np.sqrt(k * p * (1 - p))
        assert np.all(np.abs(counts - k * p) <= 4 * sigma + 1e-9), (flag, counts, k * p)


def test_synthetic_rate_is_alpha():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)
    groups = [np.arange(3 * n, 3 * n + 3) for n in range(60)]
    w = rng.uniform(0.1, 1.0, size=180)
    alpha, k = 0.3, 20000
    is_syn, idx = MixingSampler(labels, groups, w, alpha=alpha, seed=7).draw(k)
    sigma = np.sqrt(alpha * (1 - alpha) / k)
    assert abs(is_syn.mean() - alpha) < 3 * sigma
    assert idx[is_syn].max() < 180 and idx[~is_syn].max() < 60


def test_synthetic_choice_proportional_to_weight():
    w = np.array([1.0, 2.0, 3.0, 0.0, 4.0])
    s = MixingSampler(np.array([0]), [np.arange(5)], w, alpha=1.0, seed=1)
    k = 20000
    is_syn, idx = s.draw(k)
    assert is_syn.all()
    counts = np.bincount(idx, minlength=5)
    assert counts[3] == 0  # zero weight is never drawn
    p = w / w.sum()
    chi2 = (((counts - k * p) ** 2)[p > 0] / (k * p[p > 0])).sum()
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001


def test_class_balancing_and_zero_weight_groups():
    labels = np.array([0] * 9 + [1])  # 9:1 imbalance
    s = MixingSampler(labels, seed=0)
    is_syn, idx = s.draw(20000)
    assert not is_syn.any()
    frac1 = (labels[idx] == 1).mean()
    assert abs(frac1 - 0.5) < 3 * np.sqrt(0.25 / 20000)
    np.testing.assert_allclose(s.probabilities()[0], [1 / 18] * 9 + [0.5])
    s_u = MixingSampler(labels, seed=0, class_balanced=False)
    np.testing.assert_allclose(s_u.probabilities()[0], [0.1] * 10)
    # a group with zero total weight keeps the real image
    z = MixingSampler(np.array([0, 1]), [np.array([0]), np.array([1])], np.array([0.0, 1.0]), alpha=1.0, seed=0)
    is_syn, idx = z.draw(2000)
    assert set(np.unique(idx[~is_syn])) == {0} and set(np.unique(idx[is_syn])) == {1}
    np.testing.assert_allclose(z.probabilities()[0], [0.5, 0.0])
    np.testing.assert_allclose(z.probabilities()[1], [0.0, 0.5])


def test_sampler_alpha_zero_reproducible_and_validation():
    s = _hand_sampler(alpha=0.0)
    is_syn, _ = s.draw(1000)
    assert not is_syn.any()
    p_real, p_syn = s.probabilities()
    assert p_syn.sum() == 0 and p_real.sum() == pytest.approx(1.0)
    a1, b1 = _hand_sampler(seed=5).draw(500)
    a2, b2 = _hand_sampler(seed=5).draw(500)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    with pytest.raises(ValueError, match=">= 0"):
        MixingSampler(np.array([0]), [np.array([0])], np.array([-1.0]), alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        MixingSampler(np.array([0]), None, None, alpha=1.5)
    with pytest.raises(ValueError, match="out of range"):
        MixingSampler(np.array([0]), [np.array([2])], np.array([1.0, 1.0]), alpha=0.5)
    with pytest.raises(ValueError, match="groups"):
        MixingSampler(np.array([0, 1]), [np.array([0])], np.array([1.0]), alpha=0.5)


# ---------------------------------------------------------------- temperature
def test_temperature_scaling_lowers_nll_keeps_argmax():
    g = torch.Generator().manual_seed(0)
    n, c = 400, 5
    y = torch.randint(0, c, (n,), generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.6, y, torch.randint(0, c, (n,), generator=g))
    logits = 8.0 * torch.nn.functional.one_hot(pred, c).float() + 0.5 * torch.randn(n, c, generator=g)  # overconfident
    T = fit_temperature(logits, y)
    assert T > 1.0
    assert nll(logits, y, T) < nll(logits, y, 1.0) - 0.1
    assert torch.equal((logits / T).argmax(1), logits.argmax(1))
    grid = np.linspace(1.0, 8.0, 701)
    t_grid = grid[int(np.argmin([nll(logits, y, t) for t in grid]))]
    assert T == pytest.approx(t_grid, abs=0.02)  # converged to the optimum
    # well-calibrated-ish logits: T stays finite and NLL is never worse
    T2 = fit_temperature(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long))
    assert T2 > 0 and np.isfinite(T2)


# ---------------------------------------------------------------- classifiers
def _bright_dark(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    base = torch.where(y[:, None, None, None] == 1, 0.75, 0.25)
    x = (base + 0.15 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def easy():
    tx, ty = _bright_dark(32, 0)
    vx, vy = _bright_dark(32, 1)
    return tx, ty, vx, vy


FAST = dict(epochs=3, steps_per_epoch=8, batch_size=16)
CNN = ClassifierModelConfig()  # tiny-cnn, random init


def test_tiny_cnn_learns_easy_problem(easy):
    tx, ty, vx, vy = easy
    res = train_classifier(tx, ty, vx, vy, 2, TrainingConfig(**FAST), CNN, device="cpu")
    assert res.best_val_acc > 0.9
    assert len(res.history) == 3 and {"epoch", "train_loss", "val_acc", "val_loss", "n_synthetic_drawn"} <= set(res.history[0])
    assert res.n_real_draws == 3 * 8 * 16 and res.n_syn_draws == 0
    acc = float((predict_logits(res.model, vx).argmax(1) == vy).float().mean())
    assert acc == pytest.approx(res.best_val_acc)
    feats = extract_features(res.model, vx[:5], normalize=True)
    assert feats.shape == (5, 64)  # tiny-cnn: width 16 -> 4*16 features
    assert torch.allclose(feats.norm(dim=1), torch.ones(5), atol=1e-5)


def test_best_epoch_selected_on_val_and_deep_copied(easy):
    tx, ty, vx, vy = easy
    # flipped validation labels: the best "val" epoch is the one that is worst on the real task
    res = train_classifier(tx, ty, vx, 1 - vy, 2, TrainingConfig(**FAST, train_aug="none"), CNN, device="cpu")
    accs = [h["val_acc"] for h in res.history]
    assert res.best_val_acc == max(accs) and res.best_epoch == int(np.argmax(accs))
    acc = float((predict_logits(res.model, vx).argmax(1) == (1 - vy)).float().mean())
    assert acc == pytest.approx(res.best_val_acc)  # the returned weights are the best epoch's, not the last


def test_training_is_deterministic_with_synthetics(easy):
    tx, ty, vx, vy = easy
    sx, sy = _bright_dark(16, 5)
    groups = [np.nonzero(sy.numpy() == int(c))[0] for c in ty]
    w = np.linspace(0.1, 1.0, 16)
    cfg = TrainingConfig(epochs=1, steps_per_epoch=4, batch_size=16)
    runs = [train_classifier(tx, ty, vx, vy, 2, cfg, CNN, seed=3, device="cpu", synth_x=sx, synth_y=sy,
                             groups=groups, syn_weights=w, alpha=0.5)
            for _ in range(2)]
    s1, s2 = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert runs[0].n_syn_draws > 0 and runs[0].n_syn_draws == sum(h["n_synthetic_drawn"] for h in runs[0].history)
    assert runs[0].n_real_draws + runs[0].n_syn_draws == 4 * 16
    other = train_classifier(tx, ty, vx, vy, 2, cfg, CNN, seed=4, device="cpu")
    assert not all(torch.equal(s1[k], other.model.state_dict()[k]) for k in s1)


def test_freeze_backbone_trains_head_only(easy):
    tx, ty, vx, vy = easy
    torch.manual_seed(0)
    model = TinyCNN(2, freeze_backbone=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_classifier(tx, ty, vx, vy, 2, TrainingConfig(epochs=1, steps_per_epoch=3, batch_size=8, linear_probe=True),
                           CNN, device="cpu", model=model)
    after = res.model.state_dict()
    for k in before:
        if k.startswith("backbone."):  # weights and BatchNorm running statistics
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_cutmix_and_mixup_paths(easy):
    tx, ty, vx, vy = easy
    for extra in (dict(cutmix_prob=1.0), dict(mixup_alpha=0.4), dict(cutmix_prob=0.5, mixup_alpha=1.0, label_smoothing=0.1)):
        res = train_classifier(tx, ty, vx, vy, 2, TrainingConfig(epochs=1, steps_per_epoch=2, batch_size=8, **extra),
                               CNN, device="cpu")
        assert np.isfinite(res.history[0]["train_loss"])
    x, y = tx[:8], ty[:8]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        xm, ys = _mix(x, y, 2, TrainingConfig(cutmix_prob=1.0))
    assert xm.shape == x.shape and torch.allclose(ys.sum(1), torch.ones(8))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        xm, ys = _mix(x, y, 2, TrainingConfig(mixup_alpha=1.0))
    assert torch.allclose(ys.sum(1), torch.ones(8)) and float(xm.min()) >= 0 and float(xm.max()) <= 1


def test_cutmix_lambda_equals_pasted_area():
    """CutMix's label weight of the original image equals the fraction of its pixels left unpasted."""
    n, c = 8, 8
    x = torch.arange(n, dtype=torch.float32).div(n).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()  # one value each
    y = torch.arange(n)
    checked = 0
    for seed in range(5):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            xm, ys = _mix(x, y, c, TrainingConfig(cutmix_prob=1.0))
        for i in range(n):
            other = int(ys[i].argmax()) if float(ys[i, i]) < 0.5 else None
            kept = float((xm[i, 0] == x[i, 0]).float().mean())  # pixels still from image i
            if kept == 1.0:
                assert float(ys[i, i]) == pytest.approx(1.0, abs=1e-6)
                continue
            pasted_from = {round(float(v) * n) for v in xm[i, 0][xm[i, 0] != x[i, 0]].unique()}
            assert len(pasted_from) == 1  # one box from one other image
            j = pasted_from.pop()
            assert float(ys[i, i]) == pytest.approx(kept, abs=1e-6)
            assert float(ys[i, j]) == pytest.approx(1 - kept, abs=1e-6)
            assert other is None or other == j
            checked += 1
    assert checked >= 10


def test_save_load_roundtrip_tiny(easy):
    tx, ty, vx, vy = easy
    torch.manual_seed(0)
    model = TinyCNN(2).eval()
    data = save_classifier(model, {"classes": ["dark", "bright"], "temperature": 1.5})
    loaded, meta = load_classifier(data)
    assert meta["classes"] == ["dark", "bright"] and meta["temperature"] == 1.5
    assert meta["backbone"] == "tiny-cnn" and meta["num_classes"] == 2
    assert torch.equal(predict_logits(model, vx), predict_logits(loaded, vx))


def test_unknown_backbone_names_source_and_config_key():
    with pytest.raises(ValueError, match=r"models\.classifier\.source") as e:
        build_classifier("/nonexistent/backbone-dir", 3, False)
    assert "/nonexistent/backbone-dir" in str(e.value)


@pytest.fixture(scope="module")
def tiny_resnet_dir(tmp_path_factory):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    path = tmp_path_factory.mktemp("tiny_resnet")
    ResNetModel(cfg).save_pretrained(path)
    return str(path)


def test_hf_backbone_trains_and_roundtrips(easy, tiny_resnet_dir):
    tx, ty, vx, vy = easy
    model = build_classifier(tiny_resnet_dir, 2, freeze_backbone=False)
    assert isinstance(model, HFBackboneClassifier) and model.feature_dim == 16
    head0 = model.head.weight.detach().clone()
    res = train_classifier(tx[:8], ty[:8], vx[:8], vy[:8], 2,
                           TrainingConfig(epochs=1, steps_per_epoch=1, batch_size=4),
                           ClassifierModelConfig(source=tiny_resnet_dir), device="cpu", model=model)
    assert not torch.equal(head0, res.model.head.weight)
    assert extract_features(res.model, vx[:3]).shape == (3, 16)
    data = save_classifier(res.model, {"classes": ["a", "b"]})
    loaded, meta = load_classifier(data)
    assert meta["source"] == tiny_resnet_dir and meta["backbone"] == tiny_resnet_dir
    assert torch.equal(predict_logits(res.model, vx[:6]), predict_logits(loaded, vx[:6]))


def test_hf_frozen_backbone_keeps_batchnorm_stats(easy, tiny_resnet_dir):
    tx, ty, vx, vy = easy
    cfg = TrainingConfig(epochs=1, steps_per_epoch=2, batch_size=4)
    clf = ClassifierModelConfig(source=tiny_resnet_dir, freeze_backbone=True)
    model = build_classifier(tiny_resnet_dir, 2, freeze_backbone=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    res = train_classifier(tx[:8], ty[:8], vx[:4], vy[:4], 2, cfg, clf, device="cpu", model=model)
    after = res.model.backbone.state_dict()
    assert any("running_mean" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_from_scratch_backbone_has_random_weights_and_cannot_be_frozen(easy, tiny_resnet_dir):
    """models.classifier.pretrained: false (SGID's ResNet-50 rows): the checkpoint's architecture, new random
    weights, trained in full; a frozen random backbone is refused."""
    pre = build_classifier(tiny_resnet_dir, 2)
    torch.manual_seed(1)
    scratch = build_classifier(tiny_resnet_dir, 2, pretrained=False)
    a, b = pre.backbone.state_dict(), scratch.backbone.state_dict()
    assert a.keys() == b.keys()
    assert any(v.is_floating_point() and v.numel() > 8 and not torch.equal(v, b[k]) for k, v in a.items())
    with pytest.raises(ValueError, match="cannot be frozen"):
        build_classifier(tiny_resnet_dir, 2, freeze_backbone=True, pretrained=False)
    tx, ty, vx, vy = easy
    res = train_classifier(tx, ty, vx, vy, 2, TrainingConfig(**FAST),
                           ClassifierModelConfig(source=tiny_resnet_dir, pretrained=False), device="cpu")
    assert all(p.requires_grad for p in res.model.backbone.parameters())


def test_synthetic_aug_transforms_only_synthetic_images(easy):
    """training.synthetic_aug (SGID + RA, footnote 7): RandAugment on the synthetic images of a batch only. Without
    synthetic images it is a no-op (same weights as none); with them the weights change."""
    tx, ty, vx, vy = easy
    sx, sy = tx.flip(-1), ty.clone()
    cfg = dict(train_aug="none", **FAST)
    clf = ClassifierModelConfig(source="tiny-cnn")
    real_only = [train_classifier(tx, ty, vx, vy, 2, TrainingConfig(synthetic_aug=a, **cfg), clf, device="cpu").model
                 for a in ("none", "randaugment")]
    assert all(torch.equal(p, q) for p, q in zip(real_only[0].parameters(), real_only[1].parameters()))
    mixed = [train_classifier(tx, ty, vx, vy, 2, TrainingConfig(synthetic_aug=a, **cfg), clf, device="cpu", synth_x=sx,
                              synth_y=sy, alpha=0.5).model
             for a in ("none", "randaugment")]
    assert not all(torch.equal(p, q) for p, q in zip(mixed[0].parameters(), mixed[1].parameters()))
    with pytest.raises(ValueError, match="synthetic_aug"):
        TrainingConfig(synthetic_aug="cutout")


def test_epochs_over_the_data_and_memo_keys_of_older_configs():
    """epoch_unit: data makes an epoch ⌈n_real / batch⌉ steps (Diff-II); the keys added for it stay out of a
    classifier's memo key while at their defaults, so earlier configs keep their trained classifiers."""
    from augment_dagster.training.recipes import steps_per_epoch_for
    from augment_dagster.training.stage import _NOT_CLASSIFIER_KEYS, classifier_key_params

    t = TrainingConfig(recipe="diff_ii").resolved()
    assert t.epoch_unit == "data" and steps_per_epoch_for(t, 1000) == 4 and steps_per_epoch_for(t, 256) == 1
    assert steps_per_epoch_for(TrainingConfig(steps_per_epoch=7), 1000) == 7
    old = TrainingConfig(recipe="dafusion").resolved()
    k = classifier_key_params(old, ClassifierModelConfig())
    assert k == {x: v for x, v in old.model_dump(mode="json", exclude=_NOT_CLASSIFIER_KEYS).items()
                 if x not in ("epoch_unit", "synthetic_aug")}
    assert classifier_key_params(old, ClassifierModelConfig(pretrained=False))["pretrained"] is False
    assert "steps_per_epoch" not in classifier_key_params(t, ClassifierModelConfig())
