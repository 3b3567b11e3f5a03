"""Turn a method's planned units into synthetic images, with the unit memo (no Dagster).

For every unit: key = memo_key("synthetic/<algorithm>", version, model fingerprint, unit identity, seed).
Hits are reused as they are; misses are sent through the one generation core in batches. Each
finished batch is stored (blob first, then its memo record), so a killed run keeps what it finished
and the next run computes only the rest.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..store import BlobStore, Memo, memo_key
from ..util import png_bytes
from .base import MethodSpec, SynthUnit


@dataclass
class RunStats:
    planned: int = 0
    computed: int = 0
    reused: int = 0
    unet_forward_passes: int = 0
    unet_batch_size: int = 0  # the UNet batch size the cores ended with (after any OOM back-off); 0 = no UNet
    oom_backoffs: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


SYNTH_COLUMNS = [
    "synthetic_id", "method", "algorithm", "label", "guide_ids", "prompt", "prompt_segments", "negative_prompt",
    "prompt_source", "seed", "mode", "strength", "guidance_scale", "steps", "scheduler", "start_rule", "resolution",
    "start_timestep", "first_timestep", "denoise_steps", "preprocess", "vae_encode", "switch_prompt", "switch_t",
    "embedding_id", "concepts", "model_fingerprint", "params_json", "blob", "memo_key", "created_by_run", "compute_seconds",
]


def unit_key(spec: MethodSpec, unit: SynthUnit, model_fp: str) -> str:
    return memo_key(f"synthetic/{spec.name}", spec.version, model=model_fp if spec.uses_diffusion else "",
                    params=unit.identity(), seed=unit.seed)


def start_latents(unit: SynthUnit, load_tensor: Callable[[str], Any]):
    """The start latents of a 'latents' unit: a stored blob, or a recipe over stored latents."""
    if unit.init_latents_blob:
        return load_tensor(unit.init_latents_blob)
    r = unit.latent_recipe or {}
    if r.get("op") == "circle":
        from ..models.interpolation import circle_interpolate

        return circle_interpolate(load_tensor(r["z1"]), load_tensor(r["z2"]), float(r["alpha"]))
    if r.get("op") == "copy":
        return load_tensor(r["z1"])
    raise ValueError(f"unit has mode 'latents' but no usable start latents: {r}")


def to_request(unit: SynthUnit, load_image: Callable[[str], Any], load_tensor: Callable[[str], Any]):
    from ..models.generation import GenRequest
    from ..models.text import Prompt

    def prompt(p):
        if p is None:
            return None
        return Prompt(segments=[(t, float(w)) for t, w in p]) if isinstance(p, (list, tuple)) else p

    return GenRequest(
        prompt=prompt(unit.prompt), seed=unit.seed,
        strength=1.0 if unit.strength is None else unit.strength,
        init_image=load_image(unit.init_image_id) if unit.mode == "img2img" else None,
        init_latents=start_latents(unit, load_tensor) if unit.mode == "latents" else None,
        guidance_scale=unit.guidance_scale, negative_prompt=unit.negative_prompt,
        num_inference_steps=unit.steps, switch_prompt=prompt(unit.switch_prompt), switch_t=unit.switch_t,
        concepts={tok: concept_vector(unit, tok, eid, load_tensor) for tok, eid in unit.concepts.items()} or None,
        weighting=unit.weighting, scheduler=unit.scheduler, start_rule=unit.start_rule, resolution=unit.resolution,
        preprocess=unit.preprocess, vae_encode=unit.vae_encode,
    )


def concept_vector(unit: SynthUnit, token: str, embedding_id: str, load_tensor: Callable[[str], Any]):
    """The stored concept vector, plus the unit's own noise draw where it asks for one (DIAGen per-image noise)."""
    v = load_tensor(embedding_id)
    if token in unit.concept_noise:
        from ..models.text import noisy_vector

        sigma, noise_seed = unit.concept_noise[token]
        v = noisy_vector(v, sigma, noise_seed).to(v.dtype)
    return v


