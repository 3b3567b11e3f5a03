"""Textual inversion (augment_dagster.stages.concepts) on the tiny random SD model."""
from __future__ import annotations

import math

import pytest
import torch

from _fixtures_models import model_cache_root, shape_image, tiny_bundle  # noqa: F401  (fixtures)
from augment_dagster.stages.concepts import IMAGENET_TEMPLATES_SMALL, learn_concept

IMAGES = [shape_image(s) for s in range(3)]


def test_templates():
    assert len(IMAGENET_TEMPLATES_SMALL) == 27 and IMAGENET_TEMPLATES_SMALL[0] == "a photo of a {}"
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES_SMALL)


def test_only_the_new_token_moves_and_bundle_is_untouched(tiny_bundle):
    pipe = tiny_bundle.pipe
    te, tok = pipe.text_encoder, pipe.tokenizer
    emb_before = te.get_input_embeddings().weight.detach().clone()
    n_tok = len(tok)
    params_before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    res = learn_concept(tiny_bundle, IMAGES, token="<ti-test>", init_word="circle", steps=6, lr=5e-2, batch_size=2, seed=0)
    # the bundle is exactly as it was
    assert len(tok) == n_tok and "<ti-test>" not in tok.get_vocab()
    assert torch.equal(te.get_input_embeddings().weight, emb_before)
    assert all(torch.equal(v, params_before[k]) for k, v in pipe.unet.state_dict().items())
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    # the new vector started at the init word's row and moved
    circle = tok.convert_tokens_to_ids("circle</w>")
    assert res.token == "<ti-test>" and res.vector.shape == (te.config.hidden_size,) and res.vector.dtype == torch.float32
    assert torch.equal(res.init_vector, emb_before[circle])
    assert float((res.vector - res.init_vector).norm()) > 1e-3
    assert len(res.losses) == res.steps_done == 6 and res.resumed_from == 0
    assert all(math.isfinite(x) for x in res.losses)
    # generation uses it through GenRequest.concepts
    from augment_dagster.models.generation import GenerationCore, GenRequest

    core = GenerationCore(tiny_bundle)
    z = core.generate_latents([GenRequest("a photo of a <ti-test>", seed=0, num_inference_steps=3, guidance_scale=2.0,
                                          concepts={res.token: res.vector})])
    assert torch.isfinite(z).all()


def test_fixed_batch_loss_decreases(tiny_bundle):
    res = learn_concept(tiny_bundle, IMAGES[:1], token="<ti-overfit>", steps=12, lr=5e-2, batch_size=4, seed=1,
                        hflip=False, fixed_batch=True)
    assert all(math.isfinite(x) for x in res.losses)
    assert res.losses[-1] < res.losses[0], res.losses


def test_checkpoint_resume_equals_uninterrupted(tiny_bundle, tmp_path, monkeypatch):
    kw = dict(token="<ti-ck>", steps=6, lr=5e-2, batch_size=2, seed=3)
    full = learn_concept(tiny_bundle, IMAGES, **kw)

    ck = tmp_path / "ti.pt"
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def dying_loss(*a, **k):  # the run is "killed" during step 5
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "mse_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        learn_concept(tiny_bundle, IMAGES, checkpoint_path=ck, checkpoint_every=2, **kw)
    monkeypatch.setattr(torch.nn.functional, "mse_loss", real)
    assert ck.exists() and not list(tmp_path.glob(".tmp-*"))
    assert torch.load(ck, weights_only=False)["step"] == 4

    resumed = learn_concept(tiny_bundle, IMAGES, checkpoint_path=ck, checkpoint_every=2, **kw)
    assert resumed.resumed_from == 4 and resumed.steps_done == 6
    torch.testing.assert_close(resumed.vector, full.vector, atol=1e-6, rtol=0)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)


def test_joint_ti_and_lora_leaves_the_base_unet_alone(tiny_bundle):
    from augment_dagster.stages.concepts import train_concepts

    before = {k: v.detach().clone() for k, v in tiny_bundle.pipe.unet.state_dict().items()}
    res = train_concepts(tiny_bundle, {"a": IMAGES[:2], "b": IMAGES[2:]}, {"a": "<cls-a>", "b": "<cls-b>"},
                         {"a": ["a photo of a {} shape"], "b": ["a photo of a {} shape"]}, steps=2, lr=1e-2,
                         batch_size=2, lora_rank=2)
    assert set(res.vectors) == {"<cls-a>", "<cls-b>"} and res.lora_state
    assert any("lora_A" in k for k in res.lora_state)
    assert not any("lora" in k for k in tiny_bundle.pipe.unet.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in tiny_bundle.pipe.unet.state_dict().items())


def test_posterior_sampling_and_weight_decay_options(tiny_bundle):
    from augment_dagster.stages import concepts as C

    z, s = C._latents(tiny_bundle.pipe, IMAGES[:1], tiny_bundle.resolution, hflip=False, with_std=True)
    assert z.shape == s.shape and (s > 0).all()  # the posterior has a spread to sample from
    kw = dict(token="<ti-post>", steps=4, lr=5e-2, batch_size=2, seed=5, hflip=False)
    mean = learn_concept(tiny_bundle, IMAGES, latents="mean", **kw)
    samp = learn_concept(tiny_bundle, IMAGES, latents="sample", **kw)
    again = learn_concept(tiny_bundle, IMAGES, latents="sample", **kw)
    assert torch.equal(samp.vector, again.vector)  # the draws come from the seed
    assert not torch.allclose(samp.vector, mean.vector, atol=1e-6)
    # AdamW's decoupled decay: with the same gradients path the decayed vector is pulled towards 0
    wd = learn_concept(tiny_bundle, IMAGES, latents="mean", weight_decay=10.0, **kw)
    assert float(wd.vector.norm()) < float(mean.vector.norm())
    with pytest.raises(ValueError, match="latents"):
        learn_concept(tiny_bundle, IMAGES, latents="mode", **kw)


def test_a_class_name_the_tokenizer_splits_starts_from_the_fallback_word(tiny_bundle):
    tok, emb = tiny_bundle.pipe.tokenizer, tiny_bundle.pipe.text_encoder.get_input_embeddings().weight.detach()
    assert len(tok("circle", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("zqxv", add_special_tokens=False)["input_ids"]) > 1  # not a word of the vocabulary
    kw = dict(steps=1, lr=1e-3, batch_size=1, seed=0, init_fallback="shape")
    named = learn_concept(tiny_bundle, IMAGES[:1], token="<ti-named>", init_word="circle", **kw)
    split = learn_concept(tiny_bundle, IMAGES[:1], token="<ti-split>", init_word="zqxv", **kw)
    assert torch.equal(named.init_vector, emb[tok.convert_tokens_to_ids("circle</w>")])
    assert torch.equal(split.init_vector, emb[tok.convert_tokens_to_ids("shape</w>")])
