"""The papers' downstream classifier recipes and how a training config resolves against them (no torch).

A recipe is a table of :class:`~augment_dagster.config.TrainingConfig` defaults. Resolution order, key by key:
the schema's defaults < ``RECIPES[recipe]`` < keys set explicitly in ``training:`` < a method entry's
``methods.<entry>.training`` (whose ``recipe`` picks the table) — see :func:`resolve_training`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from ..config_training import TrainingConfig

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


def method_evaluation(algorithm: str | None) -> list[str] | None:
    """The evaluation an algorithm's paper protocol implies when the config sets none, or None (the schema's
    default). GeNIe's algorithms count their images per class over the other classes' images (their
    ``Protocol.count``) and their paper evaluates on few-shot episodes: they add ``few_shot_episodes``."""
    if not algorithm:
        return None
    from ..methods.registry import get_method  # no torch at import

    # NOTE: ``protocol.count`` stands in for a MethodSpec field naming the method's evaluation default (none yet)
    return ["classifier", "few_shot_episodes"] if get_method(algorithm).protocol.count else None


def resolve_training(training: TrainingConfig, overrides: dict[str, Any] | None = None,
                     algorithm: str | None = None) -> TrainingConfig:
    """``training`` with its recipe applied: defaults < RECIPES[recipe] < keys set explicitly in ``training`` <
    ``overrides`` (a method entry's ``training:``; its ``recipe`` picks the table). An algorithm whose paper
    evaluation differs (:func:`method_evaluation`, GeNIe: ``few_shot_episodes``) sets ``evaluation`` unless it is
    set explicitly. Idempotent."""
    overrides = dict(overrides or {})
    explicit = training.model_dump(include=training.model_fields_set - {"recipe"})
    recipe = overrides.get("recipe", training.recipe)
    merged: dict[str, Any] = {**RECIPES[recipe], **explicit}
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(merged.get(k, getattr(training, k, None)), (dict, BaseModel)):
            base = merged.get(k, getattr(training, k))
            base = base.model_dump() if isinstance(base, BaseModel) else dict(base)
            merged[k] = {**base, **v}
        else:
            merged[k] = v
    merged["recipe"] = recipe
    if "evaluation" not in explicit and "evaluation" not in overrides:
        evaluation = method_evaluation(algorithm)
        if evaluation is not None:
            merged["evaluation"] = evaluation
    return type(training).model_validate(merged)


def freeze_for(training, classifier_cfg) -> bool:
    """Linear probe (frozen backbone)? The resolved recipe's ``linear_probe``, else ``models.classifier.freeze_backbone``."""
    lp = getattr(training, "linear_probe", None)
    return bool(classifier_cfg.freeze_backbone if lp is None else lp)


def steps_per_epoch_for(training, n_real: int) -> int:
    """Batches per epoch: ``steps_per_epoch``, or with ``epoch_unit: data`` one pass over the ``n_real`` real
    train images, ⌈n_real / batch_size⌉ (Diff-II's DataLoader epochs)."""
    if getattr(training, "epoch_unit", "steps") == "data":
        return max(1, -(-int(n_real) // int(training.batch_size)))
    return int(training.steps_per_epoch)
