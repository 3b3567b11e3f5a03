"""Shared tiny-model fixtures for test_models / test_generation / test_concepts.

Import the fixtures into a test module (``from _fixtures_models import tiny_bundle, ...``). The cache root is
created once per process from ``tmp_path_factory`` and ``load_diffusion`` caches per process, so the tiny
model is built and loaded once per pytest session whichever module asks first.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only effective if torch is not imported yet

import torch  # noqa: E402

# Spinning OpenMP threads on 2 shared cores are avoided by OMP_WAIT_POLICY=PASSIVE (tests/conftest.py).
# The thread count is left at torch's default on purpose: float reductions depend on it, and tests compare
# images made in this process with images made by `augment` subprocesses (Pipes, determinism).

_ROOT: list = []


def cache_root_for(tmp_path_factory):
    if not _ROOT:
        _ROOT.append(tmp_path_factory.mktemp("model_cache"))
    return _ROOT[0]


def shape_image(seed: int = 0, size: int = 32):
    """A small procedural RGB image (coloured disc on a gradient), deterministic."""
    from PIL import Image

    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    bg = np.stack([xx, yy, 1 - xx], -1) * rs.uniform(60, 200, 3)
    cy, cx, r = rs.uniform(0.3, 0.7), rs.uniform(0.3, 0.7), rs.uniform(0.15, 0.3)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    bg[disc] = rs.uniform(0, 255, 3)
    return Image.fromarray(bg.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def model_cache_root(tmp_path_factory):
    return cache_root_for(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_bundle(model_cache_root):
    from augment_dagster.models.loading import load_diffusion

    return load_diffusion("tiny-random", model_cache_root, device="cpu")


@pytest.fixture()
def core(tiny_bundle):
    from augment_dagster.models.generation import GenerationCore

    return GenerationCore(tiny_bundle, batch_size=16)
