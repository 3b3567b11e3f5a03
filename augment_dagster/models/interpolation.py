"""Diff-II's random circle interpolation of inverted latents (METHODS.md §3.3)."""
from __future__ import annotations

import math
import random


def angle(z1, z2) -> float:
    """θ = arccos(⟨z1, z2⟩ / ‖z1‖‖z2‖) over the flattened latents."""
    import torch

    a, b = z1.flatten().double(), z2.flatten().double()
    c = torch.dot(a, b) / (a.norm() * b.norm())
    return float(torch.arccos(c.clamp(-1.0, 1.0)))


def circle_interpolate(z1, z2, alpha: float):
    """Random circle interpolation (Diff-II ``rand_slerp``):

        z = [sin((1 + α)θ) · z1 − sin(αθ) · z2] / sin θ,   θ = arccos(⟨z1,z2⟩ / ‖z1‖‖z2‖)

    i.e. slerp with λ = −α: a rotation of z1 by the angle φ = αθ in the plane spanned by (z1, z2).
    α = 0 gives z1; α = −1 gives z2; α = 2π/θ returns to z1 (a closed circle). For unit-Gaussian inputs of
    high dimension (nearly orthogonal, equal norms) the per-element variance stays ≈ 1 for every α.
    Degenerate (parallel) inputs return z1.
    """
    import torch

    theta = angle(z1, z2)
    s = math.sin(theta)
    if abs(s) < 1e-8:
        return z1.clone()
    out = (math.sin((1.0 + alpha) * theta) * z1.double() - math.sin(alpha * theta) * z2.double()) / s
    return out.to(z1.dtype)


def sample_alpha(theta: float, rng: random.Random) -> float:
    """α ~ U(0, 2π/θ): the rotation angle αθ is uniform on [0, 2π)."""
    return rng.uniform(0.0, 2.0 * math.pi / max(theta, 1e-8))
