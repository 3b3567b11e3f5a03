"""Memory and time against the number of classes: an imagefolder of C classes (4 shots, M = 2, real_guidance +
dafusion, tiny models, 32 px), each run cold and then again (a no-op rerun) as its own `augment run` process
with one device slot. Prints, per C: diffusion units, cold seconds, seconds per unit, peak RSS (the process's
ru_maxrss) and the no-op rerun seconds, then the peak RSS of the process tree while each stage ran.

Targets: peak RSS at 128 classes <= 1.3x the RSS at 8 classes; seconds per unit not rising with C.

    python bench/scale.py [--classes 8 32 128] [--keep DIR] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from demo import step_windows, timed_run  # noqa: E402  (same process timing: wall seconds, ru_maxrss, exit code)

SIZE = 32


def write_classes(root: Path, n: int, train: int = 6, test: int = 2) -> Path:
    """``n`` classes as an imagefolder (root/<class>/*.png, root/test/<class>/*.png): each class a colour and a
    stripe pattern, each image that pattern with its own seeded noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(n):
        colour = rng.integers(30, 226, size=3)
        period = 2 + c % 7
        for split, count in (("", train), ("test", test)):
            d = root / split / f"class{c:03d}" if split else root / f"class{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                yy, xx = np.mgrid[0:SIZE, 0:SIZE]
                stripes = ((xx + (c // 7) * yy) // period) % 2
                img = stripes[..., None] * colour[None, None, :] + rng.normal(0, 12, size=(SIZE, SIZE, 3))
                Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(d / f"{i:02d}.png")
    return root


def monitored_run(config: str, data: Path, log: Path, experiment: str) -> tuple[float, float, int, dict[str, float]]:
    """``timed_run`` plus the peak RSS (GB) of the process tree while each stage's steps ran: the cold run's
    per-stage breakdown (RSS sampled every 0.25 s; step windows from the Dagster event log)."""
    import threading

    import psutil
    from realsize import Monitor

    mon: Monitor | None = None
    done = threading.Event()

    def watch() -> None:  # the `augment run` child of this process, once it exists
        nonlocal mon
        me = psutil.Process()
        while not done.is_set():
            kids = [k for k in me.children() if "augment_dagster.cli" in " ".join(k.cmdline())]
            if kids:
                mon = Monitor(kids[0].pid, interval=0.25)
                mon.start()
                return
            done.wait(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    secs, rss, rc = timed_run(config, data, log)
    done.set()
    t.join()
    stages: dict[str, float] = {}
    if mon is not None:
        mon.stop.set()
        for s, t0, t1 in step_windows(data / "dagster_home", experiment):
            peak, _ = mon.peak(t0, t1)
            if peak:
                stages[s] = max(stages.get(s, 0.0), peak / 2 ** 30)
    return secs, rss, rc, stages


def config(dataset: Path, experiment: str) -> dict:
    return {
        "experiment": experiment,
        "dataset": {"source": str(dataset)},
        "splits": {"shots": [4], "seeds": [0], "val_per_class": 1},
        "models": {"diffusion": {"source": "tiny"}, "classifier": {"source": "tiny-cnn"}},
        "generation": {"images_per_real": 2, "steps": 4, "batch_size": 32},
        "concepts": {"steps": 2, "batch_size": 4},
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16},
        "methods": {"real_guidance": {}, "dafusion": {}},
        "mlflow": {"enabled": False},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--keep", help="work folder to keep (default: a temp folder, removed)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="augment-scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.classes:
        base = work / f"c{n}"
        if base.exists():
            shutil.rmtree(base)
        ds = write_classes(base / "dataset", n)
        cfg = base / "scale.yaml"
        cfg.write_text(yaml.safe_dump(config(ds, f"scale{n}")))
        data = base / "data"
        import os

        os.environ["AUGMENT_DEVICES"] = "1"  # one slot: the RSS is one process's, the same for every C
        try:
            cold, rss, rc, stages = monitored_run(str(cfg), data, base / "cold.log", f"scale{n}")
            if rc:
                print((base / "cold.log").read_text()[-3000:], file=sys.stderr)
                return 1
            rerun, rss_re, rc = timed_run(str(cfg), data, base / "rerun.log")
        finally:
            os.environ.pop("AUGMENT_DEVICES", None)
        m = re.search(r"diffusion units: (\d+) computed", (base / "cold.log").read_text())
        units = int(m.group(1)) if m else 0
        rows.append({"classes": n, "units": units, "cold_s": round(cold, 1),
                     "s_per_unit": round(cold / units, 3) if units else None, "peak_rss_gb": round(rss / 1024, 3),
                     "rerun_s": round(rerun, 2), "rerun_rss_gb": round(rss_re / 1024, 3),
                     "stage_peak_rss_gb": {k: round(v, 3) for k, v in stages.items()}})
        r = rows[-1]
        print(f"C={n:4d}: {units} diffusion units, cold {cold:.1f} s ({r['s_per_unit']} s/unit), peak RSS "
              f"{r['peak_rss_gb']:.2f} GB, no-op rerun {rerun:.1f} s", flush=True)
    print("\n| classes | diffusion units | cold s | s per unit | peak RSS GB | no-op rerun s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['classes']} | {r['units']} | {r['cold_s']} | {r['s_per_unit']} | {r['peak_rss_gb']:.2f} | {r['rerun_s']} |")
    names = sorted({k for r in rows for k in r["stage_peak_rss_gb"]},
                   key=lambda k: min(r["stage_peak_rss_gb"].get(k, 9e9) for r in rows))
    if names:  # which stage's peak grows with C
        print("\npeak RSS GB while each stage ran (process tree, cold run):\n\n| stage | "
              + " | ".join(f"C={r['classes']}" for r in rows) + " |\n|---|" + "---|" * len(rows))
        for k in names:
            print(f"| {k} | " + " | ".join(f"{r['stage_peak_rss_gb'][k]:.2f}" if k in r["stage_peak_rss_gb"] else "-"
                                           for r in rows) + " |")
    if len(rows) > 1:
        ratio = rows[-1]["peak_rss_gb"] / rows[0]["peak_rss_gb"]
        print(f"\npeak RSS {rows[-1]['classes']} / {rows[0]['classes']} classes: {ratio:.2f}x (target <= 1.3x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
