"""The generation core (augment_dagster.models.generation) on the tiny random SD model."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _fixtures_models import core, model_cache_root, shape_image, tiny_bundle  # noqa: F401  (fixtures)
from augment_dagster.models.generation import GenerationCore, GenRequest
from augment_dagster.models.text import Prompt

STEPS = 6


def _mixed_requests(concept_vec=None):
    im0, im1 = shape_image(0), shape_image(1)
    return [
        GenRequest("a photo of a circle", seed=1, init_image=im0, strength=0.5, num_inference_steps=STEPS),
        GenRequest("a photo of a square", seed=2, init_image=im1, strength=0.5, num_inference_steps=STEPS, guidance_scale=3.0),
        GenRequest("a photo of a ring", seed=3, num_inference_steps=STEPS, guidance_scale=1.0),  # txt2img, no CFG
        GenRequest("a photo of a star", seed=4, num_inference_steps=STEPS, guidance_scale=7.5, negative_prompt="blurry"),
        GenRequest("a photo of a cross", seed=5, num_inference_steps=STEPS, guidance_scale=4.0,
                   switch_prompt="a photo of a cross on a striped background", switch_t=500),
        GenRequest("a photo of a circle", seed=6, init_image=im1, strength=0.8, num_inference_steps=STEPS, guidance_scale=2.0),
        GenRequest("a photo of a triangle", seed=7, num_inference_steps=STEPS, guidance_scale=5.0,
                   switch_prompt="a photo of a red triangle", switch_t=300),
        GenRequest(Prompt([("a photo of a", 1.0), (" circle", 1.5)]), seed=8, init_image=im0, strength=0.8,
                   num_inference_steps=STEPS, guidance_scale=2.0),
    ] + ([GenRequest("a photo of a <cpt>", seed=9, num_inference_steps=STEPS, guidance_scale=2.0,
                     concepts={"<cpt>": concept_vec})] if concept_vec is not None else [])


def test_denoising_steps():
    assert GenerationCore.denoising_steps(50, 0.8) == 40
    assert GenerationCore.denoising_steps(25, 1.0) == 25
    assert GenerationCore.denoising_steps(25, 0.0) == 0
    assert GenerationCore.denoising_steps(10, 1.5) == 10


def test_batched_equals_one_at_a_time(tiny_bundle):
    torch.manual_seed(0)
    vec = torch.randn(tiny_bundle.pipe.text_encoder.config.hidden_size)
    reqs = _mixed_requests(vec)
    batched = GenerationCore(tiny_bundle, batch_size=16)
    single = GenerationCore(tiny_bundle, batch_size=1)
    zb = batched.generate_latents(reqs)
    zs = torch.stack([single.generate_latents([r])[0] for r in reqs])
    assert zb.shape == (len(reqs), 4, 8, 8)
    torch.testing.assert_close(zb, zs, atol=1e-4, rtol=1e-4)
    # output order == input order, whatever the grouping
    perm = [3, 0, 7, 5, 1, 8, 2, 6, 4]
    torch.testing.assert_close(batched.generate_latents([reqs[i] for i in perm]), zb[perm], atol=1e-4, rtol=1e-4)
    ib, is_ = batched.generate(reqs[:3]), [single.generate([r])[0] for r in reqs[:3]]
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in ib)
    diff = max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() for a, b in zip(ib, is_))
    assert diff < 2


def test_seeds_and_switch_change_outputs(core):
    base = dict(prompt="a photo of a circle", num_inference_steps=STEPS, guidance_scale=3.0)
    z = core.generate_latents([GenRequest(seed=0, **base), GenRequest(seed=0, **base), GenRequest(seed=1, **base),
                               GenRequest(seed=0, switch_prompt="a photo of a square", switch_t=500, **base),
                               GenRequest(seed=0, switch_prompt="a photo of a square", switch_t=0, **base)])
    assert torch.equal(z[0], z[1])
    assert not torch.allclose(z[0], z[2], atol=1e-3)
    assert not torch.allclose(z[0], z[3], atol=1e-5)  # switched for t < 500
    torch.testing.assert_close(z[0], z[4])  # switch_t=0: every step uses the first prompt
    im = shape_image(2)
    z2 = core.generate_latents([GenRequest("a photo of a circle", seed=s, init_image=im, strength=0.6, num_inference_steps=STEPS)
                                for s in (0, 1)])
    assert not torch.allclose(z2[0], z2[1], atol=1e-3)


def test_strength_zero_is_vae_reconstruction(core):
    im = shape_image(3)
    out = core.generate([GenRequest("a photo of a circle", seed=0, init_image=im, strength=0.0)])[0]
    recon = core.decode(core.encode_images([im]))[0]
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(recon, dtype=int)).max() <= 1
    z0 = core.encode_images([im.resize((64, 48))])  # any size is resized to the bundle resolution
    assert z0.shape == (1, 4, 8, 8)


def test_unet_forward_pass_counter(core):
    core.stats.update(unet_forward_passes=0, unet_calls=0, images=0)
    core.generate_latents([GenRequest("a", seed=0, num_inference_steps=5, guidance_scale=7.5),
                           GenRequest("b", seed=1, num_inference_steps=5, guidance_scale=2.0)])
    assert core.stats == {**core.stats, "unet_forward_passes": 2 * 2 * 5, "unet_calls": 5, "images": 2}
    core.generate_latents([GenRequest("a", seed=0, num_inference_steps=5, guidance_scale=1.0)])
    assert core.stats["unet_forward_passes"] == 20 + 5 and core.stats["unet_calls"] == 10
    core.generate_latents([GenRequest("a", seed=0, init_image=shape_image(0), strength=0.6, num_inference_steps=5)])
    assert core.stats["unet_forward_passes"] == 25 + 2 * 3 and core.stats["images"] == 4


def test_token_ids_match_the_tokenizer(core):
    tok = core.pipe.tokenizer
    for text in ["a photo of a circle", "", "x " * 100]:
        ids, ws = core.token_ids_and_weights(text)
        assert ids == tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert ws == [1.0] * 77
    ids, ws = core.token_ids_and_weights(Prompt([("a photo of a", 1.5), (" circle", 0.9)]))
    assert ids[:7] == tok("a photo of a circle")["input_ids"][:7] and ws[:7] == [1.0, 1.5, 1.5, 1.5, 1.5, 0.9, 1.0]


def test_mean_restore_is_skipped_for_centred_states():
    """SGID's output weighting on LayerNorm-centred states (mean ~0): no inf/zero states, factor 1."""
    from augment_dagster.models.text import mean_restore_factor

    o = torch.randn(2, 77, 32)
    o = o - o.mean(dim=(1, 2), keepdim=True)  # mean exactly ~0
    w = torch.ones(2, 77, 1)
    w[:, 1:5] = 1.5
    f = mean_restore_factor(o, o * w)
    assert torch.isfinite(f).all() and torch.equal(f, torch.ones_like(f))
    shifted = o + 1.0  # a real mean: the restore applies and matches the unweighted mean
    f2 = mean_restore_factor(shifted, shifted * w)
    torch.testing.assert_close((shifted * w * f2).mean(dim=(1, 2)), shifted.mean(dim=(1, 2)))


