"""Concept learning: textual inversion (DA-Fusion §1.2) and TI + shared LoRA (Diff-II §3.1), one trainer.

Only the new tokens' input-embedding rows are optimised (gradients of every other row are masked, their
weights stay bit-identical); with ``lora_rank`` a peft LoRA on the UNet attention projections is trained
jointly. The loss is the LDM objective ‖ε − ε_θ(z_t, t, c(prompt))‖² with t and ε from a seeded generator.
Training runs on *copies* of the text encoder, tokenizer and UNet, so the cached pipeline is never mutated.
A checkpoint (atomic) every ``checkpoint_every`` steps lets a killed run resume where it stopped.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# DA-Fusion's imagenet_templates_small (textual inversion templates)
IMAGENET_TEMPLATES_SMALL = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]


@dataclass
class ConceptResult:
    vectors: dict[str, Any]  # token -> learned input-embedding vector (cpu float32)
    init_vectors: dict[str, Any]
    lora_state: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    resumed_from: int = 0
    seconds: float = 0.0

    # single-token convenience (textual inversion of one class)
    @property
    def token(self) -> str:
        return next(iter(self.vectors))

    @property
    def vector(self):
        return self.vectors[self.token]

    @property
    def init_vector(self):
        return self.init_vectors[self.token]


def _latents(pipe, images, resolution: int, hflip: bool):
    import numpy as np
    import torch
    from PIL import Image

    vae = pipe.vae
    arr = np.stack([np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BILINEAR), dtype=np.float32)
                    for im in images]) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if hflip:
        x = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    return z.float()


def train_concepts(bundle, images_by_label: dict[str, list], tokens: dict[str, str], templates: dict[str, list[str]], *,
                   init_word: str = "the", steps: int = 100, lr: float = 5e-3, batch_size: int = 4, seed: int = 0,
                   hflip: bool = True, lora_rank: int | None = None, checkpoint_path: Path | None = None,
                   checkpoint_every: int = 50, progress: bool = False, desc: str = "textual inversion") -> ConceptResult:
    import torch
    import torch.nn.functional as F

    from ..util import atomic_path

    t_start = time.perf_counter()
    pipe = bundle.pipe
    dev = pipe.unet.device
    tok = copy.deepcopy(pipe.tokenizer)
    te = copy.deepcopy(pipe.text_encoder).float()
    unet = copy.deepcopy(pipe.unet).float() if lora_rank else pipe.unet
    sched = pipe.scheduler
    labels = sorted(images_by_label)
    new_tokens = [tokens[l] for l in labels]
    tok.add_tokens([t for t in new_tokens if t not in tok.get_vocab()])
    te.resize_token_embeddings(len(tok), mean_resizing=False)  # before any grad forward (ENVIRONMENT.md pitfall)
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
    groups = [{"params": [emb.weight], "weight_decay": 0.0}]
    if lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        groups.append({"params": [p for p in unet.parameters() if p.requires_grad], "weight_decay": 1e-2})
    opt = torch.optim.AdamW(groups, lr=lr)
    mask = torch.zeros(emb.weight.shape[0], 1)
    mask[new_ids] = 1.0

    lat, lab = [], []
    for li, l in enumerate(labels):
        z = _latents(pipe, images_by_label[l], bundle.resolution, hflip)
        lat.append(z)
        lab += [li] * len(z)
    lat = torch.cat(lat)
    all_prompts = {l: [t.format(tokens[l]) for t in templates[l]] for l in labels}

    losses: list[float] = []
    start = 0
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        ck = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            emb.weight.copy_(ck["emb"])
        if lora_rank:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(unet, ck["lora"])
        opt.load_state_dict(ck["opt"])
        losses, start = list(ck["losses"]), int(ck["step"])
        g.set_state(ck["gen"])
        rng.setstate(ck["rng"])
    bar = None
    if progress and steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, leave=False)
    T = sched.config.num_train_timesteps
    te.to(dev)
    for step in range(start, steps):
        idx = [rng.randrange(len(lat)) for _ in range(batch_size)]
        prompts = [rng.choice(all_prompts[labels[lab[i]]]) for i in idx]
        z0 = lat[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, T, (batch_size,), generator=g)
        zt = sched.add_noise(z0, noise, t)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")["input_ids"]
        enc = te(ids.to(dev))[0]
        pred = unet(zt.to(dev, unet.dtype), t.to(dev), encoder_hidden_states=enc.to(unet.dtype)).sample
        loss = F.mse_loss(pred.float(), noise.to(dev))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        emb.weight.grad.mul_(mask.to(emb.weight.grad.device))  # only the new tokens' rows learn
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
        if checkpoint_path is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            state = {"emb": emb.weight.detach().cpu(), "opt": opt.state_dict(), "losses": losses, "step": step + 1,
                     "gen": g.get_state(), "rng": rng.getstate()}
            if lora_rank:
                from peft.utils import get_peft_model_state_dict

                state["lora"] = get_peft_model_state_dict(unet)
            with atomic_path(checkpoint_path) as tmp:
                torch.save(state, tmp)
    if bar is not None:
        bar.close()
    lora_state = None
    if lora_rank:
        from peft.utils import get_peft_model_state_dict

        lora_state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    vectors = {t: emb.weight[i].detach().cpu().float().clone() for t, i in zip(new_tokens, new_ids)}
    return ConceptResult(vectors, init_vectors, lora_state, losses, steps, start, time.perf_counter() - t_start)


def learn_concept(bundle, images: list, token: str, init_word: str = "the", steps: int = 100, lr: float = 5e-3,
                  batch_size: int = 4, seed: int = 0, hflip: bool = True, checkpoint_path: Path | None = None,
                  checkpoint_every: int = 50, progress: bool = False, templates: list[str] | None = None) -> ConceptResult:
    """Textual inversion of one class: token ``token`` initialised from ``init_word``, DA-Fusion templates."""
    return train_concepts(bundle, {"_": images}, {"_": token}, {"_": templates or IMAGENET_TEMPLATES_SMALL},
                          init_word=init_word, steps=steps, lr=lr, batch_size=batch_size, seed=seed, hflip=hflip,
                          checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, progress=progress)
