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
    """Resolves image ids to PIL images: real ones from the dataset tree, synthetic ones from blobs.

    Decoded real images are kept in a small LRU (``cache_size`` images: a generation batch's guides are decoded
    once), not for the whole dataset: memory stays bounded by the batch, not by the number of classes/images."""

    def __init__(self, dataset_root: str | Path, images: pd.DataFrame, blobs: BlobStore, max_pixels: int = 40_000_000,
                 cache_size: int = 256):
        from collections import OrderedDict

        self.root = Path(dataset_root)
        self.paths = dict(zip(images["image_id"], images["path"]))
        self.blobs = blobs
        self.max_pixels = max_pixels
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def real(self, image_id: str):
        im = self._cache.get(image_id)
        if im is not None:
            self._cache.move_to_end(image_id)
            return im
        if image_id not in self.paths:
            raise KeyError(f"real image {image_id} is not in the raw_images manifest; rematerialize raw_images")
        p = self.root / self.paths[image_id]
        im = self._cache[image_id] = decode_image(p.read_bytes(), str(p), self.max_pixels)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return im

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


def map_image_batches(fn, items: list, load, size: int, batch_size: int = 256):
    """``fn(to_tensor(images of a chunk))`` over chunks of ``batch_size`` items, outputs concatenated: only one
    chunk's pixels are in memory at a time (not the whole set's). With ``fn`` = ``predict_logits`` /
    ``extract_features`` (which run in chunks of 256 themselves) the result is the same as on the whole tensor."""
    import torch

    outs = [fn(to_tensor([load(x) for x in items[i:i + batch_size]], size)) for i in range(0, len(items), batch_size)]
    return torch.cat(outs) if outs else None


def label_index(class_names: list[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(class_names)}
