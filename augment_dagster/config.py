"""Experiment configuration: a pydantic schema for one YAML file in ``assets_config/``.

Every section forbids unknown keys, so a typo is an error that names the key and the file.
Nothing here imports torch: Dagster's code server loads every config at start-up.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from .errors import UserError
from .util import hash_obj

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
DEFAULT_CONFIG_DIR = PROJECT_ROOT / "assets_config"

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SPLIT_RE = re.compile(r"^(\d+)shot-s(\d+)$")


class ConfigError(UserError, ValueError):
    """A config file is invalid. The message names the file and the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Probability = float


class BuiltinDatasetConfig(_Strict):
    """The generated shapes dataset (see augment_dagster/data/builtin.py)."""

    classes: list[str] = Field(default_factory=lambda: ["circle", "square", "triangle", "star", "cross", "ring"])
    train_per_class: int = Field(24, ge=1)
    test_per_class: int = Field(20, ge=1)
    ood_per_class: int = Field(20, ge=0)
    image_size: int = Field(32, ge=8, le=1024)
    seed: int = 0


class HFDatasetConfig(_Strict):
    """A Hugging Face dataset (``dataset.source: hf:<hub id or local path>``): which splits and columns to read."""

    train_split: str = Field("train", description="split whose images are the train pool (the few-shot splits draw from it)")
    test_split: str | None = Field("test", description="in-distribution test split (None: no test pool; a missing "
                                                       "'test' split is then noted, a missing named one is an error)")
    ood_split: str | None = Field(None, description="out-of-distribution test split (None: none)")
    image_column: str = Field("image", description="an Image feature (or bytes / {'bytes','path'} values)")
    label_column: str = Field("label", description="a ClassLabel (class ids = its names), integer or string column")
    revision: str | None = Field(None, description="hub ids: a branch, tag or commit (recorded in lineage)")


class ClassSplitConfig(_Strict):
    """Class-split benchmarks (mini-/tiered-ImageNet): disjoint lists of class ids (as the source names them, e.g.
    WordNet ids), each a list or a file with one id per line (extra text after the id is ignored). Only the
    ``evaluate`` classes enter the few-shot splits, generation and evaluation; see
    :meth:`DatasetConfig.evaluation_classes`."""

    train: list[str] | str = Field(default_factory=list)
    val: list[str] | str = Field(default_factory=list)
    test: list[str] | str = Field(default_factory=list)
    evaluate: Literal["test", "val"] = Field("test", description="which class list the experiment evaluates on")


class DatasetConfig(_Strict):
    source: str = Field("builtin", description="'builtin', a path to an imagefolder tree root/<class>/*, optional "
                                               "root/test, root/ood, or 'hf:<hub id or local path>' (a Hugging Face "
                                               "dataset: save_to_disk folder, parquet folder or hub id)")
    builtin: BuiltinDatasetConfig = Field(default_factory=BuiltinDatasetConfig)
    hf: HFDatasetConfig = Field(default_factory=HFDatasetConfig)
    class_names: dict[str, str] | str | None = Field(
        None, description="class id -> words used in prompts, captions, LLM requests, reports and exports: a mapping, "
                          "or a file of 'id<TAB>words' lines (ImageNet's words.txt; of comma-separated synonyms the "
                          "first is used). None: the id, for imagefolder names cleaned (a leading 'NNN.' index "
                          "stripped, '_' -> space). Manifests keep the id in the column class_id.")
    class_split: ClassSplitConfig | None = Field(None, description="train/val/test class lists (class-split benchmarks)")
    on_bad_file: Literal["error", "skip"] = "error"
    on_duplicate: Literal["error", "warn", "drop"] = Field(
        "error", description="an image whose bytes occur in two classes, or in the train pool and test/ood: error, "
                             "warn (keep all), or drop (the train copy of a leak; every copy of a cross-class duplicate)")
    min_image_size: int = Field(8, ge=1, description="images narrower or lower than this (px) are bad files")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images are refused (never decoded)")
    metaclass: str = Field("shape", description="super-class word used by Diff-II/GeNIe prompts")

    @property
    def is_hf(self) -> bool:
        return self.source.startswith("hf:")

    def evaluation_classes(self) -> list[str] | None:
        """The class ids the experiment evaluates on (``class_split.<evaluate>``, files read), or None when the
        dataset has no class split (every class). The few-shot split manifest holds only these classes; its
        ``class_id`` column has the ids, ``label`` the words (``data.classes.evaluation_labels``)."""
        if self.class_split is None:
            return None
        from .data.classes import read_class_list

        return read_class_list(getattr(self.class_split, self.class_split.evaluate),
                               f"dataset.class_split.{self.class_split.evaluate}")


