"""Model loading: ``tiny-random`` (built offline, saved once, loaded back with ``from_pretrained(dir)``),
``tiny`` (trained weights shipped in the package), or any hub id / local folder passed to ``from_pretrained``.

* ``tiny-random``: ``models.tiny`` builds the model with seed 0, saves it ONCE to
  ``<cache_root>/models/tiny-random-<kind>-<hash of the build config>/`` (written to a temp folder, then
  ``os.rename``d, so a concurrent or killed process never leaves a half folder), and it is ALWAYS loaded back
  with ``from_pretrained(dir)`` exactly like a real model.
* ``tiny``: ``augment_dagster/builtin_models/tiny-<kind>/``; a ``FileNotFoundError`` while they are not shipped.
* anything else: passed unchanged to ``from_pretrained(source, revision=...)``; a failure becomes a
  :class:`ModelSourceError` naming the source.

Every bundle carries a fingerprint that enters every memo key; the ``*_fingerprint`` functions compute it
without loading (or importing) the model, so a fully cached rerun never imports diffusers:
tiny-random → hash of the build config + seed; local folder → sha256 over (relative path, sha256 of content)
of its files (per-file hashes cached by (path, size, mtime_ns)); hub id → hash of (id, revision).

Loaded bundles are cached per process, keyed by (kind, source, cache_root, device, dtype, revision[, GPU
options]) — one copy of each model per process; :func:`release` drops a kind once the stage that alone needs it
has ended (the captioner after ``captions``), so its memory goes back before the next stage.

GPU path (``device`` auto → CUDA when present): weights in bf16 (fp16 where bf16 is unsupported; ``dtype``
overrides), PyTorch SDPA attention (``AttnProcessor2_0``) on the UNet and VAE, ``channels_last`` UNet/VAE
(``models.diffusion.channels_last``), and optionally ``torch.compile`` of the UNet in place
(``models.diffusion.compile``; the module object stays the same, so LoRA adapters and the cache keep working).
On CPU the model stays fp32, contiguous and uncompiled whatever those keys say.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..util import hash_obj, pick_device, pick_dtype, sha256_file

PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "builtin_models"
TINY_SD_SIZE = "small"
TINY_SEED = 0
_KIND_KEY = {"sd": "diffusion", "blip": "captioner", "clip": "clip"}


class ModelSourceError(UserError, ValueError):
    """A model source that could not be loaded; the message names the source and the config key to change."""


@dataclass
class DiffusionBundle:
    pipe: Any
    fingerprint: str
    source: str
    device: str
    dtype: Any
    resolution: int
    lora_adapter: str | None = None  # a peft adapter on pipe.unet that generation switches on (models/adapters.py)


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
_LOCK = threading.RLock()
build_counts: dict[str, int] = {"sd": 0, "blip": 0, "clip": 0}  # how often a tiny-random model was built (tests)


def clear_cache() -> None:
    """Forget the process-level cache of loaded bundles (the on-disk tiny-random copies stay)."""
    release()


def release(*kinds: str) -> int:
    """Drop cached bundles of these kinds ('sd', 'blip', 'clip'; none given: all), collect garbage and empty
    the CUDA cache; returns how many bundles were dropped. Callers holding a bundle keep it alive."""
    import gc

    with _LOCK:
        drop = [k for k in _CACHE if not kinds or k[0] in kinds]
        for k in drop:
            del _CACHE[k]
    if drop:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
    return len(drop)


def cached_kinds() -> list[str]:
    """The kinds of the bundles cached in this process (tests, diagnostics)."""
    with _LOCK:
        return sorted(k[0] for k in _CACHE)


# ---------------------------------------------------------------- fingerprints
def _tiny_build_config(kind: str) -> dict:
    from .tiny import build_config  # tiny.py imports nothing heavy at module level

    return build_config(kind, size=TINY_SD_SIZE, seed=TINY_SEED)


def _tiny_build_id(kind: str) -> str:
    return hash_obj("tiny-random", _tiny_build_config(kind))[:12]


def dir_fingerprint(d: str | os.PathLike) -> str:
    """sha256 over (relative path, sha256 of content) of every file under ``d`` (dot-files skipped)."""
    d = Path(d)
    items = []
    for p in sorted(d.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts):
            st = p.stat()
            k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
            h = _FILE_HASHES.get(k)
            if h is None:
                h = _FILE_HASHES[k] = sha256_file(p)
            items.append((p.relative_to(d).as_posix(), h))
    return hash_obj(items)[:24]


def _fingerprint(kind: str, source: str, revision: str | None) -> str:
    if source == "tiny-random":
        return f"tiny-random-{kind}-{_tiny_build_id(kind)}"
    if source == "tiny":
        d = PACKAGE_MODELS / f"tiny-{kind}"
        return f"tiny-{kind}-{dir_fingerprint(d)}" if d.is_dir() else f"tiny-{kind}-missing"
    p = Path(source).expanduser()
    if p.is_dir():
        return f"dir-{dir_fingerprint(p)}"
    return f"hub-{hash_obj(source, revision)[:24]}"


def diffusion_fingerprint(source: str, cache_root=None, revision: str | None = None) -> str:
    return _fingerprint("sd", source, revision)


def captioner_fingerprint(source: str, cache_root=None, revision: str | None = None) -> str:
    return _fingerprint("blip", source, revision)


def clip_fingerprint(source: str, cache_root=None, revision: str | None = None) -> str:
    return _fingerprint("clip", source, revision)


# ---------------------------------------------------------------- sources
def tiny_random_dir(kind: str, cache_root: str | os.PathLike) -> Path:
    """Build the random model once into ``<cache_root>/models/`` (temp folder + rename) and return its folder."""
    d = Path(cache_root) / "models" / f"tiny-random-{kind}-{_tiny_build_id(kind)}"
    if d.is_dir():
        return d
    from . import tiny

    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{d.name}-", dir=d.parent))
    try:
        _quiet()
        build_counts[kind] += 1
        if kind == "sd":
            tiny.build_tiny_sd(seed=TINY_SEED, size=TINY_SD_SIZE).save_pretrained(tmp)
        else:
            model, proc = (tiny.build_tiny_blip if kind == "blip" else tiny.build_tiny_clip)(seed=TINY_SEED)
            model.save_pretrained(tmp)
            proc.save_pretrained(tmp)
        try:
            os.rename(tmp, d)
        except OSError:
            if not d.is_dir():  # not "another process won the race"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _resolve(kind: str, source: str, cache_root) -> str:
    if source == "tiny-random":
        return str(tiny_random_dir(kind, cache_root))
    if source == "tiny":
        d = PACKAGE_MODELS / f"tiny-{kind}"
        if not d.is_dir():
            raise FileNotFoundError(
                f"the trained tiny {_KIND_KEY[kind]} model is not shipped in this build ({d} does not exist); "
                f"set models.{_KIND_KEY[kind]}.source: tiny-random to use a random-weight tiny model instead")
        return str(d)
    return source


def _error(kind: str, source: str, e: BaseException) -> ModelSourceError:
    key = _KIND_KEY[kind]
    return ModelSourceError(
        f"could not load the {key} model from source {source!r} ({type(e).__name__}: {str(e)[:300]}); "
        f"set models.{key}.source to a local folder, a hub id reachable from this machine, 'tiny' or 'tiny-random'")


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


# ---------------------------------------------------------------- loaders
def gpu_options(device: str, channels_last: bool = True, compile: bool = False) -> dict[str, bool]:
    """The GPU options that apply on ``device`` (all off on CPU/MPS)."""
    cuda = str(device).startswith("cuda")
    return {"sdpa": True, "channels_last": bool(channels_last and cuda), "compile": bool(compile and cuda)}


def _apply_gpu_options(pipe, opts: dict[str, bool]) -> None:
    import torch

    if opts["sdpa"] and hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        for m in (pipe.unet, pipe.vae):
            if hasattr(m, "set_attn_processor"):
                m.set_attn_processor(AttnProcessor2_0())
    if opts["channels_last"]:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if opts["compile"]:
        pipe.unet.compile(dynamic=False)  # in place: the module object (and its peft adapters) stays the same


def load_diffusion(source: str, cache_root: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                   revision: str | None = None, channels_last: bool = True, compile: bool = False) -> DiffusionBundle:
    """A ``StableDiffusionPipeline`` (eval mode, no grads, no safety checker) on ``device`` in ``dtype``, with
    the GPU options of the module doc on CUDA."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    opts = gpu_options(dev, channels_last, compile)
    key = ("sd", source, str(cache_root), dev, str(dt), revision, tuple(sorted(opts.items())))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        path = _resolve("sd", source, cache_root)  # FileNotFoundError for a missing 'tiny'
        _quiet()
        from diffusers import StableDiffusionPipeline

        kw: dict[str, Any] = {"dtype": dt, "safety_checker": None, "requires_safety_checker": False}
        if revision:
            kw["revision"] = revision
        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, **kw)
        except Exception as e:  # noqa: BLE001 - any failure: the source is unusable
            raise _error("sd", source, e) from e
        pipe = pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.eval().requires_grad_(False)
        _apply_gpu_options(pipe, opts)
        if dev == "cpu":
            # one image at a time through the VAE (diffusers' slicing): a batch of 8 at 256 px held ~1 GB of decoder
            # activations, and on the CPU that is the run's RSS. It also makes the VAE's output independent of the
            # generation batch size (a batch differs from single images in the last float bits on the CPU).
            pipe.vae.enable_slicing()
        if source in ("tiny", "tiny-random"):
            from .tiny import TINY_RESOLUTION as res
        else:
            res = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
        b = DiffusionBundle(pipe, diffusion_fingerprint(source, cache_root, revision), source, dev, dt, res)
        _CACHE[key] = b
        return b


