"""Real-size readiness: LoRA variants as adapters on the one UNet, model release, the GPU-path options, the
automatic batch size with OOM back-off (a fake OOM on CPU), and a real-layout SD folder through ``source:``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fixtures_models import model_cache_root, shape_image, tiny_bundle  # noqa: F401  (fixtures)

from augment_dagster.models.generation import (
    GenerationCore,
    GenRequest,
    auto_batch_size,
    is_oom,
)

ROOT = Path(__file__).resolve().parents[1]


def _reqs(n: int, **kw):
    return [GenRequest("a photo of a circle", seed=s, num_inference_steps=3, guidance_scale=2.0, **kw) for s in range(n)]


def _trained_lora(bundle):
    from augment_dagster.stages.concepts import train_concepts

    ims = [shape_image(s) for s in range(2)]
    res = train_concepts(bundle, {"a": ims}, {"a": "<lora-a>"}, {"a": ["a photo of a {}"]}, steps=2, lr=5e-2,
                         batch_size=2, lora_rank=2)
    # make the LoRA's effect unmistakable (lora_B starts at zero and moves little in 2 steps)
    return {k: (v * 50 if "lora_B" in k else v) for k, v in res.lora_state.items()}


def test_lora_bundle_is_an_adapter_on_the_same_unet(tiny_bundle):
    from augment_dagster.stages.concept_lora import bundle_with_lora
    from augment_dagster.models.adapters import adapter_names

    unet = tiny_bundle.pipe.unet
    n_params = sum(p.numel() for p in unet.parameters())
    base_before = GenerationCore(tiny_bundle).generate_latents(_reqs(2))
    state = _trained_lora(tiny_bundle)
    lb = bundle_with_lora(tiny_bundle, state, key="f" * 64)
    assert lb.pipe is tiny_bundle.pipe and lb.pipe.unet is unet  # no copy of the pipeline or the UNet
    assert lb.lora_adapter in adapter_names(unet) and lb.fingerprint != tiny_bundle.fingerprint
    assert sum(p.numel() for p in unet.parameters()) - n_params == sum(v.numel() for v in state.values())
    assert bundle_with_lora(tiny_bundle, state, key="f" * 64).lora_adapter == lb.lora_adapter  # attached once
    assert len(adapter_names(unet)) == 1
    with_lora = GenerationCore(lb).generate_latents(_reqs(2))
    base_after = GenerationCore(tiny_bundle).generate_latents(_reqs(2))
    assert not torch.allclose(with_lora, base_before, atol=1e-4)  # the adapter is on in the LoRA core
    torch.testing.assert_close(base_after, base_before, atol=1e-6, rtol=0)  # and off for the base bundle
    # inversion runs on the LoRA model too, and leaves the adapters off afterwards
    GenerationCore(lb).invert([shape_image(0)], ["a photo of a circle"], num_steps=2)
    torch.testing.assert_close(GenerationCore(tiny_bundle).generate_latents(_reqs(2)), base_before, atol=1e-6, rtol=0)
    # training another LoRA on the same UNet neither sees nor keeps the attached one (and peft's "multiple
    # adapters" warning, the design here, is not printed into a run's output)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*peft_config", category=UserWarning)
        _trained_lora(tiny_bundle)
    assert adapter_names(unet) == [lb.lora_adapter]
    from augment_dagster.models.adapters import remove

    remove(unet, lb.lora_adapter)
    assert adapter_names(unet) == [] and not any("lora" in k or "base_layer" in k for k in unet.state_dict())
    torch.testing.assert_close(GenerationCore(tiny_bundle).generate_latents(_reqs(2)), base_before, atol=1e-6, rtol=0)


def test_oom_backoff_halves_the_batch_and_keeps_the_images(tiny_bundle, monkeypatch):
    ref = GenerationCore(tiny_bundle, batch_size=1).generate_latents(_reqs(6, init_image=shape_image(1), strength=0.7))
    core = GenerationCore(tiny_bundle, batch_size=8)
    real_run, real_decode = core._run_batch, core.decode
    seen: list[int] = []

    def run(reqs, key):  # a fake accelerator that fits at most 2 requests per UNet batch
        seen.append(len(reqs))
        if len(reqs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(reqs, key)

    monkeypatch.setattr(core, "_run_batch", run)
    out = core.generate_latents(_reqs(6, init_image=shape_image(1), strength=0.7))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert seen[:3] == [6, 4, 2] and core.batch_size == 2  # 8 -> 6 requests tried, then 4, then 2
    assert core.stats["batch_size"] == 2 and core.stats["oom_backoffs"] == 2
    assert core.last_batch_sizes == [2] * 6
    # decode backs off too; a non-OOM error is not swallowed
    monkeypatch.setattr(core, "decode", lambda lat: (_ for _ in ()).throw(RuntimeError("out of memory")) if len(lat) > 1
                        else real_decode(lat))
    assert len(core.generate(_reqs(3))) == 3 and core.batch_size == 1
    monkeypatch.setattr(core, "_run_batch", lambda reqs, key: (_ for _ in ()).throw(ValueError("bad request")))
    with pytest.raises(ValueError, match="bad request"):
        core.generate_latents(_reqs(2))
    monkeypatch.setattr(core, "_run_batch", lambda reqs, key: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError):  # at batch size 1 there is nothing left to back off to
        core.generate_latents(_reqs(1))


def test_auto_batch_size_and_oom_detection(tiny_bundle):
    assert auto_batch_size("cuda:0", 48) == 48 and auto_batch_size("cpu", 48) == 8 and auto_batch_size("cpu", 4) == 4
    assert GenerationCore(tiny_bundle, batch_size="auto").batch_size == 8  # on CPU
    with pytest.raises(ValueError, match="batch_size"):
        GenerationCore(tiny_bundle, batch_size="big")
    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    from augment_dagster.config import parse_config

    cfg = parse_config({"experiment": "x", "generation": {"batch_size": "auto", "max_batch_size": 24},
                        "models": {"diffusion": {"compile": True, "channels_last": False}}})
    assert cfg.generation.batch_size == "auto" and cfg.models.diffusion.compile is True
    from augment_dagster.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        parse_config({"experiment": "x", "generation": {"batch_size": 0}})


def test_gpu_options_apply_on_cuda_only(tiny_bundle):
    from augment_dagster.models.loading import gpu_options

    assert gpu_options("cpu", True, True) == {"sdpa": True, "channels_last": False, "compile": False}
    assert gpu_options("cuda", True, True) == {"sdpa": True, "channels_last": True, "compile": True}
    assert gpu_options("cuda:1", False, False)["channels_last"] is False
    procs = {type(p).__name__ for m in (tiny_bundle.pipe.unet, tiny_bundle.pipe.vae) for p in m.attn_processors.values()}
    assert procs == {"AttnProcessor2_0"}  # SDPA attention
    assert tiny_bundle.pipe.unet.conv_in.weight.is_contiguous()  # CPU: no channels_last


def test_release_drops_a_kind_and_reloads_on_demand(model_cache_root):
    from augment_dagster.models import loading as L

    a = L.load_clip("tiny-random", model_cache_root, device="cpu")
    L.load_diffusion("tiny-random", model_cache_root, device="cpu")
    assert {"clip", "sd"} <= set(L.cached_kinds())
    assert L.release("clip") >= 1
    assert "clip" not in L.cached_kinds() and "sd" in L.cached_kinds()
    b = L.load_clip("tiny-random", model_cache_root, device="cpu")
    assert b is not a and b.fingerprint == a.fingerprint


# ------------------------------------------------------------------ a real-layout SD folder through `source:`
def _reduced_sd15_layout(folder: Path) -> Path:
    """SD-1.5's component set and block layout (3 cross-attention down blocks + 1 plain, PNDM scheduler with
    SD-1.5's config), tiny widths, saved in the hub's file layout."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from augment_dagster.models.hub_layout import save_sd_pipeline
    from augment_dagster.models.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=64, scaling_factor=0.18215)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                          skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return save_sd_pipeline(pipe, folder)


