"""DDIM inversion z0 → z_T on the generation core's model (no Dagster), with diffusers' ``DDIMInverseScheduler``;
:class:`DDIMInversion` is mixed into ``models.generation.GenerationCore`` (it uses the core's VAE encode, prompt
encoding, UNet call and OOM-chunking). Diff-II's inversion pool (stages/inversion.py) runs it; the circle
interpolation of the inverted latents is models/interpolation.py."""
from __future__ import annotations

import torch

from .text import Prompt


class DDIMInversion:
    """DDIM inversion of the generation core."""

    def _inverse_scheduler(self, num_steps: int):
        from diffusers import DDIMInverseScheduler

        inv = DDIMInverseScheduler.from_config(self._sched_config)
        inv.set_timesteps(num_steps, device=self.device)
        return inv

    def inversion_timesteps(self, num_steps: int, until: float = 1.0) -> list[int]:
        """The timesteps :meth:`invert` steps through; the returned latents sit at the last one
        (pass it as ``GenRequest.init_latents_t`` with the same ``num_inference_steps`` to denoise them back)."""
        inv = self._inverse_scheduler(num_steps)
        limit = until * inv.config.num_train_timesteps
        return [int(t) for t in inv.timesteps if t < limit]

    def invert(self, images, prompts: list["str | Prompt"], num_steps: int, concepts: dict[str, torch.Tensor] | None = None,
               guidance_scale: float = 1.0, until: float = 1.0) -> torch.Tensor:
        """DDIM inversion z0 → z_T (``until<1``: only up to t ≈ 1000·until, see :meth:`inversion_timesteps`)
        with diffusers' ``DDIMInverseScheduler``; CFG (with an empty negative prompt) when guidance_scale > 1.
        Runs ``batch_size`` images at a time; returns CPU float32 [N, 4, h, w]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        from .adapters import active

        ts = self.inversion_timesteps(num_steps, until)
        with active(self.pipe.unet, getattr(self.bundle, "lora_adapter", None)):
            return self._invert(images, prompts, num_steps, concepts, guidance_scale, ts)

    def _invert(self, images, prompts, num_steps: int, concepts, guidance_scale: float, ts: list[int]) -> torch.Tensor:
        def run(a: int, b: int) -> list:
            imgs, ps = images[a:b], prompts[a:b]
            B = len(imgs)
            inv = self._inverse_scheduler(num_steps)
            z = self.encode_images(imgs).to(self.device)
            cond = self.encode_prompts(ps, concepts)
            uncond = self.encode_prompts([""] * B, concepts) if guidance_scale > 1.0 else None
            with torch.inference_mode():
                for t in inv.timesteps:
                    if int(t) not in ts:
                        break
                    eps = self._unet_eps(inv.scale_model_input(z, t), t, cond, uncond, float(guidance_scale))
                    z = inv.step(eps, t, z).prev_sample
            self.stats["inverted_images"] += B
            return list(z.float().cpu())

        out = self._chunked(len(images), run)
        return torch.stack(out) if out else torch.zeros(0, *self._latent_shape())
