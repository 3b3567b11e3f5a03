"""Imagefolder loader for user data: ``root/<class>/*`` is the train pool; optional ``root/test/<class>/*``
(in-distribution test set) and ``root/ood/<class>/*`` (out-of-distribution test set).

Every file is read once: its id is the sha256 of its bytes (``content_id``). Images are checked before decoding
(header only) so that a huge image is refused instead of exhausting memory. Grayscale, palette,
16-bit and RGBA images are converted to RGB. Unreadable, truncated, zero-byte and non-image files
raise ``BadImageError`` naming the file, or are skipped and reported when ``on_bad_file='skip'``.

Ingestion hygiene (every bad file of the tree is listed, up to 20, then a count):

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``) whenever an image is decoded; the row records
  ``exif_transposed``.
* Images narrower or lower than ``min_size`` px (``dataset.min_image_size``, default 8) and multi-frame images
  (animated GIF/WebP/APNG, multi-page TIFF) are bad files.
* File names are read as the file system gives them; a name that is not valid UTF-8 (a Latin-1 name on a
  UTF-8 system) cannot be stored in the manifests and is a bad file named with its bytes escaped
  (``caf\\xe9.png``); a class folder with such a name is refused by name. Unreadable files (permissions) are
  bad files too.
"""
from __future__ import annotations

import io
import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

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
    """Decode bytes to an RGB PIL image (EXIF orientation applied) or raise BadImageError naming ``name``."""
    return open_image(data, name, max_pixels)[0]


def open_image(data: bytes, name: str, max_pixels: int = 40_000_000) -> tuple[Image.Image, dict]:
    """Decode bytes to an RGB image with EXIF orientation applied; also return ``{'frames', 'exif_orientation'}``."""
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
            frames = int(getattr(im, "n_frames", 1) or 1)
            try:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block: use the pixels as stored
                orientation = 1
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{name}: image is too large to decode safely ({e}); it is over "
                            f"dataset.max_image_pixels={max_pixels}: downscale it") from None
    except Exception as e:  # PIL raises many types for broken files
        raise BadImageError(f"{name}: not a readable image ({type(e).__name__}: {e}); fix or remove the file") from None
    return to_rgb(im), {"frames": frames, "exif_orientation": orientation}


def content_id(data: bytes, info: dict | None = None) -> str:
    """The image's id: sha256 of its bytes; for a photo whose EXIF orientation is applied, the hash of that and the
    orientation (the pixels used differ from those of the same bytes read before orientation was applied, so memo
    entries made from unrotated pixels are never reused)."""
    digest = sha256_bytes(data)
    if info and info.get("exif_orientation", 1) != 1:
        from ..util import hash_obj

        return hash_obj("exif_transposed", digest, int(info["exif_orientation"]))
    return digest


def check_image(im: Image.Image, info: dict, name: str, min_size: int) -> None:
    """Refuse images below ``min_size`` px and multi-frame images (BadImageError naming ``name``)."""
    w, h = im.size
    if w < min_size or h < min_size:
        raise BadImageError(f"{name}: image is {w}x{h} px, below dataset.min_image_size={min_size}; remove it or "
                            "lower dataset.min_image_size")
    if info.get("frames", 1) > 1:
        raise BadImageError(f"{name}: image has {info['frames']} frames (animated); only the first would be used: "
                            "save the frame you want as a PNG, or remove the file")


