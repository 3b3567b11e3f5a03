"""Diff-II concept learning (METHODS.md §3.1, Diff-Mix ``finetune.sh``): one textual-inversion token per class
AND one LoRA shared by all classes on the UNet attention projections (peft), trained jointly on all train
images with the LDM loss on "a photo of a <cls_i> <metaclass>".

No model is copied (one copy of each model per process): training adds a LoRA adapter to the bundle's own UNet
and deletes it afterwards (stages/concepts.py), and ``bundle_with_lora`` attaches the trained LoRA as a named
peft adapter on that same UNet (once per LoRA blob) and returns a bundle that names it; the generation core
switches the adapter on only around its own UNet calls (models/adapters.py), so the base pipeline generates
exactly as before.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from .concepts import ConceptResult, train_concepts


def learn_concepts_lora(bundle, images_by_label: dict[str, list], tokens: dict[str, str], *, metaclass: str = "",
                        init_word: str = "the", steps: int = 200, lr: float = 5e-4, rank: int = 10, batch_size: int = 4,
                        seed: int = 0, hflip: bool = True, checkpoint_path: Path | None = None,
                        checkpoint_every: int = 50, progress: bool = False) -> ConceptResult:
    """Jointly train per-class tokens (only their embedding rows) and one shared UNet LoRA on
    "a photo of a <cls_i> <metaclass>"."""
    templates = {l: [f"a photo of a {{}} {metaclass}".strip()] for l in images_by_label}
    return train_concepts(bundle, images_by_label, tokens, templates, init_word=init_word, steps=steps, lr=lr,
                          batch_size=batch_size, seed=seed, hflip=hflip, lora_rank=rank, checkpoint_path=checkpoint_path,
                          checkpoint_every=checkpoint_every, progress=progress, desc="concept_lora")


def lora_rank(state: dict[str, Any]) -> int:
    for k, v in state.items():
        if "lora_A" in k:
            return int(v.shape[0])
    raise ValueError("not a LoRA state dict: no lora_A weights")


def adapter_name(key: str) -> str:
    """The peft adapter name of the LoRA stored under blob ``key``."""
    return f"lora_{key[:16]}"


def bundle_with_lora(bundle, state: dict[str, Any], key: str):
    """A DiffusionBundle on the SAME pipeline whose ``lora_adapter`` names this LoRA, attached (once) as an
    adapter to the bundle's UNet; the base bundle keeps generating with the base model."""
    from ..models.adapters import add_lora, adapter_names

    name = adapter_name(key)
    unet = bundle.pipe.unet
    if name not in adapter_names(unet):
        add_lora(unet, name, lora_rank(state), state)
        for n, p in unet.named_parameters():  # an inference adapter: no grads
            if f".{name}." in n:
                p.requires_grad_(False)
    return dataclasses.replace(bundle, fingerprint=f"{bundle.fingerprint}+lora:{key[:12]}", lora_adapter=name)


def concept_lora_stage(train, *, images, blobs, memo, model_fp: str, bundle_factory, metaclass: str, init_word: str,
                       steps: int, lr: float, rank: int, batch_size: int, seed: int, checkpoint_dir: Path,
                       checkpoint_every: int = 50, progress: bool = False):
    """Memoized: the key covers every class's train images (the LoRA is shared). Returns (rows, stats)."""
    import numpy as np

    from ..store import memo_key
    from ..methods.base import concept_token
    from ..store.tensors import tensor_bytes, tensor_dict_bytes
    from . import StageStats

    t0 = time.perf_counter()
    stats = StageStats()
    by_label = {l: sorted(g["image_id"]) for l, g in train.groupby("label")}
    tokens = {l: concept_token(l) for l in by_label}
    params = {"steps": steps, "lr": lr, "rank": rank, "batch_size": batch_size, "init_word": init_word, "metaclass": metaclass,
              "tokens": tokens}
    key = memo_key("concept_lora", "cl-2", model=model_fp, params=params, inputs=by_label, seed=seed)
    rec = memo.get(key)
    if rec is None:
        res = learn_concepts_lora(bundle_factory(), {l: [images.real(i) for i in ids] for l, ids in by_label.items()}, tokens,
                                  metaclass=metaclass, init_word=init_word, steps=steps, lr=lr, rank=rank,
                                  batch_size=batch_size, seed=seed, checkpoint_path=checkpoint_dir / f"{key}.pt",
                                  checkpoint_every=checkpoint_every, progress=progress)
        k = max(1, len(res.losses) // 10)
        rec = {"tokens": {t: blobs.put(tensor_bytes(v), "safetensors") for t, v in res.vectors.items()},
               "moved": {t: float((res.vectors[t] - res.init_vectors[t]).norm()) for t in res.vectors},
               "lora": blobs.put(tensor_dict_bytes(res.lora_state), "safetensors"), "rank": rank,
               "first_loss": float(np.mean(res.losses[:k])), "last_loss": float(np.mean(res.losses[-k:])),
               "seconds": res.seconds, "lora_params": int(sum(v.numel() for v in res.lora_state.values()))}
        rec = memo.put(key, rec)
        ck = checkpoint_dir / f"{key}.pt"
        if ck.exists():
            ck.unlink()
        stats.computed = 1
    else:
        stats.reused = 1
    rows = [{"kind": "token", "label": l, "token": tokens[l], "blob": rec["tokens"][tokens[l]], "moved": rec["moved"][tokens[l]],
             "train_image_ids": by_label[l], "memo_key": key, "model_fingerprint": model_fp} for l in sorted(by_label)]
    rows.append({"kind": "lora", "label": None, "token": None, "blob": rec["lora"], "moved": None,
                 "train_image_ids": sorted(i for ids in by_label.values() for i in ids), "memo_key": key, "model_fingerprint": model_fp})
    stats.seconds = time.perf_counter() - t0
    stats.extra = {k: rec[k] for k in ("first_loss", "last_loss", "rank", "lora_params")}
    return rows, stats
