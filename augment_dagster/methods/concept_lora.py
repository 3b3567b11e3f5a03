"""Diff-II concept learning (METHODS.md §3.1, Diff-Mix ``finetune.sh``): one textual-inversion token per class
AND one LoRA shared by all classes on the UNet attention projections (peft), trained jointly on all train
images with the LDM loss on "a photo of a <cls_i> <metaclass>".

The cached base pipeline is never mutated: training works on copies of the text encoder, tokenizer and UNet,
and ``bundle_with_lora`` builds a new pipeline around a LoRA'd copy of the UNet (cached per LoRA blob).
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class ConceptLoraResult:
    vectors: dict[str, Any]  # token -> input-embedding vector (cpu float32)
    init_vectors: dict[str, Any]
    lora_state: dict[str, Any]  # peft state dict of the UNet adapter (cpu)
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    resumed_from: int = 0
    seconds: float = 0.0


def _encode_latents(pipe, images, resolution: int, hflip: bool):
    import numpy as np
    import torch
    from PIL import Image

    vae = pipe.vae
    dev, dt = vae.device, vae.dtype
    arr = np.stack([np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
                    for im in images]) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if hflip:
        x = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        z = vae.encode(x.to(dev, dt)).latent_dist.mean * vae.config.scaling_factor
    return z.float()


def learn_concepts_lora(bundle, images_by_label: dict[str, list], tokens: dict[str, str], *, metaclass: str = "",
                        init_word: str = "the", steps: int = 200, lr: float = 5e-4, rank: int = 10, batch_size: int = 4,
                        seed: int = 0, hflip: bool = True, checkpoint_path: Path | None = None,
                        checkpoint_every: int = 50, progress: bool = False) -> ConceptLoraResult:
    """Jointly train per-class tokens (only their embedding rows) and one shared UNet LoRA."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ..util import atomic_path

    t_start = time.perf_counter()
    pipe = bundle.pipe
    dev = pipe.unet.device
    tok = copy.deepcopy(pipe.tokenizer)
    te = copy.deepcopy(pipe.text_encoder).float().to(dev)
    unet = copy.deepcopy(pipe.unet).float().to(dev)
    sched = pipe.scheduler
    labels = sorted(images_by_label)
    new_tokens = [tokens[l] for l in labels]
    tok.add_tokens(new_tokens)
    te.resize_token_embeddings(len(tok))  # before any grad-enabled forward (ENVIRONMENT.md pitfall)
    emb = te.get_input_embeddings()
    emb.weight = torch.nn.Parameter(emb.weight.detach().clone())
    init_ids = tok(init_word, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    new_ids = tok.convert_tokens_to_ids(new_tokens)
    with torch.no_grad():
        for i in new_ids:
            emb.weight[i] = emb.weight[init_ids[0]]
    init_vectors = {t: emb.weight[i].detach().cpu().clone() for t, i in zip(new_tokens, new_ids)}
    te.requires_grad_(False)
    emb.weight.requires_grad_(True)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [emb.weight], "weight_decay": 0.0}, {"params": lora_params, "weight_decay": 1e-2}], lr=lr)
    mask = torch.zeros(emb.weight.shape[0], 1, device=dev)
    mask[new_ids] = 1.0

    res = bundle.resolution
    lat, lab = [], []
    for li, l in enumerate(labels):
        z = _encode_latents(pipe, images_by_label[l], res, hflip)
        lat.append(z)
        lab += [li] * len(z)
    lat = torch.cat(lat).to(dev)
    prompts = [f"a photo of a {tokens[l]} {metaclass}".strip() for l in labels]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")["input_ids"].to(dev)
    lab_t = torch.tensor(lab, device=dev)

    losses: list[float] = []
    start = 0
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        ck = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            emb.weight.copy_(ck["emb"].to(dev))
        set_peft_model_state_dict(unet, ck["lora"])
        opt.load_state_dict(ck["opt"])
        losses, start = ck["losses"], ck["step"]
        g.set_state(ck["gen"])
        rng.setstate(ck["rng"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="concept_lora", leave=False)
    T = sched.config.num_train_timesteps
    for step in range(start, steps):
        idx = torch.tensor([rng.randrange(len(lat)) for _ in range(batch_size)], device=dev)
        z0 = lat[idx]
        noise = torch.randn(z0.shape, generator=g).to(dev)
        t = torch.randint(0, T, (batch_size,), generator=g).to(dev)
        zt = sched.add_noise(z0, noise, t)
        enc = te(ids[lab_t[idx]])[0]
        pred = unet(zt, t, encoder_hidden_states=enc).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=False)
        loss.backward()
        emb.weight.grad.mul_(mask)  # only the new tokens' rows learn
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
        if checkpoint_path is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            with atomic_path(checkpoint_path) as tmp:
                torch.save({"emb": emb.weight.detach().cpu(), "lora": get_peft_model_state_dict(unet), "opt": opt.state_dict(),
                            "losses": losses, "step": step + 1, "gen": g.get_state(), "rng": rng.getstate()}, tmp)
    if bar is not None:
        bar.close()
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    vectors = {t: emb.weight[i].detach().cpu().float().clone() for t, i in zip(new_tokens, new_ids)}
    return ConceptLoraResult(vectors, init_vectors, state, losses, steps, start, time.perf_counter() - t_start)


def lora_rank(state: dict[str, Any]) -> int:
    for k, v in state.items():
        if "lora_A" in k:
            return int(v.shape[0])
    raise ValueError("not a LoRA state dict: no lora_A weights")


_LORA_BUNDLES: dict[tuple[int, str], Any] = {}


def bundle_with_lora(bundle, state: dict[str, Any], key: str):
    """A DiffusionBundle whose pipeline uses a copy of the UNet with this LoRA; the base stays untouched."""
    ck = (id(bundle.pipe), key)
    if ck in _LORA_BUNDLES:
        return _LORA_BUNDLES[ck]
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    r = lora_rank(state)
    unet = copy.deepcopy(bundle.pipe.unet)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    set_peft_model_state_dict(unet, {k: v.to(unet.device, unet.dtype) for k, v in state.items()})
    unet.eval()
    comps = dict(bundle.pipe.components)
    comps["unet"] = unet
    comps.setdefault("requires_safety_checker", False)
    pipe = StableDiffusionPipeline(**comps)
    out = dataclasses.replace(bundle, pipe=pipe, fingerprint=f"{bundle.fingerprint}+lora:{key[:12]}")
    _LORA_BUNDLES[ck] = out
    return out


def concept_lora_stage(train, *, images, blobs, memo, model_fp: str, bundle_factory, metaclass: str, init_word: str,
                       steps: int, lr: float, rank: int, batch_size: int, seed: int, checkpoint_dir: Path,
                       checkpoint_every: int = 50, progress: bool = False):
    """Memoized: the key covers every class's train images (the LoRA is shared). Returns (rows, stats)."""
    import numpy as np

    from ..store import memo_key
    from .base import concept_token
    from .stages import StageStats, tensor_bytes, tensor_dict_bytes

    t0 = time.perf_counter()
    stats = StageStats()
    by_label = {l: sorted(g["image_id"]) for l, g in train.groupby("label")}
    tokens = {l: concept_token(l) for l in by_label}
    params = {"steps": steps, "lr": lr, "rank": rank, "batch_size": batch_size, "init_word": init_word, "metaclass": metaclass,
              "tokens": tokens}
    key = memo_key("concept_lora", "cl-1", model=model_fp, params=params, inputs=by_label, seed=seed)
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
        memo.put(key, rec)
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
