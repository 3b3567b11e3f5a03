"""Image access for the stages: real images by id from the dataset tree, synthetic ones from the store, and
PIL -> tensor conversion (no Dagster; torch imported inside functions)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store import BlobStore
from ..store.tensors import tensor_from_bytes
from .imagefolder import decode_image


class ImageSource:
    """Resolves image ids to PIL images: real ones from the dataset tree (or, for ``hf:`` sources, single rows of
    the Hugging Face dataset, read by index), synthetic ones from blobs. At most ``cache_size`` decoded real
    images are kept (least recently used dropped), so a large test set is never held in memory at once."""

    def __init__(self, dataset_root: str | Path, images: pd.DataFrame, blobs: BlobStore, max_pixels: int = 40_000_000,
                 hf_image_column: str = "image", cache_size: int = 256):
        self.root = Path(dataset_root)
        self.paths = dict(zip(images["image_id"], images["path"]))
        self.blobs = blobs
        self.max_pixels = max_pixels
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.hf = None
        if "hf_row" in images.columns and str(dataset_root).startswith("hf:"):
            from .hf import HFReader

            hf = images.dropna(subset=["hf_row"])
            self.hf_rows = {i: (s, int(r)) for i, s, r in zip(hf["image_id"], hf["hf_split"], hf["hf_row"])}
            rev = hf["hf_revision"].iloc[0] if len(hf) else None
            self.hf = HFReader(str(dataset_root)[3:], rev or None, hf_image_column)

    def real_bytes(self, image_id: str) -> tuple[bytes, str]:
        """The stored bytes of a real image and a name for messages (file path, or the dataset row)."""
        if image_id not in self.paths:
            raise KeyError(f"real image {image_id} is not in the raw_images manifest; rematerialize raw_images")
        if self.hf is not None and image_id in self.hf_rows:
            split, row = self.hf_rows[image_id]
            return self.hf.read(split, row), f"hf:{self.hf.loc} split {split!r} row {row}"
        p = self.root / self.paths[image_id]
        return p.read_bytes(), str(p)

    def real(self, image_id: str):
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        data, name = self.real_bytes(image_id)
        im = decode_image(data, name, self.max_pixels)
        self._cache[image_id] = im
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
