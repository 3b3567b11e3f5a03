"""The work a plan implies, with no model loaded: SD-1.x schedules (diffusers' timesteps, no diffusers import),
the dataset's size from its config or a directory listing, and per entry the synthetic images, UNet
image-passes, classifier steps and GPU-hours."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import TrainingConfig

# UNet image-passes per second of an SD-1.x UNet at 512² in fp16, batched (a CFG step on B latents counts 2B):
# the figure the GPU-hours estimate divides by. An assumption, stated in the output; measure your GPU and pass
# --img-per-s (the demo's `bench/demo.py` prints passes and seconds of a real run).
DEFAULT_IMG_PER_S = 50.0
_T = 1000  # SD-1.x num_train_timesteps


# ------------------------------------------------------------------ SD-1.x schedules (numpy-free, no diffusers)
def schedule_timesteps(scheduler: str, steps: int) -> list[int]:
    """The timesteps diffusers runs for ``scheduler`` with ``steps`` inference steps on SD-1.x's config
    (steps_offset 1; DDIM/PNDM "leading" spacing, PNDM with skip_prk_steps: N + 1 timesteps; DPM-Solver++ and
    Euler "linspace")."""
    n = int(steps)
    if scheduler in ("ddim", "pndm"):
        ratio = _T // n
        base = [i * ratio + 1 for i in range(n)]
        if scheduler == "pndm":  # PLMS: the second-to-last timestep twice
            base = base[:-1] + base[-2:-1] + base[-1:]
        return base[::-1]
    if scheduler in ("dpmsolver", "euler"):
        pts = [round_half_even(i * (_T - 1) / (n if scheduler == "dpmsolver" else n - 1 or 1))
               for i in range(n + 1 if scheduler == "dpmsolver" else n)]
        pts = pts[::-1]
        return pts[:-1] if scheduler == "dpmsolver" else pts
    raise ValueError(f"unknown scheduler {scheduler!r}")


def round_half_even(x: float) -> int:
    return int(round(x))  # Python's round is half-to-even, like numpy's


def unet_calls(scheduler: str, steps: int, start_rule: str = "noise", strength: float = 1.0) -> int:
    """UNet calls of one denoising loop (the core's rules, models/generation.py): ``noise``/``latents`` run the
    whole schedule; ``sdedit`` starts at index (N − ⌊N·s⌋) of the timesteps like diffusers' img2img; ``genie``
    runs the timesteps with t − 1 ≤ 1000·r (the whole schedule for r > 0.999)."""
    ts = schedule_timesteps(scheduler, steps)
    if start_rule in ("noise", "latents"):
        return len(ts)
    if start_rule == "genie":
        return len(ts) if strength > 0.999 else sum(1 for t in ts if t - 1 <= _T * strength)
    n = min(int(steps * strength), steps)
    return 0 if n == 0 else len(ts) - (steps - n)


# ------------------------------------------------------------------ dataset size, without decoding anything
ASSUMED_POOL = 100  # train-pool images per class assumed for a "whole class" K when the dataset is not readable


def dataset_size(cfg, classes: int | None = None, train_per_class: int | None = None) -> dict[str, Any]:
    """Classes and train-pool images per class: ``classes`` × ``train_per_class`` when given (an assumption, e.g.
    for a preset whose data is elsewhere), else the built-in dataset's config or a directory listing of an
    imagefolder root (class folders; ``test``/``ood`` skipped). ``known`` is False when neither is available."""
    if classes is not None:
        n = int(train_per_class or max(cfg.splits.shots) + cfg.splits.val_per_class)
        return {"known": True, "assumed": True, "classes": int(classes),
                "train_per_class": {f"class{i}": n for i in range(int(classes))}}
    ds = cfg.dataset
    if ds.source == "builtin":
        b = ds.builtin
        return {"known": True, "classes": len(b.classes), "train_per_class": {c: b.train_per_class for c in b.classes}}
    root = Path(ds.source).expanduser()
    if (ds.is_hf or not root.is_dir()) and ds.class_split is not None:
        try:
            listed = ds.evaluation_classes() or []
        except Exception:  # a class-list file that is not here either: fall through to the one-class estimate
            listed = []
        if listed:
            n = int(max(cfg.splits.shots) + cfg.splits.val_per_class)
            return {"known": True, "assumed": True, "classes": len(listed),
                    "train_per_class": {c: n for c in listed},
                    "note": f"{ds.source} not read: {len(listed)} classes from dataset.class_split.{ds.class_split.evaluate}, "
                            f"each with its K shots + {cfg.splits.val_per_class} val images (--train-per-class M for more)"}
    if ds.is_hf or not root.is_dir():
        return {"known": False, "classes": None, "train_per_class": {},
                "note": f"{root} not found: work is for ONE class with K train images (a K of {ASSUMED_POOL}+ counts "
                        f"as {ASSUMED_POOL}); pass --classes N [--train-per-class M] for the whole dataset"}
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
    counts = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("test", "ood") and not p.name.startswith(".")):
        counts[d.name] = sum(1 for f in d.iterdir() if f.suffix.lower() in exts)  # root/<class>/* (one level)
    return {"known": True, "classes": len(counts), "train_per_class": counts}


def split_counts(size: dict, shots: int, val: int) -> list[int]:
    """Train images per class of a K-shot split (splits.py's rule, use_all included); one class if unknown."""
    if not size["known"]:
        return [min(shots, ASSUMED_POOL)]
    out = []
    for n in size["train_per_class"].values():
        if n >= shots + val:
            out.append(shots)
        elif shots >= n > val:
            out.append(n - val)
        else:
            out.append(min(shots, max(1, n - 1)))
    return out


def _cfg_on(g: float, rule: str | None) -> int:
    return 2 if rule or g > 1.0 else 1  # SGID's per-image f(s*) is > 1 for most cosines: counted with CFG


def per_image_calls(algo: str, params, proto) -> tuple[float, int, str]:
    """(mean UNet calls per synthetic image, candidates generated per kept image, start kind)."""
    s, n = proto.scheduler, proto.steps
    if algo == "dafusion":
        ts = [params.fixed_strength] if params.fixed_strength is not None else list(params.strengths)
        return sum(unet_calls(s, n, "sdedit", x) for x in ts) / len(ts), 1, "sdedit"
    if algo == "genie_ada":
        return sum(unet_calls(s, n, "genie", r) for r in params.ratios), len(params.ratios), "genie"
    if algo == "genie":
        return unet_calls(s, n, "genie", params.ratio), 1, "genie"
    if algo in ("txt2img", "real_filter"):
        return unet_calls(s, n, "noise"), 1, "noise"
    if algo == "diff_ii":
        return unet_calls(s, n, "latents"), 1, "latents" if getattr(params, "use_concepts", True) else "noise"
    strength = getattr(params, "strength", None)
    if strength is not None:
        return unet_calls(s, n, proto.start_rule, strength), 1, proto.start_rule
    return unet_calls(s, n, "noise"), 1, "noise"


def entry_work(cfg, name, algo, params, proto, out, size, t: TrainingConfig, img_per_s: float) -> dict[str, Any]:
    """Synthetic images, UNet image-passes and classifier steps of this entry over every split."""
    imgs = passes = train_steps = concept_passes = 0
    per_split = []
    for k in cfg.splits.shots:
        counts = split_counts(size, k, cfg.splits.val_per_class)
        n_real, C = sum(counts), len(counts)
        ev = out["evaluation"]
        if ev.get("support") == "episode":
            # generated per episode from that episode's support: A per class × N classes × episodes (an upper
            # bound: a unit that recurs in another episode is generated once and reused)
            n_img = int(ev["augmented_per_class"][k]) * int(ev["n_way"]) * int(ev["episodes"])
        elif algo in ("genie", "genie_ada"):
            # every train image of every other class is a source, capped by max_per_class
            per = [n_real - c for c in counts]
            if params.max_per_class:
                per = [min(p, params.max_per_class) for p in per]
            n_img = sum(per)
        elif algo == "diff_ii":
            n_img = n_real * int(getattr(params, "expansion_rate", None) or out["images_per_real"])
        else:
            n_img = n_real * int(out["images_per_real"] or 1)
        p_img = 0.0
        extra = 0
        if proto is not None:
            calls, cand, _ = per_image_calls(algo, params, proto)
            g = proto.guidance_scale
            mult = _cfg_on(g, proto.guidance)
            p_img = calls * mult
            if algo == "diff_ii" and out["inversion_steps"]:
                inv = cfg.inversion
                rec = n_real if inv.reconstruction_per_class is None else min(n_real, C * inv.reconstruction_per_class)
                extra += n_real * inv.steps + (rec * inv.steps if inv.check_reconstruction else 0)
        split_passes = int(round(n_img * p_img)) + extra
        spe = math.ceil(n_real / t.batch_size) if t.epoch_unit == "data" else t.steps_per_epoch
        steps = t.epochs * spe
        # concept learning per split (TI: per class, batch × steps; LoRA: one run for all classes)
        cp = 0
        if out["concept_steps"]:
            cp += C * cfg.concepts.steps * cfg.concepts.batch_size
        if out["lora_steps"]:
            cp += cfg.concept_lora.steps * cfg.concept_lora.batch_size
        seeds = len(cfg.splits.seeds)
        per_split.append({"shots": k, "classes": C, "real_train_images": n_real, "synthetic_images": n_img,
                          "unet_image_passes": split_passes, "classifier_steps": steps,
                          "concept_training_image_passes": cp, "seeds": seeds})
        imgs += n_img * seeds
        passes += split_passes * seeds
        train_steps += steps * seeds
        concept_passes += cp * seeds
    res = (proto.resolution if proto is not None and proto.resolution else 512)
    scale = (res / 512.0) ** 2
    gen_h = passes * scale / img_per_s / 3600.0
    gpu_h = gen_h + concept_passes * 3 * res_scale(cfg) / img_per_s / 3600.0  # a training pass ≈ 3 forward passes
    return {"synthetic_images": imgs, "unet_image_passes": passes, "unet_passes_per_image":
            round(passes / imgs, 2) if imgs else 0.0, "concept_training_image_passes": concept_passes,
            "classifier_training_steps": train_steps, "gpu_hours_generation": round(gen_h, 3),
            "gpu_hours": round(gpu_h, 3), "per_split": per_split}


def res_scale(cfg) -> float:
    r = cfg.generation.resolution or 512
    return (r / 512.0) ** 2