class SplitsConfig(_Strict):
    shots: list[int] = Field(default_factory=lambda: [4])
    seeds: list[int] = Field(default_factory=lambda: [0])
    val_per_class: int = Field(4, ge=1)
    fewer_than_k: Literal["error", "use_all"] = Field(
        "error", description="a class with fewer than K+val images: error, or use what there is (recorded in the split manifest)"
    )

    @field_validator("shots")
    @classmethod
    def _pos_shots(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("shots must be a non-empty list of positive integers")
        return sorted(set(v))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v):
            raise ValueError("seeds must be a non-empty list of non-negative integers")
        return sorted(set(v))

    def keys(self) -> list[str]:
        return [split_key(k, s) for k in self.shots for s in self.seeds]


def split_key(shots: int, seed: int) -> str:
    return f"{shots}shot-s{seed}"


def parse_split_key(key: str) -> tuple[int, int]:
    m = _SPLIT_RE.match(key)
    if not m:
        raise ValueError(f"bad split key {key!r}: expected '<K>shot-s<seed>', e.g. '4shot-s0'")
    return int(m.group(1)), int(m.group(2))


class ModelSource(_Strict):
    source: str = "tiny-random"
    revision: str | None = None


SchedulerName = Literal["ddim", "pndm", "dpmsolver", "euler"]


class DiffusionModelConfig(ModelSource):
    # the sampler is generation.scheduler (or methods.<entry>.scheduler); the field stays, always None, only so
    # config hashes (code versions) of older configs do not move
    scheduler: None = Field(None, exclude=False, description="removed: set generation.scheduler")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    channels_last: bool = Field(True, description="CUDA: UNet/VAE in channels_last memory format (SDPA attention is always on)")
    compile: bool = Field(False, description="torch.compile the UNet in place (CUDA; the first batch of each shape compiles)")

    @model_validator(mode="before")
    @classmethod
    def _moved_scheduler(cls, data: Any) -> Any:
        if isinstance(data, dict) and "scheduler" in data:
            raise ValueError("scheduler moved: set generation.scheduler (every method) or "
                             "methods.<entry>.scheduler")
        return data


class ClassifierModelConfig(_Strict):
    source: str = Field("tiny-cnn", description="'tiny-cnn' (width 16, random init), 'tiny-cnn:<width>', 'tiny-pretrained' "
                        "(shipped TinyCNN backbone pretrained on the built-in pretrain pool), or a transformers vision "
                        "backbone (hub id or folder)")
    freeze_backbone: bool = False
    pretrained: bool = Field(True, description="false: a transformers backbone's architecture with random weights "
                                               "(trained from scratch, SGID's ResNet-50 rows); needs a full fine-tune")


class LLMConfig(_Strict):
    provider: Literal["offline", "openai"] = "offline"
    model: str = "offline-template-v1"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(4, ge=0)
    fallback_to_offline: bool = True
    temperature: float = Field(0.7, ge=0, le=2)
    offline_vocabulary: Literal["scenes", "builtin-shapes"] = Field(
        "scenes", description="words of the offline prompt generator (provider offline, the fallback and top-ups): "
                              "'scenes' (real-world adjectives, places, weather, times of day) or 'builtin-shapes' (the "
                              "built-in dataset's colours, backgrounds and 'at night': the words the tiny models know)")


