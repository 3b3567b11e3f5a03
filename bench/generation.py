"""Benchmark: batched vs one-request-per-call img2img through GenerationCore.

    python bench/generation.py [--source tiny-random|FOLDER|HUB_ID] [--resolution PX] [--n 64] [--steps 25]
                               [--scheduler ddim] [--strength 0.8 | --dafusion] [--guidance 7.5]
                               [--batch-size 16|auto] [--max-batch-size 64] [--dtype auto] [--compile]
                               [--no-channels-last] [--peak-tflops T] [--threads N] [--device auto] [--cache-root DIR]

Prints images/s for ``batch_size`` requests per UNet call and for one request per ``generate`` call, and the
ratio. Both runs produce the same images (checked: max abs pixel difference).

``--dafusion`` is DA-Fusion's protocol (METHODS.md §1): t0 drawn per image from {0.25, 0.5, 0.75, 1.0}, so
requests fall into up to four batch groups; with ``--source`` the SD-1.5 folder of ``bench/realsize.py`` (or
``runwayml/stable-diffusion-v1-5``), ``--resolution 512 --steps 50 --scheduler pndm --guidance 7.5`` it is the
GPU figure of the README. ``--peak-tflops`` (the accelerator's dense bf16/fp16 peak, e.g. 989 for H100/H200
SXM) adds the ratio to the FLOP limit, taking 803 GFLOP per SD-1.5 UNet image-pass at 512 px (scaled by the
pixel count at other sizes; the VAE and text encoder are not counted).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _images(n: int):
    import numpy as np
    from PIL import Image

    out = []
    for s in range(n):
        rs = np.random.RandomState(s)
        yy, xx = np.mgrid[0:32, 0:32] / 32
        bg = np.stack([xx, yy, 1 - xx], -1) * rs.uniform(60, 200, 3)
        disc = ((yy - rs.uniform(0.3, 0.7)) ** 2 + (xx - rs.uniform(0.3, 0.7)) ** 2) < rs.uniform(0.15, 0.3) ** 2
        bg[disc] = rs.uniform(0, 255, 3)
        out.append(Image.fromarray(bg.clip(0, 255).astype(np.uint8)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="tiny-random", help="tiny-random, tiny, a model folder or a hub id")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--dafusion", action="store_true", help="t0 per image from {0.25, 0.5, 0.75, 1.0} (seeded)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", default="16", help="an integer or 'auto' (largest that fits, OOM back-off)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak, for the FLOP-limit ratio")
    ap.add_argument("--gflop-per-pass", type=float, default=None,
                    help="UNet GFLOP per image-pass (default: 803·(px/512)² for an SD-1.5-size UNet, else not shown)")
    ap.add_argument("--skip-single", action="store_true", help="only the batched run")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-root", default=None)
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from augment_dagster.models.generation import GenerationCore, GenRequest
    from augment_dagster.models.loading import load_diffusion

    root = a.cache_root or os.path.join(tempfile.gettempdir(), "augment-bench-cache")
    t0 = time.perf_counter()
    bundle = load_diffusion(a.source, root, device=a.device, dtype=a.dtype, channels_last=not a.no_channels_last,
                            compile=a.compile)
    res = a.resolution or bundle.resolution
    bs = a.batch_size if a.batch_size == "auto" else int(a.batch_size)
    print(f"loaded {a.source} on {bundle.device} ({bundle.dtype}) in {time.perf_counter() - t0:.2f}s, {res}px; "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}")
    import random

    prompts = ["a photo of a circle", "a photo of a square", "a photo of a ring", "a photo of a cross"]
    imgs = _images(a.n)
    rng = random.Random(0)
    strengths = [rng.choice([0.25, 0.5, 0.75, 1.0]) if a.dafusion else a.strength for _ in range(a.n)]
    reqs = [GenRequest(prompts[i % 4], seed=i, init_image=imgs[i], strength=strengths[i], guidance_scale=a.guidance,
                       num_inference_steps=a.steps, scheduler=a.scheduler, resolution=res) for i in range(a.n)]
    steps_run = sum(GenerationCore.denoising_steps(a.steps, st) for st in strengths) / a.n
    print(f"{a.n} img2img requests, {a.scheduler} {a.steps} steps x strength "
          f"{'t0 per image in {.25,.5,.75,1}' if a.dafusion else a.strength} = {steps_run:.1f} denoising steps per image "
          f"on average, guidance {a.guidance}")

    batched = GenerationCore(bundle, batch_size=bs, max_batch_size=a.max_batch_size, scheduler=a.scheduler)
    single = GenerationCore(bundle, batch_size=1, scheduler=a.scheduler)
    batched.generate(reqs[:min(a.n, max(2, batched.batch_size))])  # warm-up (and compile / OOM back-off at full size)
    single.generate(reqs[:1])

    def sync():
        if bundle.device.startswith("cuda"):
            torch.cuda.synchronize()

    if bundle.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    batched.stats.update(unet_forward_passes=0, unet_calls=0)
    sync()
    t = time.perf_counter()
    out_b = batched.generate(reqs)
    sync()
    tb = time.perf_counter() - t
    gflop = a.gflop_per_pass
    if gflop is None and sum(p.numel() for p in bundle.pipe.unet.parameters()) > 800e6:
        gflop = 803.0 * (res / 512) ** 2  # SD-1.5 UNet per image-pass (see the module doc)
    passes = batched.stats["unet_forward_passes"]
    print(f"batch_size={batched.batch_size:<3d}: {a.n / tb:8.2f} images/s  ({tb:.2f}s, {batched.stats['unet_calls']} UNet "
          f"calls, {passes} image-passes" + (f", {passes * gflop / tb / 1e3:.1f} TFLOP/s in the UNet" if gflop else "")
          + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if bundle.device.startswith("cuda") else "")
          + (f", {batched.stats['oom_backoffs']} OOM back-offs" if batched.stats["oom_backoffs"] else "") + ")")
    if a.peak_tflops and gflop:
        limit = a.peak_tflops * 1e3 / (gflop * passes / a.n)
        print(f"FLOP limit at {a.peak_tflops:g} TFLOP/s: {limit:.2f} images/s; batched reaches {a.n / tb / limit:.1%}")
    if a.skip_single:
        return
    single.stats.update(unet_forward_passes=0, unet_calls=0)
    t = time.perf_counter()
    out_s = [single.generate([r])[0] for r in reqs]
    sync()
    ts = time.perf_counter() - t
    diff = max(int(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max()) for x, y in zip(out_b, out_s))
    print(f"one per call  : {a.n / ts:8.2f} images/s  ({ts:.2f}s, {single.stats['unet_calls']} UNet calls, "
          f"{single.stats['unet_forward_passes']} image-passes)")
    print(f"speed-up {ts / tb:.2f}x; max abs pixel difference batched vs single: {diff}/255")


if __name__ == "__main__":
    main()
