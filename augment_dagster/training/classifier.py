"""Downstream classifier: a tiny CNN by default (random init, or ``tiny-pretrained``: the shipped backbone),
or any transformers vision backbone (ResNet, ViT, DINOv2, CLIP vision; hub id or local folder) with a linear
head, linear-probe (``freeze_backbone``) or full fine-tuning.

Batches are drawn by the α-mixing sampler (real with 1−α, synthetic ∝ weight within the real image's
group; DIAGen Eq. 2), an online train transform (kornia; TRAIN_AUGS), Adam/AdamW/SGD with a per-step
torch LR scheduler (onecycle, cosine with linear warmup, constant), optional CutMix/MixUp with soft-label CE; the best
epoch is chosen on the *validation* split and deep-copied (never the test set, METHODS §8). A frozen
backbone runs in eval mode under no_grad, so its BatchNorm statistics cannot drift (DA-Fusion bug, §8).

Images are float tensors [N,3,H,W] in [0,1]; labels LongTensor [N]."""
from __future__ import annotations

import copy
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..util import pick_device
from .sampler import MixingSampler

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# online train transforms (METHODS §1, §3, §4, §10):
#   none; crop = RRC(0.6–1) + HFlip (the project's recipe); weak = RRC(0.2–1) + HFlip (GeNIe);
#   dafusion = Resize + HFlip + Rot ±15° (DA-Fusion/DIAGen); pad_crop = RandomCrop with padding + HFlip (Diff-II;
#   pad 8 px at 224, scaled to the image size); strong (GeNIe); randaugment (N 2, M 9)
TRAIN_AUGS = ("none", "crop", "weak", "dafusion", "pad_crop", "strong", "randaugment")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
SELECT_ON = ("val_acc", "val_loss")
PRETRAINED_BACKBONE = "tiny-pretrained"
PRETRAINED_BACKBONE_FILE = Path(__file__).resolve().parent.parent / "builtin_models" / "tiny-backbone.pt"


