"""The downstream classifier's training loop on the one pydantic training config
(:class:`~augment_dagster.config.TrainingConfig`, recipe applied here) and ``models.classifier``.

Batches are drawn by the α-mixing sampler (real with 1−α, synthetic ∝ weight within the real image's
group; DIAGen Eq. 2), an online train transform (kornia; TRAIN_AUGS), Adam/AdamW/SGD with a per-step
torch LR scheduler (onecycle, cosine with linear warmup, constant), optional CutMix/MixUp with soft-label CE; the best
epoch is chosen on the *validation* split and deep-copied (never the test set, METHODS §8). Backbones, building
and saving a classifier: ``training/backbones.py``.

Images are float tensors [N,3,H,W] in [0,1]; labels LongTensor [N]."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..util import pick_device
from .backbones import build_classifier
from .recipes import freeze_for, resolve_training, steps_per_epoch_for
from .sampler import MixingSampler

if TYPE_CHECKING:  # the schema is passed in; importing it here would close a cycle through config's lazy imports
    from ..config import ClassifierModelConfig, TrainingConfig

log = logging.getLogger(__name__)

# online train transforms (METHODS §1, §3, §4, §10):
#   none; crop = RRC(0.6–1) + HFlip (the project's recipe); weak = RRC(0.2–1) + HFlip (GeNIe);
#   dafusion = Resize + HFlip + Rot ±15° (DA-Fusion/DIAGen); pad_crop = RandomCrop with padding + HFlip (Diff-II;
#   pad 8 px at 224, scaled to the image size); strong (GeNIe); randaugment (N 2, M 9)
TRAIN_AUGS = ("none", "crop", "weak", "dafusion", "pad_crop", "strong", "randaugment")
# what _make_optimizer / make_scheduler implement (the schema's Literals list the same: tests/test_protocols.py)
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
SELECT_ON = ("val_acc", "val_loss")


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = 0.0
    n_real_draws: int = 0
    n_syn_draws: int = 0
    optimizer: str = ""  # class name of the optimizer used
    lr_curve: list[float] = field(default_factory=list)  # LR of every optimisation step
    stopped_early: bool = False
    features_cached: bool = False


def build_train_transform(name: str, size: tuple[int, int]):
    """The online train transform ``name`` (see TRAIN_AUGS) as a kornia module, None for 'none'."""
    if name not in TRAIN_AUGS:
        raise ValueError(f"unknown train_aug {name!r}; valid: {', '.join(TRAIN_AUGS)}")
    if name == "none":
        return None
    import kornia.augmentation as K

    size = (int(size[0]), int(size[1]))
    if name == "crop":
        return K.AugmentationSequential(K.RandomResizedCrop(size, scale=(0.6, 1.0)), K.RandomHorizontalFlip())
    if name == "dafusion":  # images already arrive resized to training.image_size (the "Resize")
        return K.AugmentationSequential(K.RandomHorizontalFlip(), K.RandomRotation(15.0))
    if name == "pad_crop":
        pad = max(1, round(8 * min(size) / 224))
        return K.AugmentationSequential(K.RandomCrop(size, padding=pad), K.RandomHorizontalFlip())
    from ..data.augment import make_policy

    return make_policy(name, size)



def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits [N, C] (float32, CPU), eval mode, on the model's device."""
    dev = _model_device(model)
    model.eval()
    outs = [model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)]
    if not outs:
        return torch.zeros(0, model.head.out_features)
    return torch.cat(outs)


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256, normalize: bool = False) -> torch.Tensor:
    """Penultimate (pooled) features [N, D] (float32, CPU); L2-normalised rows when ``normalize``."""
    dev = _model_device(model)
    model.eval()
    outs = [model.features(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)]
    if not outs:
        return torch.zeros(0, model.head.in_features)
    f = torch.cat(outs)
    return F.normalize(f, dim=1) if normalize else f


