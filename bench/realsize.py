"""Real-size readiness: every method end to end on the real model architectures (random weights, no download).

    python bench/realsize.py [--resolution 128] [--steps 4] [--cache-dir DIR] [--data-dir DIR] [--keep]
                             [--max-seconds 1200] [--max-rss-gb 8] [--threads N]

1. Builds, with random weights from the published architecture configs written below, Stable Diffusion 1.5
   (UNet2DConditionModel 859.5 M params, AutoencoderKL, CLIPTextModel ViT-L/14 text tower, a PNDM scheduler), BLIP
   base (Salesforce/blip-image-captioning-base), CLIP ViT-B/32 (openai/clip-vit-base-patch32) and ResNet-50 in the
   ``microsoft/resnet-50`` layout, and saves each with ``save_pretrained`` in hub layout under ``--cache-dir``
   (once; reruns reuse the folders). Tokenizers are the offline byte-level BPE / WordPiece ones of
   ``augment_dagster/models/tiny.py`` (``vocab.json`` + ``merges.txt``); the embedding tables keep the real vocab
   sizes (49408 / 30524), so parameter counts and per-forward compute equal the real models'. The one change
   from the published configs: ``unet.sample_size`` / ``vae.sample_size`` are set to the bench resolution
   (``--resolution``/8 and ``--resolution``) — the model's default size, which does not change any weight or
   per-pixel compute — because textual inversion, LoRA training and DDIM inversion run at the model's size.
2. Writes a small real dataset: scikit-learn's ``load_digits`` (8×8 scans in the wheel), 3 classes, upscaled to
   64 px, as an imagefolder tree (train pool + ``test/``, no ``ood/``).
3. Writes a config that points ``models.*.source`` at those folders and enables one entry per method
   algorithm, each with ``--steps`` denoising steps (``methods.<entry>.steps``), and runs it through
   ``python -m augment_dagster.cli run --config …`` in a subprocess.
4. Prints one row per stage (Dagster step): seconds, UNet image-passes and image-passes/s, the peak RSS of the
   run's process tree while the stage ran, and on CUDA the peak GPU memory of that process (nvidia-smi); then
   the run's overall peak RSS. Exit status 1 when the run fails, takes longer than ``--max-seconds`` or peaks
   above ``--max-rss-gb``.

UNet image-passes: a CFG step on B images counts 2B (``unet_forward_passes`` of the synthetic assets); for the
training stages one training step on a batch of B counts B forward+backward passes, and the inversion pool
counts its inversion steps plus its reconstruction check — those three are computed from the config.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BUILD_VERSION = 2  # bump when a builder below changes
CLASSES = {0: "zero", 1: "one", 2: "two"}

# ---------------------------------------------------------------- published architecture configs
# runwayml/stable-diffusion-v1-5 unet/config.json (sample_size is set from --resolution, see the module doc)
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD15_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3,
    latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
# Salesforce/blip-image-captioning-base
BLIP_BASE = dict(
    text=dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=512),
    vision=dict(hidden_size=768, image_size=384, patch_size=16, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072),
    projection_dim=512,
)
# openai/clip-vit-base-patch32
CLIP_B32 = dict(
    text=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
              max_position_embeddings=77, hidden_act="quick_gelu"),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                patch_size=32, hidden_act="quick_gelu"),
    projection_dim=512,
)
# microsoft/resnet-50
RESNET50 = dict(num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False, num_labels=1000)


# ---------------------------------------------------------------- model folders
def _quiet():
    from augment_dagster.models.loading import _quiet as q

    q()


def build_sd15(out: Path, resolution: int) -> int:
    import torch
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
    unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": resolution // 8}).eval()
    n_unet = sum(p.numel() for p in unet.parameters())
    vae = AutoencoderKL(**{**SD15_VAE, "sample_size": resolution}).eval()
    te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    save_sd_pipeline(pipe, out)  # hub layout: tokenizer/ with vocab.json + merges.txt
    return n_unet


def build_blip(out: Path) -> int:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    from augment_dagster.models.tiny import build_bert_tokenizer

    tok = build_bert_tokenizer()
    tid = tok.convert_tokens_to_ids
    cfg = BlipConfig(text_config=dict(**BLIP_BASE["text"], bos_token_id=tid("[DEC]"), sep_token_id=tid("[SEP]"),
                                      eos_token_id=tid("[SEP]"), pad_token_id=tid("[PAD]")),
                     vision_config=BLIP_BASE["vision"], projection_dim=BLIP_BASE["projection_dim"])
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    s = BLIP_BASE["vision"]["image_size"]
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": s, "width": s}), tokenizer=tok).save_pretrained(out)
    return n


def build_clip(out: Path) -> int:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    from augment_dagster.models.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = CLIPConfig(text_config=dict(**CLIP_B32["text"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=CLIP_B32["vision"], projection_dim=CLIP_B32["projection_dim"])
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    s = CLIP_B32["vision"]["image_size"]
    CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s}),
                  tokenizer=tok).save_pretrained(out)
    return n


def build_resnet50(out: Path) -> int:
    import torch
    from transformers import (
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
    )

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(**RESNET50)).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    ConvNextImageProcessor(crop_pct=0.875, size={"shortest_edge": 224}, resample=3).save_pretrained(out)
    return n


def ensure_models(cache: Path, resolution: int) -> dict[str, tuple[Path, int]]:
    """Build each model folder once (temp folder + rename) and return {kind: (folder, parameter count)}."""
    cache.mkdir(parents=True, exist_ok=True)
    builders = {"sd15": lambda d: build_sd15(d, resolution), "blip-base": build_blip, "clip-vit-b32": build_clip,
                "resnet-50": build_resnet50}
    out = {}
    for kind, fn in builders.items():
        name = f"{kind}-r{resolution}-v{BUILD_VERSION}" if kind == "sd15" else f"{kind}-v{BUILD_VERSION}"
        d = cache / name
        info = d / "realsize_build.json"
        if not info.exists():
            shutil.rmtree(d, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache))
            t0 = time.perf_counter()
            _quiet()
            n = fn(tmp)
            (tmp / "realsize_build.json").write_text(json.dumps({"params": n, "version": BUILD_VERSION}))
            os.rename(tmp, d)
            import gc

            gc.collect()
            print(f"  built {kind}: {n / 1e6:.1f} M params in {time.perf_counter() - t0:.0f}s -> {d}", flush=True)
        out[kind] = (d, int(json.loads(info.read_text())["params"]))
    return out


# ---------------------------------------------------------------- dataset + config
def write_dataset(root: Path, per_class_train: int = 4, per_class_test: int = 4, size: int = 64) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for label, name in CLASSES.items():
        idx = np.flatnonzero(d.target == label)[: per_class_train + per_class_test]
        for j, i in enumerate(idx):
            sub = root / name if j < per_class_train else root / "test" / name
            sub.mkdir(parents=True, exist_ok=True)
            a = (255 - d.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)  # dark digit on white
            Image.fromarray(a).convert("RGB").resize((size, size), Image.BICUBIC).save(sub / f"{label}_{i:04d}.png")


def write_config(path: Path, models: dict, data: Path, steps: int, a) -> dict:
    import yaml

    from augment_dagster.methods.registry import available_methods, get_method
    from augment_dagster.slots import cpu_count

    # one entry per registered method; the diffusion ones at --steps denoising steps
    methods = {m: {"steps": steps} if get_method(m).uses_diffusion else {} for m in available_methods()}
    methods["standard"] = {"params": {"policy": "strong"}}
    frozen = "tiny-pretrained" if a.smoke else str(models["resnet-50"][0])  # DIAGen filter / episode encoder
    cfg = {
        "experiment": "realsize",
        "description": "bench/realsize.py: real architectures (random weights), every method at small step counts",
        "seed": 0,
        "dataset": {"source": str(data), "metaclass": "digit"},
        "splits": {"shots": [2], "seeds": [0], "val_per_class": 2},
        "models": {
            "device": a.device,
            "diffusion": {"source": str(models["sd15"][0])},
            "captioner": {"source": str(models["blip-base"][0])},
            "clip": {"source": str(models["clip-vit-b32"][0])},
            "classifier": {"source": str(models["resnet-50"][0]), "freeze_backbone": not a.smoke},
            "llm": {"provider": "offline"},
        },
        "generation": {"images_per_real": 1, "steps": steps, "guidance_scale": 7.5, "batch_size": 8},
        "concepts": {"steps": a.train_steps, "batch_size": 2, "lr": 5e-3, "init_word": "digit", "checkpoint_every": 50},
        "concept_lora": {"steps": a.train_steps, "batch_size": 2, "rank": 4, "lr": 1e-3, "init_word": "digit"},
        "inversion": {"steps": steps, "check_reconstruction": True},
        "prompts": {"per_class": 2},
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "image_size": 64,
                     # DIAGen's own filter and GeNIe's episodes on the same real-architecture backbone
                     "diagen_filter": {"backbone": frozen, "epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "views": 1},
                     "episodes": {"episodes": 20, "encoder": frozen}},
        "methods": methods,
        "mlflow": {"enabled": True, "log_models": False},
        # one partition: one slot with every core (the default, one 1-thread slot per core, would leave all
        # but one idle; results here are timings and memory, not bytes to compare across slot counts)
        "execution": {"cpu_threads": a.threads or cpu_count()},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


# ---------------------------------------------------------------- monitoring
class Monitor(threading.Thread):
    """Samples (time, RSS of the process tree, GPU memory of the tree on CUDA) every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5, gpu: bool = False):
        super().__init__(daemon=True)
        self.pid, self.interval, self.gpu = pid, interval, gpu
        self.samples: list[tuple[float, int, int | None]] = []
        self.stop = threading.Event()

    def _gpu_bytes(self, pids: set[int]) -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        tot = 0
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
                tot += int(float(parts[1])) * 2 ** 20
        return tot

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                gpu = self._gpu_bytes({p.pid for p in procs}) if self.gpu else None
                self.samples.append((time.time(), rss, gpu))
            except psutil.Error:
                break
            self.stop.wait(self.interval)

    def peak(self, t0: float | None = None, t1: float | None = None) -> tuple[int | None, int | None]:
        s = [x for x in self.samples if (t0 is None or x[0] >= t0 - self.interval) and (t1 is None or x[0] <= t1 + self.interval)]
        if not s:
            return None, None
        g = [x[2] for x in s if x[2] is not None]
        return max(x[1] for x in s), (max(g) if g else None)