def test_weighted_prompt_scales_only_weighted_tokens(core):
    plain = core.encode_prompts(["a photo of a circle"])
    wp = Prompt([("a photo of a", 1.0), (" circle", 1.5)])
    assert wp.text == "a photo of a circle" and Prompt.of("x").text == "x" and Prompt.of(wp) is wp
    un = core.encode_prompts([wp], restore_mean=False)
    pos = 5  # BOS a photo of a circle -> circle at 5
    torch.testing.assert_close(un[0, pos], 1.5 * plain[0, pos])
    others = [i for i in range(77) if i != pos]
    assert torch.equal(un[0, others], plain[0, others])
    restored = core.encode_prompts([wp])
    torch.testing.assert_close(restored.mean(), plain.mean())
    # unweighted Prompt == plain string
    assert torch.equal(core.encode_prompts([Prompt([("a photo of a", 1.0), (" circle", 1.0)])]), plain)
    # input-embedding weighting: causal text encoder -> states before the weighted token are unchanged
    inp = core.encode_prompts([wp], weighting="input_embeddings")
    assert torch.equal(inp[0, :pos], plain[0, :pos]) and not torch.allclose(inp[0, pos:], plain[0, pos:])
    with pytest.raises(ValueError):
        core.encode_prompts([wp], weighting="bogus")


