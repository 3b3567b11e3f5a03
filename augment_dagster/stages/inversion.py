"""Diff-II inversion pool (METHODS.md §3.2): DDIM inversion of every train image with guidance 1, conditioned on
"a photo of a <cls> <metaclass>" (the learned token + LoRA model), per-image memo; reports the reconstruction
error of invert → regenerate (on every image, or on the first ``recon_per_class`` train images of each class: the
check costs as many UNet passes again as the inversion)."""
from __future__ import annotations

import time

import numpy as np

from ..store import memo_key
from ..store.tensors import tensor_bytes
from . import StageStats


def inversion_stage(train, *, images, blobs, memo, model_fp: str, core_factory, prompts: dict[str, str],
                    concepts: dict[str, str], load_tensor, steps: int, lora_key: str | None, check_recon: bool = True,
                    recon_per_class: int | None = None):
    from ..models.generation import GenRequest

    t0 = time.perf_counter()
    stats = StageStats()
    rows, todo = [], []
    for r in train.itertuples():
        key = memo_key("inversion", "inv-1", model=f"{model_fp}|{lora_key}", params={"steps": steps, "prompt": prompts[r.label],
                       "concepts": concepts}, inputs=r.image_id, seed=0)
        rec = memo.get(key)
        rows.append([r, key, rec])
        if rec is None:
            todo.append(len(rows) - 1)
    if todo:
        core = core_factory()
        cvec = {t: load_tensor(b) for t, b in concepts.items()} or None
        imgs = [images.real(rows[i][0].image_id) for i in todo]
        ps = [prompts[rows[i][0].label] for i in todo]
        zT = core.invert(imgs, ps, num_steps=steps, concepts=cvec, guidance_scale=1.0)
        errs = [None] * len(todo)
        sample: set = set()  # the images whose reconstruction is checked: every one, or the first N per class
        if check_recon:
            first = train if recon_per_class is None else train.groupby("label", sort=False).head(recon_per_class)
            sample = set(first["image_id"])
        checked = [j for j, i in enumerate(todo) if rows[i][0].image_id in sample]
        if checked:
            z0 = core.encode_images([imgs[j] for j in checked])
            recon = core.generate_latents([GenRequest(prompt=ps[j], seed=0, init_latents=zT[j], guidance_scale=1.0,
                                                      num_inference_steps=steps, scheduler="ddim", concepts=cvec)
                                           for j in checked])
            for j, a, b in zip(checked, recon, z0):
                errs[j] = float(((a - b).norm() / b.norm()).item())
        for j, i in enumerate(todo):
            rec = {"blob": blobs.put(tensor_bytes(zT[j]), "safetensors"), "recon_rel_error": errs[j],
                   "z_std": float(zT[j].std())}
            rec = memo.put(rows[i][1], rec)
            rows[i][2] = rec
        stats.computed = len(todo)
    stats.reused = len(rows) - len(todo)
    out = [{"image_id": r.image_id, "label": r.label, "latent_blob": rec["blob"], "prompt": prompts[r.label], "steps": steps,
            "recon_rel_error": rec["recon_rel_error"], "z_std": rec["z_std"], "model_fingerprint": model_fp, "lora": lora_key,
            "memo_key": key} for r, key, rec in rows]
    errs = [o["recon_rel_error"] for o in out if o["recon_rel_error"] is not None]
    stats.extra = {"mean_recon_rel_error": float(np.mean(errs)) if errs else None, "recon_checked": len(errs)}
    stats.seconds = time.perf_counter() - t0
    return out, stats
