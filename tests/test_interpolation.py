import math
import random

import pytest
import torch

from augment_dagster.models.interpolation import angle, circle_interpolate, sample_alpha
from augment_dagster.stages.suffixes import frequent_context_phrases, parse_suffixes


def gauss(seed, shape=(4, 32, 32)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_alpha_zero_is_z1_and_minus_one_is_z2():
    z1, z2 = gauss(0), gauss(1)
    assert torch.allclose(circle_interpolate(z1, z2, 0.0), z1, atol=1e-5)
    assert torch.allclose(circle_interpolate(z1, z2, -1.0), z2, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.3, 2.7, 3.9])
def test_variance_preserved_for_unit_gaussians(alpha):
    z1, z2 = gauss(2), gauss(3)
    theta = angle(z1, z2)
    z = circle_interpolate(z1, z2, alpha * (2 * math.pi / theta) / 4)
    assert abs(float(z.var()) - 1.0) < 0.05


def test_closed_circle():
    z1, z2 = gauss(4), gauss(5)
    theta = angle(z1, z2)
    full = circle_interpolate(z1, z2, 2 * math.pi / theta)
    assert torch.allclose(full, z1, atol=1e-4)
    # all points lie in the plane of (z1, z2) with the same norm (equal-norm inputs)
    z2n = z2 / z2.norm() * z1.norm()
    pts = [circle_interpolate(z1, z2n, a) for a in torch.linspace(0, 2 * math.pi / angle(z1, z2n), 7).tolist()]
    norms = torch.tensor([float(p.norm()) for p in pts])
    assert float(norms.std() / norms.mean()) < 1e-4


def test_alpha_sampler_range():
    rng = random.Random(0)
    theta = 1.2
    xs = [sample_alpha(theta, rng) for _ in range(2000)]
    assert min(xs) >= 0 and max(xs) <= 2 * math.pi / theta
    assert abs(sum(xs) / len(xs) - math.pi / theta) < 0.1


def test_parallel_inputs_degenerate_gracefully():
    z = gauss(6)
    assert torch.allclose(circle_interpolate(z, 2 * z, 0.7), z)


def test_suffix_parser_on_messy_text():
    text = """Sure, here are summaries:
1. A photo of a shape on a striped background.
2) "a photo of a shape at night"
- a photo of a shape   with a shadow
a photo of a bird flying
3. A PHOTO OF A SHAPE on a striped background
Thanks!"""
    assert parse_suffixes(text, "a photo of a shape") == ["on a striped background", "at night", "with a shadow"]


def test_offline_suffixes_come_from_captions():
    caps = ["a red circle on a dotted rug", "a star on a dotted rug at dawn", "a cross on a dotted rug", "a ring at dawn"]
    ph = frequent_context_phrases(caps)
    assert ph[0] == "on a dotted rug" and "at dawn" in ph
