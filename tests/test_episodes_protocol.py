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
    from augment_dagster.training.episodes import augmented_per_class, natural_episode_count

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