# ---------------------------------------------------------------- per-stage figures from the Dagster event log
def stage_rows(home: Path, cfg: dict, mon: Monitor) -> list[dict]:
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    inst = dg.DagsterInstance.from_config(str(home))
    steps: dict[str, dict] = {}
    for run in inst.get_runs():
        for e in inst.all_logs(run.run_id):
            ev = e.dagster_event
            if ev is None or not e.step_key:
                continue
            s = steps.setdefault(e.step_key, {"stage": e.step_key, "start": None, "end": None, "passes": None,
                                              "status": "?"})
            t = ev.event_type_value
            if t == "STEP_START":
                s["start"] = e.timestamp
            elif t in ("STEP_SUCCESS", "STEP_FAILURE"):
                s["end"] = e.timestamp
                s["status"] = "ok" if t == "STEP_SUCCESS" else "FAILED"
            elif t == "ASSET_MATERIALIZATION":
                md = ev.event_specific_data.materialization.metadata
                v = md.get("unet_forward_passes")
                if v is not None:
                    s["passes"] = int(getattr(v, "value", v))
    n_cls, shots = len(CLASSES), cfg["splits"]["shots"][0]
    derived = {  # training / inversion stages: computed from the config (see the module doc)
        "concept_embeddings": n_cls * cfg["concepts"]["steps"] * cfg["concepts"]["batch_size"],
        "concept_lora": cfg["concept_lora"]["steps"] * cfg["concept_lora"]["batch_size"],
        "inversion_pool": n_cls * shots * cfg["inversion"]["steps"] * (2 if cfg["inversion"]["check_reconstruction"] else 1),
    }
    rows = []
    for s in sorted(steps.values(), key=lambda r: r["start"] or 0):
        name = s["stage"].removeprefix("realsize__")
        if s["passes"] is None:
            for k, v in derived.items():
                if name == k:
                    s["passes"] = v
        secs = (s["end"] - s["start"]) if s["start"] and s["end"] else None
        rss, gpu = mon.peak(s["start"], s["end"]) if s["start"] else (None, None)
        rows.append({"stage": name.replace("__", "/"), "status": s["status"], "seconds": secs, "passes": s["passes"],
                     "rss": rss, "gpu": gpu})
    return rows