def printable(name: str) -> str:
    """A file name as text, with bytes that are not UTF-8 escaped (``caf\\xe9.png``)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_ok(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def bad_files_error(bad: list[dict], where: str, limit: int = 20) -> BadImageError:
    """One error listing every bad file (up to ``limit``, then a count)."""
    if len(bad) == 1:
        return BadImageError(bad[0]["reason"])
    prefix = where.rstrip("/") + "/"
    # each file's reason without the tree's path and without its advice (the error's hint says what to do)
    shown = "; ".join(b["reason"].replace(prefix, "").replace(where + " ", "").split("; ")[0] for b in bad[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return BadImageError(f"{len(bad)} bad image files in {where}: {shown}{more}")


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
    duplicates: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


COLUMNS = ["image_id", "label", "pool", "path", "bytes", "width", "height", "exif_transposed"]


def _iter_class_dirs(base: Path):
    for d in sorted(base.iterdir(), key=lambda p: p.name):
        if d.is_dir() and not d.name.startswith("."):
            yield d


def scan_imagefolder(root: str | os.PathLike, on_bad_file: str = "error", max_pixels: int = 40_000_000,
                     check_decode: bool = True, min_size: int = 8) -> ScanResult:
    """List every image of the tree with its content id; validate each (header + decode + size + frames).
    Every bad file is collected; with ``on_bad_file='error'`` one BadImageError lists them all."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder (dataset.source)")
    rows, skipped = [], []
    pools = [("train", root)] + [(p, root / p) for p in ("test", "ood") if (root / p).is_dir()]
    for pool, base in pools:
        for cdir in _iter_class_dirs(base):
            if pool == "train" and cdir.name in RESERVED:
                continue
            if not utf8_ok(cdir.name):
                msg = (f"class folder {printable(str(cdir))}: its name is not valid UTF-8; rename it "
                       "(e.g. `convmv -f latin1 -t utf8 -r --notest <folder>`)")
                if on_bad_file == "skip":
                    skipped.append({"path": printable(cdir.relative_to(root).as_posix()), "reason": msg})
                    continue
                raise DatasetError(msg)
            label = check_class_name(cdir.name, str(cdir))
            try:
                files = sorted(f for f in cdir.rglob("*") if f.is_file() and not f.name.startswith("."))
            except OSError as e:
                raise DatasetError(f"cannot list class folder {cdir} ({e.strerror or e}); check its permissions") from None
            for f in files:
                rel = f.relative_to(root).as_posix()
                try:
                    if not utf8_ok(rel):
                        raise BadImageError(f"{printable(str(f))}: file name is not valid UTF-8; rename the file "
                                            "(e.g. `convmv -f latin1 -t utf8 --notest <file>`)")
                    try:
                        data = f.read_bytes()
                    except OSError as e:
                        raise BadImageError(f"{f}: cannot read the file ({e.strerror or e}); check its permissions") from None
                    transposed, info = False, None
                    if check_decode:
                        im, info = open_image(data, str(f), max_pixels)
                        check_image(im, info, str(f), min_size)
                        w, h = im.size
                        transposed = info["exif_orientation"] != 1
                    else:
                        w = h = None
                except BadImageError as e:
                    skipped.append({"path": printable(rel), "reason": str(e)})
                    continue
                rows.append(dict(image_id=content_id(data, info), label=label, pool=pool, path=rel,
                                 bytes=len(data), width=w, height=h, exif_transposed=transposed))
    if skipped and on_bad_file != "skip":
        raise bad_files_error(skipped, str(root))
    df = pd.DataFrame(rows, columns=COLUMNS)
    train_labels = sorted(df.loc[df.pool == "train", "label"].unique()) if len(df) else []
    if not train_labels:
        raise DatasetError(f"dataset root {root} has no class folders with images (expected root/<class>/*.png)")
    empty = [d.name for d in _iter_class_dirs(root) if d.name not in RESERVED and d.name not in train_labels
             and utf8_ok(d.name)]
    if empty:
        raise DatasetError(f"class folder(s) {empty} under {root} contain no usable images; add images or remove the folder")
    notes = []
    n_t = int(df["exif_transposed"].sum())
    if n_t:
        notes.append(f"EXIF orientation applied to {n_t} image(s), e.g. {df.loc[df.exif_transposed, 'path'].iloc[0]}")
    return ScanResult(df, skipped, notes=notes)


def load_image(root: str | os.PathLike, rel_path: str, max_pixels: int = 40_000_000) -> Image.Image:
    p = Path(root) / rel_path
    return decode_image(p.read_bytes(), str(p), max_pixels)