class TinyCNN(nn.Module):
    """3 blocks × 2 conv 3×3 (32/64/128 ch) + BatchNorm + ReLU, maxpool after each block, global average
    pool, linear head. Inputs in [0,1] are ImageNet-normalised inside."""

    def __init__(self, num_classes: int, width: int = 32, freeze_backbone: bool = False):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, width * 2, width * 4):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_classes)
        self.width = width
        self.source = "tiny-cnn"
        self.freeze_backbone = bool(freeze_backbone)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [N, 4·width]."""
        x = (x.float() - self.mean) / self.std
        if self.freeze_backbone:
            self.backbone.eval()
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self


def _processor_image_size(source: str, cache_root: str | None) -> int | None:
    """The crop/resize size from the checkpoint's preprocessor_config.json, if it has one."""
    try:
        p = Path(source) / "preprocessor_config.json"
        if not p.is_file():
            from transformers.utils import cached_file

            found = cached_file(source, "preprocessor_config.json", cache_dir=cache_root,
                                _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            if not found:
                return None
            p = Path(found)
        cfg = json.loads(p.read_text())
    except Exception:  # noqa: BLE001 - optional metadata
        return None
    for key in ("crop_size", "size"):
        v = cfg.get(key)
        if isinstance(v, int):
            return v
        if isinstance(v, dict):
            for k in ("height", "shortest_edge"):
                if isinstance(v.get(k), int):
                    return v[k]
    return None


class HFBackboneClassifier(nn.Module):
    """transformers ``AutoModel`` backbone + linear head.

    Inputs in [0,1] are resized (bilinear) to the backbone's expected size — the checkpoint's
    preprocessor crop/size, else the config's ``image_size``, else 224 — and ImageNet-normalised.
    Features: ``pooler_output`` when the checkpoint has trained pooler weights, else the CLS token
    (transformers) or the spatial mean (conv nets) of ``last_hidden_state``. CLIP checkpoints use the
    vision tower only."""

    def __init__(self, source: str, num_classes: int, freeze_backbone: bool = False, cache_root: str | None = None,
                 image_size: int | None = None, backbone: nn.Module | None = None, pretrained: bool = True):
        super().__init__()
        self.source = str(source)
        self.cache_root = str(cache_root) if cache_root is not None else None
        self.use_pooler = True
        if backbone is None:
            backbone, self.use_pooler = self._load(self.source, self.cache_root, pretrained)
        self.backbone = backbone
        c = backbone.config
        self.image_size = int(image_size or _processor_image_size(self.source, self.cache_root)
                              or getattr(c, "image_size", None) or 224)
        self.freeze_backbone = bool(freeze_backbone)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        dim = getattr(c, "hidden_size", None)
        if not dim and getattr(c, "hidden_sizes", None):
            dim = c.hidden_sizes[-1]
        if not dim:  # fall back to a probe forward
            was = backbone.training
            backbone.eval()
            with torch.no_grad():
                dim = self._pool(backbone(pixel_values=torch.zeros(1, 3, self.image_size, self.image_size))).shape[1]
            backbone.train(was)
        self.feature_dim = int(dim)
        self.head = nn.Linear(self.feature_dim, num_classes)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    @staticmethod
    def _load(source: str, cache_root: str | None, pretrained: bool = True):
        from transformers import AutoConfig, AutoModel

        kw = {"cache_dir": cache_root} if cache_root else {}
        cfg = AutoConfig.from_pretrained(source, **kw)
        if not pretrained:  # the architecture only, random weights (trained from scratch)
            if getattr(cfg, "model_type", "") == "clip":
                from transformers import CLIPVisionModel

                return CLIPVisionModel(cfg.vision_config), True
            model = AutoModel.from_config(cfg)
            if hasattr(model, "vision_model") and hasattr(cfg, "vision_config"):
                model = model.vision_model
            return model, True
        if getattr(cfg, "model_type", "") == "clip":  # the vision tower of a CLIP checkpoint
            from transformers import CLIPVisionModel

            model, info = CLIPVisionModel.from_pretrained(source, output_loading_info=True, **kw)
        else:
            model, info = AutoModel.from_pretrained(source, output_loading_info=True, **kw)
            if hasattr(model, "vision_model") and hasattr(cfg, "vision_config"):  # SigLIP & co.
                model = model.vision_model
                if not hasattr(model, "config"):
                    model.config = cfg.vision_config
        missing = [k for k in (info or {}).get("missing_keys", []) if "pooler" in k]
        return model, not missing  # a randomly initialised pooler (ViTModel from a *ForImageClassification) is useless

    def _pool(self, out) -> torch.Tensor:
        pooled = getattr(out, "pooler_output", None) if self.use_pooler else None
        if pooled is None:
            h = out.last_hidden_state
            pooled = h.mean(dim=(2, 3)) if h.ndim == 4 else h[:, 0]
        return pooled.flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - self.mean) / self.std
        if self.freeze_backbone:
            self.backbone.eval()
            with torch.no_grad():
                return self._pool(self.backbone(pixel_values=x)).float()
        return self._pool(self.backbone(pixel_values=x)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen: BatchNorm statistics must not drift (DA-Fusion bug, METHODS §8)
        return self


def load_pretrained_backbone(path: str | Path | None = None) -> tuple[dict, dict]:
    """(backbone state_dict, meta) of the shipped ``tiny-pretrained`` TinyCNN backbone
    (``builtin_models/tiny-backbone.pt``, trained by ``scripts/train_tiny_models.py --stages backbone``)."""
    p = Path(path) if path is not None else PRETRAINED_BACKBONE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: the '{PRETRAINED_BACKBONE}' classifier source "
                                "(models.classifier.source) needs it; run `python scripts/train_tiny_models.py --stages backbone`")
    obj = torch.load(p, map_location="cpu", weights_only=False)
    return obj["state_dict"], obj["meta"]