def test_concept_injection(core):
    te, tok = core.pipe.text_encoder, core.pipe.tokenizer
    before_circle = core.encode_prompts(["a photo of a circle"])
    D = te.config.hidden_size
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    n_before = te.get_input_embeddings().weight.shape[0]
    rows_before = te.get_input_embeddings().weight[:n_before].clone()
    e1 = core.encode_prompts(["a photo of a <inj-test>"], concepts={"<inj-test>": v1})
    e2 = core.encode_prompts(["a photo of a <inj-test>"], concepts={"<inj-test>": v2})
    tid = tok.convert_tokens_to_ids("<inj-test>")
    ids, _ = core.token_ids_and_weights("a photo of a <inj-test>")
    pos = ids.index(tid)
    assert pos == 5
    # causal CLIP text encoder: positions before the placeholder are untouched, the rest see the vector
    assert torch.equal(e1[0, :pos], e2[0, :pos]) and not torch.allclose(e1[0, pos:], e2[0, pos:])
    assert torch.equal(te.get_input_embeddings().weight[tid], v2)  # the last call's vector is in the table
    # pre-existing rows and prompts without the token are unchanged
    assert torch.equal(te.get_input_embeddings().weight[:n_before][: rows_before.shape[0]], rows_before)
    assert torch.equal(core.encode_prompts(["a photo of a circle"]), before_circle)
    # a later call with v1 overwrites v2 again
    assert torch.equal(core.encode_prompts(["a photo of a <inj-test>"], concepts={"<inj-test>": v1}), e1)
    # one batch with conflicting vectors for the same token: each request gets its own
    reqs = [GenRequest("a photo of a <inj-test>", seed=0, concepts={"<inj-test>": v}) for v in (v1, v2)]
    enc = core._encode_requests([Prompt.of(r.prompt) for r in reqs], reqs)
    assert torch.equal(enc[0], e1[0]) and torch.equal(enc[1], e2[0])


