"""Downstream classifier backbones: a tiny CNN (random init, or ``tiny-pretrained``: the shipped backbone) or
any transformers vision backbone (ResNet, ViT, DINOv2, CLIP vision; hub id or local folder) with a linear head,
linear-probe (``freeze_backbone``) or full fine-tuning; building one from ``models.classifier.source`` and
saving/loading a trained one. A frozen backbone runs in eval mode under no_grad, so its BatchNorm statistics
cannot drift (DA-Fusion bug, METHODS §8). The training loop is ``training/loop.py``.

Images are float tensors [N,3,H,W] in [0,1]."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
