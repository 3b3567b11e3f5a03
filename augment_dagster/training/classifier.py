"""Downstream classifier: a tiny CNN by default, or any transformers vision backbone (ResNet, ViT, DINOv2,
CLIP vision; hub id or local folder) with a linear head, linear-probe (``freeze_backbone``) or full fine-tuning.

Batches are drawn by the α-mixing sampler (real with 1−α, synthetic ∝ weight within the real image's
group); weak train augmentation (kornia), optional CutMix/MixUp; the best epoch is chosen on the
*validation* split and deep-copied (never the test set, METHODS §8)."""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..util import pick_device
from .sampler import MixingSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyCNN(nn.Module):
    """3 blocks × 2 conv (32/64/128 ch) + BatchNorm + ReLU + maxpool, global average pool, linear head."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, width * 2, width * 4):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, x):
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x):
        return self.head(self.features(x))


class HFBackboneClassifier(nn.Module):
    """transformers ``AutoModel`` backbone + linear head; inputs in [0,1] are resized and ImageNet-normalised."""

    def __init__(self, source: str, num_classes: int, freeze_backbone: bool = False, backbone=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.source = source
        if backbone is None:
            cfg = AutoConfig.from_pretrained(source)
            if getattr(cfg, "model_type", "") == "clip":  # use the vision tower of a CLIP checkpoint
                from transformers import CLIPVisionModel

                backbone = CLIPVisionModel.from_pretrained(source)
            else:
                backbone = AutoModel.from_pretrained(source)
        self.backbone = backbone
        c = backbone.config
        self.image_size = int(getattr(c, "image_size", 224) or 224)
        dim = getattr(c, "hidden_size", None) or (c.hidden_sizes[-1] if hasattr(c, "hidden_sizes") else None)
        if dim is None:
            raise ValueError(f"cannot infer the feature size of backbone {source}")
        self.head = nn.Linear(int(dim), num_classes)
        self.freeze_backbone = freeze_backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def features(self, x):
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if self.freeze_backbone:
            self.backbone.eval()
            with torch.no_grad():
                out = self.backbone(pixel_values=x)
        else:
            out = self.backbone(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return pooled.flatten(1)

    def forward(self, x):
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen: BatchNorm statistics must not drift (DA-Fusion bug, METHODS §8)
        return self


def build_classifier(backbone: str, num_classes: int, freeze_backbone: bool = False) -> nn.Module:
    if backbone == "tiny-cnn":
        return TinyCNN(num_classes)
    try:
        return HFBackboneClassifier(backbone, num_classes, freeze_backbone)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load models.classifier.source={backbone!r}: {type(e).__name__}: {str(e)[:200]}; "
                         "use 'tiny-cnn', a local folder or a reachable hub id") from None


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
    label_smoothing: float = 0.0
    train_aug: str = "weak"
    cutmix_prob: float = 0.0
    mixup_alpha: float = 0.0
    seed: int = 0
    device: str = "auto"


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = 0.0
    n_real_draws: int = 0
    n_syn_draws: int = 0


def _weak_aug(size: tuple[int, int]):
    import kornia.augmentation as K

    return K.AugmentationSequential(K.RandomResizedCrop(size, scale=(0.6, 1.0)), K.RandomHorizontalFlip())


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    dev = next(model.parameters()).device
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i:i + batch_size].to(dev)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256, normalize: bool = False) -> torch.Tensor:
    dev = next(model.parameters()).device
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model.features(x[i:i + batch_size].to(dev)).float().cpu())
    f = torch.cat(outs)
    return F.normalize(f, dim=1) if normalize else f


def _mix(x, y_soft, cfg: TrainConfig, gen: torch.Generator):
    """Batch-level CutMix (prob cutmix_prob, β=1) or MixUp (Beta(α, α)) with soft labels."""
    B = len(x)
    if cfg.cutmix_prob > 0 and torch.rand(1, generator=gen).item() < cfg.cutmix_prob:
        lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).beta(1.0, 1.0))
        perm = torch.randperm(B, generator=gen)
        H, W = x.shape[-2:]
        rh, rw = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
        cy, cx = int(torch.randint(0, H, (1,), generator=gen)), int(torch.randint(0, W, (1,), generator=gen))
        y0, y1, x0, x1 = max(cy - rh // 2, 0), min(cy + rh // 2, H), max(cx - rw // 2, 0), min(cx + rw // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
        return x, lam * y_soft + (1 - lam) * y_soft[perm]
    if cfg.mixup_alpha > 0:
        lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).beta(cfg.mixup_alpha, cfg.mixup_alpha))
        perm = torch.randperm(B, generator=gen)
        return lam * x + (1 - lam) * x[perm], lam * y_soft + (1 - lam) * y_soft[perm]
    return x, y_soft


def train_classifier(real_x, real_y, val_x, val_y, num_classes: int, cfg: TrainConfig, synth_x=None, synth_y=None,
                     groups=None, syn_weights=None, alpha: float = 0.0, progress: bool = False,
                     model: nn.Module | None = None) -> TrainResult:
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = (model or build_classifier(cfg.backbone, num_classes, cfg.freeze_backbone)).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay) if cfg.optimizer == "sgd"
           else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.15)
    use_syn = synth_x is not None and len(synth_x) > 0 and alpha > 0
    sampler = MixingSampler(real_y.numpy(), groups if use_syn else None, syn_weights if use_syn else None,
                            alpha if use_syn else 0.0, seed=cfg.seed)
    aug = _weak_aug(tuple(real_x.shape[-2:])) if cfg.train_aug == "weak" else None
    best = (-1.0, 0, None)
    history = []
    n_real = n_syn = 0
    for epoch in range(cfg.epochs):
        model.train()
        tot = 0.0
        syn_this = 0
        for _ in range(cfg.steps_per_epoch):
            is_syn, idx = sampler.draw(cfg.batch_size)
            xs = torch.empty((cfg.batch_size,) + tuple(real_x.shape[1:]))
            ys = torch.empty(cfg.batch_size, dtype=torch.long)
            r = ~is_syn
            xs[torch.from_numpy(r)] = real_x[idx[r]]
            ys[torch.from_numpy(r)] = real_y[idx[r]]
            if is_syn.any():
                xs[torch.from_numpy(is_syn)] = synth_x[idx[is_syn]]
                ys[torch.from_numpy(is_syn)] = synth_y[idx[is_syn]]
            n_syn += int(is_syn.sum())
            syn_this += int(is_syn.sum())
            n_real += int(r.sum())
            if aug is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
                    xs = aug(xs)
            y_soft = F.one_hot(ys, num_classes).float()
            xs, y_soft = _mix(xs, y_soft, cfg, gen)
            if cfg.label_smoothing > 0:
                y_soft = y_soft * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
            logits = model(xs.to(dev))
            loss = torch.sum(-y_soft.to(dev) * F.log_softmax(logits.float(), dim=1), dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
        vl = predict_logits(model, val_x)
        val_acc = float((vl.argmax(1) == val_y).float().mean()) if len(val_y) else 0.0
        val_loss = float(F.cross_entropy(vl, val_y)) if len(val_y) else 0.0
        history.append({"epoch": epoch, "train_loss": tot / cfg.steps_per_epoch, "val_acc": val_acc, "val_loss": val_loss,
                        "n_synthetic_drawn": syn_this})
        # best epoch on validation accuracy (ties: lower val loss), weights deep-copied
        if val_acc > best[0] or (val_acc == best[0] and best[2] is not None and val_loss < best[2][1]):
            best = (val_acc, epoch, (copy.deepcopy(model.state_dict()), val_loss))
    model.load_state_dict(best[2][0])
    model.eval()
    return TrainResult(model.cpu(), history, best[1], best[0], n_real, n_syn)


def save_classifier(model: nn.Module, meta: dict[str, Any]) -> bytes:
    m = dict(meta)
    if isinstance(model, TinyCNN):
        m.update(arch="tiny-cnn", num_classes=model.head.out_features)
    else:
        m.update(arch="hf", source=model.source, num_classes=model.head.out_features, freeze_backbone=model.freeze_backbone)
    buf = io.BytesIO()
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": m}, buf)
    return buf.getvalue()


def load_classifier(data: bytes) -> tuple[nn.Module, dict[str, Any]]:
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    meta = obj["meta"]
    if meta["arch"] == "tiny-cnn":
        model = TinyCNN(meta["num_classes"])
    else:
        model = HFBackboneClassifier(meta["source"], meta["num_classes"], meta.get("freeze_backbone", False))
    model.load_state_dict(obj["state_dict"])
    return model.eval(), meta
