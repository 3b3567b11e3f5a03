"""Classic augmentation baselines with kornia (batched, GPU-capable; METHODS.md §10).

* weak: RandomResizedCrop(scale 0.2–1) + HFlip (GeNIe's weak transform)
* strong: weak + ColorJitter(.4,.4,.4,.1, p=.8) + RandomGrayscale(p=.2) + RandomGaussianBlur(p=.5)
* randaugment: kornia's RandAugment (n=2, m=9)
"""
from __future__ import annotations

POLICIES = ("weak", "strong", "randaugment")


def make_policy(name: str, size: tuple[int, int]):
    import kornia.augmentation as K

    if name not in POLICIES:
        raise ValueError(f"unknown augmentation policy {name!r}; valid: {list(POLICIES)}")
    weak = [K.RandomResizedCrop(size, scale=(0.2, 1.0)), K.RandomHorizontalFlip()]
    if name == "weak":
        return K.AugmentationSequential(*weak)
    if name == "strong":
        k = max(3, (size[0] // 10) | 1)
        return K.AugmentationSequential(*weak, K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
                                        K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5))
    from kornia.augmentation.auto import RandAugment

    return RandAugment(n=2, m=9)


def augment_images(x, policy: str, seed: int):
    """Augment a batch [N,3,H,W] in [0,1]; deterministic for a seed (global RNG untouched)."""
    import torch

    aug = make_policy(policy, tuple(x.shape[-2:]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return aug(x.float()).clamp(0.0, 1.0)


def standard_variants(x, policy: str, m: int, seed: int):
    """m augmented copies of each image, image-major order (img0 copy0..m-1, img1 ...)."""
    import torch

    reps = x.repeat_interleave(m, dim=0)
    return augment_images(reps, policy, seed) if len(reps) else torch.zeros_like(reps)
