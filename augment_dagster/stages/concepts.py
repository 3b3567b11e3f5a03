"""Concept learning: textual inversion (DA-Fusion §1.2, METHODS.md §0) and TI + shared LoRA (Diff-II §3.1), one trainer.

* One new placeholder token per class. Its input embedding is a separate ``nn.Parameter`` (initialised from the
  embedding of ``init_word``) that is spliced into the token-embedding output by a forward hook wherever the
  placeholder id occurs; the embedding matrix itself is frozen, so every pre-existing row stays bit-identical and
  the optimiser state is just [n_tokens, D].
* The loss is the LDM objective ‖ε − ε_θ(z_t, t, c(template.format(token)))‖² (velocity target for
  v-prediction models) with z0 = VAE posterior mean · scaling_factor, t ~ U{0..T−1} and ε from a seeded
  ``torch.Generator``; image indices and templates come from a seeded ``random.Random``. ``hflip`` adds the
  mirrored latents to the pool (so a draw is flipped with p = 0.5). The noise schedule is
  ``DDPMScheduler.from_config(pipe.scheduler.config)`` (the inference scheduler may be PNDM/Euler).
* The bundle is left exactly as it was, and no model is copied (one copy of each model per process): training
  uses a copy of the (small) tokenizer only; the bundle's frozen text encoder is used as is — a forward
  pre-hook maps placeholder ids the embedding table does not have to row 0 before the lookup, and the splice
  hook writes the trained vectors there, so the table is never resized or written (ENVIRONMENT.md pitfall). The
  UNet/VAE are frozen (their ``requires_grad`` flags are restored afterwards); with ``lora_rank`` a peft LoRA
  adapter (:data:`TRAIN_ADAPTER`) is added to the bundle's own UNet on the attention projections, trained
  jointly (Diff-II), read out and deleted again. Only a half-precision (GPU) model is copied to fp32 for
  training, where a copy costs GPU memory rather than host RAM.
* Checkpoint: every ``checkpoint_every`` steps {step, vectors, optimizer state, losses, RNG states[, LoRA]} is
  written atomically to ``checkpoint_path``; if that file exists at start (same tokens, step ≤ steps) training
  resumes from it, and the result equals that of an uninterrupted run.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..models.adapters import LORA_TARGETS, adapter_names, add_lora
from ..models.adapters import remove as remove_adapter
from ..store import memo_key
from ..store.tensors import tensor_bytes
from . import StageStats
from ..methods.base import concept_token

if TYPE_CHECKING:
    import pandas as pd

    from ..data.images import ImageSource
    from ..store import BlobStore, Memo

TRAIN_ADAPTER = "concept_lora_training"  # the adapter name of a LoRA while it is trained on the bundle's UNet
CHECKPOINT_VERSION = 2

# DA-Fusion's imagenet_templates_small (textual-inversion templates), 27 entries
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
    vectors: dict[str, Any]  # token -> learned input-embedding vector (cpu float32, [D])
    init_vectors: dict[str, Any]  # token -> its initial vector (the init word's embedding)
    lora_state: dict[str, Any] | None = None  # peft LoRA state dict (cpu) when lora_rank was given
    losses: list[float] = field(default_factory=list)  # one per step, including the steps before a resume
    steps_done: int = 0
    resumed_from: int = 0  # the checkpoint step training resumed from (0 = fresh start)
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


def _latents(pipe, images, resolution: int, hflip: bool, with_std: bool = False):
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
        dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
        z = dist.mean * vae.config.scaling_factor
        if with_std:  # the posterior's std in the same (scaled) units, to sample z0 ~ q(z | x) per step
            return z.float().cpu(), (dist.std * vae.config.scaling_factor).float().cpu()
    return z.float().cpu()


def train_concepts(bundle, images_by_label: dict[str, list], tokens: dict[str, str], templates: dict[str, list[str]], *,
                   init_word: str = "the", steps: int = 100, lr: float = 5e-3, batch_size: int = 4, seed: int = 0,
                   hflip: bool = True, lora_rank: int | None = None, checkpoint_path: Path | None = None,
                   checkpoint_every: int = 50, progress: bool = False, desc: str = "textual inversion",
                   weight_decay: float = 0.0, fixed_batch: bool = False, latents: str = "mean",
                   init_fallback: str | None = None) -> ConceptResult:
    """Learn one token per label (``tokens[label]``) on ``images_by_label[label]`` with ``templates[label]``.

    The tokens start at the embedding of ``init_word`` (its first piece if the tokenizer splits it), or of
    ``init_fallback`` when that is given and ``init_word`` is not one token (a class name the model never learned).

    ``fixed_batch=True`` draws one batch (images, templates, t, ε) and reuses it every step (overfit check).
    ``latents``: "mean" trains on the VAE posterior mean; "sample" draws z0 ~ q(z | x) afresh for every batch
    item, as the diffusers textual-inversion script (``latent_dist.sample()``) that DA-Fusion uses does.
    """
    if latents not in ("mean", "sample"):
        raise ValueError(f"latents must be 'mean' or 'sample', not {latents!r}")
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from ..util import atomic_path

    t_start = time.perf_counter()
    pipe = bundle.pipe
    dev = next(pipe.unet.parameters()).device
    labels = sorted(images_by_label)
    new_tokens = [tokens[l] for l in labels]
    if len(set(new_tokens)) != len(new_tokens):
        raise ValueError(f"concept tokens must be distinct: {new_tokens}")

    # --- a copy of the tokenizer; the bundle's text encoder, never resized (see the module doc)
    tok = copy.deepcopy(pipe.tokenizer)
    te = pipe.text_encoder
    if te.dtype != torch.float32:  # half precision (GPU): train through an fp32 copy
        te = copy.deepcopy(te).float()
    te_flags = [(p, p.requires_grad) for p in te.parameters()]
    te_mode = te.training
    te.eval().requires_grad_(False)
    missing = [t for t in new_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing)
    emb = te.get_input_embeddings()
    n_rows = int(emb.weight.shape[0])
    new_ids = tok.convert_tokens_to_ids(new_tokens)
    init_ids = tok(init_word, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]  # first piece if several
    if init_fallback is not None and len(init_ids) != 1:
        init_ids = tok(init_fallback, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    init = emb.weight[init_ids[0]].detach().float().clone()
    vec = torch.nn.Parameter(init.repeat(len(new_tokens), 1))  # [n_tokens, D], the only trained text weights
    init_vectors = {t: init.cpu().clone() for t in new_tokens}
    row_of = torch.full((max(n_rows, len(tok)),), -1, dtype=torch.long, device=dev)
    row_of[torch.tensor(new_ids, device=dev)] = torch.arange(len(new_ids), device=dev)
    seen: dict[str, Any] = {}

    def valid_ids(module, inputs):  # ids past the table (tokens the table has no row for) look up row 0
        seen["ids"] = inputs[0]
        return (torch.where(inputs[0] < n_rows, inputs[0], torch.zeros_like(inputs[0])),)

    def splice(module, inputs, out):
        rows = row_of[seen["ids"]]
        m = rows >= 0
        return torch.where(m[..., None], vec[rows.clamp(min=0)].to(out.dtype), out)

    hooks = [emb.register_forward_pre_hook(valid_ids), emb.register_forward_hook(splice)]

    # --- frozen UNet (+ a LoRA adapter on it); VAE only used under no_grad
    base_unet = pipe.unet
    unet = base_unet if base_unet.dtype == torch.float32 else copy.deepcopy(base_unet).float()
    frozen_flags: list[tuple[Any, bool]] = [(p, p.requires_grad) for p in unet.parameters()]
    unet_mode = unet.training
    unet.requires_grad_(False)
    if lora_rank:
        # the gaussian init of lora_A draws from torch's global generator: seeded here, so the LoRA depends on
        # ``seed`` and the memo key's inputs only, not on what the process ran before (a cold run vs a rerun)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_lora(unet, TRAIN_ADAPTER, lora_rank)
        unet.enable_adapters()
        unet.set_adapters(TRAIN_ADAPTER)
        for n_, p_ in unet.named_parameters():  # only this adapter's weights train
            p_.requires_grad_(f"lora_A.{TRAIN_ADAPTER}." in n_ or f"lora_B.{TRAIN_ADAPTER}." in n_)
    elif adapter_names(unet):
        unet.disable_adapters()  # TI trains on the base UNet
    groups = [{"params": [vec], "weight_decay": weight_decay}]
    if lora_rank:
        groups.append({"params": [p for p in unet.parameters() if p.requires_grad], "weight_decay": 1e-2})
    opt = torch.optim.AdamW(groups, lr=lr)

    try:
        lat, lat_std, lab = [], [], []
        for li, l in enumerate(labels):
            z, s = _latents(pipe, images_by_label[l], bundle.resolution, hflip, with_std=True)
            lat.append(z)
            lat_std.append(s)
            lab += [li] * len(z)
        lat, lat_std = torch.cat(lat), torch.cat(lat_std)
        all_prompts = {l: [t.format(tokens[l]) for t in templates[l]] for l in labels}
        noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        T = int(noise_sched.config.num_train_timesteps)
        pred_type = noise_sched.config.prediction_type

        losses: list[float] = []
        start = 0
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        if checkpoint_path is not None and Path(checkpoint_path).exists():
            ck = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
            if ck.get("version") == CHECKPOINT_VERSION and ck.get("tokens") == new_tokens and int(ck["step"]) <= steps:
                with torch.no_grad():
                    vec.copy_(ck["vectors"].to(vec.device))
                if lora_rank:
                    from peft.utils import set_peft_model_state_dict

                    set_peft_model_state_dict(unet, ck["lora"], adapter_name=TRAIN_ADAPTER)
                opt.load_state_dict(ck["opt"])
                losses, start = list(ck["losses"]), int(ck["step"])
                g.set_state(ck["gen"])
                rng.setstate(ck["rng"])

        def draw():
            idx = [rng.randrange(len(lat)) for _ in range(batch_size)]
            prompts = [rng.choice(all_prompts[labels[lab[i]]]) for i in idx]
            z0 = lat[idx]
            if latents == "sample":
                z0 = z0 + lat_std[idx] * torch.randn(z0.shape, generator=g)
            noise = torch.randn(z0.shape, generator=g)
            t = torch.randint(0, T, (batch_size,), generator=g)
            return z0, prompts, noise, t

        fixed = draw() if fixed_batch else None
        bar = None
        if progress and steps > start:
            from ..progress import progress_bar

            bar = progress_bar(steps, "steps", desc=desc, initial=start)  # tty: a bar; else a line every 30 s
        udt = unet.dtype  # diffusers walks every parameter for it: once, not twice per step
        for step in range(start, steps):
            z0, prompts, noise, t = fixed if fixed is not None else draw()
            zt = noise_sched.add_noise(z0, noise, t)
            target = noise if pred_type == "epsilon" else noise_sched.get_velocity(z0, noise, t)
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")["input_ids"]
            enc = te(ids.to(dev))[0]
            pred = unet(zt.to(dev, udt), t.to(dev), encoder_hidden_states=enc.to(udt)).sample
            loss = F.mse_loss(pred.float(), target.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
            if checkpoint_path is not None and (step + 1) % max(1, checkpoint_every) == 0:
                state = {"version": CHECKPOINT_VERSION, "tokens": new_tokens, "step": step + 1,
                         "vectors": vec.detach().cpu().clone(), "opt": opt.state_dict(), "losses": list(losses),
                         "gen": g.get_state(), "rng": rng.getstate()}
                if lora_rank:
                    from peft.utils import get_peft_model_state_dict

                    state["lora"] = {k: v.detach().cpu()
                                     for k, v in get_peft_model_state_dict(unet, adapter_name=TRAIN_ADAPTER).items()}
                with atomic_path(checkpoint_path) as tmp:
                    torch.save(state, tmp)
        if bar is not None:
            bar.close()
        lora_state = None
        if lora_rank:
            from peft.utils import get_peft_model_state_dict

            lora_state = {k: v.detach().cpu().contiguous()
                          for k, v in get_peft_model_state_dict(unet, adapter_name=TRAIN_ADAPTER).items()}
        vectors = {t: vec[i].detach().cpu().float().clone() for i, t in enumerate(new_tokens)}
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen_flags + te_flags:
            p.requires_grad_(flag)
        if lora_rank:
            remove_adapter(unet, TRAIN_ADAPTER)  # the bundle's UNet is the base model again
        unet.train(unet_mode)
        te.train(te_mode)
    return ConceptResult(vectors, init_vectors, lora_state, losses, steps, start, time.perf_counter() - t_start)


def learn_concept(bundle, images: list, token: str, init_word: str = "the", steps: int = 100, lr: float = 5e-3,
                  batch_size: int = 4, seed: int = 0, hflip: bool = True, checkpoint_path: Path | None = None,
                  checkpoint_every: int = 50, progress: bool = False, templates: list[str] | None = None,
                  weight_decay: float = 0.0, fixed_batch: bool = False, latents: str = "mean",
                  init_fallback: str | None = None) -> ConceptResult:
    """Textual inversion of one class: token ``token`` initialised from ``init_word``, DA-Fusion templates.

    Returns a :class:`ConceptResult` (``.token``, ``.vector`` [D] cpu float32, ``.init_vector``, ``.losses``,
    ``.steps_done``, ``.resumed_from``). Generation uses the vector via ``GenRequest.concepts={token: vector}``.
    """
    return train_concepts(bundle, {"_": images}, {"_": token}, {"_": templates or IMAGENET_TEMPLATES_SMALL},
                          init_word=init_word, steps=steps, lr=lr, batch_size=batch_size, seed=seed, hflip=hflip,
                          checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, progress=progress,
                          weight_decay=weight_decay, fixed_batch=fixed_batch, latents=latents,
                          init_fallback=init_fallback)


# ---------------------------------------------------------------- the concept_embeddings stage (memoized per class)
CONCEPT_VERSION = "ti-1"  # weight_decay / latents enter the memo params only when set (keys of older runs stay)


def learn_concepts(
    split: pd.DataFrame,
    *,
    images: ImageSource,
    blobs: BlobStore,
    memo: Memo,
    model_fp: str,
    bundle_factory: Callable[[], Any],
    steps: int,
    lr: float,
    batch_size: int,
    init_word: str,
    seed: int,
    checkpoint_dir: Path,
    checkpoint_every: int = 50,
    progress: bool = False,
    weight_decay: float = 0.0,
    latents: str = "mean",
    init_fallback: str = "the",
) -> tuple[list[dict], StageStats]:
    """One textual-inversion token per class; a class whose train images did not change is reused.
    ``weight_decay`` (AdamW on the token vector) and ``latents`` ("mean" | "sample") as in :func:`train_concepts`.
    ``init_word`` may contain ``{label}`` (the class name, ``_`` → space); a name the tokenizer splits into
    several pieces starts from ``init_fallback`` instead."""
    t0 = time.perf_counter()
    stats = StageStats()
    train = split[split["role"] == "train"]
    rows = []
    for label, grp in sorted(train.groupby("label"), key=lambda kv: kv[0]):
        ids = sorted(grp["image_id"])
        token = concept_token(label)
        per_label = "{label}" in init_word
        word = init_word.replace("{label}", label.replace("_", " "))
        params = {"steps": steps, "lr": lr, "batch_size": batch_size, "init_word": word, "token": token,
                  **({"init_fallback": init_fallback} if per_label else {}),
                  **({"weight_decay": weight_decay} if weight_decay else {}),
                  **({"latents": latents} if latents != "mean" else {})}
        key = memo_key("concept_embeddings", CONCEPT_VERSION, model=model_fp, params=params, inputs=ids, seed=seed)
        rec = memo.get(key)
        if rec is None or not blobs.exists(rec["blob"]):
            res = learn_concept(bundle_factory(), [images.real(i) for i in ids], token=token, init_word=word,
                                init_fallback=init_fallback if per_label else None,
                                steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                checkpoint_path=checkpoint_dir / f"{key}.pt", checkpoint_every=checkpoint_every,
                                progress=progress, weight_decay=weight_decay, latents=latents)
            digest = blobs.put(tensor_bytes(res.vector), "safetensors")
            losses = [float(x) for x in res.losses]
            k = max(1, len(losses) // 10)
            rec = {"blob": digest, "first_loss": float(np.mean(losses[:k])), "last_loss": float(np.mean(losses[-k:])),
                   "steps": int(res.steps_done), "resumed_from": int(getattr(res, "resumed_from", 0)),
                   "vector_norm": float(res.vector.norm()), "moved": float((res.vector - res.init_vector).norm())}
            rec = memo.put(key, rec)
            ck = checkpoint_dir / f"{key}.pt"
            if ck.exists():
                ck.unlink()
            stats.computed += 1
            reused = False
        else:
            stats.reused += 1
            reused = True
        rows.append({"label": label, "token": token, "variant": "base", "embedding_id": rec["blob"],
                     "first_loss": rec["first_loss"], "last_loss": rec["last_loss"], "steps": rec["steps"],
                     "vector_norm": rec.get("vector_norm"), "moved": rec.get("moved"),
                     "train_image_ids": ids, "model_fingerprint": model_fp, "memo_key": key, "reused": reused})
    stats.seconds = time.perf_counter() - t0
    return rows, stats
