"""Incremental recomputation benchmark on the demo config.

Scenarios (each a full `augment run`-equivalent materialization against one persistent instance + store):
  1. cold run                      — empty store
  2. no-op rerun                   — nothing changed
  3. one image added to one class  — the dataset is a user imagefolder copy of the built-in data
  4. one method's parameter changed

For each it prints wall time, computed/reused units per asset (summed over partitions) and the ratios
no-op/cold and one-image/cold. Targets: no-op does 0 diffusion forward passes and < 5% of cold time; one new
image recomputes only that class's units.

    python bench/incremental.py [--partition 4shot-s0] [--methods real_guidance dafusion] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cfg_path: Path, partitions: list[str] | None) -> tuple[float, dict]:
    import dagster as dg

    from augment_dagster.config import load_config
    from augment_dagster.definitions import build_definitions

    from augment_dagster.running import materialize_experiment

    cfg = load_config(cfg_path)
    defs = build_definitions([cfg])
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    t0 = time.perf_counter()
    meta = materialize_experiment(defs, cfg, dg.DagsterInstance.get(), partitions=partitions, run_config=quiet)
    stats: dict[str, list[int]] = {}
    for key, md in meta.items():
        if "computed" in md:
            s = stats.setdefault("/".join(key.split("[")[0].split("/")[1:]), [0, 0, 0])
            s[0] += int(md["computed"])
            s[1] += int(md.get("reused", 0))
            s[2] += int(md.get("unet_forward_passes", 0))
    return time.perf_counter() - t0, stats


def show(name: str, secs: float, stats: dict) -> None:
    passes = sum(v[2] for v in stats.values())
    print(f"\n== {name}: {secs:.1f}s, UNet forward passes {passes}")
    for k in sorted(stats):
        c, r, p = stats[k]
        if c or "synthetic" in k or "concept" in k or "inversion" in k or "captions" in k:
            print(f"   {k:<36} computed {c:>5}  reused {r:>5}  unet passes {p:>6}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "assets_config" / "demo.yaml"))
    ap.add_argument("--partition", action="append")
    ap.add_argument("--methods", nargs="*")
    ap.add_argument("--keep", help="work in this folder (kept) instead of a temp folder")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="augment-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["AUGMENT_DATA_DIR"] = str(work / "data")
    os.environ["DAGSTER_HOME"] = str(work / "dagster_home")
    (work / "dagster_home").mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", work / "dagster_home" / "dagster.yaml")
    raw = yaml.safe_load(Path(args.config).read_text())
    if args.methods:
        raw["methods"] = {k: v for k, v in raw["methods"].items() if k in args.methods}
    raw.setdefault("mlflow", {})["log_models"] = False
    # a user imagefolder copy of the built-in dataset, so an image can be added
    from augment_dagster.config import parse_config
    from augment_dagster.data.builtin import write_builtin

    b = parse_config(raw).dataset.builtin
    src = write_builtin(work / "gen", classes=b.classes, train_per_class=b.train_per_class, test_per_class=b.test_per_class,
                        ood_per_class=b.ood_per_class, size=b.image_size, seed=b.seed)
    ds = work / "dataset"
    if not ds.exists():
        shutil.copytree(src, ds)
    raw["dataset"] = {**raw.get("dataset", {}), "source": str(ds)}
    raw["dataset"].pop("builtin", None)
    cfg_path = work / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    t_cold, s_cold = run(cfg_path, args.partition)
    show("cold run", t_cold, s_cold)
    t_noop, s_noop = run(cfg_path, args.partition)
    show("no-op rerun", t_noop, s_noop)

    from augment_dagster.data.builtin import generate_pool
    from augment_dagster.data.splits import rank_key

    # add one image to the first class that ranks FIRST for every seed's split, so every split of that class changes
    cls = b.classes[0]
    seeds = parse_config(raw).splits.seeds
    from augment_dagster.util import png_bytes, sha256_bytes

    existing = [sha256_bytes(p.read_bytes()) for p in (ds / cls).glob("*.png")]
    for i, (im, _) in enumerate(generate_pool("pretrain", cls, 500, 7, b.image_size)):
        data = png_bytes(im)
        iid = sha256_bytes(data)
        if all(rank_key(s, iid) < min(rank_key(s, e) for e in existing) for s in seeds):
            (ds / cls / f"added_{i}.png").write_bytes(data)
            break
    t_new, s_new = run(cfg_path, args.partition)
    show(f"one image added to class {cls!r}", t_new, s_new)

    # change one method's parameter
    m = "real_guidance" if "real_guidance" in raw["methods"] else next(iter(raw["methods"]))
    raw["methods"][m] = {**(raw["methods"][m] or {}), "guidance_scale": 2.5}
    cfg_path.write_text(yaml.safe_dump(raw))
    t_par, s_par = run(cfg_path, args.partition)
    show(f"method {m!r}: guidance_scale changed", t_par, s_par)

    print("\n== ratios")
    print(f"   no-op / cold      = {t_noop / t_cold:.3f}  (target < 0.05; diffusion passes {sum(v[2] for v in s_noop.values())}, target 0)")
    print(f"   one-image / cold  = {t_new / t_cold:.3f}")
    print(f"   one-param / cold  = {t_par / t_cold:.3f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
