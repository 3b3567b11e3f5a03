"""Standard augmentation baselines (kornia): shapes, range, determinism, errors."""
from __future__ import annotations

import pytest
import torch

from augment_dagster.data.augment import POLICIES, augment_images, make_policy, standard_variants


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g)


@pytest.mark.parametrize("policy", POLICIES)
def test_shape_range_determinism(images, policy):
    before = torch.random.get_rng_state()
    a = augment_images(images, policy, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    b = augment_images(images, policy, seed=1)
    c = augment_images(images, policy, seed=2)
    assert a.shape == images.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, images)


def test_standard_variants_image_major(images):
    out = standard_variants(images, "weak", m=3, seed=0)
    assert out.shape == (12, 3, 32, 32)
    assert torch.equal(out, standard_variants(images, "weak", m=3, seed=0))
    # image-major: rows 0..2 come from image 0; the mean colour of a crop/flip stays near its source's
    src_mean = images.mean(dim=(2, 3))
    out_mean = out.mean(dim=(2, 3)).view(4, 3, 3)
    for i in range(4):
        d = (out_mean[i] - src_mean[i]).abs().mean(1)  # distance of copies of image i to image i
        others = torch.stack([(out_mean[i] - src_mean[j]).abs().mean(1) for j in range(4) if j != i])
        assert float(d.mean()) <= float(others.mean()) + 1e-6
    assert standard_variants(images, "strong", m=0, seed=0).shape == (0, 3, 32, 32)


def test_non_square_and_make_policy():
    x = torch.rand(2, 3, 24, 40)
    assert augment_images(x, "strong", seed=0).shape == x.shape
    pol = make_policy("weak")
    assert pol(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_unknown_policy():
    with pytest.raises(ValueError, match="weak, strong, randaugment"):
        augment_images(torch.rand(1, 3, 8, 8), "autoaugment", seed=0)
    with pytest.raises(ValueError, match="valid policies"):
        make_policy("nope")
