"""The human table of ``augment plan`` (``--json`` prints the plan dict itself)."""
from __future__ import annotations

from typing import Any


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