def _mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, training: TrainingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level CutMix (probability ``cutmix_prob``, β=1, kornia RandomCutMixV2) or else MixUp
    (λ ~ Beta(α, α), convex pixel + label mix); returns images and soft labels [B, C]. Uses the (seeded)
    global torch RNG."""
    y_soft = F.one_hot(y, num_classes).float()
    if training.cutmix_prob > 0 and float(torch.rand(())) < training.cutmix_prob:
        from kornia.augmentation import RandomCutMixV2

        cut = RandomCutMixV2(num_mix=1, beta=1.0, p=1.0, data_keys=["input", "class"], use_correct_lambda=True)
        xm, lab = cut(x, y)
        lab = lab[0]  # [B, 3]: label, permuted label, λ = weight of the original label (1 − area)
        lam = lab[:, 2:3].float()
        y_soft = lam * y_soft + (1 - lam) * F.one_hot(lab[:, 1].long(), num_classes).float()
        return xm, y_soft
    if training.mixup_alpha > 0:
        a = torch.tensor(float(training.mixup_alpha))
        lam = float(torch.distributions.Beta(a, a).sample())
        perm = torch.randperm(len(x), device="cpu").to(x.device)
        return lam * x + (1 - lam) * x[perm], lam * y_soft + (1 - lam) * y_soft[perm]
    return x, y_soft


def _make_optimizer(params, training: TrainingConfig):
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)


def make_scheduler(opt, training: TrainingConfig, total: int):
    """torch LR scheduler stepped once per optimisation step: OneCycleLR (pct_start 0.15), cosine =
    LinearLR warmup over ``warmup_frac`` of the steps then CosineAnnealingLR to 0 (Diff-II), or constant."""
    S = torch.optim.lr_scheduler
    if training.schedule == "onecycle":
        return S.OneCycleLR(opt, max_lr=training.lr, total_steps=total, pct_start=0.15)
    if training.schedule == "constant":
        return S.ConstantLR(opt, factor=1.0, total_iters=0)
    warm = int(round(training.warmup_frac * total))
    if warm < 1:
        return S.CosineAnnealingLR(opt, T_max=max(1, total))
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm),
                                S.CosineAnnealingLR(opt, T_max=max(1, total - warm))], milestones=[warm])


def train_classifier(real_x: torch.Tensor, real_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                     num_classes: int, training: TrainingConfig, classifier: ClassifierModelConfig, *,
                     seed: int = 0, device: str = "auto", synth_x: torch.Tensor | None = None,
                     synth_y: torch.Tensor | None = None, groups=None, syn_weights=None, alpha: float = 0.0,
                     select_on: str = "val_acc", patience: int | None = None, cache_features: bool = True,
                     cache_root: str | None = None, progress: bool = False, model: nn.Module | None = None,
                     features: tuple | None = None) -> TrainResult:
    """Train a ``classifier`` (``models.classifier``: source, pretrained, freeze_backbone) with the settings of
    ``training`` (recipe applied here; idempotent) for ``epochs`` × steps-per-epoch batches (``steps_per_epoch``, or one pass over the real images with ``epoch_unit: data``)
    drawn by :class:`MixingSampler` (class-balanced or uniform real draws; with probability ``alpha`` a synthetic
    of the drawn image's group), with ``optimizer``, the per-step LR schedule ``schedule`` and the online transform
    ``train_aug``. The backbone is frozen when the recipe's ``linear_probe`` (else ``freeze_backbone``) says so.
    A frozen backbone with no random transform and no CutMix/MixUp trains the head on features encoded once
    (``cache_features``). ``select_on``/``patience``: best epoch by val accuracy or val loss, optional early stopping.
    ``features`` = (real [N, D], synthetic [S, D] or None, val [V, D]): precomputed backbone features of the
    same images (e.g. from the store), used on that feature-cached path instead of encoding here.
    ``cache_root``: transformers cache folder of a hub-id backbone; ``model``: a prebuilt model to train.

    ``groups`` defaults to the class pool (every synthetic of the same class) when synthetics are given.
    The returned model holds the weights of the best validation epoch (accuracy, ties -> lower val loss),
    on the CPU. Seeded: identical inputs + settings give identical weights on CPU; the caller's global RNG
    state is left untouched."""
    training = resolve_training(training)
    if select_on not in SELECT_ON:
        raise ValueError(f"unknown select_on {select_on!r}; valid: {', '.join(SELECT_ON)}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 (or None), got {patience}")
    steps_per_epoch = steps_per_epoch_for(training, len(real_x))
    real_y = torch.as_tensor(real_y).long().reshape(-1)
    val_y = torch.as_tensor(val_y).long().reshape(-1)
    if len(real_x) != len(real_y) or len(real_x) == 0:
        raise ValueError(f"need >= 1 real image and one label per image (got {len(real_x)} images, {len(real_y)} labels)")
    if len(val_x) != len(val_y):
        raise ValueError(f"val images/labels differ in length ({len(val_x)} vs {len(val_y)})")
    use_syn = synth_x is not None and len(synth_x) > 0 and alpha > 0
    if use_syn:
        if synth_y is None or len(synth_y) != len(synth_x):
            raise ValueError("synth_y must give one label per synthetic image")
        synth_y = torch.as_tensor(synth_y).long().reshape(-1)
        if groups is None:
            sy = synth_y.numpy()
            groups = [np.nonzero(sy == int(c))[0] for c in real_y.numpy()]
        if syn_weights is None:
            syn_weights = np.ones(len(synth_x))
        if len(syn_weights) != len(synth_x):
            raise ValueError(f"{len(syn_weights)} synthetic weights for {len(synth_x)} synthetic images")
    sampler = MixingSampler(real_y.numpy(), groups if use_syn else None, syn_weights if use_syn else None,
                            alpha if use_syn else 0.0, seed=seed, class_balanced=training.class_balanced)

    dev = torch.device(pick_device(device))
    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = (model if model is not None else build_classifier(classifier.source, num_classes, freeze_for(training, classifier),
                                                                           cache_root, classifier.pretrained)).to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        opt = _make_optimizer(params, training)
        total = training.epochs * steps_per_epoch
        sched = make_scheduler(opt, training, total)
        aug = build_train_transform(training.train_aug, tuple(real_x.shape[-2:]))
        if aug is not None:
            aug = aug.to(dev)
        syn_aug = build_train_transform(training.synthetic_aug, tuple(real_x.shape[-2:])) if use_syn else None
        if syn_aug is not None:
            syn_aug = syn_aug.to(dev)
        # linear probe with a deterministic input pipeline: encode every image once, train the head on features
        cached = bool(cache_features and getattr(model, "freeze_backbone", False) and aug is None and syn_aug is None
                      and training.cutmix_prob == 0 and training.mixup_alpha == 0)
        if cached and features is not None:
            f_r, f_s, f_v = features
            if len(f_r) != len(real_x) or len(f_v) != len(val_x) or (use_syn and len(f_s) != len(synth_x)):
                raise ValueError("precomputed features must have one row per real / synthetic / val image")
            rx = f_r.float().to(dev)
            sx = f_s.float().to(dev) if use_syn else None
            vf = f_v.float() if len(val_y) else None
        elif cached:
            rx = extract_features(model, real_x.float()).to(dev)
            sx = extract_features(model, synth_x.float()).to(dev) if use_syn else None
            vf = extract_features(model, val_x.float()) if len(val_y) else None
        if cached:
            step_model = model.head
        else:
            rx = real_x.float().to(dev)
            sx = synth_x.float().to(dev) if use_syn else None
            step_model = model
        ry = real_y.to(dev)
        sy = synth_y.to(dev) if use_syn else None
        vx, vy = val_x.float(), val_y

        best_acc, best_loss, best_epoch, best_state = -1.0, float("inf"), 0, None
        history: list[dict] = []
        lr_curve: list[float] = []
        n_real = n_syn = 0
        since_best, stopped = 0, False
        from ..progress import progress_bar

        bar = progress_bar(training.epochs * steps_per_epoch, "steps", desc="classifier training")
        for epoch in range(training.epochs):
            model.train()
            tot, syn_this = 0.0, 0
            for _ in range(steps_per_epoch):
                is_syn, idx = sampler.draw(training.batch_size)
                r_idx = torch.from_numpy(np.where(is_syn, 0, idx)).to(dev)
                xs, ys = rx[r_idx], ry[r_idx]  # advanced indexing copies
                if is_syn.any():
                    m = torch.from_numpy(is_syn).to(dev)
                    s_idx = torch.from_numpy(idx[is_syn]).to(dev)
                    xs[m] = sx[s_idx]
                    ys[m] = sy[s_idx]
                k_syn = int(is_syn.sum())
                n_syn += k_syn
                syn_this += k_syn
                n_real += training.batch_size - k_syn
                if aug is not None:
                    with torch.no_grad():
                        xs = aug(xs).reshape(xs.shape).clamp(0.0, 1.0)
                if syn_aug is not None and k_syn:  # SGID + RA: RandAugment on the synthetic images only
                    with torch.no_grad():
                        m = torch.from_numpy(is_syn).to(dev)
                        xs[m] = syn_aug(xs[m]).reshape(xs[m].shape).clamp(0.0, 1.0)
                if cached:
                    y_soft = F.one_hot(ys, num_classes).float()
                else:
                    xs, y_soft = _mix(xs, ys, num_classes, training)
                if training.label_smoothing > 0:
                    y_soft = y_soft * (1 - training.label_smoothing) + training.label_smoothing / num_classes
                logits = step_model(xs)
                loss = torch.sum(-y_soft * F.log_softmax(logits.float(), dim=1), dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr_curve.append(float(opt.param_groups[0]["lr"]))
                opt.step()
                sched.step()
                tot += float(loss.detach())
                bar.update(1)
            if len(vy):
                if cached:
                    with torch.no_grad():
                        vl = model.head(vf.to(dev)).float().cpu()
                else:
                    vl = predict_logits(model, vx)
                val_acc = float((vl.argmax(1) == vy).float().mean())
                val_loss = float(F.cross_entropy(vl, vy))
            else:
                val_acc, val_loss = float("nan"), float("nan")
            history.append({"epoch": epoch, "train_loss": tot / steps_per_epoch, "val_acc": val_acc,
                            "val_loss": val_loss, "n_synthetic_drawn": syn_this})
            if progress:
                log.info("epoch %d/%d train_loss %.4f val_acc %.4f val_loss %.4f synthetic %d", epoch + 1, training.epochs,
                         tot / steps_per_epoch, val_acc, val_loss, syn_this)
            # best epoch on validation accuracy (ties: lower val loss) or on val loss; weights deep-copied
            # (METHODS §8). Without a validation split, the last epoch is kept.
            if select_on == "val_loss":
                better = (not len(vy)) or val_loss < best_loss
            else:
                better = (not len(vy)) or val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss)
            if best_state is None or better:
                best_acc, best_loss, best_epoch = val_acc, val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
                since_best = 0
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    stopped = True
                    break
        bar.close()
        model.load_state_dict(best_state)
    model = model.cpu().eval()
    return TrainResult(model, history, best_epoch, best_acc, n_real, n_syn, type(opt).__name__, lr_curve, stopped, cached)
