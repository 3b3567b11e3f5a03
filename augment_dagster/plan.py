"""`augment plan --config FILE [--json]`: what an experiment config will do, before anything runs.

For every method entry: the resolved generation protocol (sampler, steps, start rule, guidance, images per real
image or per class, resolution, method params, concept / LoRA / inversion steps), the classifier recipe and the
evaluation protocol, where each value came from, and the work it implies (synthetic images, UNet image-passes,
classifier training steps) with an estimated GPU-hours figure at a stated UNet throughput.

No model is loaded and neither torch nor diffusers is imported: the config, the method registry (pydantic
params) and, where the dataset is a readable folder, a directory listing are all it reads. The SD-1.x schedules
below are diffusers' (``X.from_config`` of SD-1.x's scheduler config; tests/test_plan.py checks them against
diffusers).

Where a value came from (``sources``): ``default`` (the project's default), ``method`` (the algorithm's paper
default in ``methods/<name>.py``), ``recipe`` (a classifier recipe of ``training/recipes.py``), ``paper preset`` (set
in a file under ``assets_config/papers/``) or ``config`` (set in any other config file).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import TrainingConfig, load_config
from .training.recipes import RECIPES, freeze_for, method_evaluation

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


# ------------------------------------------------------------------ where a value came from
def _is_preset(cfg) -> bool:
    p = getattr(cfg, "source_path", None)
    return bool(p) and Path(p).resolve().parent.name == "papers"


def _protocol_source(where: str, preset: bool) -> dict[str, str]:
    if where.startswith("paper:"):
        kind = "method"
    elif where in ("project", "model"):
        kind = "default"
    else:
        kind = "paper preset" if preset else "config"
    return {"from": kind, "at": where}


def _training_sources(cfg, entry: str | None, t: TrainingConfig, preset: bool) -> dict[str, dict[str, str]]:
    set_exp = cfg.training.model_fields_set
    over = cfg.methods[entry].training if entry and entry in cfg.methods else {}
    recipe = t.recipe
    kind = "paper preset" if preset else "config"
    out = {}
    for k in TrainingConfig.model_fields:
        if k in over:
            out[k] = {"from": kind, "at": f"methods.{entry}.training.{k}"}
        elif k in set_exp:
            out[k] = {"from": kind, "at": f"training.{k}"}
        elif k in RECIPES.get(recipe, {}):
            out[k] = {"from": "recipe", "at": f"RECIPES[{recipe!r}]"}
        else:
            out[k] = {"from": "default", "at": f"TrainingConfig.{k}"}
    if entry and entry in cfg.methods and method_evaluation(cfg.method_algorithm(entry)) \
            and out["evaluation"]["from"] == "default":
        out["evaluation"] = {"from": "method", "at": "TrainingConfig.resolved (GeNIe: few_shot_episodes)"}
    return out


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


def _split_counts(size: dict, shots: int, val: int) -> list[int]:
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


# ------------------------------------------------------------------ one method entry
def _cfg_on(g: float, rule: str | None) -> int:
    return 2 if rule or g > 1.0 else 1  # SGID's per-image f(s*) is > 1 for most cosines: counted with CFG


def entry_plan(cfg, name: str, size: dict, img_per_s: float) -> dict[str, Any]:
    from .methods.protocol import resolve_protocol
    from .methods.registry import get_method, method_params

    entry = cfg.methods[name]
    algo = cfg.method_algorithm(name)
    spec = get_method(algo)
    params = method_params(name, entry)
    preset = _is_preset(cfg)
    t = cfg.training_for(name)
    tsrc = _training_sources(cfg, name, t, preset)
    out: dict[str, Any] = {"algorithm": algo, "enabled": entry.enabled, "uses_diffusion": spec.uses_diffusion,
                           "needs": list(spec.needs)}
    sources: dict[str, dict[str, str]] = {}
    mparams = params.model_dump(mode="json", exclude={"images_per_real", "guidance_scale", "steps"})
    out["method_params"] = mparams
    sources["method_params"] = {"from": ("paper preset" if preset else "config") if entry.params else "method",
                                "at": f"methods.{name}.params" if entry.params else f"methods/{algo}.py"}
    proto = None
    if spec.uses_diffusion:
        proto = resolve_protocol(cfg, name)
        out.update(scheduler=proto.scheduler, steps=proto.steps, start_rule=proto.start_rule,
                   preprocess=proto.preprocess, vae_encode=proto.vae_encode,
                   guidance_scale=None if proto.guidance else proto.guidance_scale, guidance_rule=proto.guidance,
                   resolution=proto.resolution)
        for k, w in proto.sources.items():
            sources[k] = _protocol_source(w, preset)
        sources["vae_encode"] = {"from": "method" if proto.vae_encode != "mode" else "default",
                                 "at": f"paper:{algo}" if proto.vae_encode != "mode" else "Protocol.vae_encode"}
        if sources.get("guidance_scale") and proto.guidance:
            sources["guidance_scale"] = {"from": "method", "at": f"paper:{algo} ({proto.guidance})"}
        if proto.count:
            out["images_per_real"], out["images_per_class"] = None, proto.count
        else:
            out["images_per_real"], out["images_per_class"] = proto.images_per_real, None
        out["protocol_note"] = proto.note
    else:
        out.update(scheduler=None, steps=None, start_rule=None, preprocess=None, vae_encode=None, guidance_scale=None,
                   guidance_rule=None, resolution=None, images_per_real=_plain_m(cfg, entry), images_per_class=None)
    # concept learning / inversion steps the entry depends on
    out["concept_steps"] = cfg.concepts.steps if "concepts" in spec.needs else None
    out["concepts"] = (cfg.concepts.model_dump(mode="json") if "concepts" in spec.needs else
                       cfg.concept_lora.model_dump(mode="json") if out_uses_lora(spec, params) else None)
    out["lora_steps"] = (cfg.concept_lora.steps if "concept_lora" in spec.needs and getattr(params, "use_concepts", True)
                         else None)
    out["inversion_steps"] = (cfg.inversion.steps if "inversion_pool" in spec.needs and getattr(params, "use_concepts", True)
                              else None)
    alpha = next(a for a in (entry.synthetic_probability, spec.default_alpha, t.synthetic_probability) if a is not None)
    out["synthetic_probability"] = alpha
    sources["synthetic_probability"] = (
        {"from": "paper preset" if preset else "config", "at": f"methods.{name}.synthetic_probability"}
        if entry.synthetic_probability is not None else
        {"from": "method", "at": f"methods/{algo}.py default_alpha"} if spec.default_alpha is not None else
        tsrc["synthetic_probability"])
    out["classifier"] = classifier_plan(cfg, t)
    renamed = {"train_transform": "train_aug", "synthetic_transform": "synthetic_aug", "headline_metric": "headline",
               "epochs_over_data": "epoch_unit", "full_fine_tune": "linear_probe"}
    csrc = {k: tsrc[renamed.get(k, k)] for k in out["classifier"] if renamed.get(k, k) in tsrc}
    kind = "paper preset" if preset else "config"
    mc = cfg.models.classifier.model_fields_set
    for k in ("backbone", "pretrained"):
        f = "source" if k == "backbone" else k
        csrc[k] = ({"from": kind, "at": f"models.classifier.{f}"} if f in mc
                   else {"from": "default", "at": f"ClassifierModelConfig.{f}"})
    if tsrc["linear_probe"]["from"] == "default":  # None: models.classifier.freeze_backbone decides
        csrc["linear_probe"] = csrc["full_fine_tune"] = (
            {"from": kind, "at": "models.classifier.freeze_backbone"} if "freeze_backbone" in mc
            else {"from": "default", "at": "ClassifierModelConfig.freeze_backbone"})
    sources["classifier"] = csrc
    if algo == "diagen" and getattr(params, "weighting", "none") != "none":
        f = t.diagen_filter
        out["filter"] = {"backbone": f.backbone, "linear_probe": True, "optimizer": f.optimizer, "lr": f.lr,
                         "weight_decay": f.weight_decay, "epochs": f.epochs, "steps_per_epoch": f.steps_per_epoch,
                         "batch_size": f.batch_size, "patience": f.patience, "train_transform": f.train_aug,
                         "views": f.views, "temperature": "LBFGS on NLL over half of each class's val images "
                                                          "(the other half stops training)"}
        sources["filter"] = tsrc["diagen_filter"]
    out["evaluation"] = evaluation_plan(cfg, t)
    sources["evaluation"] = tsrc["evaluation"]
    out["sources"] = sources
    out["work"] = entry_work(cfg, name, algo, params, proto, out, size, t, img_per_s)
    if proto is not None:  # the start the units actually use: txt2img and Diff-II's latents have no img2img start
        kind = _per_image_calls(algo, params, proto)[2]
        if kind != out["start_rule"]:
            out["start_rule"], out["preprocess"], out["vae_encode"] = kind, None, None
            sources["start_rule"] = {"from": "method", "at": f"methods/{algo}.py ({kind} start)"}
            sources.pop("vae_encode", None)
    return out


def out_uses_lora(spec, params) -> bool:
    return "concept_lora" in spec.needs and getattr(params, "use_concepts", True)


def _plain_m(cfg, entry) -> int:
    for v in (entry.images_per_real, getattr(entry.params, "get", lambda k: None)("images_per_real"),
              cfg.generation.images_per_real):
        if v is not None:
            return int(v)
    return 4


def classifier_plan(cfg, t: TrainingConfig) -> dict[str, Any]:
    probe = freeze_for(t, cfg.models.classifier)
    return {
        "recipe": t.recipe, "backbone": cfg.models.classifier.source, "pretrained": cfg.models.classifier.pretrained,
        "linear_probe": probe, "full_fine_tune": not probe, "optimizer": t.optimizer, "lr": t.lr,
        "momentum": t.momentum if t.optimizer == "sgd" else None, "weight_decay": t.weight_decay,
        "label_smoothing": t.label_smoothing, "schedule": t.schedule,
        "warmup_frac": t.warmup_frac if t.schedule == "cosine" else None, "epochs": t.epochs,
        "epoch_unit": t.epoch_unit, "steps_per_epoch": t.steps_per_epoch if t.epoch_unit == "steps" else None,
        "epochs_over_data": t.epoch_unit == "data", "batch_size": t.batch_size, "train_transform": t.train_aug,
        "synthetic_transform": t.synthetic_aug, "class_balanced": t.class_balanced, "image_size": t.image_size,
        "headline_metric": t.headline, "model_selection": "best epoch on the validation split",
    }


def evaluation_plan(cfg, t: TrainingConfig) -> dict[str, Any]:
    ep = t.episodes
    episodic = "few_shot_episodes" in t.evaluation
    return {
        "kind": list(t.evaluation), "shots": list(cfg.splits.shots), "seeds": list(cfg.splits.seeds),
        "val_per_class": cfg.splits.val_per_class,
        "n_way": ep.n_way if episodic else None, "queries": ep.queries_per_class if episodic else None,
        "episodes": ep.episodes if episodic else None, "encoder": ep.encoder if episodic else None,
        # "split": the split's K shots are every episode's support (synthetic images made once per split);
        # "episode": a fresh support per episode, every method generating from it (GeNIe §4.1)
        "support": ep.support if episodic else None,
        # per K: augmented images per class in every episode (support: episode; default (N−1)·K, GeNIe's count)
        "augmented_per_class": ({k: (ep.augmented_per_class if ep.augmented_per_class is not None
                                     else (ep.n_way - 1) * k) for k in cfg.splits.shots}
                                if episodic and ep.support == "episode" else None),
    }


def _per_image_calls(algo: str, params, proto) -> tuple[float, int, str]:
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
        counts = _split_counts(size, k, cfg.splits.val_per_class)
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
            calls, cand, _ = _per_image_calls(algo, params, proto)
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
    gpu_h = gen_h + concept_passes * 3 * _res_scale(cfg) / img_per_s / 3600.0  # a training pass ≈ 3 forward passes
    return {"synthetic_images": imgs, "unet_image_passes": passes, "unet_passes_per_image":
            round(passes / imgs, 2) if imgs else 0.0, "concept_training_image_passes": concept_passes,
            "classifier_training_steps": train_steps, "gpu_hours_generation": round(gen_h, 3),
            "gpu_hours": round(gpu_h, 3), "per_split": per_split}


def _res_scale(cfg) -> float:
    r = cfg.generation.resolution or 512
    return (r / 512.0) ** 2


# ------------------------------------------------------------------ the whole config
def plan_config(cfg, img_per_s: float = DEFAULT_IMG_PER_S, include_disabled: bool = False,
                classes: int | None = None, train_per_class: int | None = None) -> dict[str, Any]:
    size = dataset_size(cfg, classes, train_per_class)
    methods = {n: entry_plan(cfg, n, size, img_per_s) for n, e in cfg.methods.items() if e.enabled or include_disabled}
    t = cfg.training_for(None)
    real = {"classifier": classifier_plan(cfg, t), "evaluation": evaluation_plan(cfg, t)}
    real_steps = 0
    for k in cfg.splits.shots:
        n_real = sum(_split_counts(size, k, cfg.splits.val_per_class))
        real_steps += (t.epochs * (math.ceil(n_real / t.batch_size) if t.epoch_unit == "data" else t.steps_per_epoch)
                       * len(cfg.splits.seeds))
    tot = {k: sum(m["work"][k] for m in methods.values())
           for k in ("synthetic_images", "unet_image_passes", "classifier_training_steps")}
    tot["classifier_training_steps"] += real_steps
    # concept learning is one shared stage per split (TI: concept_embeddings; TI + LoRA: concept_lora): counted once
    shared = {}
    for m in methods.values():
        kind = "ti" if m["concept_steps"] else "lora" if m["lora_steps"] else None
        if kind:
            shared[kind] = max(shared.get(kind, 0), m["work"]["concept_training_image_passes"])
    tot["concept_training_image_passes"] = sum(shared.values())
    gen_h = sum(m["work"]["gpu_hours_generation"] for m in methods.values())
    tot["gpu_hours"] = round(gen_h + 3 * tot["concept_training_image_passes"] * _res_scale(cfg) / img_per_s / 3600.0, 3)
    tot["img_per_s"] = img_per_s
    tot["assumption"] = (f"{img_per_s:g} UNet image-passes/s (SD-1.x UNet at 512², fp16, batched; a CFG step on B "
                         "images counts 2B), scaled by (resolution/512)²; a concept-training pass counts as 3 forward "
                         "passes. An entry's figure includes the concept learning it needs; the total counts that shared "
                         "stage once (inversion pools: per entry). Classifier steps are not in GPU-hours.")
    tot["dataset"] = {k: v for k, v in size.items() if k != "train_per_class"}
    return {"experiment": cfg.experiment, "config": cfg.source_path, "paper_preset": _is_preset(cfg),
            "splits": {"shots": list(cfg.splits.shots), "seeds": list(cfg.splits.seeds),
                       "val_per_class": cfg.splits.val_per_class, "fewer_than_k": cfg.splits.fewer_than_k},
            "diffusion_model": cfg.models.diffusion.source,
            "models": {"diffusion": cfg.models.diffusion.source, "captioner": cfg.models.captioner.source,
                       "clip": cfg.models.clip.source, "classifier": cfg.models.classifier.source,
                       "llm": f"{cfg.models.llm.provider}:{cfg.models.llm.model}"},
            "real_only": real, "methods": methods, "work": tot}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def format_plan(p: dict[str, Any]) -> str:
    """The human table: one row per entry for generation, one for the classifier/evaluation, then the work."""
    L = [f"plan of {p['experiment']} ({p['config']}){'  [paper preset]' if p['paper_preset'] else ''}",
         f"  model {p['diffusion_model']}; splits: shots {p['splits']['shots']} × seeds {p['splits']['seeds']}, "
         f"val {p['splits']['val_per_class']} per class"
         + (" (use_all: a short class keeps its K shots, the rest validates)" if p["splits"]["fewer_than_k"] == "use_all"
            else ""), ""]
    gen_cols = ["entry", "algorithm", "sampler", "steps", "start", "z0", "g", "M / count", "res", "concept/LoRA/inv"]
    rows = []
    for n, m in p["methods"].items():
        ci = "/".join(_fmt(m[k]) for k in ("concept_steps", "lora_steps", "inversion_steps"))
        rows.append([n, m["algorithm"], _fmt(m["scheduler"]), _fmt(m["steps"]),
                     _fmt(m["start_rule"]) + ("" if m["preprocess"] in (None, "resize") else "+crop"),
                     _fmt(m["vae_encode"]), _fmt(m["guidance_rule"] or m["guidance_scale"]),
                     _fmt(m["images_per_class"] or (f"M {m['images_per_real']}")), _fmt(m["resolution"]), ci])
    L += _table(gen_cols, rows) + [""]
    clf_cols = ["entry", "α", "optimizer", "lr", "schedule", "epochs", "batch", "transform", "probe", "metric", "evaluation"]
    rows = []
    for n, m in [("real_only", {"classifier": p["real_only"]["classifier"], "evaluation": p["real_only"]["evaluation"],
                                "synthetic_probability": None})] + list(p["methods"].items()):
        c, e = m["classifier"], m["evaluation"]
        ep = (f"{'+'.join(e['kind'])}" + (f" {e['n_way']}-way {e['episodes']} ep × {e['queries']} q" if e["n_way"] else "")
              + (f", support per {e['support']}" if e.get("support") else "")
              + (", aug/class " + "/".join(f"{v} (K={k})" for k, v in e["augmented_per_class"].items())
                 if e.get("augmented_per_class") else ""))
        epochs = f"{c['epochs']}×{'data' if c['epochs_over_data'] else c['steps_per_epoch']}"
        tr = c["train_transform"] + (f"+syn:{c['synthetic_transform']}" if c["synthetic_transform"] != "none" else "")
        probe = "linear" if c["linear_probe"] else ("full" if c["pretrained"] else "scratch")
        rows.append([n, _fmt(m["synthetic_probability"]), c["optimizer"], _fmt(c["lr"]), c["schedule"], epochs,
                     str(c["batch_size"]), tr, probe, c["headline_metric"], ep])
    L += _table(clf_cols, rows)
    for n, m in p["methods"].items():
        f = m.get("filter")
        if f:
            L.append(f"  {n} filter: {f['backbone']} linear probe, {f['optimizer']} {f['lr']:g} (wd {f['weight_decay']:g}), "
                     f"≤ {f['epochs']}×{f['steps_per_epoch']}×{f['batch_size']}, patience {f['patience']}, "
                     f"{f['train_transform']}, q over {f['views']} views; T: {f['temperature']}")
    L.append("")
    w = p["work"]
    rows = [[n, str(m["work"]["synthetic_images"]), str(m["work"]["unet_image_passes"]),
             _fmt(m["work"]["unet_passes_per_image"]), str(m["work"]["classifier_training_steps"]),
             _fmt(m["work"]["gpu_hours"])] for n, m in p["methods"].items()]
    rows.append(["total", str(w["synthetic_images"]), str(w["unet_image_passes"]), "",
                 str(w["classifier_training_steps"]), _fmt(w["gpu_hours"])])
    L += _table(["entry", "synthetic", "UNet passes", "per image", "clf steps", "GPU-h"], rows)
    if w["dataset"].get("note"):
        L.append(f"  dataset: {w['dataset']['note']}")
    L.append(f"  GPU-hours at {w['assumption']}")
    from collections import Counter

    set_here = Counter(k for m in p["methods"].values() for k, s in m["sources"].items()
                       if isinstance(s, dict) and s.get("from") in ("config", "paper preset"))
    if set_here:
        L.append("  set in this file (key × entries; the rest come from the method, a recipe or the project default; "
                 "--json has every source): " + ", ".join(f"{k} ×{n}" for k, n in sorted(set_here.items())))
    return "\n".join(L)


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    w = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda r: "  " + "  ".join(str(x).ljust(w[i]) for i, x in enumerate(r)).rstrip()  # noqa: E731
    return [line(cols), line(["-" * x for x in w])] + [line(r) for r in rows]


def cmd_plan(args) -> int:
    cfg = load_config(args.config)
    if args.img_per_s <= 0 or (args.classes is not None and args.classes < 1) or \
            (args.train_per_class is not None and args.train_per_class < 1):
        from .errors import UserError

        raise UserError("augment plan: --img-per-s, --classes and --train-per-class must be positive")
    p = plan_config(cfg, img_per_s=args.img_per_s, include_disabled=args.all, classes=args.classes,
                    train_per_class=args.train_per_class)
    print(json.dumps(p, indent=2, default=str) if args.json else format_plan(p))
    return 0


def register(sub, default_config: str) -> None:
    """The `augment plan` subcommand (cli.py)."""
    sp = sub.add_parser("plan", help="every method entry's resolved protocol, where each value came from, and the "
                                     "work it implies (no model is loaded)")
    sp.add_argument("--config", default=default_config, help="experiment YAML (default: assets_config/demo.yaml)")
    sp.add_argument("--json", action="store_true", help="machine-readable output (methods.<entry>.*, work)")
    sp.add_argument("--img-per-s", type=float, default=DEFAULT_IMG_PER_S,
                    help=f"UNet image-passes per second the GPU-hours estimate assumes (default {DEFAULT_IMG_PER_S:g})")
    sp.add_argument("--all", action="store_true", help="include disabled entries")
    sp.add_argument("--classes", type=int, default=None, help="assume this many classes (the dataset is elsewhere)")
    sp.add_argument("--train-per-class", type=int, default=None,
                    help="with --classes: train-pool images per class (default: the largest K + val_per_class)")
    sp.set_defaults(fn=cmd_plan)
