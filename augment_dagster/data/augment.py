"""Classic augmentation baselines with kornia (batched, GPU-capable; METHODS.md §10).

* weak: RandomResizedCrop(scale 0.2–1) + HFlip (GeNIe's weak transform)
* strong: weak + ColorJitter(.4,.4,.4,.1, p=.8) + RandomGrayscale(p=.2) + RandomGaussianBlur(p=.5)
  (GeNIe's strong transform; blur kernel ≈ 10% of the image side, odd, >= 3; sigma 0.1–2)
* randaugment: kornia's RandAugment (n=2, m=9), the torchvision defaults

Images are float tensors [N,3,H,W] in [0,1]; outputs keep the input size and are clamped to [0,1].
torch is imported lazily (Dagster's code server imports the methods package).
"""
from __future__ import annotations

POLICIES = ("weak", "strong", "randaugment")


def _check(name: str) -> None:
    if name not in POLICIES:
        raise ValueError(f"unknown augmentation policy {name!r}; valid policies: {', '.join(POLICIES)}")


def _build(name: str, size: tuple[int, int]):
    import kornia.augmentation as K

    weak = [K.RandomResizedCrop(size, scale=(0.2, 1.0)), K.RandomHorizontalFlip()]
    if name == "weak":
        return K.AugmentationSequential(*weak)
    if name == "strong":
        k = max(3, int(round(0.1 * min(size))) | 1)
        return K.AugmentationSequential(
            *weak,
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5),
        )
    from kornia.augmentation.auto import RandAugment

    return RandAugment(n=2, m=9)


def make_policy(name: str, size: tuple[int, int] | None = None):
    """A kornia augmentation module for ``name``. ``size`` (H, W) fixes the crop output size; None = the
    size of each input batch (the module then builds one kornia pipeline per input size)."""
    _check(name)
    if size is not None:
        return _build(name, (int(size[0]), int(size[1])))
    import torch.nn as nn

    class _SizeAwarePolicy(nn.Module):
        def __init__(self):
            super().__init__()
            self.name = name
            self.pipes = nn.ModuleDict()

        def forward(self, x):
            h, w = int(x.shape[-2]), int(x.shape[-1])
            key = f"{h}x{w}"
            if key not in self.pipes:
                self.pipes[key] = _build(self.name, (h, w))
            return self.pipes[key](x)

    return _SizeAwarePolicy()


def augment_images(x, policy: str, seed: int):
    """Augment a batch [N,3,H,W] in [0,1] with ``policy``; deterministic for a seed, global RNG untouched."""
    import torch

    _check(policy)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W], got shape {tuple(x.shape)}")
    if len(x) == 0:
        return x.float().clone()
    aug = make_policy(policy, tuple(x.shape[-2:]))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(int(seed) % (2**63))
        out = aug(x.float())
    return out.reshape(x.shape).clamp(0.0, 1.0)


def standard_variants(x, policy: str, m: int, seed: int):
    """m augmented copies of each image, image-major order (img0 copy0..m-1, img1 copy0..), [N*m,3,H,W]."""
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    reps = x.repeat_interleave(int(m), dim=0)
    return augment_images(reps, policy, seed)
