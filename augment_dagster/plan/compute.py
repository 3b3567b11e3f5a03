"""One plan per config: every method entry's resolved protocol, classifier recipe and evaluation, where each
value came from (``sources``), and its work (``plan/work.py``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import TrainingConfig
from ..training.recipes import RECIPES, freeze_for, method_evaluation
from .work import DEFAULT_IMG_PER_S, dataset_size, entry_work, per_image_calls, res_scale, split_counts


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


# ------------------------------------------------------------------ one method entry
def entry_plan(cfg, name: str, size: dict, img_per_s: float) -> dict[str, Any]:
    from ..methods.registry import get_method, method_params, resolve_protocol

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
        kind = per_image_calls(algo, params, proto)[2]
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


# ------------------------------------------------------------------ the whole config
def plan_config(cfg, img_per_s: float = DEFAULT_IMG_PER_S, include_disabled: bool = False,
                classes: int | None = None, train_per_class: int | None = None) -> dict[str, Any]:
    size = dataset_size(cfg, classes, train_per_class)
    methods = {n: entry_plan(cfg, n, size, img_per_s) for n, e in cfg.methods.items() if e.enabled or include_disabled}
    t = cfg.training_for(None)
    real = {"classifier": classifier_plan(cfg, t), "evaluation": evaluation_plan(cfg, t)}
    real_steps = 0
    for k in cfg.splits.shots:
        n_real = sum(split_counts(size, k, cfg.splits.val_per_class))
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
    tot["gpu_hours"] = round(gen_h + 3 * tot["concept_training_image_passes"] * res_scale(cfg) / img_per_s / 3600.0, 3)
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