class ModelsConfig(_Strict):
    diffusion: DiffusionModelConfig = Field(default_factory=DiffusionModelConfig)
    captioner: ModelSource = Field(default_factory=ModelSource)
    clip: ModelSource = Field(default_factory=ModelSource)
    classifier: ClassifierModelConfig = Field(default_factory=ClassifierModelConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    device: str = Field("auto", description="'auto' picks CUDA when present")


class GenerationConfig(_Strict):
    """Experiment-wide generation settings. The protocol keys (scheduler, steps, guidance_scale, resolution,
    images_per_real) are None = unset: a method entry's own value wins, then this block, then the algorithm's
    paper default (methods/protocol.py; METHODS.md §6)."""

    images_per_real: int | None = Field(None, ge=1, description="M: synthetic images per real train image")
    resolution: int | None = Field(None, ge=8, description="None = the model's native size")
    scheduler: SchedulerName | None = Field(None, description="sampler for every method (None: each method's paper sampler)")
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0)
    batch_size: int | Literal["auto"] = Field(
        32, description="requests per UNet call; 'auto': start at max_batch_size on CUDA (8 on CPU) and halve on "
                        "out-of-memory (the size used is recorded in the synthetic asset's metadata)")
    max_batch_size: int = Field(64, ge=1, description="starting size of batch_size: auto")
    negative_prompt: str = ""

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("batch_size must be a positive integer or 'auto'")
        return v