def build_classifier(backbone: str, num_classes: int, freeze_backbone: bool = False, cache_root=None,
                     pretrained: bool = True) -> nn.Module:
    """'tiny-cnn' -> :class:`TinyCNN` (random init); 'tiny-pretrained' -> TinyCNN with the shipped backbone
    pretrained on the built-in ``pretrain`` pool (new head); anything else is a transformers checkpoint.
    ``pretrained=False``: the same architecture with random weights (trained from scratch)."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not pretrained and freeze_backbone:
        raise ValueError("a backbone with random weights (models.classifier.pretrained: false) cannot be frozen: "
                         "set training.linear_probe: false")
    if backbone == PRETRAINED_BACKBONE and pretrained:
        sd, meta = load_pretrained_backbone()
        model = TinyCNN(num_classes, width=int(meta["width"]), freeze_backbone=freeze_backbone)
        model.backbone.load_state_dict(sd)
        model.source = PRETRAINED_BACKBONE
        return model
    if backbone == PRETRAINED_BACKBONE:
        return TinyCNN(num_classes, width=int(load_pretrained_backbone()[1]["width"]), freeze_backbone=False)
    if backbone == "tiny-cnn" or backbone.startswith("tiny-cnn:"):
        # 'tiny-cnn' = width 16 (16/32/64 channels: trains in seconds on 2 CPU cores); 'tiny-cnn:<width>' for others
        width = int(backbone.split(":", 1)[1]) if ":" in backbone else 16
        return TinyCNN(num_classes, width=width, freeze_backbone=freeze_backbone)
    try:
        return HFBackboneClassifier(backbone, num_classes, freeze_backbone, cache_root=cache_root, pretrained=pretrained)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one actionable message
        raise ValueError(
            f"could not load classifier backbone {backbone!r} (config key models.classifier.source): "
            f"{type(e).__name__}: {str(e)[:300]}. Use 'tiny-cnn', a local transformers folder, or a hub id that is "
            "already in the cache (this machine may be offline)") from e


@dataclass
class TrainConfig:
    backbone: str = "tiny-cnn"
    freeze_backbone: bool = False
    epochs: int = 10
    steps_per_epoch: int = 50
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    optimizer: str = "adamw"
    momentum: float = 0.9  # sgd only
    schedule: str = "onecycle"  # onecycle | cosine (linear warmup per step, then cosine to 0) | constant
    warmup_frac: float = 0.1  # cosine: fraction of all steps spent in linear warmup
    label_smoothing: float = 0.0
    train_aug: str = "crop"
    synthetic_aug: str = "none"  # an extra transform on the synthetic images of a batch only (SGID + RA: randaugment)
    pretrained: bool = True  # False: the backbone's architecture with random weights (from scratch)
    cutmix_prob: float = 0.0
    mixup_alpha: float = 0.0
    class_balanced: bool = True  # real draws ∝ 1/class count (DIAGen) instead of uniform (DA-Fusion)
    select_on: str = "val_acc"  # best epoch by val accuracy (ties: lower loss) or by val loss
    patience: int | None = None  # early stopping: stop after this many epochs without a better val score
    cache_features: bool = True  # frozen backbone + no random transform: encode once, train the head on features
    seed: int = 0
    device: str = "auto"
    cache_root: str | None = None  # transformers cache folder for hub-id backbones

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.train_aug not in TRAIN_AUGS:
            raise ValueError(f"unknown train_aug {self.train_aug!r}; valid: {', '.join(TRAIN_AUGS)}")
        if self.synthetic_aug not in TRAIN_AUGS:
            raise ValueError(f"unknown synthetic_aug {self.synthetic_aug!r}; valid: {', '.join(TRAIN_AUGS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"unknown select_on {self.select_on!r}; valid: {', '.join(SELECT_ON)}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None), got {self.patience}")
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise ValueError("epochs, steps_per_epoch and batch_size must be >= 1")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ValueError(f"cutmix_prob must be in [0, 1], got {self.cutmix_prob}")
        if self.mixup_alpha < 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("mixup_alpha must be >= 0 and label_smoothing in [0, 1)")


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


def _mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level CutMix (probability ``cutmix_prob``, β=1, kornia RandomCutMixV2) or else MixUp
    (λ ~ Beta(α, α), convex pixel + label mix); returns images and soft labels [B, C]. Uses the (seeded)
    global torch RNG."""
    y_soft = F.one_hot(y, num_classes).float()
    if cfg.cutmix_prob > 0 and float(torch.rand(())) < cfg.cutmix_prob:
        from kornia.augmentation import RandomCutMixV2

        cut = RandomCutMixV2(num_mix=1, beta=1.0, p=1.0, data_keys=["input", "class"], use_correct_lambda=True)
        xm, lab = cut(x, y)
        lab = lab[0]  # [B, 3]: label, permuted label, λ = weight of the original label (1 − area)
        lam = lab[:, 2:3].float()
        y_soft = lam * y_soft + (1 - lam) * F.one_hot(lab[:, 1].long(), num_classes).float()
        return xm, y_soft
    if cfg.mixup_alpha > 0:
        a = torch.tensor(float(cfg.mixup_alpha))
        lam = float(torch.distributions.Beta(a, a).sample())
        perm = torch.randperm(len(x), device="cpu").to(x.device)
        return lam * x + (1 - lam) * x[perm], lam * y_soft + (1 - lam) * y_soft[perm]
    return x, y_soft


