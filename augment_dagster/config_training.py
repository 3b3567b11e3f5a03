"""The ``training:`` section of an experiment config: the downstream classifier, GeNIe's episodes and DIAGen's
filter classifier. The recipe tables and their merging live in ``training/recipes.py``; import these classes
from ``augment_dagster.config``. Nothing here imports torch."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from .config_sections import _Strict

TRAIN_AUG_NAMES = ("none", "crop", "weak", "dafusion", "pad_crop", "strong", "randaugment")
RECIPE_NAMES = ("project", "dafusion", "diagen", "diff_ii", "sgid", "sgid_probe")


class EpisodesConfig(_Strict):
    """GeNIe's episodic few-shot evaluation (METHODS §4): frozen encoder, L2-normalised features, logistic
    regression per episode, N classes drawn from the evaluation classes, queries from the test pool.

    ``support: episode`` is the paper's protocol: a fresh K-shot support per episode (disjoint from the queries,
    from the test pool) and every method's synthetic images generated from that episode's support,
    ``augmented_per_class`` per class for every method of the comparison. ``support: split`` keeps the split's
    K shots as the support of every episode and the split's synthetic images (episodes resample classes and
    queries only): one generation per split instead of one per episode."""

    episodes: int = Field(600, ge=1, description="number of episodes (GeNIe: 600 mini / 1000 tiered)")
    n_way: int = Field(5, ge=2, description="classes per episode (capped at the number of classes)")
    queries_per_class: int = Field(16, ge=1)
    caching_epochs: int = Field(5, ge=1, description="weak-transform views of each real support image")
    encoder: str = Field("tiny-pretrained", description="frozen feature encoder: a classifier source (tiny-pretrained, "
                                                         "a local folder or a transformers hub id)")
    seed: int = 0
    support: Literal["split", "episode"] = Field(
        "split", description="episode: a fresh support per episode and each method's images generated from it "
                             "(GeNIe §4.1); split: the split's shots and synthetic set for every episode (cheaper)")
    augmented_per_class: int | None = Field(
        None, ge=1, description="support: episode — augmented images per class in every episode, the same for every "
                                "method of the comparison; None: (n_way − 1)·K (GeNIe: 4 at 5-way 1-shot, 20 at 5-shot)")
    classes: list[str] | None = Field(None, description="evaluation classes the episodes draw from (None: all)")

    @model_serializer(mode="wrap")
    def _dump_new_keys_when_set(self, handler):
        """The keys added with ``support: episode`` are dumped only when they differ from their defaults, so a
        ``support: split`` config keeps its config hash and code versions (no asset turns stale by the upgrade)."""
        d = handler(self)
        for k, default in (("support", "split"), ("augmented_per_class", None), ("classes", None)):
            if k in d and d[k] == default:
                d.pop(k)
        return d

    @model_validator(mode="after")
    def _augmented_needs_episode_support(self) -> "EpisodesConfig":
        if self.augmented_per_class is not None and self.support != "episode":
            raise ValueError("augmented_per_class applies to support: episode (per-episode generation); with "
                             "support: split each method keeps its own count — set support: episode or drop it")
        return self


class DiagenFilterConfig(_Strict):
    """DIAGen's own filter classifier (METHODS §2c): frozen backbone + linear head on the K real shots with
    RandAugment, Adam, early stopping on val loss; T by LBFGS on a val half not used for early stopping.
    The paper's ≤50 × 200 × 32 at lr 1e-4 is scaled down here (≤50 × 5 × 32 at lr 3e-3; on the demo's 4-shot
    split it stops early after ~30 epochs, ~15 s on 2 cores) [I]."""

    backbone: str = Field("tiny-pretrained", description="frozen backbone of the filter (a classifier source)")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    epochs: int = Field(50, ge=1)
    steps_per_epoch: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    patience: int = Field(6, ge=1, description="early stopping on val loss")
    train_aug: Literal["none", "crop", "weak", "dafusion", "pad_crop", "strong", "randaugment"] = "randaugment"
    views: int = Field(5, ge=1, description="views of the filter's train transform averaged into q")
    t_min: float = Field(0.05, gt=0, description="a fitted T below this is degenerate (fallback T = 1)")
    t_max: float = Field(20.0, gt=0, description="a fitted T above this is degenerate (fallback T = 1)")


class TrainingConfig(_Strict):
    """Downstream classifier training. ``recipe`` names a table of defaults (RECIPES); any key set here wins."""

    recipe: Literal["project", "dafusion", "diagen", "diff_ii", "sgid", "sgid_probe"] = "project"
    epochs: int = Field(8, ge=1)
    steps_per_epoch: int = Field(30, ge=1)
    epoch_unit: Literal["steps", "data"] = Field(
        "steps", description="steps: an epoch is steps_per_epoch batches (DA-Fusion's 200 iterations); data: an epoch is "
                             "one pass over the real train images, ⌈#real / batch_size⌉ batches (Diff-II's DataLoader "
                             "epochs; steps_per_epoch is then unused)")
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["onecycle", "cosine", "constant"] = Field(
        "onecycle", description="LR schedule per step: onecycle, cosine (linear warmup then cosine), constant")
    warmup_frac: float = Field(0.1, ge=0, lt=1, description="cosine: fraction of the steps in linear warmup")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    train_aug: Literal["none", "crop", "weak", "dafusion", "pad_crop", "strong", "randaugment"] = Field(
        "crop", description="online train transform: crop = RRC(0.6–1)+HFlip, weak = RRC(0.2–1)+HFlip, "
                            "dafusion = HFlip + Rot ±15°, pad_crop, strong, randaugment (N 2 M 9), none")
    synthetic_aug: Literal["none", "randaugment"] = Field(
        "none", description="an extra transform applied to the synthetic images of a batch only, after train_aug "
                            "(SGID's '+ SGID & RA' row: RandAugment on SGID's augmented images, footnote 7)")
    linear_probe: bool | None = Field(None, description="frozen backbone + linear head; None: models.classifier.freeze_backbone")
    headline: Literal["top1", "mean_per_class"] = Field(
        "top1", description="the metric reported as acc_id/acc_ood (both are always recorded)")
    evaluation: list[Literal["classifier", "few_shot_episodes"]] = Field(
        default_factory=lambda: ["classifier"],
        description="classifier = train on real (+α synthetic) and test; few_shot_episodes = GeNIe's episodic protocol")
    episodes: EpisodesConfig = Field(default_factory=EpisodesConfig)
    diagen_filter: DiagenFilterConfig = Field(default_factory=DiagenFilterConfig)
    image_size: int = Field(32, ge=8, le=1024, description="classifier input size (images are resized)")
    cutmix_prob: float = Field(0.0, ge=0, le=1)
    mixup_alpha: float = Field(0.0, ge=0)
    synthetic_probability: float = Field(0.5, ge=0, le=1, description="alpha: P(draw a synthetic image), DA-Fusion default 0.5")
    class_balanced: bool = Field(True, description="real draws ∝ 1/class count (DIAGen) instead of uniform (DA-Fusion)")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "weight_views" in data:
            raise ValueError("weight_views moved to training.diagen_filter.views (DIAGen's own filter)")
        return data

    def resolved(self, overrides: dict[str, Any] | None = None, algorithm: str | None = None) -> "TrainingConfig":
        """This config with its recipe applied (``training.recipes.resolve_training``; idempotent)."""
        from .training.recipes import resolve_training

        return resolve_training(self, overrides, algorithm)