class ConceptsConfig(_Strict):
    """Textual inversion (DA-Fusion §1.2), one token per class."""

    steps: int = Field(100, ge=1)
    lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(4, ge=1)
    init_word: str = Field("the", description="the word the tokens start from (DA-Fusion: 'the'); '{label}': each class's "
                                              "own name (a name the tokenizer splits into pieces starts from init_fallback)")
    init_fallback: str = Field("the", description="start word of a class whose name is not one token (init_word '{label}')")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay on the token vector (DA-Fusion: 1e-2)")
    latents: Literal["sample", "mean"] = Field(
        "sample", description="z0 per step: a draw from the VAE posterior (diffusers TI script) or its mean")
    checkpoint_every: int = Field(50, ge=1)
    noise_sigmas: list[float] = Field(default_factory=lambda: [0.005, 0.01, 0.025],
                                      description="DIAGen embedding noise: one fixed draw per sigma per class (std devs)")

    @field_validator("noise_sigmas")
    @classmethod
    def _sigmas(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("noise_sigmas must be positive standard deviations")
        return v


class ConceptLoraConfig(_Strict):
    """Diff-II concepts: per-class tokens + one shared UNet LoRA (paper: rank 10, 35k steps at lr 5e-5 on SD;
    scaled down for the tiny model)."""

    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    rank: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    init_word: str = "the"


class InversionConfig(_Strict):
    steps: int = Field(50, ge=1, le=1000, description="DDIM inversion steps (paper: 200 on SD)")
    check_reconstruction: bool = True
    reconstruction_per_class: int | None = Field(None, ge=1, description="check the reconstruction (invert -> regenerate, "
                                                 "as many UNet passes again) on the first N train images of each class "
                                                 "only; None: every image")


class PromptsConfig(_Strict):
    """LLM prompt sets per class (DIAGen §2b): ask for per_class + 5, keep per_class."""

    per_class: int = Field(10, ge=1)
    uncommon_settings: bool = Field(False, description="use the 'uncommon settings' meta-prompt variant")
    top_up_offline: bool = Field(True, description="top up from the offline generator when the LLM yields fewer usable prompts "
                                                   "(counted in the class_prompts metadata and logged as a warning)")
    llm_seed: bool = Field(False, description="send the experiment seed as the API's `seed` (DIAGen sends none); "
                                              "models.llm.temperature likewise is sent only when set")


TRAIN_AUG_NAMES = ("none", "crop", "weak", "dafusion", "pad_crop", "strong", "randaugment")
RECIPE_NAMES = ("project", "dafusion", "diagen", "diff_ii", "sgid", "sgid_probe")

# The papers' downstream classifier recipes (METHODS.md §1–§5). Each is a table of TrainingConfig defaults;
# keys set explicitly in ``training:`` (and then in ``methods.<entry>.training``) win key by key. The step
# counts are the papers'; at demo scale override epochs/steps_per_epoch. [I] = not in the paper.
RECIPES: dict[str, dict[str, Any]] = {
    # today's project recipe: AdamW + OneCycle, RRC(0.6–1) + HFlip, full fine-tune, top-1
    "project": {},
    # DA-Fusion [C] (train_classifier.py): frozen backbone + linear head, Adam 1e-4 constant, 50 × 200 × 32,
    # Resize + HFlip + Rot ±15°, uniform real sampling (RandomSampler), mean per-class accuracy
    "dafusion": dict(optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="constant", epochs=50, steps_per_epoch=200,
                     batch_size=32, train_aug="dafusion", linear_probe=True, class_balanced=False,
                     headline="mean_per_class"),
    # DIAGen [C]: DA-Fusion's classifier, batch 16 (CLI default), class-balanced WeightedRandomSampler
    "diagen": dict(optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="constant", epochs=50, steps_per_epoch=200,
                   batch_size=16, train_aug="dafusion", linear_probe=True, class_balanced=True,
                   headline="mean_per_class"),
    # Diff-II [C] (train_classifier.py): full fine-tune, SGD momentum 0.9, lr 0.05 (CUB), wd 5e-4, label smoothing
    # 0.1, cosine with 10 % linear warmup per step, RandomCrop(pad 8) + HFlip, 128 epochs OVER THE DATA (a DataLoader
    # epoch: ⌈#real train / 256⌉ steps) at batch 256, top-1
    "diff_ii": dict(optimizer="sgd", momentum=0.9, lr=0.05, weight_decay=5e-4, label_smoothing=0.1, schedule="cosine",
                    warmup_frac=0.1, epochs=128, epoch_unit="data", batch_size=256, train_aug="pad_crop",
                    linear_probe=False, class_balanced=False, headline="top1"),
    # SGID [P] Table 1 main rows: ResNet-50 trained FROM SCRATCH (full training), no RandAugment (RA only in the
    # "+ SGID & RA" row, on the augmented images: synthetic_aug). App. H (training details) is unavailable and there is
    # no code: optimizer, LR, schedule, epochs and transform are [I] (SGD 0.1 cosine, RRC + HFlip, 100 data epochs).
    "sgid": dict(optimizer="sgd", momentum=0.9, lr=0.1, weight_decay=5e-4, schedule="cosine", warmup_frac=0.05,
                 epochs=100, epoch_unit="data", batch_size=128, train_aug="crop", linear_probe=False,
                 class_balanced=False, headline="top1"),
    # SGID [P] pre-trained backbones (ViT IN-21k, CLIP-ViT LAION-2B): linear probing (related work); the rest [I]
    # (AdamW 1e-3, cosine with 10 % warmup, 30 data epochs, RRC + HFlip), no RandAugment in the main rows.
    "sgid_probe": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-2, schedule="cosine", warmup_frac=0.1, epochs=30,
                       epoch_unit="data", batch_size=32, train_aug="crop", linear_probe=True, class_balanced=False,
                       headline="top1"),
}


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
        """This config with its recipe applied: defaults < RECIPES[recipe] < keys set explicitly here <
        ``overrides`` (a method entry's ``training:``; its ``recipe`` picks the table). GeNIe's presets
        (algorithm genie / genie_ada) add ``few_shot_episodes`` unless ``evaluation`` is set explicitly."""
        overrides = dict(overrides or {})
        explicit = self.model_dump(include=self.model_fields_set - {"recipe"})
        recipe = overrides.get("recipe", self.recipe)
        merged: dict[str, Any] = {**RECIPES[recipe], **explicit}
        for k, v in overrides.items():
            if isinstance(v, dict) and isinstance(merged.get(k, getattr(self, k, None)), (dict, BaseModel)):
                base = merged.get(k, getattr(self, k))
                base = base.model_dump() if isinstance(base, BaseModel) else dict(base)
                merged[k] = {**base, **v}
            else:
                merged[k] = v
        merged["recipe"] = recipe
        if (algorithm in ("genie", "genie_ada") and "evaluation" not in explicit and "evaluation" not in overrides):
            merged["evaluation"] = ["classifier", "few_shot_episodes"]
        return TrainingConfig.model_validate(merged)