def _chunks(seq: list, n: int) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def run_units(
    spec: MethodSpec,
    method_name: str,
    units: list[SynthUnit],
    *,
    blobs: BlobStore,
    memo: Memo,
    model_fp: str,
    load_image: Callable[[str], Any],
    load_tensor: Callable[[str], Any],
    core_factory: Callable[[], Any] | None,
    render_params: Any = None,
    batch_size: int = 32,
    run_id: str = "",
    progress: bool = False,
    on_batch_done: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], RunStats]:
    t_start = time.perf_counter()
    stats = RunStats(planned=len(units))
    keys = [unit_key(spec, u, model_fp) for u in units]
    records: list[dict | None] = [memo.get(k) for k in keys]
    todo = [i for i, r in enumerate(records) if r is None or not blobs.exists(r["blob"])]
    stats.reused = len(units) - len(todo)

    if todo:
        bar = None
        if progress:
            from ..progress import progress_bar

            bar = progress_bar(len(todo), "img", desc=f"synthetic/{method_name}")  # tty: a bar; else a line every 30 s
        t0 = time.perf_counter()
        # units that need another UNet (a LoRA) are generated with their own core
        by_lora: dict[str | None, list[int]] = {}
        for i in todo:
            by_lora.setdefault(units[i].lora_blob, []).append(i)
        cores = {lb: (core_factory(lb) if lb else core_factory()) for lb in by_lora} if spec.uses_diffusion else {}
        passes0 = sum(c.stats["unet_forward_passes"] for c in cores.values())
        batches = [(lb, ch) for lb, idx in by_lora.items() for ch in _chunks(idx, batch_size)]
        for lb, chunk in batches:
            tb = time.perf_counter()
            cu = [units[i] for i in chunk]
            info: list[dict] = [{} for _ in cu]
            if spec.uses_diffusion:
                reqs = [to_request(u, load_image, load_tensor) for u in cu]
                images = cores[lb].generate(reqs)
                info = [cores[lb].schedule_info(r) for r in reqs]
                for inf, bs in zip(info, getattr(cores[lb], "last_batch_sizes", None) or []):
                    inf["unet_batch"] = bs
            else:
                images = spec.render(cu, {u.init_image_id: load_image(u.init_image_id) for u in cu}, render_params)
            per_unit = (time.perf_counter() - tb) / max(1, len(chunk))
            for i, u, im, inf in zip(chunk, cu, images, info):
                rec = None
                try:
                    digest = blobs.put(png_bytes(im), "png")
                    rec = {"blob": digest, "fn": f"synthetic/{spec.name}", "method": method_name,
                           "created_by_run": run_id, "created_at": time.time(), "seconds": per_unit,
                           **{k: inf.get(k) for k in ("start_timestep", "first_timestep", "denoise_steps")},
                           **({"unet_batch": inf["unet_batch"]} if inf.get("unet_batch") else {})}
                    rec = memo.put(keys[i], rec)
                except BaseException:
                    # an interrupt (Ctrl-C, SIGTERM) between a unit's bytes and its record: record it before
                    # unwinding, so every unit whose bytes are written is reused by the next run
                    if rec is not None and keys[i] not in memo:
                        memo.put(keys[i], rec)
                    raise
                records[i] = rec
            stats.computed += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
            if on_batch_done is not None:
                on_batch_done(stats.computed, len(todo))
        if bar is not None:
            bar.close()
        stats.compute_seconds = time.perf_counter() - t0
        stats.unet_forward_passes = sum(c.stats["unet_forward_passes"] for c in cores.values()) - passes0
        sizes = [int(c.stats["batch_size"]) for c in cores.values() if "batch_size" in c.stats]
        stats.unet_batch_size = min(sizes) if sizes else 0
        stats.oom_backoffs = sum(int(c.stats.get("oom_backoffs", 0)) for c in cores.values())

    rows = []
    for u, k, rec in zip(units, keys, records):
        assert rec is not None
        segs = u.prompt if not isinstance(u.prompt, str) else None
        sw = u.switch_prompt
        rows.append({
            "synthetic_id": rec["blob"], "method": method_name, "algorithm": spec.name, "label": u.label,
            "guide_ids": list(u.guide_ids), "prompt": u.prompt_text(),
            "prompt_segments": json.dumps(segs) if segs is not None else None,
            "negative_prompt": u.negative_prompt, "prompt_source": u.prompt_source, "seed": int(u.seed),
            "mode": u.mode, "strength": u.strength, "guidance_scale": float(u.guidance_scale), "steps": int(u.steps),
            # the resolved protocol (methods/protocol.py); the schedule facts come from the memo record
            "scheduler": u.scheduler if spec.uses_diffusion else None,
            "start_rule": u.start_rule if spec.uses_diffusion and u.mode == "img2img" else None,
            "resolution": u.resolution, "start_timestep": rec.get("start_timestep"),
            "first_timestep": rec.get("first_timestep"), "denoise_steps": rec.get("denoise_steps"),
            "preprocess": u.preprocess if spec.uses_diffusion and u.mode == "img2img" else None,
            "vae_encode": u.vae_encode if spec.uses_diffusion and u.mode == "img2img" else None,
            "switch_prompt": (sw if isinstance(sw, str) or sw is None else "".join(t for t, _ in sw)),
            "switch_t": u.switch_t, "embedding_id": u.embedding_id, "concepts": json.dumps(u.concepts, sort_keys=True),
            "model_fingerprint": model_fp if spec.uses_diffusion else None,
            "params_json": json.dumps(u.params, sort_keys=True, default=str), "blob": rec["blob"], "memo_key": k,
            "created_by_run": rec.get("created_by_run", ""), "compute_seconds": float(rec.get("seconds", 0.0)),
        })
    stats.seconds = time.perf_counter() - t_start
    return rows, stats
