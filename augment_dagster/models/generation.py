"""The one generation core every method uses (DA-Fusion, DIAGen, Diff-II, GeNIe, SGID and the baselines).

ONE denoising loop (:meth:`GenerationCore._run`) over a diffusers pipeline's components and a fresh diffusers
scheduler per batch (``set_timesteps`` / ``scale_model_input`` / ``step`` / ``add_noise``):

* img2img / SDEdit at strength s: encode the image (``vae_encode``: the posterior mode/mean, or a *sample* of the
  posterior) · scaling_factor, ``add_noise`` at the first kept timestep and denoise the remaining
  ``min(int(N·s), N)`` steps — StableDiffusionImg2ImgPipeline's convention (``strength=0`` returns the VAE
  reconstruction). Random draws per request come from one ``torch.Generator('cpu').manual_seed(seed)``:
  ``vae_encode="mode"`` (GeNIe's ``latent_dist.mode()``, the default): the first draw is the forward noise;
  ``vae_encode="sample"`` (diffusers' img2img pipeline, which DA-Fusion's and DIAGen's reference code run): the
  first draw samples the posterior (mean + std·ε) and the second is the forward noise, so the core gives the
  pipeline's latents bit for bit for the same generator seed;
* txt2img from ``N(0, I)·init_noise_sigma``;
* denoising given start latents (e.g. DDIM-inverted z_T) over the full schedule, or — with ``init_latents_t`` —
  from the first timestep of the scheduler's actual schedule that is ≤ ``init_latents_t`` on (partial inversion;
  PNDM's schedule has N + 1 timesteps, so the start is found in the timesteps, not computed as (N − n)·order);
* per-request guidance scale (CFG off when ≤ 1, like diffusers), negative prompt, and a per-request prompt
  switch (Diff-II two-stage: timesteps t ≥ switch_t use ``prompt``, t < switch_t use ``switch_prompt``);
* prompt embeddings with per-token weights (SGID) and injected concept vectors (textual inversion): models/text.py;
* DDIM inversion with diffusers' ``DDIMInverseScheduler``: models/inversion.py.

Per-request protocol: each request names its ``scheduler`` (None = the core's default), its ``resolution``
(None = the bundle's) and its ``start_rule`` for img2img starts:

* ``sdedit`` (DA-Fusion, DIAGen, SGID, the baselines) — the diffusers img2img convention above;
* ``genie`` (GeNIe, METHODS §4): noise z0 to t = ⌊1000·r⌋ (pure noise for r > 0.999), run the full N-step
  schedule but skip every step with t − 1 > 1000·r (≈⌊N·r⌋ steps: 40 at r = 0.8 on DPM-Solver++-50).

A scheduler other than the model's own class is built from the model's scheduler config (betas, offset) with
that class's *default* timestep spacing and, for PNDM, ``skip_prk_steps`` — what ``X.from_config(pipe.scheduler
.config)`` gives on SD-1.x, whose config sets neither (DDIM/PNDM: "leading", DPM-Solver++/Euler: "linspace").

Batching: requests are grouped by (scheduler, resolution, num_inference_steps, start kind, first step, noise
timestep, CFG on/off) — everything that changes the image apart from per-request tensors — and run up to
``batch_size`` at a time through the UNet (a CFG batch of B requests is one UNet call on 2B latents).
Noise: request i's noise is drawn on the CPU from its own ``torch.Generator('cpu').manual_seed(seed)`` and then
moved to the device, so a request gives the same image alone or inside any batch.

Batch size and OOM back-off: ``batch_size`` is an int or ``"auto"`` (start at ``max_batch_size`` on CUDA, 8 on
CPU). Every chunked loop (denoising, VAE decode, inversion) that hits an out-of-memory error halves the core's
batch size, frees the CUDA cache and retries the same chunk; the size it ends up with stays for later calls.
Outputs do not depend on the batch size (per-request noise), so it is never part of a memo key; the size used
is recorded: ``stats["batch_size"]`` (the current size), ``stats["oom_backoffs"]`` and, per request of the last
:meth:`generate` call, ``last_batch_sizes`` (the UNet batch it was denoised in).

Counters in ``stats``: ``unet_forward_passes`` counts image-passes (a CFG call on 2B latents counts 2B, a
call without CFG counts B; inversion steps included), ``unet_calls`` counts UNet invocations, ``images`` counts
generated latents/images, ``inverted_images`` counts images passed through :meth:`invert`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ..util import release_free_heap
from .inversion import DDIMInversion
from .text import WEIGHTINGS, Prompt, TextEncoding

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
START_RULES = ("sdedit", "genie")
VAE_ENCODE = ("mode", "sample")
PREPROCESS = ("resize", "center_crop")
# what SD-1.x's scheduler_config.json sets and a scheduler class would not default to on its own
_SD1_SCHEDULER_EXTRAS = {"pndm": {"skip_prk_steps": True}}


class _Key(NamedTuple):
    """Batch group key: requests with equal keys share one denoising loop."""

    scheduler: str
    resolution: int | None  # None = the bundle's
    steps: int
    kind: str  # "noise" | "image" (SDEdit) | "genie" | "latents"
    begin: int  # index of the first timestep run
    noise_t: int | None  # genie: the timestep z0 is noised to
    cfg: bool


@dataclass
class GenRequest:
    prompt: "str | Prompt"
    seed: int
    strength: float = 1.0  # SDEdit/img2img noise ratio in [0,1]; ignored when init_latents is given
    init_image: Any = None  # PIL image; None and no init_latents -> txt2img
    init_latents: "torch.Tensor | None" = None  # [4,h,w] start latents (e.g. DDIM-inverted z_T)
    guidance_scale: float = 7.5  # CFG off (no uncond branch) when <= 1, like diffusers
    negative_prompt: str = ""
    num_inference_steps: int = 25
    switch_prompt: "str | Prompt | None" = None  # t >= switch_t: prompt; t < switch_t: switch_prompt
    switch_t: int | None = None
    concepts: "dict[str, torch.Tensor] | None" = None  # placeholder token -> input-embedding vector
    weighting: str = "output"  # "output" (text-encoder states, mean restored) | "input_embeddings"
    # extension: the timestep init_latents sit at (e.g. the end of a partial inversion, see
    # GenerationCore.inversion_timesteps); None = pure z_T, denoised over the full schedule
    init_latents_t: int | None = None
    scheduler: str | None = None  # one of SCHEDULERS; None = the core's default
    start_rule: str = "sdedit"  # img2img start: "sdedit" (diffusers img2img) | "genie" (⌊1000r⌋, skip t−1 > 1000r)
    resolution: int | None = None  # pixels (square); None = the bundle's resolution
    preprocess: str = "resize"  # init image -> square: "resize" (squash, DA-Fusion) | "center_crop" (GeNIe: Resize + CenterCrop)
    # img2img z0: "mode" (posterior mean; the seed's first draw is the noise) | "sample" (diffusers' img2img
    # pipeline: the first draw samples the posterior, the second is the noise)
    vae_encode: str = "mode"


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of the accelerator (or the allocator's RuntimeError saying so)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def auto_batch_size(device, max_batch_size: int = 64) -> int:
    """The starting size of ``batch_size="auto"``: ``max_batch_size`` on CUDA (backed off on OOM), 8 on CPU
    (larger batches buy nothing there and cost memory)."""
    return max(1, int(max_batch_size)) if str(device).startswith("cuda") else min(8, max(1, int(max_batch_size)))


class GenerationCore(TextEncoding, DDIMInversion):
    """Batched, seeded generation on a :class:`~augment_dagster.models.loading.DiffusionBundle`. Prompt and
    concept encoding come from :class:`~.text.TextEncoding`, DDIM inversion from :class:`~.inversion.DDIMInversion`."""

    def __init__(self, bundle, batch_size: "int | str" = 16, scheduler: str = "ddim", max_batch_size: int = 64):
        import diffusers

        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose from {sorted(SCHEDULERS)}")
        self.bundle = bundle
        self.pipe = bundle.pipe
        self.scheduler_name = scheduler
        self._diffusers = diffusers
        self._sched_config = dict(self.pipe.scheduler.config)
        self._native = type(self.pipe.scheduler).__name__
        self._sched_configs: dict[str, tuple[type, dict]] = {}
        self._plans: dict[tuple, tuple] = {}
        p = next(self.pipe.unet.parameters())
        self.device = p.device
        self.dtype = p.dtype
        if batch_size == "auto":
            self.batch_size = auto_batch_size(self.device, max_batch_size)
        elif isinstance(batch_size, str):
            raise ValueError(f"batch_size must be a positive integer or 'auto', not {batch_size!r}")
        else:
            self.batch_size = max(1, int(batch_size))
        self.stats = {"unet_forward_passes": 0, "unet_calls": 0, "images": 0, "inverted_images": 0,
                      "batch_size": self.batch_size, "oom_backoffs": 0}
        self.last_batch_sizes: list[int] = []

    # ------------------------------------------------------------------ batching with OOM back-off
    def _back_off(self) -> None:
        self.batch_size = max(1, self.batch_size // 2)
        self.stats["batch_size"] = self.batch_size
        self.stats["oom_backoffs"] += 1
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _chunked(self, n: int, run) -> list:
        """``run(start, end)`` over [0, n) in chunks of ``self.batch_size``; an OOM halves the size and retries
        the chunk (see the module doc). Returns the concatenated per-item results."""
        out: list = []
        s = 0
        while s < n:
            e_ = min(n, s + self.batch_size)
            oom = False
            try:
                res = run(s, e_)
            except Exception as e:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(e) or self.batch_size <= 1:
                    raise
                oom = True
            if oom:  # outside the except block: the traceback (and the tensors its frames hold) is gone
                self._back_off()
                continue
            out.extend(res)
            s = e_
            if torch.device(self.device).type == "cpu":
                release_free_heap()  # the chunk's freed activations leave the RSS before the next chunk
        return out

    # ------------------------------------------------------------------ images
    @staticmethod
    def prepare_image(image, size: int, preprocess: str = "resize"):
        """RGB ``size``² image: ``resize`` squashes to the square (bilinear); ``center_crop`` resizes the short
        side to ``size`` and crops the centre (torchvision Resize + CenterCrop, GeNIe)."""
        from PIL import Image

        if preprocess not in PREPROCESS:
            raise ValueError(f"unknown preprocess {preprocess!r}; choose from {PREPROCESS}")
        im = image.convert("RGB")
        if preprocess == "center_crop" and im.width != im.height:
            s = size / min(im.width, im.height)
            w, h = max(size, round(im.width * s)), max(size, round(im.height * s))
            im = im.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            return im.crop((left, top, left + size, top + size))
        return im.resize((size, size), Image.BILINEAR)

    def encode_images(self, images, resolution: int | None = None, preprocess: "str | list[str]" = "resize",
                      generators: "list[torch.Generator | None] | None" = None) -> torch.Tensor:
        """z0 = posterior mean · scaling_factor of RGB images brought to ``resolution``² (None: the bundle's) by
        ``preprocess`` (one for all, or one per image; see :meth:`prepare_image`). ``generators``: per image, None
        (the mean) or a CPU generator that draws a posterior sample mean + std·ε (diffusers' ``latent_dist.sample``)."""
        r = int(resolution or self.bundle.resolution)
        pre = [preprocess] * len(images) if isinstance(preprocess, str) else list(preprocess)
        arr = np.stack([np.asarray(self.prepare_image(im, r, p), dtype=np.float32)
                        for im, p in zip(images, pre)]) / 127.5 - 1.0
        vae = self.pipe.vae
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device, vae.dtype)
        with torch.inference_mode():
            dist = vae.encode(x).latent_dist
            z = dist.mean
            if generators is not None and any(g is not None for g in generators):
                z = z.clone()
                for i, g in enumerate(generators):
                    if g is not None:  # diffusers' DiagonalGaussianDistribution.sample, one image at a time
                        eps = torch.randn(tuple(z.shape[1:]), generator=g, dtype=dist.std.dtype).to(z.device)
                        z[i] = dist.mean[i] + dist.std[i] * eps
            z = z * vae.config.scaling_factor
        return z.float()

    def decode(self, latents: torch.Tensor) -> list:
        """PIL images (bundle resolution) of latents; decoded values are clamped to [-1, 1]."""
        from PIL import Image

        vae = self.pipe.vae
        with torch.inference_mode():
            x = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor).sample
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in x]

    # ------------------------------------------------------------------ scheduling
    @staticmethod
    def denoising_steps(num_inference_steps: int, strength: float) -> int:
        """Steps actually run at ``strength`` (diffusers img2img: ``min(int(N·strength), N)``)."""
        return min(int(num_inference_steps * strength), num_inference_steps)

    def scheduler_class_and_config(self, name: str | None = None) -> tuple[type, dict]:
        """The diffusers class and config of scheduler ``name`` on this model (see the module doc)."""
        name = name or self.scheduler_name
        if name not in self._sched_configs:
            if name not in SCHEDULERS:
                raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
            cls_name = SCHEDULERS[name]
            conf = dict(self._sched_config)
            if cls_name != self._native:
                conf.pop("timestep_spacing", None)
                conf.update(_SD1_SCHEDULER_EXTRAS.get(name, {}))
            self._sched_configs[name] = (getattr(self._diffusers, cls_name), conf)
        return self._sched_configs[name]

    def _new_scheduler(self, name: str | None = None):
        cls, conf = self.scheduler_class_and_config(name)
        return cls.from_config(conf)

    def _latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        c = self.pipe.unet.config
        if resolution is None or int(resolution) == int(self.bundle.resolution):
            return (int(c.in_channels), int(c.sample_size), int(c.sample_size))
        f = int(self.bundle.resolution) // int(c.sample_size)  # the VAE's downscale factor
        if int(resolution) % f:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downscale factor {f}")
        return (int(c.in_channels), int(resolution) // f, int(resolution) // f)

    @staticmethod
    def _noise(seed: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)

    def _timesteps(self, name: str, steps: int) -> tuple[list[int], int]:
        """(the N-step schedule's timesteps, scheduler order) — cached per (scheduler, N)."""
        k = ("ts", name, int(steps))
        if k not in self._plans:
            sch = self._new_scheduler(name)
            sch.set_timesteps(int(steps))
            self._plans[k] = ([int(t) for t in sch.timesteps], int(getattr(sch, "order", 1)))
        return self._plans[k]

    def _group_key(self, r: GenRequest) -> _Key:
        cfg = r.guidance_scale > 1.0
        if r.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {r.weighting!r}; choose from {WEIGHTINGS}")
        if r.start_rule not in START_RULES:
            raise ValueError(f"unknown start_rule {r.start_rule!r}; choose from {START_RULES}")
        if r.vae_encode not in VAE_ENCODE:
            raise ValueError(f"unknown vae_encode {r.vae_encode!r}; choose from {VAE_ENCODE}")
        name = r.scheduler or self.scheduler_name
        res = int(r.resolution) if r.resolution and int(r.resolution) != int(self.bundle.resolution) else None
        self._latent_shape(res)  # validates the resolution
        N = int(r.num_inference_steps)
        ts, order = self._timesteps(name, N)
        if r.init_latents is not None:
            if r.init_latents_t is None:
                return _Key(name, res, N, "latents", 0, None, cfg)
            # the first timestep of the actual schedule at or below init_latents_t (PNDM has N + 1 timesteps)
            begin = next((i for i, t in enumerate(ts) if t <= int(r.init_latents_t)), len(ts))
            return _Key(name, res, N, "latents", begin, None, cfg)
        if r.init_image is not None:
            if r.start_rule == "genie":
                T = int(self._sched_config.get("num_train_timesteps", 1000))
                if r.strength > 0.999:  # GeNIe: pure noise start
                    return _Key(name, res, N, "noise", 0, None, cfg)
                limit = T * float(r.strength)
                keep = [i for i, t in enumerate(ts) if t - 1 <= limit]
                begin = keep[0] if keep else len(ts)
                return _Key(name, res, N, "genie", begin, int(limit), cfg)
            n = self.denoising_steps(N, r.strength)  # 0: the VAE reconstruction
            return _Key(name, res, N, "image", (N - n) * order if n else len(ts), None, cfg)
        return _Key(name, res, N, "noise", 0, None, cfg)

    def schedule_info(self, r: GenRequest) -> dict[str, Any]:
        """What the loop does for request ``r`` (lineage): scheduler, resolution, start_rule, the timestep the
        start latents sit at (``start_timestep``; None for pure-noise / pure-z_T starts), the first UNet timestep
        and the number of denoising steps."""
        k = self._group_key(r)
        ts, _ = self._timesteps(k.scheduler, k.steps)
        run = ts[k.begin:]
        start = None
        if k.kind == "genie":
            start = k.noise_t
        elif k.kind == "image":
            start = run[0] if run else 0
        elif k.kind == "latents" and k.begin > 0:
            start = int(r.init_latents_t)
        return {"scheduler": k.scheduler, "resolution": int(k.resolution or self.bundle.resolution),
                "start_rule": r.start_rule if r.init_image is not None else None,
                "start_timestep": start,
                "first_timestep": run[0] if run else None, "denoise_steps": len(run)}

    # ------------------------------------------------------------------ generation
    def _generate(self, requests: list[GenRequest], progress: bool = False) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._group_key(r), []).append(i)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate", leave=False, disable=None)  # disable=None: no bar when not a terminal
        sizes = [0] * len(requests)
        for key, idx in groups.items():
            def run(a: int, b: int, idx=idx, key=key) -> list:
                chunk = idx[a:b]
                lat = self._run([requests[i] for i in chunk], key)
                for j, i in enumerate(chunk):
                    out[i] = lat[j]
                    sizes[i] = len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                return chunk

            self._chunked(len(idx), run)
        if bar is not None:
            bar.close()
        self.stats["images"] += len(requests)
        self.last_batch_sizes = sizes
        return out  # type: ignore[return-value]

    def generate_latents(self, requests: list[GenRequest], progress: bool = False) -> torch.Tensor:
        """Final latents [N, 4, h, w] (CPU float32), in request order (all requests of one resolution)."""
        out = self._generate(requests, progress)
        if len({tuple(z.shape) for z in out}) > 1:
            raise ValueError("generate_latents: requests of different resolutions; use generate()")
        return torch.stack(out) if out else torch.zeros(0, *self._latent_shape())

    def generate(self, requests: list[GenRequest], progress: bool = False) -> list:
        """PIL images (each at its request's resolution), in request order."""
        if not requests:
            return []
        lat = self._generate(requests, progress)
        by_shape: dict[tuple, list[int]] = {}
        for i, z in enumerate(lat):
            by_shape.setdefault(tuple(z.shape), []).append(i)
        images: list = [None] * len(lat)
        for idx in by_shape.values():
            def dec(a: int, b: int, idx=idx) -> list:
                chunk = idx[a:b]
                for i, im in zip(chunk, self.decode(torch.stack([lat[i] for i in chunk]))):
                    images[i] = im
                return chunk

            self._chunked(len(idx), dec)
        return images

    def _unet_eps(self, z: torch.Tensor, t, emb: torch.Tensor, uncond: torch.Tensor | None,
                  g: torch.Tensor | float) -> torch.Tensor:
        """ε̂ for one step: with ``uncond`` one UNet call on [uncond; cond] and ε_u + g·(ε_c − ε_u)."""
        unet = self.pipe.unet
        B = z.shape[0]
        if uncond is not None:
            eps = unet(torch.cat([z, z]).to(self.dtype), t, encoder_hidden_states=torch.cat([uncond, emb])).sample.float()
            eu, ec = eps.chunk(2)
            eps = eu + g * (ec - eu)
            self.stats["unet_forward_passes"] += 2 * B
        else:
            eps = unet(z.to(self.dtype), t, encoder_hidden_states=emb).sample.float()
            self.stats["unet_forward_passes"] += B
        self.stats["unet_calls"] += 1
        return eps

    def _run(self, reqs: list[GenRequest], key: tuple) -> torch.Tensor:
        """THE denoising loop (one batch of one group), with the bundle's LoRA adapter (if any) switched on."""
        from .adapters import active

        with active(self.pipe.unet, getattr(self.bundle, "lora_adapter", None)):
            return self._run_batch(reqs, key)

    def _run_batch(self, reqs: list[GenRequest], key: tuple) -> torch.Tensor:
        sched = self._new_scheduler(key.scheduler)
        sched.set_timesteps(key.steps, device=self.device)
        timesteps = sched.timesteps[key.begin:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(key.begin)
        shape = self._latent_shape(key.resolution)
        B = len(reqs)
        kind = key.kind
        if kind == "latents":
            z = torch.stack([r.init_latents.detach().float().cpu().reshape(shape) for r in reqs]).to(self.device)
            if key.begin == 0:  # pure z_T, like the pipelines' `latents=` argument
                z = z * sched.init_noise_sigma
            if len(timesteps) == 0:
                return z.cpu()
        elif kind in ("image", "genie"):
            gens = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in reqs]
            z0 = self.encode_images([r.init_image for r in reqs], key.resolution, [r.preprocess for r in reqs],
                                    [g if r.vae_encode == "sample" else None for g, r in zip(gens, reqs)])
            if len(timesteps) == 0:
                return z0.cpu()
            # the next draw of each request's generator (the first one with vae_encode "mode")
            noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(self.device)
            if kind == "image":
                z = sched.add_noise(z0.to(self.device), noise, timesteps[:1].repeat(B))
            else:  # GeNIe: q(z_t | z0) at t = ⌊1000r⌋, which need not be on the schedule
                ab = sched.alphas_cumprod[int(key.noise_t)].to(self.device, torch.float32)
                z = ab.sqrt() * z0.to(self.device) + (1 - ab).sqrt() * noise
                if key.scheduler == "euler":  # sigma parameterisation: x = z_t / sqrt(ᾱ)
                    z = z / ab.sqrt()
        else:
            z = torch.stack([self._noise(r.seed, shape) for r in reqs]).to(self.device) * sched.init_noise_sigma
        # text conditioning
        prompts = [Prompt.of(r.prompt) for r in reqs]
        cond = self._encode_requests(prompts, reqs)
        has_switch = [r.switch_prompt is not None and r.switch_t is not None for r in reqs]
        if any(has_switch):
            switch = self._encode_requests([Prompt.of(r.switch_prompt) if h else p
                                            for r, h, p in zip(reqs, has_switch, prompts)], reqs)
        else:
            switch = cond
        switch_t = torch.tensor([int(r.switch_t) if h else -1 for r, h in zip(reqs, has_switch)], device=self.device)
        uncond = None
        if key.cfg:
            neg = [GenRequest(prompt=r.negative_prompt, seed=0, concepts=r.concepts) for r in reqs]
            uncond = self._encode_requests([Prompt.of(r.negative_prompt) for r in reqs], neg)
        g = torch.tensor([float(r.guidance_scale) for r in reqs], device=self.device, dtype=torch.float32).view(B, 1, 1, 1)
        with torch.inference_mode():
            for t in timesteps:
                first = (t >= switch_t) | (switch_t < 0)
                emb = torch.where(first.view(B, 1, 1), cond, switch) if any(has_switch) else cond
                x = sched.scale_model_input(z, t)
                eps = self._unet_eps(x, t, emb, uncond, g)
                z = sched.step(eps, t, z).prev_sample
        return z.float().cpu()
