"""Tiny offline models and model loading (augment_dagster.models.tiny / .loading)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from _fixtures_models import model_cache_root, shape_image, tiny_bundle  # noqa: F401  (fixtures)


def test_models_package_import_is_light():
    code = ("import sys, augment_dagster.models, augment_dagster.models.loading as l; "
            "l.diffusion_fingerprint('tiny-random'); "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenizer_deterministic_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    from augment_dagster.models.tiny import build_tokenizer

    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "A photo of a red circle on a striped background at night, with a zebra!"
    assert a.tokenize("a photo of a red circle")[:6] == ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "circle</w>"]
    assert a.unk_token_id not in a(text)["input_ids"][1:-1]
    a.save_pretrained(tmp_path)
    c = CLIPTokenizer.from_pretrained(tmp_path)
    kw = dict(padding="max_length", max_length=77, truncation=True)
    assert c(text, **kw)["input_ids"] == a(text, **kw)["input_ids"]
    assert len(c(text, **kw)["input_ids"]) == 77
    # no merges: character-level, still never UNK
    plain = build_tokenizer([])
    assert len(plain) == 514 and len(plain.tokenize("circle")) == 6


def test_tiny_random_saved_once_and_loaded_like_a_real_model(tiny_bundle, model_cache_root, monkeypatch):
    from augment_dagster.models import loading, tiny

    b = tiny_bundle
    assert b.source == "tiny-random" and b.device == "cpu" and b.dtype == torch.float32 and b.resolution == 32
    dirs = [p for p in (model_cache_root / "models").iterdir() if p.name.startswith("tiny-random-sd-")]
    assert len(dirs) == 1 and (dirs[0] / "model_index.json").exists()
    assert not [p for p in (model_cache_root / "models").iterdir() if p.name.startswith(".tmp")]
    # round trip: the from_pretrained copy computes exactly what a fresh in-memory build computes
    fresh = tiny.build_tiny_sd(seed=0, size=loading.TINY_SD_SIZE)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    ids = b.pipe.tokenizer(["a photo of a circle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        e1, e2 = b.pipe.text_encoder(ids)[0], fresh.text_encoder(ids)[0]
        assert torch.equal(e1, e2)
        assert torch.equal(b.pipe.unet(x, t, encoder_hidden_states=e1).sample, fresh.unet(x, t, encoder_hidden_states=e2).sample)
    assert b.pipe.vae.config.scaling_factor == fresh.vae.config.scaling_factor
    # a second load (fresh process cache) reads the disk copy; it never rebuilds
    monkeypatch.setattr(loading, "_CACHE", {})
    monkeypatch.setattr(tiny, "build_tiny_sd", lambda *a, **k: pytest.fail("rebuilt the tiny model"))
    b2 = loading.load_diffusion("tiny-random", model_cache_root, device="cpu")
    assert b2 is not b and b2.fingerprint == b.fingerprint
    assert loading.load_diffusion("tiny-random", model_cache_root, device="cpu") is b2  # process cache


def test_latent_geometry_and_unit_scale(tiny_bundle):
    pipe = tiny_bundle.pipe
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    x = torch.stack([torch.from_numpy(__import__("numpy").asarray(shape_image(s), dtype="float32")).permute(2, 0, 1)
                     for s in range(4)]) / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    assert z.shape == (4, 4, 8, 8)
    assert 0.3 < float(z.std()) < 3.0


def test_fingerprints_stable_and_distinct(tiny_bundle, model_cache_root, tmp_path):
    from augment_dagster.models import loading as L

    fp = L.diffusion_fingerprint("tiny-random")
    assert fp == L.diffusion_fingerprint("tiny-random", model_cache_root) == tiny_bundle.fingerprint
    assert len({fp, L.captioner_fingerprint("tiny-random"), L.clip_fingerprint("tiny-random")}) == 3
    hub = L.diffusion_fingerprint("org/some-model")
    assert hub == L.diffusion_fingerprint("org/some-model") != L.diffusion_fingerprint("org/some-model", revision="abc")
    src = next((model_cache_root / "models").glob("tiny-random-sd-*"))
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    fd = L.diffusion_fingerprint(str(d))
    assert fd.startswith("dir-") and fd == L.diffusion_fingerprint(str(d)) and fd not in (fp, hub)
    assert fd == "dir-" + L.dir_fingerprint(src)  # content, not location
    (d / "scheduler" / "scheduler_config.json").write_text("{}")
    assert L.diffusion_fingerprint(str(d)) != fd


def test_bad_sources(model_cache_root, tmp_path):
    from augment_dagster.models import loading as L

    for src in ["no-such-org/no-such-model-xyz", str(tmp_path / "missing-folder")]:
        with pytest.raises(L.ModelSourceError) as ei:
            L.load_diffusion(src, model_cache_root, device="cpu")
        msg = str(ei.value)
        assert src in msg and "models.diffusion.source" in msg and "tiny-random" in msg
    with pytest.raises(L.ModelSourceError, match="models.clip.source"):
        L.load_clip("no-such-org/no-such-clip", model_cache_root, device="cpu")
    if not (L.PACKAGE_MODELS / "tiny-sd").exists():
        with pytest.raises(FileNotFoundError, match="tiny-random"):
            L.load_diffusion("tiny", model_cache_root, device="cpu")


def test_tiny_blip_generates_a_string(model_cache_root):
    from augment_dagster.models.loading import load_captioner

    b = load_captioner("tiny-random", model_cache_root, device="cpu")
    assert type(b.processor.image_processor).__name__ == "BlipImageProcessorPil"
    inputs = b.processor(images=shape_image(1), return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = b.model.generate(**inputs, max_new_tokens=6)
    cap = b.processor.decode(out[0], skip_special_tokens=True)
    assert isinstance(cap, str)
    assert b.fingerprint.startswith("tiny-random-blip-")


def test_tiny_clip_shapes(model_cache_root):
    from augment_dagster.models.loading import load_clip

    b = load_clip("tiny-random", model_cache_root, device="cpu")
    px = b.processor(images=[shape_image(0), shape_image(1)], return_tensors="pt")["pixel_values"]
    assert px.shape == (2, 3, 32, 32)
    tok = b.processor.tokenizer(["a photo of a circle", "a square", "a star"], padding=True, return_tensors="pt")
    with torch.no_grad():
        img = b.model.get_image_features(pixel_values=px)
        txt = b.model.get_text_features(**tok)
        out = b.model(pixel_values=px, **tok)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    assert img.shape == (2, 16) and txt.shape == (3, 16)
    assert out.logits_per_image.shape == (2, 3)


def test_base_size_matches_tiny_models_md():
    from augment_dagster.models.tiny import build_tiny_sd

    pipe = build_tiny_sd(seed=0, size="base")
    assert tuple(pipe.vae.config.block_out_channels) == (32, 64, 128) and pipe.vae_scale_factor == 4
    assert tuple(pipe.unet.config.block_out_channels) == (64, 128) and pipe.unet.config.cross_attention_dim == 64
    assert pipe.text_encoder.config.hidden_size == 64 and pipe.safety_checker is None
    with torch.no_grad():
        z = pipe.vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        eps = pipe.unet(z, 10, encoder_hidden_states=torch.zeros(2, 77, 64)).sample
    assert z.shape == eps.shape == (2, 4, 8, 8) and 0.3 < float(z.std()) < 3.0
