"""The embedded default, timed: on a fresh data dir run `augment run` cold with the default device slots
(execution.devices: auto — on a CPU-only machine one worker per core), then again (a no-op rerun), then cold once
more on a second fresh data dir with one worker (`--devices 1`); each run is its own process. Prints the cold
seconds of both, their ratio (default / one worker), whether the two reports are identical, rerun seconds, the
max RSS of each run (the child's ru_maxrss) and the cold run's seconds per stage (summed Dagster step durations).
Then two floors under the default-devices figure: the *work floor*, the one-worker run's summed step time (every
step on one thread) divided by the number of slots — no schedule of the same steps on those slots is faster,
process start-up and the slots' contention for memory bandwidth aside — and the *UNet floor*, the UNet image-passes
the synthetic steps recorded divided by the UNet's one-thread throughput (measured here) and the slots.

Targets (the demo): cold <= 200 s on 2 cores, cold / one-worker cold <= 0.65, identical reports, max RSS <= 2 GB,
rerun <= 5% of cold and <= 10 s.

    python bench/demo.py [--config assets_config/demo.yaml] [--keep DIR] [--json OUT.json] [--unet-seconds S]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"cold_s": 200.0, "rerun_s": 10.0, "ratio": 0.05, "max_rss_mb": 2048.0, "slots_ratio": 0.65}


def timed_run(config: str, data: Path, log: Path, devices: str | None = None) -> tuple[float, float, int]:
    """(wall seconds, max RSS in MB, exit code) of one `augment run` process; its output goes to ``log``.
    ``devices``: `augment run --devices` (None: the config's execution.devices). The RSS is the largest single
    process's (a worker's or the parent's)."""
    env = {**os.environ, "AUGMENT_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
    env.pop("DAGSTER_HOME", None)  # the CLI puts it under the data dir
    env.pop("AUGMENT_DEVICES", None)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "augment_dagster.cli", "run", "--config", config, "--data-dir", str(data)]
    with log.open("w") as out:
        p = subprocess.Popen(cmd + (["--devices", devices] if devices else []),
                             env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    rss_mb = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20  # KB on Linux
    return secs, rss_mb, p.returncode


def stage_of(step_key: str, experiment: str) -> str:
    """``demo__synthetic__dafusion`` -> ``synthetic``; ``demo__concept_embeddings`` -> ``concept_embeddings``."""
    parts = step_key.split("__")
    if parts and parts[0] == experiment:
        parts = parts[1:]
    return parts[0] if parts else step_key


def step_windows(home: Path, experiment: str, since: float = 0.0, until: float = float("inf"),
                 passes: list[int] | None = None) -> list[tuple[str, float, float]]:
    """(stage, start, end) of every finished step of the runs that started in [since, until) (epoch seconds), from
    the Dagster instance under ``home``. With ``passes`` (a one-item list), also adds up the UNet image-passes the
    synthetic steps recorded (``unet_forward_passes`` of their materializations)."""
    before = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    out: list[tuple[str, float, float]] = []
    try:
        with dg.DagsterInstance.get() as inst:
            for rec in inst.get_run_records():
                if not (since <= (rec.start_time or rec.create_timestamp.timestamp()) < until):
                    continue
                rid = rec.dagster_run.run_id
                out += [(stage_of(st.step_key, experiment), st.start_time, st.end_time)
                        for st in inst.get_run_step_stats(rid) if st.start_time and st.end_time]
                if passes is not None:
                    for e in inst.all_logs(rid, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
                        v = e.dagster_event.event_specific_data.materialization.metadata.get("unet_forward_passes")
                        passes[0] += int(getattr(v, "value", v) or 0)
    finally:
        if before is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = before
    return out


def stage_seconds(home: Path, experiment: str, since: float, until: float,
                  passes: list[int] | None = None) -> dict[str, float]:
    """Summed step durations per stage over the runs that started in [since, until) (``step_windows``)."""
    out: dict[str, float] = {}
    for s, t0, t1 in step_windows(home, experiment, since, until, passes):
        out[s] = out.get(s, 0.0) + (t1 - t0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def unet_rate(config: str, batch: int = 128, seconds: float = 5.0) -> float:
    """Image-passes per second of the config's diffusion UNet on one CPU thread (the one-worker setting), at
    ``batch`` latents with a text context of the tokenizer's length: what one slot sustains at best."""
    import torch

    from augment_dagster.config import load_config
    from augment_dagster.models.loading import load_diffusion

    cfg = load_config(config)
    torch.set_num_threads(cfg.execution.cpu_threads)
    with tempfile.TemporaryDirectory() as td:
        b = load_diffusion(cfg.models.diffusion.source, td, device="cpu")
    unet, te = b.pipe.unet, b.pipe.text_encoder
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(batch, c, s, s)
    ctx = torch.randn(batch, b.pipe.tokenizer.model_max_length, te.config.hidden_size)
    t = torch.full((batch,), 500)
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=ctx)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            unet(x, t, encoder_hidden_states=ctx)
            n += 1
    return n * batch / (time.perf_counter() - t0)


def without_timings(report: str) -> str:
    """The report with the cells of its timing columns (a header naming ``seconds``) blanked: the only cells that
    may differ between two runs of the same config (how long a step took depends on the machine and the slots)."""
    out, timing = [], None
    for line in report.splitlines():
        cells = line.split("|")
        if line.startswith("|") and timing is None:  # a table's header row
            timing = {i for i, c in enumerate(cells) if "seconds" in c}
        elif line.startswith("|") and timing:
            cells = ["" if i in timing else c for i, c in enumerate(cells)]
        elif not line.startswith("|"):
            timing = None
        out.append("|".join(cells))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "assets_config" / "demo.yaml"))
    ap.add_argument("--keep", help="use this (fresh) folder as the data dir and keep it; default: a temp folder, removed")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--unet-seconds", type=float, default=5.0, help="how long to time the UNet for the UNet floor")
    args = ap.parse_args(argv)
    from augment_dagster.config import load_config

    experiment = load_config(args.config).experiment
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="augment-demo-bench-"))
    if work.exists() and any(work.iterdir()):
        print(f"{work} is not empty: a cold run needs a fresh data dir (remove it or choose another)", file=sys.stderr)
        return 2
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    t_cold0 = time.time()
    cold, rss_cold, rc = timed_run(args.config, data, work / "cold.log")
    if rc:
        print(f"cold run failed (exit {rc}); its output: {work / 'cold.log'}\n" + (work / "cold.log").read_text()[-3000:],
              file=sys.stderr)
        return 1
    t_re0 = time.time()
    rerun, rss_re, rc = timed_run(args.config, data, work / "rerun.log")
    if rc:
        print(f"rerun failed (exit {rc}); its output: {work / 'rerun.log'}", file=sys.stderr)
        return 1
    stages = stage_seconds(data / "dagster_home", experiment, t_cold0, t_re0)
    data1 = work / "data_one_worker"
    data1.mkdir(parents=True, exist_ok=True)
    t_one0 = time.time()
    cold1, rss_cold1, rc = timed_run(args.config, data1, work / "cold_one_worker.log", devices="1")
    if rc:
        print(f"one-worker cold run failed (exit {rc}); its output: {work / 'cold_one_worker.log'}\n"
              + (work / "cold_one_worker.log").read_text()[-3000:], file=sys.stderr)
        return 1
    passes = [0]
    steps1 = stage_seconds(data1 / "dagster_home", experiment, t_one0, time.time() + 1, passes)
    work1 = sum(steps1.values())  # the one-worker run's steps, one thread each: the demo's work in core-seconds
    from augment_dagster.config import load_config as _load
    from augment_dagster.slots import resolve

    slots = len(resolve(_load(args.config)))
    rate = unet_rate(args.config, seconds=args.unet_seconds)
    rep, rep1 = (d / "report" / experiment / "report.md" for d in (data, data1))
    same = rep.exists() and rep1.exists() and without_timings(rep.read_text()) == without_timings(rep1.read_text())
    res = {"config": str(args.config), "cold_s": round(cold, 1), "rerun_s": round(rerun, 2), "ratio": round(rerun / cold, 4),
           "cold_one_worker_s": round(cold1, 1), "slots_ratio": round(cold / cold1, 3), "reports_identical": same,
           "max_rss_mb": round(max(rss_cold, rss_re), 1), "max_rss_cold_mb": round(rss_cold, 1),
           "max_rss_rerun_mb": round(rss_re, 1), "max_rss_cold_one_worker_mb": round(rss_cold1, 1), "cpus": os.cpu_count(),
           "stage_seconds_cold": {k: round(v, 1) for k, v in stages.items()},
           "one_worker_step_s": round(work1, 1), "slots": slots, "work_floor_s": round(work1 / max(slots, 1), 1),
           "unet_image_passes": passes[0], "unet_passes_per_s_one_thread": round(rate, 1),
           "unet_floor_s": round(passes[0] / rate / max(slots, 1), 1)}
    ok = {k: res[k] <= v for k, v in TARGETS.items()}
    ok["reports_identical"] = same
    print(f"config          {args.config}  (cpus: {os.cpu_count()})")
    print(f"cold run        {cold:8.1f} s   (default devices; target <= {TARGETS['cold_s']:.0f} s)   "
          f"{'ok' if ok['cold_s'] else 'MISSED'}")
    print(f"one worker cold {cold1:8.1f} s   (--devices 1)")
    print(f"default / one   {res['slots_ratio']:8.3f}     (target <= {TARGETS['slots_ratio']})   "
          f"{'ok' if ok['slots_ratio'] else 'MISSED'}")
    print(f"reports         {'identical' if same else 'DIFFER'}      (timing columns aside; {rep} vs {rep1})")
    print(f"no-op rerun     {rerun:8.2f} s   (target <= {TARGETS['rerun_s']:.0f} s)    {'ok' if ok['rerun_s'] else 'MISSED'}")
    print(f"rerun / cold    {res['ratio']:8.3f}     (target <= {TARGETS['ratio']})   {'ok' if ok['ratio'] else 'MISSED'}")
    print(f"max RSS         {res['max_rss_mb']:8.0f} MB  (cold {rss_cold:.0f}, rerun {rss_re:.0f}; "
          f"target <= {TARGETS['max_rss_mb']:.0f})"
          f"   {'ok' if ok['max_rss_mb'] else 'MISSED'}")
    print(f"work floor      {res['work_floor_s']:8.1f} s   (the one-worker run's summed step time {work1:.0f} s on one "
          f"thread each, over {slots} slot(s): no schedule of this work is faster, start-up and contention aside)")
    print(f"UNet floor      {res['unet_floor_s']:8.1f} s   ({passes[0]} UNet image-passes of the synthetic steps at "
          f"{rate:.0f} img-passes/s per thread (measured here, batch 128), over {slots} slot(s))")
    total = sum(stages.values()) or 1.0
    print("cold seconds per stage (summed step time):")
    for k, v in stages.items():
        print(f"   {k:<22} {v:8.1f} s  {100 * v / total:5.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(res | {"ok": ok}, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
