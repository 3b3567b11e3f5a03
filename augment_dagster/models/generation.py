"""The one generation core every method uses (DA-Fusion, DIAGen, Diff-II, GeNIe, SGID and the baselines).

One denoising loop over a diffusers pipeline's components and scheduler:

* img2img at strength t (SDEdit: noise z0 to the first kept timestep, denoise the remaining
  ``min(int(N·t), N)`` steps — StableDiffusionImg2ImgPipeline's convention), txt2img from N(0, I), and
  denoise-from-latents (e.g. DDIM-inverted z_T) over the full schedule;
* per-request guidance scale (CFG off when ≤ 1, like diffusers), negative prompt, and a prompt switch at a
  timestep (Diff-II two-stage: t ≥ switch_t uses ``prompt``, later steps ``switch_prompt``);
* prompt embeddings with per-token weights (SGID) and injected concept vectors (textual inversion);
* DDIM inversion (diffusers ``DDIMInverseScheduler``).

Requests are grouped by (steps, start step, start kind, CFG on/off) and run ``batch_size`` at a time through
the UNet. Each request's noise comes from its own ``torch.Generator('cpu').manual_seed(seed)``, so a request
gives the same image alone or in a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


@dataclass
class Prompt:
    """A prompt made of weighted segments, e.g. SGID: [("A picture of a dog", 1.5), (", on grass", 0.9)]."""

    segments: list[tuple[str, float]]

    @classmethod
    def of(cls, p: "str | Prompt") -> "Prompt":
        return p if isinstance(p, Prompt) else cls([(str(p), 1.0)])

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


@dataclass
class GenRequest:
    prompt: "str | Prompt"
    seed: int
    strength: float = 1.0
    init_image: Any = None
    init_latents: "torch.Tensor | None" = None
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    num_inference_steps: int = 25
    switch_prompt: "str | Prompt | None" = None
    switch_t: int | None = None
    concepts: dict[str, torch.Tensor] | None = None
    weighting: str = "output"  # "output" (text-encoder states, mean restored) | "input_embeddings"


@dataclass
class _Encoded:
    embeds: torch.Tensor
    unrestored: torch.Tensor | None = None


class GenerationCore:
    def __init__(self, bundle, batch_size: int = 16, scheduler: str = "ddim"):
        import diffusers

        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose from {sorted(SCHEDULERS)}")
        self.bundle = bundle
        self.pipe = bundle.pipe
        self.batch_size = max(1, int(batch_size))
        self.scheduler_name = scheduler
        self._sched_cls = getattr(diffusers, SCHEDULERS[scheduler])
        self._sched_config = dict(self.pipe.scheduler.config)
        self.device = self.pipe.unet.device
        self.dtype = self.pipe.unet.dtype
        self.stats = {"unet_forward_passes": 0, "unet_calls": 0, "images": 0}

    # ------------------------------------------------------------------ text
    def _ensure_concepts(self, concepts: dict[str, torch.Tensor] | None) -> None:
        if not concepts:
            return
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        vocab = tok.get_vocab()
        missing = [t for t in concepts if t not in vocab]
        if missing:
            tok.add_tokens(missing)
            te.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = te.get_input_embeddings()
        with torch.no_grad():
            for t, v in concepts.items():
                i = tok.convert_tokens_to_ids(t)
                if v.shape[-1] != emb.weight.shape[1]:
                    raise ValueError(f"concept {t}: vector has {v.shape[-1]} dims, the text encoder expects {emb.weight.shape[1]}")
                emb.weight[i] = v.to(emb.weight.device, emb.weight.dtype)

    def _ids_and_weights(self, prompt: Prompt) -> tuple[list[int], list[float]]:
        tok = self.pipe.tokenizer
        L = tok.model_max_length
        ids, ws = [tok.bos_token_id], [1.0]
        for text, w in prompt.segments:
            seg = tok(text, add_special_tokens=False)["input_ids"]
            ids += seg
            ws += [float(w)] * len(seg)
        ids, ws = ids[: L - 1] + [tok.eos_token_id], ws[: L - 1] + [1.0]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ws += [1.0] * (L - len(ids))
        ids += [pad] * (L - len(ids))
        return ids, ws

    def _encode(self, prompts: list[Prompt], concepts=None, weighting: str = "output") -> _Encoded:
        self._ensure_concepts(concepts)
        te = self.pipe.text_encoder
        rows = [self._ids_and_weights(p) for p in prompts]
        ids = torch.tensor([r[0] for r in rows], device=te.device)
        w = torch.tensor([r[1] for r in rows], device=te.device, dtype=torch.float32)
        weighted = bool((w != 1.0).any())
        with torch.inference_mode():
            if weighted and weighting == "input_embeddings":
                emb = te.get_input_embeddings()
                h = emb.register_forward_hook(lambda m, i, o: o * w[..., None].to(o.dtype))
                try:
                    out = te(ids)[0]
                finally:
                    h.remove()
                return _Encoded(out.to(self.dtype))
            out = te(ids)[0]
            if not weighted or weighting != "output":
                return _Encoded(out.to(self.dtype))
            if weighting != "output":
                raise ValueError(f"unknown weighting {weighting!r}: 'output' or 'input_embeddings'")
            o = out.float()
            scaled = o * w[..., None]
            restore = o.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True)
            return _Encoded((scaled * restore).to(self.dtype), unrestored=scaled)

    def encode_prompts(self, prompts, concepts=None, weighting: str = "output") -> torch.Tensor:
        return self._encode([Prompt.of(p) for p in prompts], concepts, weighting).embeds

    # ------------------------------------------------------------------ images
    def encode_images(self, images) -> torch.Tensor:
        from PIL import Image

        r = self.bundle.resolution
        arr = np.stack([np.asarray(im.convert("RGB").resize((r, r), Image.BILINEAR), dtype=np.float32) for im in images]) / 127.5 - 1.0
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device, self.pipe.vae.dtype)
        with torch.inference_mode():
            z = self.pipe.vae.encode(x).latent_dist.mean * self.pipe.vae.config.scaling_factor
        return z.float()

    def decode(self, latents: torch.Tensor) -> list:
        from PIL import Image

        vae = self.pipe.vae
        with torch.inference_mode():
            x = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor).sample
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in x]

    # ------------------------------------------------------------------ scheduling
    @staticmethod
    def denoising_steps(num_inference_steps: int, strength: float) -> int:
        return min(int(num_inference_steps * strength), num_inference_steps)

    def _new_scheduler(self):
        return self._sched_cls.from_config(self._sched_config)

    def _latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.unet.config
        return (int(c.in_channels), int(c.sample_size), int(c.sample_size))

    @staticmethod
    def _noise(seed: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)

    def _group_key(self, r: GenRequest) -> tuple:
        cfg = r.guidance_scale > 1.0
        if r.init_latents is not None:
            return (r.num_inference_steps, 0, "latents", cfg)
        if r.init_image is not None:
            return (r.num_inference_steps, self.denoising_steps(r.num_inference_steps, r.strength), "image", cfg)
        return (r.num_inference_steps, r.num_inference_steps, "noise", cfg)

    # ------------------------------------------------------------------ generation
    def generate_latents(self, requests: list[GenRequest], progress: bool = False) -> torch.Tensor:
        out: list[torch.Tensor | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._group_key(r), []).append(i)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate", leave=False)
        for key, idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                lat = self._run([requests[i] for i in chunk], key)
                for j, i in enumerate(chunk):
                    out[i] = lat[j]
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        self.stats["images"] += len(requests)
        return torch.stack(out) if out else torch.zeros(0, *self._latent_shape())

    def generate(self, requests: list[GenRequest], progress: bool = False) -> list:
        if not requests:
            return []
        lat = self.generate_latents(requests, progress)
        return [im for s in range(0, len(lat), self.batch_size) for im in self.decode(lat[s:s + self.batch_size])]

    def _run(self, reqs: list[GenRequest], key: tuple) -> torch.Tensor:
        steps, n_denoise, kind, cfg = key
        sched = self._new_scheduler()
        sched.set_timesteps(steps, device=self.device)
        t_start = steps - n_denoise
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        shape = self._latent_shape()
        B = len(reqs)
        if kind == "latents":
            z = torch.stack([r.init_latents.float().reshape(shape) for r in reqs]).to(self.device) * sched.init_noise_sigma
        elif kind == "image":
            z0 = self.encode_images([r.init_image for r in reqs])
            if n_denoise == 0:
                return z0.cpu()
            noise = torch.stack([self._noise(r.seed, shape) for r in reqs]).to(self.device)
            z = sched.add_noise(z0, noise, timesteps[:1].repeat(B))
        else:
            z = torch.stack([self._noise(r.seed, shape) for r in reqs]).to(self.device) * sched.init_noise_sigma
        # text conditioning (concept vectors of the batch are written into the embedding table first)
        concepts: dict[str, torch.Tensor] = {}
        for r in reqs:
            concepts.update(r.concepts or {})
        weighting = reqs[0].weighting
        cond = self._encode([Prompt.of(r.prompt) for r in reqs], concepts, weighting).embeds
        has_switch = [r.switch_prompt is not None and r.switch_t is not None for r in reqs]
        switch = self._encode([Prompt.of(r.switch_prompt if h else r.prompt) for r, h in zip(reqs, has_switch)], concepts,
                              weighting).embeds if any(has_switch) else cond
        switch_t = torch.tensor([r.switch_t if h else -1 for r, h in zip(reqs, has_switch)], device=self.device)
        uncond = self._encode([Prompt.of(r.negative_prompt) for r in reqs]).embeds if cfg else None
        g = torch.tensor([r.guidance_scale for r in reqs], device=self.device, dtype=torch.float32).view(B, 1, 1, 1)
        unet = self.pipe.unet
        with torch.inference_mode():
            for t in timesteps:
                use_first = (t >= switch_t) | (switch_t < 0)
                emb = torch.where(use_first.view(B, 1, 1), cond, switch)
                x = sched.scale_model_input(z, t)
                if cfg:
                    eps = unet(torch.cat([x, x]).to(self.dtype), t, encoder_hidden_states=torch.cat([uncond, emb])).sample.float()
                    eu, ec = eps.chunk(2)
                    eps = eu + g * (ec - eu)
                    self.stats["unet_forward_passes"] += 2 * B
                else:
                    eps = unet(x.to(self.dtype), t, encoder_hidden_states=emb).sample.float()
                    self.stats["unet_forward_passes"] += B
                self.stats["unet_calls"] += 1
                z = sched.step(eps, t, z).prev_sample
        return z.float().cpu()

    # ------------------------------------------------------------------ inversion
    def invert(self, images, prompts, num_steps: int, concepts=None, guidance_scale: float = 1.0, until: float = 1.0) -> torch.Tensor:
        """DDIM inversion z0 → z_T (or to t ≈ 1000·until) with diffusers' DDIMInverseScheduler."""
        from diffusers import DDIMInverseScheduler

        inv = DDIMInverseScheduler.from_config(self._sched_config)
        inv.set_timesteps(num_steps, device=self.device)
        z = self.encode_images(images).to(self.device)
        cond = self.encode_prompts(prompts, concepts)
        B = len(images)
        cfg = guidance_scale > 1.0
        uncond = self.encode_prompts([""] * B) if cfg else None
        limit = until * inv.config.num_train_timesteps
        unet = self.pipe.unet
        with torch.inference_mode():
            for t in inv.timesteps:
                if t >= limit:
                    break
                if cfg:
                    eu, ec = unet(torch.cat([z, z]).to(self.dtype), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.float().chunk(2)
                    eps = eu + guidance_scale * (ec - eu)
                    self.stats["unet_forward_passes"] += 2 * B
                else:
                    eps = unet(z.to(self.dtype), t, encoder_hidden_states=cond).sample.float()
                    self.stats["unet_forward_passes"] += B
                self.stats["unet_calls"] += 1
                z = inv.step(eps, t, z).prev_sample
        return z.float().cpu()
