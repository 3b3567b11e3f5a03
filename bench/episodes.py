"""Benchmark: the orchestration cost per episode of ``training.episodes.support: episode``.

    python bench/episodes.py [--episodes 20] [--shots 5] [--n-way 5] [--method genie] [--steps 2] [--threads 2]

Runs ``synthetic/<method>`` (``defs.assets.synthetic.compute_synthetic``, no Dagster) on the built-in data with
per-episode generation on a fresh store, twice: once with a no-op generation core (returns blank images at
once: what is left is planning every episode's units, hashing their memo keys, storing the PNGs and building
the manifest) and once with the tiny-random UNet. Prints seconds per episode for both, the images per
episode, and the no-op share. A third run on the second store shows the cost when every unit is a memo hit.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class NoopCore:
    """A generation core that makes a blank image per request (the store and manifest work stays)."""

    def __init__(self):
        self.stats = {"unet_forward_passes": 0}

    def generate(self, reqs):
        from PIL import Image

        return [Image.new("RGB", (32, 32), (i % 251, 7, 11)) for i, _ in enumerate(reqs)]

    def schedule_info(self, req):
        return {}


def run(args, data_dir: Path, noop: bool) -> tuple[float, dict]:
    os.environ["AUGMENT_DATA_DIR"] = str(data_dir)
    import pandas as pd

    import augment_dagster.defs.assets.synthetic as S
    from augment_dagster.defs.assets.common import Experiment
    from augment_dagster.defs.assets.data import dataset_root
    from augment_dagster.defs.resources import Models
    from augment_dagster.config import parse_config
    from augment_dagster.data.imagefolder import scan_imagefolder
    from augment_dagster.data.splits import few_shot_split

    cfg = parse_config({
        "experiment": "bench_episodes",
        "dataset": {"source": "builtin", "builtin": {"train_per_class": args.shots + 2,
                                                      "test_per_class": args.shots + 16, "ood_per_class": 1}},
        "splits": {"shots": [args.shots], "seeds": [0], "val_per_class": 2},
        "models": {"diffusion": {"source": "tiny-random"}},
        "generation": {"steps": args.steps, "batch_size": 64, "images_per_real": 1},
        "training": {"evaluation": ["classifier", "few_shot_episodes"],
                     "episodes": {"support": "episode", "episodes": args.episodes, "n_way": args.n_way}},
        "methods": {args.method: {}}, "mlflow": {"enabled": False}})
    exp = Experiment(cfg)
    root = dataset_root(exp)
    raw = scan_imagefolder(root).images.copy()
    raw["dataset_root"] = str(root)
    split = few_shot_split(raw, args.shots, 0, 2)
    models = Models(cfg)
    if noop:
        models.generation_core = lambda lora=None: NoopCore()
    t = time.perf_counter()
    df, md = S.compute_synthetic(exp, args.method, f"{args.shots}shot-s0", split, {}, "bench", models=models)
    sec = time.perf_counter() - t
    return sec, {"rows": len(df), "episode_rows": int((df["episode"] >= 0).sum()),
                 "computed": md["computed"].value, "reused": md["reused"].value,
                 "orchestration_s": md["episode_orchestration_seconds"].value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--method", default="genie")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        noop_s, noop = run(args, Path(d) / "noop", noop=True)
        gen_s, gen = run(args, Path(d) / "gen", noop=False)
        hit_s, hit = run(args, Path(d) / "gen", noop=False)
    e = args.episodes
    print(f"{args.method}, {args.n_way}-way {args.shots}-shot, {e} episodes, {gen['episode_rows'] // e} images per "
          f"episode (+ {gen['rows'] - gen['episode_rows']} from the split's shots), tiny-random UNet {args.steps} steps, "
          f"{args.threads} threads")
    print(f"  no-op core:  {noop_s:7.2f} s  = {noop_s / e:.3f} s per episode (planning {noop['orchestration_s']:.2f} s "
          f"in all, the rest storing {noop['computed']} PNGs and the manifest)")
    print(f"  generation:  {gen_s:7.2f} s  = {gen_s / e:.3f} s per episode ({gen['computed']} units computed for "
          f"{gen['rows']} rows: a unit shared by episodes is generated once)")
    print(f"  all memo hits: {hit_s:5.2f} s  = {hit_s / e:.3f} s per episode")
    print(f"  no-op / generation: {noop_s / gen_s:.1%}")


if __name__ == "__main__":
    main()
