"""The comparison rule of GeNIe's episodic evaluation with ``support: episode`` (METHODS §4), checked when a config
loads (no torch): every method of the comparison runs the same episodes and gives the same number of augmented
images per class per episode. The evaluation itself is ``training/episodes.py``."""
from __future__ import annotations

from .episodes import augmented_per_class, episode_config_identity

# stages computed per image of the split's shots: an episode's fresh support has none of them
PER_IMAGE_STAGES = {"captions": "captions (one per real image)", "inversion_pool": "inversion_pool (DDIM inversions)"}
# post-filters that keep a fixed number per planned group (GeNIe-Ada: one of its r grid per pair); any other
# post-filter (Real-Filter's CLIP filter) drops a data-dependent number
COUNT_KEEPING_FILTERS = {"genie_ada"}


def natural_episode_count(cfg, name: str, shots: int, n_way: int) -> tuple[int | None, str]:
    """(images per class one episode of method entry ``name`` can give at most — None: as many as asked —, why)."""
    from ..methods.registry import get_method, method_params

    spec = get_method(cfg.method_algorithm(name))
    params = method_params(name, cfg.methods[name])
    if spec.name in ("genie", "genie_ada"):
        other = n_way - 1 if params.sources == "all" else min(params.topk, n_way - 1)
        n = other * shots
        why = f"{other} source classes × {shots} shots"
        if params.max_per_class:
            n, why = min(n, params.max_per_class), why + f", max_per_class {params.max_per_class}"
        return n, why
    entry = cfg.methods[name]
    m = entry.images_per_real if entry.images_per_real is not None else getattr(params, "images_per_real", None)
    if m is not None:
        return m * shots, f"images_per_real {m} × {shots} shots (methods.{name})"
    return None, ""


def episodic_methods(cfg) -> list[str]:
    return [m for m in cfg.enabled_methods() if "few_shot_episodes" in cfg.training_for(m).evaluation]


def check_episode_comparison(cfg) -> None:
    """The equal-count rule of ``support: episode`` (GeNIe §4.1: "the total number of labeled samples in the
    support set after augmentation remains the same across all … methodologies"): every method of the comparison
    (the entries whose evaluation lists few_shot_episodes, and real_only) runs the same episodes and gives exactly
    ``augmented_per_class`` images per class per episode. Raises ValueError (a ConfigError when loading) naming the
    entry and the key otherwise."""
    from ..methods.registry import get_method

    names = episodic_methods(cfg)
    if not names:
        return
    base = cfg.training.resolved().episodes
    per = {m: cfg.training_for(m).episodes for m in names}
    if base.support != "episode" and all(e.support != "episode" for e in per.values()):
        return
    ident = episode_config_identity(base)
    for m, e in per.items():
        if episode_config_identity(e) != ident:
            diff = sorted(k for k in set(ident) | set(episode_config_identity(e))
                          if ident.get(k) != episode_config_identity(e).get(k))
            raise ValueError(f"methods.{m}.training.episodes differs from training.episodes in {diff}: with support: "
                             "episode every method of the comparison (and real_only) must run the same episodes; "
                             "set these keys once under training.episodes")
    for m in names:
        spec = get_method(cfg.method_algorithm(m))
        stage = next((PER_IMAGE_STAGES[n] for n in spec.needs if n in PER_IMAGE_STAGES), None)
        if stage:
            raise ValueError(f"methods.{m}: support: episode generates from each episode's fresh support, but "
                             f"{cfg.method_algorithm(m)} needs {stage}, computed only for the split's shots; use "
                             "training.episodes.support: split, or leave few_shot_episodes out of this entry's "
                             "training.evaluation")
        if spec.post_filter is not None and spec.name not in COUNT_KEEPING_FILTERS:
            raise ValueError(f"methods.{m}: its post-filter drops a data-dependent number of images, so its count "
                             "per class per episode cannot be held at training.episodes.augmented_per_class "
                             "(support: episode); leave few_shot_episodes out of this entry's training.evaluation")
        for k in cfg.splits.shots:
            want = augmented_per_class(base, k)
            have, why = natural_episode_count(cfg, m, k, base.n_way)
            if have is not None and have < want:
                raise ValueError(f"methods.{m}: {have} augmented images per class per episode at {k}-shot ({why}) "
                                 f"but the comparison uses {want} (training.episodes.augmented_per_class, default "
                                 "(n_way − 1)·K); every method must give the same number — raise this entry's count "
                                 "or lower augmented_per_class")