def test_schedulers_run(tiny_bundle):
    im = shape_image(4)
    for name in ("pndm", "dpmsolver", "euler"):
        c = GenerationCore(tiny_bundle, batch_size=4, scheduler=name)
        reqs = [GenRequest("a photo of a circle", seed=s, init_image=im, strength=0.5, num_inference_steps=4) for s in (0, 1)]
        reqs.append(GenRequest("a photo of a ring", seed=2, num_inference_steps=4, guidance_scale=2.0))
        z = c.generate_latents(reqs)
        assert torch.isfinite(z).all(), name
        torch.testing.assert_close(c.generate_latents(reqs[2:]), z[2:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        GenerationCore(tiny_bundle, scheduler="nope")


class _StubUNet(torch.nn.Module):
    """ε that ignores the latents and t (depends only on the text states): DDIM inversion is then exact."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = torch.nn.Parameter(eps, requires_grad=False)
        self.config = SimpleNamespace(in_channels=4, sample_size=8)

    def forward(self, sample, t, encoder_hidden_states):
        e = self.eps + 0.1 * encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=e.expand_as(sample).to(sample.dtype))


def test_inversion_round_trip_exact_with_stub(tiny_bundle):
    p = tiny_bundle.pipe
    stub = _StubUNet(0.5 * torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)))
    pipe = SimpleNamespace(unet=stub, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, scheduler=p.scheduler)
    c = GenerationCore(dataclasses.replace(tiny_bundle, pipe=pipe), batch_size=4)
    imgs, prompts = [shape_image(0), shape_image(1)], ["a photo of a circle", "a photo of a square"]
    zT = c.invert(imgs, prompts, num_steps=10)
    z0 = c.encode_images(imgs)
    assert not torch.allclose(zT, z0, atol=1e-2)
    rec = c.generate_latents([GenRequest(pr, seed=0, init_latents=z, guidance_scale=1.0, num_inference_steps=10)
                              for pr, z in zip(prompts, zT)])
    assert float((rec - z0).norm() / z0.norm()) < 1e-4


def test_partial_inversion_error_shrinks_with_steps(core):
    imgs, prompts = [shape_image(5), shape_image(6)], ["a photo of a circle", "a photo of a ring"]
    z0 = core.encode_images(imgs)
    errs = []
    for n in (10, 40):
        ts = core.inversion_timesteps(n, until=0.5)
        assert ts[-1] < 500 and len(ts) == n // 2
        zt = core.invert(imgs, prompts, num_steps=n, until=0.5)
        rec = core.generate_latents([GenRequest(pr, seed=0, init_latents=z, init_latents_t=ts[-1], guidance_scale=1.0,
                                                num_inference_steps=n) for pr, z in zip(prompts, zt)])
        errs.append(float((rec - z0).norm() / z0.norm()))
    assert errs[1] < errs[0] and errs[1] < 0.5, errs


# ---------------------------------------------------------------- per-request protocol (METHODS §1–§6)
def _sd1_scheduler(name: str, steps: int):
    """The schedule SD-1.x reference code gets: ``X.from_config`` of SD-1.x's scheduler config (PNDM, steps_offset
    1, skip_prk_steps, no timestep_spacing key), written here from the config file, not from the core."""
    import diffusers

    sd1 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
           "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
    cls = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpmsolver": "DPMSolverMultistepScheduler"}[name]
    s = getattr(diffusers, cls).from_config(sd1)
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


def test_genie_rule_r08_on_dpmsolver50_runs_exactly_40_steps_from_t800(core):
    im = shape_image(5)
    r = GenRequest("a photo of a star", seed=3, init_image=im, strength=0.8, num_inference_steps=50,
                   scheduler="dpmsolver", start_rule="genie", guidance_scale=7.5)
    info = core.schedule_info(r)
    expect = [t for t in _sd1_scheduler("dpmsolver", 50) if t - 1 <= 800]  # GeNIe editor.py: skip t-1 > 1000r
    assert len(expect) == 40
    assert info == {"scheduler": "dpmsolver", "resolution": 32, "start_rule": "genie", "start_timestep": 800,
                    "first_timestep": expect[0], "denoise_steps": 40}
    assert info["first_timestep"] <= 800
    core.stats.update(unet_forward_passes=0, unet_calls=0)
    z = core.generate_latents([r])
    assert core.stats["unet_calls"] == 40 and core.stats["unet_forward_passes"] == 80  # CFG: 2 latents per call
    # on DDIM-25 (961, 921, …, 1) GeNIe's rule keeps 801 … 1 (21 steps), diffusers' img2img int(25·0.8) = 20 from 761
    g25 = core.schedule_info(dataclasses.replace(r, scheduler="ddim", num_inference_steps=25))
    s25 = core.schedule_info(dataclasses.replace(r, scheduler="ddim", num_inference_steps=25, start_rule="sdedit"))
    assert (g25["start_timestep"], g25["first_timestep"], g25["denoise_steps"]) == (800, 801, 21)
    assert (s25["start_timestep"], s25["first_timestep"], s25["denoise_steps"]) == (761, 761, 20)
    zs = core.generate_latents([dataclasses.replace(r, start_rule="sdedit")])
    assert not torch.allclose(z, zs, atol=1e-4)  # the start rule changes the image
    # r > 0.999: GeNIe starts from pure noise, i.e. the txt2img latents of the same seed
    full = core.generate_latents([dataclasses.replace(r, strength=1.0)])
    txt = core.generate_latents([dataclasses.replace(r, init_image=None)])
    torch.testing.assert_close(full, txt)
    assert core.schedule_info(dataclasses.replace(r, strength=1.0))["denoise_steps"] == 50


def test_mixed_schedulers_in_one_call_equal_each_alone(tiny_bundle):
    im = shape_image(6)
    reqs = [GenRequest("a photo of a circle", seed=1, init_image=im, strength=0.5, num_inference_steps=6, scheduler="pndm"),
            GenRequest("a photo of a circle", seed=1, init_image=im, strength=0.5, num_inference_steps=6, scheduler="ddim"),
            GenRequest("a photo of a circle", seed=1, init_image=im, strength=0.8, num_inference_steps=6,
                       scheduler="dpmsolver", start_rule="genie"),
            GenRequest("a photo of a ring", seed=2, num_inference_steps=6, scheduler="euler", guidance_scale=2.0),
            GenRequest("a photo of a ring", seed=2, num_inference_steps=6, guidance_scale=2.0)]  # the core's default
    mixed = GenerationCore(tiny_bundle, batch_size=16, scheduler="ddim")
    z = mixed.generate_latents(reqs)
    for i, r in enumerate(reqs):
        alone = GenerationCore(tiny_bundle, batch_size=1, scheduler=r.scheduler or "ddim")
        torch.testing.assert_close(alone.generate_latents([dataclasses.replace(r, scheduler=None)])[0], z[i],
                                   atol=1e-4, rtol=1e-4)
    assert not torch.allclose(z[0], z[1], atol=1e-4)  # PNDM vs DDIM: batches never mix samplers
    torch.testing.assert_close(z[1], mixed.generate_latents([reqs[1]])[0], atol=1e-4, rtol=1e-4)
    # a scheduler other than the model's own gets SD-1.x's schedule: PNDM with skip_prk_steps (PLMS: N+1
    # timesteps), DPM-Solver++ with its own default (linspace) spacing
    assert mixed._timesteps("pndm", 50)[0] == _sd1_scheduler("pndm", 50)
    assert mixed._timesteps("dpmsolver", 50)[0] == _sd1_scheduler("dpmsolver", 50)
    assert mixed._timesteps("ddim", 25)[0] == _sd1_scheduler("ddim", 25)[:25] == list(range(961, 0, -40))
    with pytest.raises(ValueError, match="unknown scheduler"):
        mixed.generate_latents([dataclasses.replace(reqs[0], scheduler="nope")])
    with pytest.raises(ValueError, match="unknown start_rule"):
        mixed.generate_latents([dataclasses.replace(reqs[0], start_rule="nope")])


def test_resolution_per_request(core):
    im = shape_image(7)
    reqs = [GenRequest("a photo of a circle", seed=1, init_image=im, strength=0.5, num_inference_steps=4, resolution=64),
            GenRequest("a photo of a circle", seed=1, init_image=im, strength=0.5, num_inference_steps=4)]
    out = core.generate(reqs)
    assert [o.size for o in out] == [(64, 64), (32, 32)]
    assert core.schedule_info(reqs[0])["resolution"] == 64
    with pytest.raises(ValueError, match="generate_latents"):
        core.generate_latents(reqs)
    with pytest.raises(ValueError, match="multiple of"):
        core.generate([dataclasses.replace(reqs[0], resolution=34)])


def test_center_crop_preprocess_keeps_the_aspect(core):
    from PIL import Image

    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (16, 0, 48, 32))  # blue centre square, red side bands
    crop = np.asarray(GenerationCore.prepare_image(wide, 32, "center_crop"))
    squash = np.asarray(GenerationCore.prepare_image(wide, 32, "resize"))
    assert crop.shape == squash.shape == (32, 32, 3)
    assert (crop[..., 2] == 255).all() and (crop[..., 0] == 0).all()  # only the centre survives, unsquashed
    assert (squash[:, 0, 0] == 255).all()  # squashing keeps the red bands
    reqs = [GenRequest("a photo of a circle", seed=1, init_image=wide, strength=0.5, num_inference_steps=4, preprocess=p)
            for p in ("center_crop", "resize")]
    z = core.generate_latents(reqs)
    assert not torch.allclose(z[0], z[1], atol=1e-4)
    torch.testing.assert_close(z[0], core.generate_latents(reqs[:1])[0], atol=1e-3, rtol=1e-3)  # batch of 2 vs 1


# ---------------------------------------------------------------- the core vs diffusers' own pipelines (METHODS §1, §4)
def _img2img_pipeline(bundle, core):
    """diffusers' StableDiffusionImg2ImgPipeline on the tiny model's components with SD-1.x's PNDM (DA-Fusion's
    reference setup: the pipeline's default scheduler)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    cls, conf = core.scheduler_class_and_config("pndm")
    p = bundle.pipe
    return StableDiffusionImg2ImgPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                                          scheduler=cls.from_config(conf), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False).to("cpu")


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_vae_sample_convention_equals_diffusers_img2img_bit_for_bit(core, tiny_bundle, strength):
    """DA-Fusion's reference runs StableDiffusionImg2ImgPipeline: z0 is a posterior *sample* (the generator's first
    draw) and the forward noise is the second draw. vae_encode="sample" gives the pipeline's latents exactly."""
    im = shape_image(8)
    seed, steps = 11, 10
    pipe = _img2img_pipeline(tiny_bundle, core)
    ref = pipe("a photo of a circle", image=im, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    r = GenRequest("a photo of a circle", seed=seed, init_image=im, strength=strength, num_inference_steps=steps,
                   guidance_scale=7.5, scheduler="pndm", vae_encode="sample")
    z = core.generate_latents([r])
    assert torch.equal(z, ref.float().cpu())
    # the core's default (the posterior mode, GeNIe's convention; first draw = noise) is another image
    zm = core.generate_latents([dataclasses.replace(r, vae_encode="mode")])
    assert not torch.allclose(zm, z, atol=1e-4)
    # batched with other requests, the sample convention still draws per request: same latents
    other = dataclasses.replace(r, seed=12, prompt="a photo of a square")
    torch.testing.assert_close(core.generate_latents([other, r])[1], z[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown vae_encode"):
        core.generate_latents([dataclasses.replace(r, vae_encode="argmax")])


def test_vae_encode_is_a_protocol_setting_recorded_per_unit():
    from augment_dagster.methods.base import SynthUnit
    from augment_dagster.methods.protocol import given
    from augment_dagster.methods.registry import resolve_protocol
    from augment_dagster.config import parse_config

    cfg = parse_config({"experiment": "x", "methods": {"dafusion": {}, "diagen": {}, "genie": {}, "real_guidance": {}}})
    got = {n: resolve_protocol(cfg, n).vae_encode for n in cfg.methods}
    assert got == {"dafusion": "sample", "diagen": "sample", "genie": "mode", "real_guidance": "mode"}

    def unit(mode, proto):
        return SynthUnit(label="a", seed=0, mode=mode, strength=0.5, **proto.unit_fields(mode))

    mode_key = unit("img2img", given()).identity()
    u = unit("img2img", resolve_protocol(cfg, "dafusion"))
    assert u.vae_encode == "sample" and u.identity()["vae_encode"] == "sample"
    u = unit("img2img", resolve_protocol(cfg, "genie"))
    assert "vae_encode" not in u.identity()  # the mode leaves memo keys of every other method as they were
    t = unit("txt2img", resolve_protocol(cfg, "dafusion"))
    assert t.vae_encode == "mode" and "vae_encode" not in t.identity()
    assert "vae_encode" not in mode_key


@pytest.mark.parametrize("name", ["pndm", "ddim", "dpmsolver"])
def test_init_latents_t_starts_at_that_timestep_of_the_actual_schedule(core, name):
    """The start of partially inverted latents is looked up in the scheduler's timesteps. PNDM-10's schedule has 11
    (901, 801, 801, 701, …, 1): init_latents_t=501 must run the 6 steps 501 … 1, not 7 from 601."""
    ts = _sd1_scheduler(name, 10)
    z = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t_start in (501, 500, 250, 150):
        r = GenRequest("a photo of a circle", seed=0, init_latents=z, init_latents_t=t_start, guidance_scale=1.0,
                       num_inference_steps=10, scheduler=name)
        info = core.schedule_info(r)
        expect = [t for t in ts if t <= t_start]
        assert info["first_timestep"] == expect[0] and info["denoise_steps"] == len(expect), (name, t_start, info)
        core.stats.update(unet_calls=0)
        core.generate_latents([r])
        assert core.stats["unet_calls"] == len(expect)
    if name == "pndm":
        info = core.schedule_info(GenRequest("x", seed=0, init_latents=z, init_latents_t=501, num_inference_steps=10,
                                             scheduler="pndm"))
        assert (info["first_timestep"], info["denoise_steps"]) == (501, 6)
