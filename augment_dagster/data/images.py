"""Image access for the stages: real images by id from the dataset tree, synthetic ones from the store, and
PIL -> tensor conversion (no Dagster; torch imported inside functions)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store import BlobStore
from ..store.tensors import tensor_from_bytes
from .imagefolder import decode_image


class ImageSource:
    """Resolves image ids to PIL images: real ones from the dataset tree, synthetic ones from blobs."""

    def __init__(self, dataset_root: str | Path, images: pd.DataFrame, blobs: BlobStore, max_pixels: int = 40_000_000):
        self.root = Path(dataset_root)
        self.paths = dict(zip(images["image_id"], images["path"]))
        self.blobs = blobs
        self.max_pixels = max_pixels
        self._cache: dict[str, Any] = {}

    def real(self, image_id: str):
        if image_id not in self._cache:
            if image_id not in self.paths:
                raise KeyError(f"real image {image_id} is not in the raw_images manifest; rematerialize raw_images")
            p = self.root / self.paths[image_id]
            self._cache[image_id] = decode_image(p.read_bytes(), str(p), self.max_pixels)
        return self._cache[image_id]

    def synthetic(self, blob: str):
        return decode_image(self.blobs.get(blob), f"blob {blob}")

    def tensor(self, blob: str):
        return tensor_from_bytes(self.blobs.get(blob))


def to_tensor(images: list, size: int):
    """PIL images -> float tensor [N,3,size,size] in [0,1] (bilinear resize)."""
    import torch
    from PIL import Image

    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def label_index(class_names: list[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(class_names)}