def _make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg: TrainConfig, total: int):
    """torch LR scheduler stepped once per optimisation step: OneCycleLR (pct_start 0.15), cosine =
    LinearLR warmup over ``warmup_frac`` of the steps then CosineAnnealingLR to 0 (Diff-II), or constant."""
    S = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        return S.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    if cfg.schedule == "constant":
        return S.ConstantLR(opt, factor=1.0, total_iters=0)
    warm = int(round(cfg.warmup_frac * total))
    if warm < 1:
        return S.CosineAnnealingLR(opt, T_max=max(1, total))
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm),
                                S.CosineAnnealingLR(opt, T_max=max(1, total - warm))], milestones=[warm])


def train_classifier(real_x: torch.Tensor, real_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                     num_classes: int, cfg: TrainConfig, synth_x: torch.Tensor | None = None,
                     synth_y: torch.Tensor | None = None, groups=None, syn_weights=None, alpha: float = 0.0,
                     progress: bool = False, model: nn.Module | None = None,
                     features: tuple | None = None) -> TrainResult:
    """Train for ``cfg.epochs`` × ``cfg.steps_per_epoch`` batches drawn by :class:`MixingSampler`
    (class-balanced or uniform real draws; with probability ``alpha`` a synthetic of the drawn image's group),
    with ``cfg.optimizer``, the per-step LR schedule ``cfg.schedule`` and the online transform ``cfg.train_aug``.
    A frozen backbone with no random transform and no CutMix/MixUp trains the head on features encoded once.
    ``select_on``/``patience``: best epoch by val accuracy or val loss, optional early stopping.
    ``features`` = (real [N, D], synthetic [S, D] or None, val [V, D]): precomputed backbone features of the
    same images (e.g. from the store), used on that feature-cached path instead of encoding here.

    ``groups`` defaults to the class pool (every synthetic of the same class) when synthetics are given.
    The returned model holds the weights of the best validation epoch (accuracy, ties -> lower val loss),
    on the CPU. Seeded: identical inputs + cfg give identical weights on CPU; the caller's global RNG
    state is left untouched."""
    cfg.validate()
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
                            alpha if use_syn else 0.0, seed=cfg.seed, class_balanced=cfg.class_balanced)

    dev = torch.device(pick_device(cfg.device))
    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        model = (model if model is not None else build_classifier(cfg.backbone, num_classes, cfg.freeze_backbone,
                                                                           cfg.cache_root, cfg.pretrained)).to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        opt = _make_optimizer(params, cfg)
        total = cfg.epochs * cfg.steps_per_epoch
        sched = make_scheduler(opt, cfg, total)
        aug = build_train_transform(cfg.train_aug, tuple(real_x.shape[-2:]))
        if aug is not None:
            aug = aug.to(dev)
        syn_aug = build_train_transform(cfg.synthetic_aug, tuple(real_x.shape[-2:])) if use_syn else None
        if syn_aug is not None:
            syn_aug = syn_aug.to(dev)
        # linear probe with a deterministic input pipeline: encode every image once, train the head on features
        cached = bool(cfg.cache_features and getattr(model, "freeze_backbone", False) and aug is None and syn_aug is None
                      and cfg.cutmix_prob == 0 and cfg.mixup_alpha == 0)
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

        bar = progress_bar(cfg.epochs * cfg.steps_per_epoch, "steps", desc="classifier training")
        for epoch in range(cfg.epochs):
            model.train()
            tot, syn_this = 0.0, 0
            for _ in range(cfg.steps_per_epoch):
                is_syn, idx = sampler.draw(cfg.batch_size)
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
                n_real += cfg.batch_size - k_syn
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
                    xs, y_soft = _mix(xs, ys, num_classes, cfg)
                if cfg.label_smoothing > 0:
                    y_soft = y_soft * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
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
            history.append({"epoch": epoch, "train_loss": tot / cfg.steps_per_epoch, "val_acc": val_acc,
                            "val_loss": val_loss, "n_synthetic_drawn": syn_this})
            if progress:
                log.info("epoch %d/%d train_loss %.4f val_acc %.4f val_loss %.4f synthetic %d", epoch + 1, cfg.epochs,
                         tot / cfg.steps_per_epoch, val_acc, val_loss, syn_this)
            # best epoch on validation accuracy (ties: lower val loss) or on val loss; weights deep-copied
            # (METHODS §8). Without a validation split, the last epoch is kept.
            if cfg.select_on == "val_loss":
                better = (not len(vy)) or val_loss < best_loss
            else:
                better = (not len(vy)) or val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss)
            if best_state is None or better:
                best_acc, best_loss, best_epoch = val_acc, val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
                since_best = 0
            else:
                since_best += 1
                if cfg.patience is not None and since_best >= cfg.patience:
                    stopped = True
                    break
        bar.close()
        model.load_state_dict(best_state)
    model = model.cpu().eval()
    return TrainResult(model, history, best_epoch, best_acc, n_real, n_syn, type(opt).__name__, lr_curve, stopped, cached)


