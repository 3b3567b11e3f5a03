"""Text side of the generation core: prompts (plain or weighted segments), concept tokens and their vectors,
text-encoder states (no Dagster)."""
from __future__ import annotations


def noisy_vector(base, sigma: float, noise_seed: int):
    """S* + σ·ε with ε ~ N(0, I) drawn from ``noise_seed`` (float32). DIAGen's fixed noise draws
    (``methods.diagen.noise_variants``) and its ``resample_per_image`` option, applied per unit by the runner."""
    import torch

    g = torch.Generator().manual_seed(int(noise_seed))
    eps = torch.randn(base.shape, generator=g, dtype=torch.float32)
    return base.float() + float(sigma) * eps
