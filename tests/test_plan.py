"""`augment plan`: no model loaded, fast, the JSON shape, the work arithmetic and diffusers' schedules."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest
import yaml

from augment_dagster.cli import main
from augment_dagster.config import DEFAULT_CONFIG_DIR, PROJECT_ROOT, parse_config
from augment_dagster.plan.compute import plan_config
from augment_dagster.plan.work import schedule_timesteps, unet_calls

DEMO = DEFAULT_CONFIG_DIR / "demo.yaml"
KEYS = {"algorithm", "scheduler", "steps", "start_rule", "guidance_scale", "images_per_real", "images_per_class",
        "resolution", "method_params", "concept_steps", "lora_steps", "inversion_steps", "classifier", "evaluation",
        "sources", "work", "vae_encode", "preprocess", "synthetic_probability"}
CLASSIFIER_KEYS = {"optimizer", "lr", "schedule", "epochs", "steps_per_epoch", "epochs_over_data", "batch_size",
                   "train_transform", "linear_probe", "full_fine_tune", "headline_metric"}
EVAL_KEYS = {"kind", "n_way", "shots", "queries", "episodes", "augmented_per_class"}


def test_plan_is_fast_and_imports_no_torch():
    """A fresh interpreter: `augment plan` on the demo config in < 5 s without importing torch or diffusers."""
    code = ("import sys, io, contextlib; from augment_dagster.cli import main; buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = main(['plan', '--config', sys.argv[1], '--json'])\n"
            "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules, len(buf.getvalue()))")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(DEMO)], capture_output=True, text=True, env=env, timeout=60)
    secs = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    rc, torch_loaded, diffusers_loaded, n = out.stdout.split()
    assert (rc, torch_loaded, diffusers_loaded) == ("0", "False", "False") and int(n) > 1000, out.stderr[-500:]
    # CPU seconds of the whole process (interpreter start included): wall time on a loaded shared machine is not
    # the command's; unloaded, wall ≈ CPU ≈ 1.3 s here
    assert cpu < 5.0, f"augment plan used {cpu:.1f} CPU s ({secs:.1f} s wall)"


def test_json_has_every_named_field_and_a_source_for_each(capsys):
    assert main(["plan", "--config", str(DEMO), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert set(p["methods"]) == set(parse_config(yaml.safe_load(DEMO.read_text())).enabled_methods())
    for name, m in p["methods"].items():
        assert KEYS <= set(m), (name, KEYS - set(m))
        assert CLASSIFIER_KEYS <= set(m["classifier"]) and EVAL_KEYS <= set(m["evaluation"]), name
        for k in ("scheduler", "steps", "images_per_real") if m["uses_diffusion"] else ():
            assert m["sources"][k]["from"] in ("default", "method", "config"), (name, k)
        for k, s in m["sources"]["classifier"].items():
            assert s["from"] in ("default", "recipe", "config", "method"), (name, k, s)
    # the demo sets 10 steps in generation (config), DA-Fusion's sampler comes from the method
    d = p["methods"]["dafusion"]
    assert d["steps"] == 10 and d["sources"]["steps"] == {"from": "config", "at": "generation"}
    assert d["scheduler"] == "pndm" and d["sources"]["scheduler"] == {"from": "method", "at": "paper:dafusion"}
    assert d["sources"]["classifier"]["optimizer"]["from"] == "recipe"
    assert {"synthetic_images", "unet_image_passes", "classifier_training_steps", "gpu_hours", "img_per_s"} <= set(p["work"])


def test_work_arithmetic_on_the_builtin_data():
    """Counts from the config alone: 3 classes × K train images, M per image, CFG doubling, PNDM's N + 1 steps."""
    cfg = parse_config({"experiment": "x", "dataset": {"builtin": {"classes": ["circle", "square", "star"],
                                                                     "train_per_class": 10}},
                        "splits": {"shots": [2, 4], "seeds": [0, 1, 2], "val_per_class": 2},
                        "generation": {"images_per_real": 3},
                        "training": {"epochs": 5, "steps_per_epoch": 7},
                        "methods": {"dafusion": {"steps": 10, "params": {"fixed_strength": 0.5}},
                                    "txt2img": {"steps": 10, "guidance_scale": 1.0},
                                    "genie": {"steps": 10}}})
    p = plan_config(cfg, img_per_s=100.0)
    da = p["methods"]["dafusion"]["work"]
    # (2 + 4) shots × 3 classes × M 3 × 3 seeds = 162 images; PNDM-10 at t0 0.5: start index 5 of 11 -> 6 calls, CFG ×2
    assert da["synthetic_images"] == 162 and da["unet_image_passes"] == 162 * 6 * 2
    assert da["classifier_training_steps"] == 2 * 3 * 5 * 7
    tx = p["methods"]["txt2img"]["work"]
    assert tx["unet_image_passes"] == 162 * 10  # DDIM-10, no CFG at g 1
    ge = p["methods"]["genie"]["work"]  # every other class's train images: (C−1)·K per class
    assert ge["synthetic_images"] == 3 * (3 * 2 * 2 + 3 * 2 * 4)
    # DA-Fusion's TI per class: steps × batch image-passes (3 forward-pass equivalents each), at 100 passes/s
    ti = 2 * 3 * 3 * cfg.concepts.steps * cfg.concepts.batch_size
    assert da["concept_training_image_passes"] == ti
    assert da["gpu_hours"] == pytest.approx(round((162 * 12 + 3 * ti) / 100 / 3600, 3))
    assert p["work"]["synthetic_images"] == da["synthetic_images"] + tx["synthetic_images"] + ge["synthetic_images"]


