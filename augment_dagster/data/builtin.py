"""The built-in generated dataset: coloured shapes on textured backgrounds.

Six object classes (circle, square, triangle, star, cross, ring) with varied colour, size, rotation
and position. The train pool and the in-distribution test set use the *common* backgrounds
(plain, striped, checkered); the OOD "uncommon settings" set uses backgrounds never seen in the
train pool (dotted, gradient, noise) and night-time dimming. Every image is a pure function of
(seed, pool, class, index), so the tree is identical on every machine.

``render`` also returns the attributes it drew, from which ``caption`` builds texts such as
"a red star on a striped background" (used to train the tiny models of the embedded default).
"""
from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from ..util import hash_obj, png_bytes

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245),
}
COMMON_TEXTURES = ("plain", "striped", "checkered")
UNCOMMON_TEXTURES = ("dotted", "gradient", "noise")
MUTED = [(90, 90, 100), (120, 110, 90), (70, 100, 110), (110, 80, 80), (80, 110, 80), (150, 150, 150), (40, 40, 50)]
SCALE = 4  # draw at 4x, downsample with LANCZOS


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    texture: str
    time: str  # "day" | "night"
    size: float
    angle: float


def _jitter(rgb, rng: random.Random, amount: int = 20):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(draw: ImageDraw.ImageDraw, img: Image.Image, texture: str, rng: random.Random) -> None:
    w, h = img.size
    c1, c2 = rng.sample(MUTED, 2)
    if texture == "plain":
        draw.rectangle([0, 0, w, h], fill=c1)
    elif texture == "striped":
        period = rng.randint(6, 12) * SCALE // 2
        draw.rectangle([0, 0, w, h], fill=c1)
        vertical = rng.random() < 0.5
        for k in range(0, max(w, h), period * 2):
            box = [k, 0, k + period, h] if vertical else [0, k, w, k + period]
            draw.rectangle(box, fill=c2)
    elif texture == "checkered":
        cell = rng.randint(4, 8) * SCALE
        for i in range(0, w, cell):
            for j in range(0, h, cell):
                draw.rectangle([i, j, i + cell, j + cell], fill=c1 if ((i // cell + j // cell) % 2 == 0) else c2)
    elif texture == "dotted":
        draw.rectangle([0, 0, w, h], fill=c1)
        step = rng.randint(5, 8) * SCALE
        r = step // 4
        for i in range(step // 2, w, step):
            for j in range(step // 2, h, step):
                draw.ellipse([i - r, j - r, i + r, j + r], fill=c2)
    elif texture == "gradient":
        for j in range(h):
            t = j / max(1, h - 1)
            draw.line([0, j, w, j], fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(c1, c2)))
    elif texture == "noise":
        cell = 2 * SCALE
        for i in range(0, w, cell):
            for j in range(0, h, cell):
                v = rng.randint(40, 200)
                draw.rectangle([i, j, i + cell, j + cell], fill=(v, v, v))
    else:
        raise ValueError(f"unknown texture {texture!r}")


def _polygon(cx, cy, r, n, angle, inner=None):
    pts = []
    k = n * (2 if inner else 1)
    for i in range(k):
        rad = r if (inner is None or i % 2 == 0) else inner
        a = angle + 2 * math.pi * i / k - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, angle, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ri = r * 0.55
        # punch the hole with the pixels underneath is hard in PIL: draw a darker inner disc
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=(20, 20, 20))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, angle), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.15, 3, angle), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.15, 5, angle, inner=r * 0.45), fill=fill)
    elif shape == "cross":
        t = r * 0.36
        c, s = math.cos(angle), math.sin(angle)
        for (w, h) in ((r, t), (t, r)):
            pts = [(-w, -h), (w, -h), (w, h), (-w, h)]
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; built-in shapes are {SHAPES}")


def render(shape: str, rng: random.Random, size: int = 32, textures=COMMON_TEXTURES, night_p: float = 0.0):
    """Draw one image; return (PIL RGB image, Attributes)."""
    W = size * SCALE
    img = Image.new("RGB", (W, W))
    draw = ImageDraw.Draw(img)
    texture = rng.choice(list(textures))
    _background(draw, img, texture, rng)
    colour = rng.choice(list(COLOURS))
    r = rng.uniform(0.26, 0.40) * W
    cx = rng.uniform(r, W - r)
    cy = rng.uniform(r, W - r)
    angle = rng.uniform(0, 2 * math.pi)
    _shape(draw, shape, cx, cy, r, angle, _jitter(COLOURS[colour], rng))
    img = img.resize((size, size), Image.LANCZOS)
    time = "night" if rng.random() < night_p else "day"
    if time == "night":
        img = Image.eval(img, lambda v: int(v * 0.45)).filter(ImageFilter.GaussianBlur(0.4))
    return img, Attributes(shape, colour, texture, time, r / W, angle)


def caption(a: Attributes, name: str | None = None) -> str:
    """A caption from the generator's known attributes, e.g. 'a red star on a striped background at night'."""
    text = f"a {a.colour} {name or a.shape} on a {a.texture} background"
    if a.time == "night":
        text += " at night"
    return text


POOLS = {
    # pool name: (folder prefix, textures, night probability, salt)
    "train": ("", COMMON_TEXTURES, 0.0, "train"),
    "test": ("test", COMMON_TEXTURES, 0.0, "test"),
    "ood": ("ood", UNCOMMON_TEXTURES, 0.5, "ood"),
    # large disjoint pool for training the embedded tiny models (never used by the demo)
    "pretrain": ("", COMMON_TEXTURES, 0.25, "pretrain"),
}


def generate_pool(pool: str, shape: str, n: int, seed: int, size: int):
    _, textures, night_p, salt = POOLS[pool]
    for i in range(n):
        rng = random.Random(hash_obj("builtin", seed, salt, shape, i))
        yield render(shape, rng, size=size, textures=textures, night_p=night_p)


def write_builtin(root: str | os.PathLike, classes=SHAPES, train_per_class=24, test_per_class=20,
                  ood_per_class=20, size=32, seed=0) -> Path:
    """Write the dataset once as an imagefolder tree (root/<class>, root/test/<class>, root/ood/<class>).

    Written into a temp folder and renamed, so a killed run never leaves a half tree.
    Returns the tree's root (a subfolder of ``root`` named by the parameters' hash).
    """
    for c in classes:
        if c not in SHAPES:
            raise ValueError(f"dataset.builtin.classes: unknown class {c!r}; available: {list(SHAPES)}")
    params = dict(classes=list(classes), train=train_per_class, test=test_per_class, ood=ood_per_class, size=size, seed=seed, v=1)
    out = Path(root) / f"builtin-{hash_obj(params)[:12]}"
    if out.exists():
        return out
    tmp = Path(root) / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for pool, n in (("train", train_per_class), ("test", test_per_class), ("ood", ood_per_class)):
        prefix = POOLS[pool][0]
        for c in classes:
            d = tmp / prefix / c if prefix else tmp / c
            d.mkdir(parents=True, exist_ok=True)
            for i, (img, _a) in enumerate(generate_pool(pool, c, n, seed, size)):
                (d / f"{c}_{i:04d}.png").write_bytes(png_bytes(img))
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
        if not out.exists():
            raise
    return out