@pytest.mark.slow
def test_real_layout_sd_folder_loads_through_source(tmp_path):
    from augment_dagster.config import parse_config
    from augment_dagster.defs.resources import Models

    folder = _reduced_sd15_layout(tmp_path / "stable-diffusion-v1-5")
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
            "scheduler/scheduler_config.json"} <= files
    assert "tokenizer/tokenizer.json" not in files  # the slow-tokenizer files only, like the hub's SD-1.5
    idx = json.loads((folder / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionPipeline" and idx["tokenizer"] == ["transformers", "CLIPTokenizer"]

    cfg = parse_config({"experiment": "layout", "data_dir": str(tmp_path / "data"),
                        "models": {"diffusion": {"source": str(folder)}, "device": "cpu"}})
    models = Models(cfg)
    b = models.diffusion()
    assert b.resolution == 64 and type(b.pipe.scheduler).__name__ == "PNDMScheduler"
    assert b.fingerprint == models.diffusion_fingerprint() and b.fingerprint.startswith("dir-")
    from augment_dagster.models.tiny import build_tokenizer

    ref = build_tokenizer()
    prompt = "a photo of a <new-token> circle"
    assert b.pipe.tokenizer(prompt)["input_ids"] == ref(prompt)["input_ids"]  # vocab.json + merges.txt round trip
    core = models.generation_core()
    imgs = core.generate([GenRequest("a photo of a circle", seed=0, num_inference_steps=2, guidance_scale=3.0,
                                     scheduler="pndm"),
                          GenRequest("a photo of a square", seed=1, num_inference_steps=4, strength=0.5,
                                     init_image=shape_image(0), scheduler="ddim")])
    assert [im.size for im in imgs] == [(64, 64), (64, 64)]
    # a file change is a new fingerprint (so every memo key downstream changes)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        (folder / "scheduler" / "scheduler_config.json").read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert models.diffusion_fingerprint() != b.fingerprint


@pytest.mark.slow
def test_realsize_bench_smoke(tmp_path):
    """The bench's whole flow (dataset, config, `augment run` subprocess, event-log table) on the tiny models."""
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "realsize.py"), "--smoke", "--data-dir", str(tmp_path / "w"),
                        "--json", str(out), "--max-seconds", "600"], capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    stages = {row["stage"]: row for row in res["rows"]}
    for m in ("dafusion", "diagen", "diff_ii", "genie", "genie_ada", "sgid", "txt2img", "real_guidance", "img2img_low",
              "img2img_high", "real_filter", "standard"):
        assert stages[f"synthetic/{m}"]["status"] == "ok", m
    assert stages["synthetic/dafusion"]["passes"] > 0 and stages["concept_lora"]["passes"] == 4
    assert all(row["seconds"] is not None and row["rss"] for row in res["rows"])
    assert "| stage | status | seconds |" in r.stdout and "PASS" in r.stdout and "nan ±" not in res["table"]