@pytest.mark.parametrize("name, steps", [("ddim", 25), ("ddim", 10), ("pndm", 50), ("pndm", 10), ("dpmsolver", 50),
                                         ("dpmsolver", 10), ("euler", 20)])
def test_schedules_match_diffusers(name, steps):
    """The plan's torch-free schedules are diffusers' (SD-1.x config, the class's own default spacing)."""
    import diffusers

    sd1 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
           "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
    cls = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
           "euler": "EulerDiscreteScheduler"}[name]
    s = getattr(diffusers, cls).from_config(sd1)
    s.set_timesteps(steps)
    assert schedule_timesteps(name, steps) == [int(round(float(t))) for t in s.timesteps]


def test_unet_calls_follow_the_core_rules():
    assert unet_calls("dpmsolver", 50, "genie", 0.8) == 40  # GeNIe: 40 steps at r 0.8 (METHODS §4)
    assert unet_calls("pndm", 50, "sdedit", 0.7) == 36  # diffusers img2img on PLMS: 35 + the repeated timestep
    assert unet_calls("ddim", 25, "sdedit", 0.8) == 20 and unet_calls("ddim", 25, "sdedit", 0.0) == 0
    assert unet_calls("dpmsolver", 50, "genie", 1.0) == 50


def test_human_table_and_bad_arguments(capsys, tmp_path):
    assert main(["plan", "--config", str(DEFAULT_CONFIG_DIR / "papers" / "genie.yaml")]) == 0
    out = capsys.readouterr().out
    assert "genie+crop" in out and "GPU-h" in out and "UNet image-passes/s" in out
    # the preset's data folder is not on this machine: its class split sizes the work (20 test classes)
    assert "not read: 20 classes from dataset.class_split.test" in out
    assert main(["plan", "--config", str(DEMO), "--img-per-s", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\nmethods: {dafusion: {stepz: 3}}\n")
    assert main(["plan", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and str(bad) in err and "Traceback" not in err


def test_imagefolder_sizes_are_counted_without_decoding(tmp_path):
    root = tmp_path / "ds"
    for c, n in (("cat", 7), ("dog", 3)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i}.jpg").write_bytes(b"not decoded")
    (root / "test" / "cat").mkdir(parents=True)  # held-out pools are not train classes
    cfg = parse_config({"experiment": "x", "dataset": {"source": str(root)},
                        "splits": {"shots": [2], "val_per_class": 2, "fewer_than_k": "use_all"},
                        "methods": {"img2img_low": {"images_per_real": 2}}})
    p = plan_config(cfg)
    assert p["work"]["dataset"] == {"known": True, "classes": 2}
    split = p["methods"]["img2img_low"]["work"]["per_split"][0]
    assert (split["classes"], split["real_train_images"], split["synthetic_images"]) == (2, 4, 8)
