"""The embedded default, timed: on a fresh data dir run `augment run` cold, then again (a no-op rerun), each as
its own process, and print cold seconds, rerun seconds, their ratio, the max RSS of each run (the child's
ru_maxrss) and the cold run's seconds per stage (summed Dagster step durations, from the instance).

Targets (the demo): cold <= 300 s on 2 cores, max RSS <= 2 GB, rerun <= 5% of cold and <= 10 s.

    python bench/demo.py [--config assets_config/demo.yaml] [--keep DIR] [--json OUT.json]
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

TARGETS = {"cold_s": 300.0, "rerun_s": 10.0, "ratio": 0.05, "max_rss_mb": 2048.0}


def timed_run(config: str, data: Path, log: Path) -> tuple[float, float, int]:
    """(wall seconds, max RSS in MB, exit code) of one `augment run` process; its output goes to ``log``."""
    env = {**os.environ, "AUGMENT_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
    env.pop("DAGSTER_HOME", None)  # the CLI puts it under the data dir
    t0 = time.perf_counter()
    with log.open("w") as out:
        p = subprocess.Popen([sys.executable, "-m", "augment_dagster.cli", "run", "--config", config, "--data-dir", str(data)],
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


def stage_seconds(home: Path, experiment: str, since: float, until: float) -> dict[str, float]:
    """Summed step durations per stage over the runs that started in [since, until) (epoch seconds)."""
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    out: dict[str, float] = {}
    with dg.DagsterInstance.get() as inst:
        for rec in inst.get_run_records():
            if not (since <= (rec.start_time or rec.create_timestamp.timestamp()) < until):
                continue
            for st in inst.get_run_step_stats(rec.dagster_run.run_id):
                if st.start_time and st.end_time:
                    s = stage_of(st.step_key, experiment)
                    out[s] = out.get(s, 0.0) + (st.end_time - st.start_time)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "assets_config" / "demo.yaml"))
    ap.add_argument("--keep", help="use this (fresh) folder as the data dir and keep it; default: a temp folder, removed")
    ap.add_argument("--json", help="also write the figures to this JSON file")
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
    res = {"config": str(args.config), "cold_s": round(cold, 1), "rerun_s": round(rerun, 2), "ratio": round(rerun / cold, 4),
           "max_rss_mb": round(max(rss_cold, rss_re), 1), "max_rss_cold_mb": round(rss_cold, 1),
           "max_rss_rerun_mb": round(rss_re, 1), "cpus": os.cpu_count(),
           "stage_seconds_cold": {k: round(v, 1) for k, v in stages.items()}}
    ok = {k: res[k] <= v for k, v in TARGETS.items()}
    print(f"config          {args.config}  (cpus: {os.cpu_count()})")
    print(f"cold run        {cold:8.1f} s   (target <= {TARGETS['cold_s']:.0f} s)   {'ok' if ok['cold_s'] else 'MISSED'}")
    print(f"no-op rerun     {rerun:8.2f} s   (target <= {TARGETS['rerun_s']:.0f} s)    {'ok' if ok['rerun_s'] else 'MISSED'}")
    print(f"rerun / cold    {res['ratio']:8.3f}     (target <= {TARGETS['ratio']})   {'ok' if ok['ratio'] else 'MISSED'}")
    print(f"max RSS         {res['max_rss_mb']:8.0f} MB  (cold {rss_cold:.0f}, rerun {rss_re:.0f}; "
          f"target <= {TARGETS['max_rss_mb']:.0f})"
          f"   {'ok' if ok['max_rss_mb'] else 'MISSED'}")
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
