"""Imagefolder loader for user data: ``root/<class>/*`` is the train pool; optional ``root/test/<class>/*``
(in-distribution test set) and ``root/ood/<class>/*`` (out-of-distribution test set).

Every file is read once: its id is the sha256 of its bytes. Images are checked before decoding
(header only) so that a huge image is refused instead of exhausting memory. Grayscale, palette,
16-bit and RGBA images are converted to RGB. Unreadable, truncated, zero-byte and non-image files
raise ``BadImageError`` naming the file, or are skipped and reported when ``on_bad_file='skip'``.
"""
from __future__ import annotations

import io
import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from ..errors import UserError
from ..util import sha256_bytes

RESERVED = {"test", "ood"}


class BadImageError(UserError, ValueError):
    pass


class DatasetError(UserError, ValueError):
    pass


def check_class_name(name: str, where: str = "") -> str:
    """Class names become folder names, tokens and prompt text: refuse anything unsafe."""
    norm = unicodedata.normalize("NFC", name)
    bad = (
        not norm.strip()
        or norm in (".", "..")
        or norm.startswith(".")
        or "/" in norm
        or "\\" in norm
        or any(unicodedata.category(ch).startswith("C") for ch in norm)
        or len(norm) > 100
    )
    if bad:
        raise DatasetError(
            f"unsafe class name {name!r}{' in ' + where if where else ''}: class names must be non-empty, "
            "at most 100 characters, not start with '.', and contain no '/', '\\' or control characters; rename the folder"
        )
    return norm


def decode_image(data: bytes, name: str, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode bytes to an RGB PIL image or raise BadImageError naming ``name``."""
    if not data:
        raise BadImageError(f"{name}: zero-byte file; delete it or replace it with an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImageError(
                    f"{name}: image is {w}x{h} = {w * h} pixels, over dataset.max_image_pixels={max_pixels}; "
                    "downscale it or raise the limit"
                )
            im.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{name}: image is too large to decode safely ({e}); it is over "
                            f"dataset.max_image_pixels={max_pixels}: downscale it") from None
    except Exception as e:  # PIL raises many types for broken files
        raise BadImageError(f"{name}: not a readable image ({type(e).__name__}: {e}); fix or remove the file") from None
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        im = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


@dataclass
class ScanResult:
    images: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)


def _iter_class_dirs(base: Path):
    for d in sorted(base.iterdir(), key=lambda p: p.name):
        if d.is_dir() and not d.name.startswith("."):
            yield d


def scan_imagefolder(root: str | os.PathLike, on_bad_file: str = "error", max_pixels: int = 40_000_000,
                     check_decode: bool = True) -> ScanResult:
    """List every image of the tree with its content id; validate each (header + decode)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder (dataset.source)")
    rows, skipped = [], []
    pools = [("train", root)] + [(p, root / p) for p in ("test", "ood") if (root / p).is_dir()]
    for pool, base in pools:
        for cdir in _iter_class_dirs(base):
            if pool == "train" and cdir.name in RESERVED:
                continue
            label = check_class_name(cdir.name, str(cdir))
            files = sorted(f for f in cdir.rglob("*") if f.is_file() and not f.name.startswith("."))
            for f in files:
                rel = f.relative_to(root).as_posix()
                data = f.read_bytes()
                try:
                    if check_decode:
                        im = decode_image(data, str(f), max_pixels)
                        w, h = im.size
                    else:
                        w = h = None
                except BadImageError as e:
                    if on_bad_file == "skip":
                        skipped.append({"path": rel, "reason": str(e)})
                        continue
                    raise
                rows.append(dict(image_id=sha256_bytes(data), label=label, pool=pool, path=rel,
                                 bytes=len(data), width=w, height=h))
    df = pd.DataFrame(rows, columns=["image_id", "label", "pool", "path", "bytes", "width", "height"])
    train_labels = sorted(df.loc[df.pool == "train", "label"].unique()) if len(df) else []
    if not train_labels:
        raise DatasetError(f"dataset root {root} has no class folders with images (expected root/<class>/*.png)")
    empty = [d.name for d in _iter_class_dirs(root) if d.name not in RESERVED and d.name not in train_labels]
    if empty:
        raise DatasetError(f"class folder(s) {empty} under {root} contain no usable images; add images or remove the folder")
    return ScanResult(df, skipped)


def load_image(root: str | os.PathLike, rel_path: str, max_pixels: int = 40_000_000) -> Image.Image:
    p = Path(root) / rel_path
    return decode_image(p.read_bytes(), str(p), max_pixels)
