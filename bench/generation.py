"""Benchmark: batched vs one-request-per-call img2img through GenerationCore on the tiny-random model.

    python bench/generation.py [--n 64] [--steps 25] [--strength 0.8] [--guidance 7.5] [--batch-size 16]
                               [--threads N] [--device auto] [--cache-root DIR]

Prints images/s for ``batch_size`` requests per UNet call and for one request per ``generate`` call, and the
ratio. Both runs produce the same images (checked: max abs pixel difference).
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
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=16)
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
    bundle = load_diffusion("tiny-random", root, device=a.device)
    print(f"loaded tiny-random on {bundle.device} ({bundle.dtype}) in {time.perf_counter() - t0:.2f}s; "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}")
    prompts = ["a photo of a circle", "a photo of a square", "a photo of a ring", "a photo of a cross"]
    imgs = _images(a.n)
    reqs = [GenRequest(prompts[i % 4], seed=i, init_image=imgs[i], strength=a.strength, guidance_scale=a.guidance,
                       num_inference_steps=a.steps) for i in range(a.n)]
    steps_run = GenerationCore.denoising_steps(a.steps, a.strength)
    print(f"{a.n} img2img requests, {a.steps} steps x strength {a.strength} = {steps_run} denoising steps, "
          f"guidance {a.guidance}")

    batched = GenerationCore(bundle, batch_size=a.batch_size)
    single = GenerationCore(bundle, batch_size=1)
    batched.generate(reqs[:2])  # warm-up
    single.generate(reqs[:1])

    def sync():
        if bundle.device.startswith("cuda"):
            torch.cuda.synchronize()

    batched.stats.update(unet_forward_passes=0, unet_calls=0)
    sync()
    t = time.perf_counter()
    out_b = batched.generate(reqs)
    sync()
    tb = time.perf_counter() - t
    single.stats.update(unet_forward_passes=0, unet_calls=0)
    t = time.perf_counter()
    out_s = [single.generate([r])[0] for r in reqs]
    sync()
    ts = time.perf_counter() - t
    diff = max(int(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max()) for x, y in zip(out_b, out_s))
    print(f"batch_size={a.batch_size:<3d}: {a.n / tb:8.1f} images/s  ({tb:.2f}s, {batched.stats['unet_calls']} UNet calls, "
          f"{batched.stats['unet_forward_passes']} image-passes)")
    print(f"one per call  : {a.n / ts:8.1f} images/s  ({ts:.2f}s, {single.stats['unet_calls']} UNet calls, "
          f"{single.stats['unet_forward_passes']} image-passes)")
    print(f"speed-up {ts / tb:.2f}x; max abs pixel difference batched vs single: {diff}/255")


if __name__ == "__main__":
    main()