def group_rows(rows: list[dict]) -> list[dict]:
    """One row per stage family (``classifier/*`` etc.; single stages stay): summed seconds and passes,
    the largest peak."""
    fam: dict[str, dict] = {}
    for r in rows:
        parts = r["stage"].split("/")
        name = r["stage"] if parts[0] == "synthetic" or len(parts) == 1 else f"{parts[0]}/* ({{n}})"
        g = fam.setdefault(name, {"stage": name, "status": "ok", "seconds": 0.0, "passes": None, "rss": None,
                                  "gpu": None, "n": 0})
        g["n"] += 1
        g["seconds"] += r["seconds"] or 0.0
        if r["passes"] is not None:
            g["passes"] = (g["passes"] or 0) + r["passes"]
        if r["status"] != "ok":
            g["status"] = r["status"]
        for k in ("rss", "gpu"):
            if r[k] is not None:
                g[k] = max(g[k] or 0, r[k])
    out = []
    for g in fam.values():
        g["stage"] = g["stage"].format(n=g["n"])
        out.append(g)
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], gpu: bool) -> str:
    head = ["stage", "status", "seconds", "UNet img-passes", "passes/s", "peak RSS GB"] + (["peak GPU GB"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rate = r["passes"] / r["seconds"] if r["passes"] and r["seconds"] else None
        cells = [r["stage"], r["status"], _fmt(r["seconds"], ".1f"), _fmt(r["passes"], "d"), _fmt(rate, ".2f"),
                 _fmt(r["rss"] / 2 ** 30 if r["rss"] else None, ".2f")]
        if gpu:
            cells.append(_fmt(r["gpu"] / 2 ** 30 if r["gpu"] else None, ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=128, help="pixels (≥ 128; the SD folder's sample_size)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps of every method entry (and DDIM inversion)")
    ap.add_argument("--train-steps", type=int, default=2, help="textual-inversion / concept-LoRA training steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=os.environ.get("AUGMENT_REALSIZE_CACHE",
                                                          str(Path.home() / ".cache" / "augment-realsize")),
                    help="where the model folders are built once (about 6 GB)")
    ap.add_argument("--data-dir", default=None, help="artifact root of the run (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temp data dir")
    ap.add_argument("--max-seconds", type=float, default=1200.0)
    ap.add_argument("--max-rss-gb", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=0, help="torch/OMP/MKL threads of the run, one slot (0: every core)")
    ap.add_argument("--smoke", action="store_true", help="plumbing check: the same run on the tiny-random models "
                    "(seconds, not a real-size figure)")
    ap.add_argument("--json", default=None, help="also write the rows and totals to this JSON file")
    a = ap.parse_args(argv)
    if a.resolution < 128 or a.resolution % 8:
        ap.error("--resolution must be a multiple of 8 and at least 128")

    t_all = time.perf_counter()
    cuda = False
    try:
        import torch

        cuda = a.device in ("auto", "cuda") and torch.cuda.is_available()
    except ImportError:
        pass
    print(f"realsize bench: {a.resolution}px, {a.steps} denoising steps per method, {a.train_steps} training steps, "
          f"device {'cuda' if cuda else 'cpu'}, {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    if a.smoke:
        models = {"sd15": ("tiny-random", 0), "blip-base": ("tiny-random", 0), "clip-vit-b32": ("tiny-random", 0),
                  "resnet-50": ("tiny-cnn", 0)}
    else:
        models = ensure_models(Path(a.cache_dir).expanduser(), a.resolution)
    t_build = time.perf_counter() - t0
    for k, (d, n) in models.items():
        print(f"  {k:<13} {n / 1e6:8.1f} M params  {d}")
    import gc

    gc.collect()

    work = Path(a.data_dir).resolve() if a.data_dir else Path(tempfile.mkdtemp(prefix="augment-realsize-"))
    work.mkdir(parents=True, exist_ok=True)
    data, out = work / "dataset", work / "augment_data"
    if not data.is_dir():
        write_dataset(data)
    cfg_path = work / "realsize.yaml"
    cfg = write_config(cfg_path, models, data, a.steps, a)
    env = dict(os.environ, AUGMENT_DATA_DIR=str(out), DAGSTER_HOME=str(out / "dagster_home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlflow.db'}")
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, "-m", "augment_dagster.cli", "run", "--config", str(cfg_path), "--data-dir", str(out)]
    print(f"config {cfg_path}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(work))
    mon = Monitor(proc.pid, gpu=cuda)
    mon.start()
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line)
        del tail[:-60]
        print("  | " + line.rstrip(), flush=True)
    rc = proc.wait()
    t_run = time.perf_counter() - t0
    mon.stop.set()
    mon.join(5)
    peak_rss, peak_gpu = mon.peak()

    rows = stage_rows(out / "dagster_home", cfg, mon)
    print(f"\nper stage ({a.resolution}px; every method entry {a.steps} steps; TI/LoRA {a.train_steps} steps at batch 2; "
          f"inversion {a.steps} steps + reconstruction check):")
    table = print_table(rows, cuda)
    print("\nper stage family:")
    grouped = print_table(group_rows(rows), cuda)
    report = out / "report" / "realsize" / "report.md"
    if report.exists() and "nan" in report.read_text():
        print(f"warning: the report prints 'nan' for some cell ({report})")
    total_passes = sum(r["passes"] or 0 for r in rows)
    gb = (peak_rss or 0) / 2 ** 30
    print(f"\nmodel build/reuse {t_build:.0f}s; augment run {t_run:.0f}s (rc {rc}); UNet image-passes {total_passes} "
          f"({total_passes / t_run:.2f}/s overall); peak RSS {gb:.2f} GB (limit {a.max_rss_gb:g})"
          + (f"; peak GPU {peak_gpu / 2 ** 30:.2f} GB" if peak_gpu else "")
          + ("" if cuda else "; no GPU: no GPU figure measured"))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "run_seconds": t_run, "build_seconds": t_build, "rc": rc,
                                            "peak_rss_bytes": peak_rss, "peak_gpu_bytes": peak_gpu, "table": table,
                                            "grouped": grouped,
                                            "resolution": a.resolution, "steps": a.steps, "train_steps": a.train_steps,
                                            "cuda": cuda}, indent=2, default=str))
    ok = True
    if rc != 0:
        print("FAIL: augment run exited with", rc, file=sys.stderr)
        print("".join(tail[-30:]), file=sys.stderr)
        ok = False
    if t_run > a.max_seconds:
        print(f"FAIL: augment run took {t_run:.0f}s > --max-seconds {a.max_seconds:g}", file=sys.stderr)
        ok = False
    if gb > a.max_rss_gb:
        print(f"FAIL: peak RSS {gb:.2f} GB > --max-rss-gb {a.max_rss_gb:g}", file=sys.stderr)
        ok = False
    if not a.data_dir and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - t_all:.0f}s: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
