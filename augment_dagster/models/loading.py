"""Model loading: ``tiny-random`` (built offline, saved once, loaded back with ``from_pretrained(dir)``),
``tiny`` (trained weights shipped in the package), or any hub id / local folder passed to ``from_pretrained``.

Every bundle carries a fingerprint that enters every memo key; ``*_fingerprint`` functions compute it
without loading the model, so a fully cached rerun never imports diffusers.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..util import hash_obj, pick_device, pick_dtype, sha256_file

PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "builtin_models"
TINY_BUILD_VERSION = 1
TINY_SD_SIZE = "small"


class ModelSourceError(ValueError):
    pass


@dataclass
class DiffusionBundle:
    pipe: Any
    fingerprint: str
    source: str
    device: str
    dtype: Any
    resolution: int


@dataclass
class CaptionerBundle:
    model: Any
    processor: Any
    fingerprint: str
    source: str
    device: str


@dataclass
class ClipBundle:
    model: Any
    processor: Any
    fingerprint: str
    source: str
    device: str


_CACHE: dict[tuple, Any] = {}
_FILE_HASHES: dict[tuple, str] = {}


def _tiny_build_id(kind: str) -> str:
    from .tiny import SD_CONFIGS

    return hash_obj("tiny-random", kind, TINY_BUILD_VERSION, SD_CONFIGS.get(TINY_SD_SIZE) if kind == "sd" else None)[:12]


def _dir_fingerprint(d: Path) -> str:
    items = []
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            k = (str(p), st.st_size, st.st_mtime_ns)
            if k not in _FILE_HASHES:
                _FILE_HASHES[k] = sha256_file(p)
            items.append((p.relative_to(d).as_posix(), _FILE_HASHES[k]))
    return hash_obj(items)[:24]


def _fingerprint(kind: str, source: str, cache_root, revision: str | None) -> str:
    if source == "tiny-random":
        return f"tiny-random-{kind}-{_tiny_build_id(kind)}"
    if source == "tiny":
        d = PACKAGE_MODELS / f"tiny-{kind}"
        return f"tiny-{kind}-{_dir_fingerprint(d)}" if d.exists() else f"tiny-{kind}-missing"
    p = Path(source).expanduser()
    if p.is_dir():
        return f"dir-{_dir_fingerprint(p)}"
    return f"hub-{hash_obj(source, revision)[:24]}"


def diffusion_fingerprint(source: str, cache_root=None, revision: str | None = None) -> str:
    return _fingerprint("sd", source, cache_root, revision)


def captioner_fingerprint(source: str, cache_root=None, revision: str | None = None) -> str:
    return _fingerprint("blip", source, cache_root, revision)


def clip_fingerprint(source: str, cache_root=None, revision: str | None = None) -> str:
    return _fingerprint("clip", source, cache_root, revision)


def _tiny_random_dir(kind: str, cache_root) -> Path:
    """Build the random model once into <cache_root>/models/ (temp dir + rename), return its folder."""
    d = Path(cache_root) / "models" / f"tiny-random-{kind}-{_tiny_build_id(kind)}"
    if d.exists():
        return d
    from .tiny import build_tiny_blip, build_tiny_clip, build_tiny_sd

    tmp = d.parent / f".tmp-{d.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _quiet()
    if kind == "sd":
        build_tiny_sd(seed=0, size=TINY_SD_SIZE).save_pretrained(tmp)
    else:
        model, proc = (build_tiny_blip if kind == "blip" else build_tiny_clip)(seed=0)
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
    try:
        os.rename(tmp, d)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not d.exists():
            raise
    return d


def _resolve(kind: str, source: str, cache_root) -> str:
    if source == "tiny-random":
        return str(_tiny_random_dir(kind, cache_root))
    if source == "tiny":
        d = PACKAGE_MODELS / f"tiny-{kind}"
        if not d.exists():
            raise FileNotFoundError(
                f"the trained tiny {kind} weights are not shipped in this build ({d} is missing); "
                "use source: tiny-random, or train them with scripts/train_tiny_models.py")
        return str(d)
    return source


def _error(kind_key: str, source: str, e: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"could not load models.{kind_key}.source={source!r}: {type(e).__name__}: {str(e)[:300]}. "
        f"Set models.{kind_key}.source to a local folder, a hub id reachable from this machine, 'tiny' or 'tiny-random'.")


def load_diffusion(source: str, cache_root, device: str = "auto", dtype: str = "auto", revision: str | None = None) -> DiffusionBundle:
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    key = ("sd", source, str(cache_root), dev, str(dt), revision)
    if key in _CACHE:
        return _CACHE[key]
    from diffusers import StableDiffusionPipeline

    try:
        path = _resolve("sd", source, cache_root)
        _quiet()
        kw: dict[str, Any] = {"dtype": dt}
        if revision:
            kw["revision"] = revision
        if not source.startswith("tiny"):
            kw.update(safety_checker=None, requires_safety_checker=False)
        pipe = StableDiffusionPipeline.from_pretrained(path, **kw)
    except FileNotFoundError as e:
        raise _error("diffusion", source, e) from None
    except (OSError, ValueError, EnvironmentError) as e:
        raise _error("diffusion", source, e) from None
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    res = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    b = DiffusionBundle(pipe, diffusion_fingerprint(source, cache_root, revision), source, dev, dt, res)
    _CACHE[key] = b
    return b


def _load_pair(kind: str, kind_key: str, source: str, cache_root, device: str, revision):
    dev = pick_device(device)
    key = (kind, source, str(cache_root), dev, revision)
    if key in _CACHE:
        return _CACHE[key]
    if kind == "blip":
        from transformers import BlipForConditionalGeneration as M, BlipProcessor as P
    else:
        from transformers import CLIPModel as M, CLIPProcessor as P
    _quiet()
    try:
        path = _resolve(kind, source, cache_root)
        kw = {"revision": revision} if revision else {}
        model = M.from_pretrained(path, **kw).to(dev).eval()
        proc = P.from_pretrained(path, **kw)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise _error(kind_key, source, e) from None
    fp = (captioner_fingerprint if kind == "blip" else clip_fingerprint)(source, cache_root, revision)
    b = (CaptionerBundle if kind == "blip" else ClipBundle)(model, proc, fp, source, dev)
    _CACHE[key] = b
    return b


def _quiet() -> None:
    """No per-shard progress bars or info logs from diffusers/transformers."""
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.disable_progress_bar()
        dl.set_verbosity_error()
        tl.disable_progress_bar()
        tl.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


def load_captioner(source: str, cache_root, device: str = "auto", revision: str | None = None) -> CaptionerBundle:
    return _load_pair("blip", "captioner", source, cache_root, device, revision)


def load_clip(source: str, cache_root, device: str = "auto", revision: str | None = None) -> ClipBundle:
    return _load_pair("clip", "clip", source, cache_root, device, revision)