def test_runner_records_the_batch_size_used_and_keys_ignore_it(tiny_bundle, tmp_path, monkeypatch):
    from augment_dagster.methods.base import SynthUnit
    from augment_dagster.methods.protocol import given
    from augment_dagster.methods.registry import get_method
    from augment_dagster.methods.runner import run_units
    from augment_dagster.store import BlobStore, Memo

    spec = get_method("txt2img")
    units = [SynthUnit(label="circle", seed=s, mode="txt2img", prompt="a photo of a circle",
                       **given(steps=2, guidance_scale=2.0).unit_fields("txt2img")) for s in range(5)]

    def factory(lora=None):
        core = GenerationCore(tiny_bundle, batch_size=8)
        real = core._run_batch

        def run(reqs, key):
            if len(reqs) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return real(reqs, key)

        monkeypatch.setattr(core, "_run_batch", run)
        return core

    kw = dict(blobs=BlobStore(tmp_path), memo=Memo(tmp_path), model_fp="fp", load_image=None, load_tensor=None,
              batch_size=8)
    rows, stats = run_units(spec, "txt2img", units, core_factory=factory, **kw)
    assert stats.computed == 5 and stats.unet_batch_size == 2 and stats.oom_backoffs == 2
    recs = [Memo(tmp_path).get(r["memo_key"]) for r in rows]
    assert [r["unet_batch"] for r in recs] == [2, 2, 2, 2, 1]
    # the same units with a core that never backs off: same keys, all reused
    rows2, stats2 = run_units(spec, "txt2img", units, core_factory=lambda lora=None: GenerationCore(tiny_bundle, 8), **kw)
    assert stats2.reused == 5 and [r["memo_key"] for r in rows2] == [r["memo_key"] for r in rows]
    assert "unet_batch" not in rows[0]  # not in the manifest: its data version does not depend on the machine


def test_lora_adapter_weights_are_frozen_for_inference(tiny_bundle):
    from augment_dagster.stages.concept_lora import bundle_with_lora
    from augment_dagster.models.adapters import remove

    lb = bundle_with_lora(tiny_bundle, _trained_lora(tiny_bundle), key="e" * 64)
    unet = tiny_bundle.pipe.unet
    assert not any(p.requires_grad for n, p in unet.named_parameters() if lb.lora_adapter in n)
    remove(unet, lb.lora_adapter)