class MethodConfig(_Strict):
    """One entry under ``methods:``. ``method`` names the algorithm (defaults to the entry name), so
    variants/ablations are several entries pointing at one method with other ``params``.

    The protocol keys override the experiment's ``generation`` block and the algorithm's paper default
    (None = unset)."""

    method: str | None = None
    enabled: bool = True
    scheduler: SchedulerName | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0)
    resolution: int | None = Field(None, ge=8)
    images_per_real: int | None = Field(None, ge=1)
    start_rule: Literal["sdedit", "genie"] | None = Field(
        None, description="img2img start: sdedit (diffusers img2img) or genie (noise to ⌊1000r⌋, skip t−1 > 1000r); "
                          "None: the algorithm's (GeNIe's baselines: set genie to share GeNIe's generation setup)")
    preprocess: Literal["resize", "center_crop"] | None = Field(
        None, description="init image -> square: resize (squash) or center_crop (Resize + CenterCrop, GeNIe); None: the algorithm's")
    params: dict[str, Any] = Field(default_factory=dict)
    synthetic_probability: float | None = Field(None, ge=0, le=1, description="overrides training.synthetic_probability")
    training: dict[str, Any] = Field(default_factory=dict, description="overrides of training.* for this entry "
                                                                        "(key by key; 'recipe' picks another table)")


class MlflowConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: sqlite under the data dir; MLFLOW_TRACKING_URI overrides")
    experiment_name: str | None = None
    log_models: bool = True


class ChecksConfig(_Strict):
    """Asset checks (augment_dagster/assets/checks.py; severities in README "Asset checks")."""

    enabled: bool = Field(True, description="false: define no asset checks (each check is one more Dagster step per "
                                            "asset and partition, ~0.2 s each on a no-op rerun)")

    label_consistency_floor: float = Field(
        0.5, ge=0.0, le=1.0, description="synthetic/<m> label_consistency warns when the judge's accuracy on the "
                                         "synthetic images is below this fraction of its accuracy on the split's val images")
    label_consistency_alpha: float = Field(
        0.05, gt=0.0, le=1.0, description="label_consistency warns only when the shortfall is significant: one-sided exact "
                                          "binomial test p < alpha (1: any shortfall warns)")
    label_judge: Literal["auto", "classifier", "clip"] = Field(
        "auto", description="label_consistency judge: the split's real-only classifier, CLIP zero-shot (models.clip), "
                            "or auto: whichever is more accurate on the split's val images")
    balance_tolerance: float = Field(0.5, ge=0.0, description="synthetic/<m> class_balance warns when the largest per-class "
                                                              "count (per real train image) exceeds the smallest by more than this fraction")
    max_images: int = Field(256, ge=1, description="label_consistency scores at most this many synthetic images per partition")


class AutomationConfig(_Strict):
    enabled: bool = Field(True, description="false: the new-data sensor, the nightly schedule and the automation-condition "
                                            "sensor of this experiment start STOPPED (an example config that must not run "
                                            "by itself); they can still be turned on in the UI")
    schedule_cron: str = "0 2 * * *"
    sensor_interval_s: int = Field(60, ge=5)


class K8sExecutionConfig(_Strict):
    """Kubernetes settings for GPU assets (``dagster-k8s/config`` op tags; image for ``pipes_k8s``)."""

    gpu_limit: int = Field(1, ge=1, description="nvidia.com/gpu limit of a GPU asset's container")
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    namespace: str | None = Field(None, description="pipes_k8s: namespace of the worker pod (None: the client's default)")
    image: str | None = Field(None, description="pipes_k8s: image of the worker pod (must contain augment_dagster)")
    store_pvc: str | None = Field(None, description="pipes_k8s: ReadWriteMany PVC mounted at the store root in the worker pod")