def _load_pair(kind: str, source: str, cache_root, device: str, revision: str | None):
    dev = pick_device(device)
    key = (kind, source, str(cache_root), dev, revision)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        path = _resolve(kind, source, cache_root)
        _quiet()
        if kind == "blip":
            from transformers import BlipForConditionalGeneration as M, BlipProcessor as P
        else:
            from transformers import CLIPModel as M, CLIPProcessor as P
        kw = {"revision": revision} if revision else {}
        try:
            model = M.from_pretrained(path, **kw).to(dev).eval().requires_grad_(False)
            proc = P.from_pretrained(path, **kw)
        except Exception as e:  # noqa: BLE001
            raise _error(kind, source, e) from e
        fp = _fingerprint(kind, source, revision)
        b = (CaptionerBundle if kind == "blip" else ClipBundle)(model, proc, fp, source, dev)
        _CACHE[key] = b
        return b


def load_captioner(source: str, cache_root: str | os.PathLike, device: str = "auto",
                   revision: str | None = None) -> CaptionerBundle:
    """``BlipForConditionalGeneration`` + ``BlipProcessor`` (same source rules as :func:`load_diffusion`)."""
    return _load_pair("blip", source, cache_root, device, revision)


def load_clip(source: str, cache_root: str | os.PathLike, device: str = "auto", revision: str | None = None) -> ClipBundle:
    """``CLIPModel`` + ``CLIPProcessor`` (same source rules as :func:`load_diffusion`)."""
    return _load_pair("clip", source, cache_root, device, revision)