def classifier_meta(model: nn.Module) -> dict[str, Any]:
    """What :func:`load_classifier` needs to rebuild ``model``."""
    if isinstance(model, TinyCNN):
        return {"arch": "tiny-cnn", "backbone": getattr(model, "source", "tiny-cnn"), "num_classes": model.head.out_features,
                "width": model.width, "freeze_backbone": model.freeze_backbone}
    if isinstance(model, HFBackboneClassifier):
        return {"arch": "hf", "backbone": model.source, "source": model.source, "num_classes": model.head.out_features,
                "freeze_backbone": model.freeze_backbone, "cache_root": model.cache_root,
                "model_image_size": model.image_size, "use_pooler": model.use_pooler}
    raise TypeError(f"cannot serialise a {type(model).__name__}")


def save_classifier(model: nn.Module, meta: dict[str, Any]) -> bytes:
    """torch.save bytes of {"state_dict", "meta"}; meta = the caller's meta + the architecture fields."""
    m = {**dict(meta), **classifier_meta(model)}
    buf = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": m}, buf)
    return buf.getvalue()


def load_classifier(data: bytes, cache_root: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Inverse of :func:`save_classifier` -> (model in eval mode on the CPU, meta). An HF backbone is
    rebuilt from its source (architecture/config) and then overwritten with the saved weights."""
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    meta = obj["meta"]
    if meta["arch"] == "tiny-cnn":
        model: nn.Module = TinyCNN(meta["num_classes"], width=meta.get("width", 32),
                                   freeze_backbone=meta.get("freeze_backbone", False))
        model.source = meta.get("backbone", "tiny-cnn")
    else:
        try:
            model = HFBackboneClassifier(meta["source"], meta["num_classes"], meta.get("freeze_backbone", False),
                                         cache_root=cache_root or meta.get("cache_root"),
                                         image_size=meta.get("model_image_size"))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"could not rebuild classifier backbone {meta['source']!r} (models.classifier.source): "
                             f"{type(e).__name__}: {str(e)[:300]}") from e
        model.use_pooler = meta.get("use_pooler", model.use_pooler)
    model.load_state_dict(obj["state_dict"])
    return model.eval(), meta


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