class ExecutionConfig(_Strict):
    """Where GPU work runs (ARCHITECTURE "Scale-out"). ``mode`` picks how diffusion ``synthetic/<method>`` assets
    execute: in the run process, in a Dagster Pipes subprocess, or in a Kubernetes pod via Pipes. ``executor``
    picks the code location's run executor (k8s_job / celery need the ``k8s`` / ``celery`` extras)."""

    mode: Literal["in_process", "pipes_subprocess", "pipes_k8s"] = "in_process"
    executor: Literal["in_process", "multiprocess", "k8s_job", "celery"] = "in_process"
    max_concurrent: int = Field(2, ge=1, description="multiprocess executor: processes (each imports torch)")
    devices: Literal["auto"] | list[str] = Field(
        "auto", description="device slots (augment_dagster/slots.py): 'auto' = every visible CUDA device, or on a "
        "CPU-only machine one slot per cpu_threads cores; or a list such as [cuda:0, cuda:2]. $AUGMENT_DEVICES / "
        "`augment run --devices` override it (e.g. 1 = one slot)")
    cpu_threads: int = Field(1, ge=1, description="torch threads of every worker, fixed so that results do not "
                             "depend on the number of slots")
    python: str | None = Field(None, description="pipes_subprocess: interpreter for the worker (None: this one)")
    k8s: K8sExecutionConfig = Field(default_factory=K8sExecutionConfig)
    celery_gpu_queue: str = Field("gpu", description="celery queue that GPU assets are routed to (run one worker with concurrency 1 on it)")
    celery_broker: str = Field("redis://127.0.0.1:6379/0", description="celery executor: broker URL")
    celery_backend: str = Field("redis://127.0.0.1:6379/1", description="celery executor: result backend URL")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v):
        if isinstance(v, list):
            bad = [d for d in v if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", str(d))]
            if bad or not v:
                raise ValueError(f"execution.devices: {bad or v} are not devices; use auto or a list such as [cuda:0, cuda:1]")
        return v

    @model_validator(mode="after")
    def _k8s_image(self) -> "ExecutionConfig":
        if self.mode == "pipes_k8s" and not self.k8s.image:
            raise ValueError("execution.mode pipes_k8s needs execution.k8s.image (an image with augment_dagster installed)")
        return self


class ExperimentConfig(_Strict):
    experiment: str
    description: str = ""
    data_dir: str | None = Field(None, description="None: ./augment_data; $AUGMENT_DATA_DIR overrides")
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    concepts: ConceptsConfig = Field(default_factory=ConceptsConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    concept_lora: ConceptLoraConfig = Field(default_factory=ConceptLoraConfig)
    inversion: InversionConfig = Field(default_factory=InversionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    methods: dict[str, MethodConfig] = Field(default_factory=dict)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    automation: AutomationConfig = Field(default_factory=AutomationConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    # filled by load_config, not part of the YAML
    source_path: str | None = Field(None, exclude=True)

    @field_validator("experiment")
    @classmethod
    def _exp_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("experiment must start with a letter and use only letters, digits and '_'")
        return v

    @field_validator("methods")
    @classmethod
    def _method_names(cls, v: dict[str, MethodConfig]) -> dict[str, MethodConfig]:
        for name in v:
            if not _NAME_RE.match(name):
                raise ValueError(f"method entry {name!r}: use letters, digits and '_' only")
        return v

    @model_validator(mode="after")
    def _check_methods(self) -> "ExperimentConfig":
        from .methods.registry import validate_method_entry  # no torch at import

        for name, entry in self.methods.items():
            validate_method_entry(name, entry)
            if entry.training:
                try:
                    self.training.resolved(entry.training)
                except ValidationError as e:
                    err = e.errors()[0]
                    loc = ".".join(str(x) for x in err.get("loc", ()))
                    msg = "unknown key" if err.get("type") == "extra_forbidden" else err.get("msg", "")
                    raise ValueError(f"methods.{name}.training.{loc}: {msg}") from None
        from .training.episodes import check_episode_comparison  # numpy/pandas only

        check_episode_comparison(self)
        return self

    # ---- derived -------------------------------------------------------------------------
    def enabled_methods(self) -> dict[str, MethodConfig]:
        return {k: v for k, v in self.methods.items() if v.enabled}

    def method_algorithm(self, name: str) -> str:
        entry = self.methods[name]
        return entry.method or name

    def training_for(self, name: str | None = None) -> TrainingConfig:
        """The resolved training settings of a method entry (None / 'real_only': the experiment's)."""
        if name is None or name not in self.methods:
            return self.training.resolved()
        return self.training.resolved(self.methods[name].training, self.method_algorithm(name))

    def freeze_backbone_for(self, training: TrainingConfig) -> bool:
        """linear probe of the recipe, else models.classifier.freeze_backbone."""
        return self.models.classifier.freeze_backbone if training.linear_probe is None else bool(training.linear_probe)

    def resolved_data_dir(self) -> Path:
        """$AUGMENT_DATA_DIR (set by ``augment --data-dir``) > config ``data_dir`` > ./augment_data."""
        d = os.environ.get("AUGMENT_DATA_DIR") or self.data_dir or "augment_data"
        return Path(d).expanduser().resolve()

    def section_hash(self, *path: str) -> str:
        """Hash of one config block (for code_version): e.g. section_hash('methods', 'dafusion'). Keys added later
        (``_HASH_NEUTRAL``) count only when they differ from their default, so older configs keep their versions."""
        node: Any = _drop_neutral(self.model_dump(mode="json"))
        for p in path:
            node = node[p]
        return hash_obj(node)[:12]

    def config_hash(self) -> str:
        return hash_obj(_drop_neutral(self.model_dump(mode="json")))[:16]


# keys added after configs were first hashed, with their defaults (methods.<entry>.start_rule / preprocess,
# training.epoch_unit / synthetic_aug, models.classifier.pretrained): left out of the hashes while at the default
_HASH_NEUTRAL = {"start_rule": None, "preprocess": None, "epoch_unit": "steps", "synthetic_aug": "none", "pretrained": True}


def _drop_neutral(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_neutral(v) for k, v in node.items() if not (k in _HASH_NEUTRAL and v == _HASH_NEUTRAL[k])}
    if isinstance(node, list):
        return [_drop_neutral(v) for v in node]
    return node


def _format_errors(err: ValidationError, path: str) -> str:
    lines = [f"invalid experiment config {path}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())) or "<root>"
        msg = e.get("msg", "")
        if e.get("type") == "extra_forbidden":
            msg = "unknown key (check spelling; see augment_dagster/config.py for the schema)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let the base loader report it
                continue
            if first is not None:
                raise ConfigError(f"key {key!r} is written twice (lines {first} and {key_node.start_mark.line + 1}); "
                                  "the second block would silently replace the first — merge them into one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Load and validate a YAML experiment config; errors name the file and the key."""
    from .errors import ConfigFileError

    path = Path(path)
    if not path.exists():
        raise ConfigFileError(f"config file {path} does not exist", hint="the file is missing: check the --config path "
                              "(the shipped examples are in assets_config/, e.g. assets_config/demo.yaml)")
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise ConfigFileError(f"--config {path} is a folder, not a YAML file"
                              + (f" (it holds {', '.join(yamls)})" if yamls else ""),
                              hint="pass one experiment YAML file, e.g. --config " + str(path / (yamls[0] if yamls else "demo.yaml")))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"config file {path} is not UTF-8 text (byte {e.start}): not a YAML file?") from None
    except OSError as e:
        raise ConfigFileError(f"config file {path} cannot be read: {e.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with at least 'experiment:'")
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    except ValueError as e:  # raised by method validation
        raise ConfigError(f"invalid experiment config {source}:\n  - {e}") from None
    cfg.source_path = source if source != "<dict>" else None
    return cfg


def discover_configs(config_dir: str | os.PathLike | None = None) -> list[ExperimentConfig]:
    """Every *.yaml in the config folder (default: $AUGMENT_CONFIG_DIR or ./assets_config)."""
    d = Path(config_dir or os.environ.get("AUGMENT_CONFIG_DIR") or DEFAULT_CONFIG_DIR)
    cfgs = [load_config(p) for p in sorted(d.glob("*.yaml"))]
    names = [c.experiment for c in cfgs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{d}: experiment names must be unique, repeated: {sorted(dup)}")
    return cfgs
