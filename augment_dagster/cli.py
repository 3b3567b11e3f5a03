"""`augment run | status | lineage | report | export` — the command line."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import os as _os

# On small shared CPUs, OpenMP worker threads that spin-wait make every small torch op 50-250x slower while
# another process is busy; passive waiting avoids it. Must be set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .config import DEFAULT_CONFIG_DIR, PROJECT_ROOT, ConfigError, ExperimentConfig, load_config  # noqa: F401

DEFAULT_CONFIG = DEFAULT_CONFIG_DIR / "demo.yaml"


def _setup(args) -> ExperimentConfig:
    if getattr(args, "data_dir", None):
        os.environ["AUGMENT_DATA_DIR"] = str(Path(args.data_dir).resolve())
    cfg = load_config(args.config)
    data_dir = cfg.resolved_data_dir()
    home = Path(os.environ.get("DAGSTER_HOME") or data_dir / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    from .scaleout import write_instance_yaml  # the project's dagster.yaml; PostgreSQL with $AUGMENT_POSTGRES_URL

    write_instance_yaml(home, PROJECT_ROOT / "dagster.yaml")
    if cfg.models.diffusion.source.startswith("tiny"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cfg


def preflight(cfg: ExperimentConfig) -> None:
    """Checks that must fail before any GPU work: LLM credentials for methods that need the LLM."""
    from .methods.registry import get_method

    needs = {n for m in cfg.enabled_methods() for n in get_method(cfg.method_algorithm(m)).needs}
    if needs & {"class_prompts", "prompt_suffixes"}:
        from .llm import LLMClient

        LLMClient.from_config(cfg.models.llm).check_ready()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_runs(instance) -> list[str]:
    """Runs of `augment run` whose process died (SIGKILL, OOM, power loss) still look STARTED and still hold
    their `gpu` pool slot, which would block the next run forever without the run-monitoring daemon. Mark them
    failed and free their slots (same host, pid no longer alive)."""
    import socket

    import dagster as dg

    freed = []
    flt = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING], tags={"augment/cli": "run"})
    for run in instance.get_runs(filters=flt):
        pid, host = run.tags.get("augment/pid"), run.tags.get("augment/host")
        if pid and host == socket.gethostname() and not _pid_alive(int(pid)):
            instance.report_run_failed(run, message=f"process {pid} of this run is gone (killed); marked failed by augment run")
            freed.append(run.run_id)
    for rid in set(instance.event_log_storage.get_concurrency_run_ids()) - _active_run_ids(instance):
        instance.event_log_storage.free_concurrency_slots_for_run(rid)
        freed.append(rid)
    return sorted(set(freed))


def _active_run_ids(instance) -> set[str]:
    import dagster as dg

    flt = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.QUEUED,
                                  dg.DagsterRunStatus.NOT_STARTED])
    return {r.run_id for r in instance.get_runs(filters=flt)}


def cmd_run(args) -> int:
    if getattr(args, "devices", None):
        os.environ["AUGMENT_DEVICES"] = args.devices  # slots.py; the partition workers inherit it
    cfg = _setup(args)
    from .llm import MissingAPIKeyError

    try:
        preflight(cfg)
    except MissingAPIKeyError as e:
        print(f"augment run: {e}", file=sys.stderr)
        return 2
    import dagster as dg

    from .definitions import build_definitions

    defs = build_definitions([cfg])
    instance = dg.DagsterInstance.get()
    for rid in release_dead_runs(instance):
        print(f"  released GPU slot / marked failed: run {rid[:8]} (its process is gone)")
    exp = cfg.experiment
    bad = [p for p in args.partition or [] if p not in cfg.splits.keys()]
    if bad:
        print(f"unknown partition(s) {bad}; this config has {cfg.splits.keys()}", file=sys.stderr)
        return 2
    import socket

    from .running import materialize_experiment
    from .scaleout import redact

    t0 = time.perf_counter()
    tags = {"augment/cli": "run", "augment/pid": str(os.getpid()), "augment/host": socket.gethostname()}
    level = "DEBUG" if args.verbose else "WARNING"
    print(f"augment run: experiment {exp}, data dir {cfg.resolved_data_dir()}, DAGSTER_HOME {os.environ['DAGSTER_HOME']}")
    def plan(pk, n, total):
        what = "report" if pk == "-" else f"partition {pk}"
        if args.force:
            print(f"  {what}: {n} assets (--force: every asset executes, finished units are reused)", flush=True)
        else:
            print(f"  {what}: {'nothing missing or stale' if not n else f'{n}/{total} assets missing or stale'}", flush=True)

    meta = materialize_experiment(
        defs, cfg, instance, partitions=args.partition, methods=args.methods, tags=tags, force=args.force,
        run_config={"loggers": {"console": {"config": {"log_level": level}}}}, on_plan=plan,
        on_partition=lambda pk, secs, rid, slot=None: print(
            f"  partition {pk}: done in {secs:.1f}s (run {rid[:8]}{'; ' + slot if slot else ''}; "
            f"{time.perf_counter() - t0:.0f}s since start)", flush=True))
    # ---- summary
    comp = {"diffusion": [0, 0], "concepts": [0, 0], "classifiers": [0, 0]}
    for key, md in meta.items():
        bucket = ("diffusion" if "/synthetic/" in key and md.get("diffusion")
                  else "concepts" if "concept_embeddings" in key
                  else "classifiers" if ("classifier" in key) else None)
        if bucket and "computed" in md:
            comp[bucket][0] += int(md["computed"])
            comp[bucket][1] += int(md.get("reused", 0))
    passes = sum(int(md.get("unet_forward_passes", 0)) for md in meta.values())
    print(f"\nfinished in {time.perf_counter() - t0:.1f}s; {len(meta)} asset materializations"
          + ("" if args.force else " (missing or stale ones; raw_images is always re-ingested)"))
    print(f"diffusion units: {comp['diffusion'][0]} computed, {comp['diffusion'][1]} reused "
          f"({passes} UNet forward passes)")
    print(f"concept units (textual inversion): {comp['concepts'][0]} computed, {comp['concepts'][1]} reused")
    print(f"classifiers: {comp['classifiers'][0]} trained, {comp['classifiers'][1]} reused")
    rep = cfg.resolved_data_dir() / "report" / exp / "report.md"
    if rep.exists() and not args.partition and not args.methods:
        print("\n" + rep.read_text())
        print(f"report: {rep.parent}")
    print("look further:  DAGSTER_HOME=%s dagster dev -w workspace.yaml   |   mlflow ui --backend-store-uri %s"
          % (os.environ["DAGSTER_HOME"], redact(defs.resources["mlflow"].resolved_uri())))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="augment", description="Diffusion-based few-shot augmentation as a Dagster asset graph.")
    p.add_argument("-v", "--verbose", dest="trace", action="store_true",
                   help="on an error, show the full trace (also `augment run -v`)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: assets_config/demo.yaml)")
        sp.add_argument("--data-dir", default=None, help="artifact root (default: ./augment_data or $AUGMENT_DATA_DIR)")

    sp = sub.add_parser("run", help="materialize the whole graph of a config in-process (persistent DAGSTER_HOME)")
    common(sp)
    sp.add_argument("--partition", action="append", help="only these split keys (e.g. 4shot-s0); repeatable")
    sp.add_argument("--methods", nargs="*", help="only these method entries")
    sp.add_argument("--verbose", "-v", action="store_true", help="show Dagster's step logs")
    sp.add_argument("--devices", help="device slots, overriding execution.devices: auto, a count (1 = one worker) "
                                      "or a list such as cuda:0,cuda:2 (sets $AUGMENT_DEVICES)")
    sp.add_argument("--force", action="store_true",
                    help="execute every asset, not only missing/stale ones (finished units are still reused)")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("status", help="per asset and partition: missing / unsynced / fresh, and why")
    common(sp)
    sp.set_defaults(fn=lambda a: _lazy("status", a))

    sp = sub.add_parser("lineage", help="trace a synthetic image (id, unique id prefix or file path) to its sources")
    common(sp)
    sp.add_argument("ident")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=lambda a: _lazy("lineage", a))

    sp = sub.add_parser("report", help="print the report; --relog re-logs metrics runs that failed to reach MLflow")
    common(sp)
    sp.add_argument("--relog", action="store_true")
    sp.set_defaults(fn=lambda a: _lazy("report", a))

    sp = sub.add_parser("export", help="export a synthetic set as a Hugging Face imagefolder with metadata.jsonl "
                                          "and croissant.json (Croissant 1.1 + PROV-O lineage)")
    common(sp)
    sp.add_argument("--method", required=True)
    sp.add_argument("--split", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--with-real", action="store_true")
    sp.add_argument("--license", help="license of the exported set for croissant.json (URL or SPDX id)")
    sp.set_defaults(fn=lambda a: _lazy("export", a))

    args = p.parse_args(argv)
    if not (args.trace or getattr(args, "verbose", False)):
        from .errors import quiet_user_error_logs

        quiet_user_error_logs()
    try:
        return int(args.fn(args) or 0)
    except Exception as e:  # user errors (also when raised inside a Dagster step): one short block, exit 2
        from .errors import find_user_error, format_user_error

        user = find_user_error(e)
        if user is None:
            raise
        if args.trace or getattr(args, "verbose", False):
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        print(format_user_error(user), file=sys.stderr)
        return 2


def _lazy(name: str, args) -> int:
    from . import commands

    cfg = _setup(args)
    return getattr(commands, name)(cfg, args)


if __name__ == "__main__":
    raise SystemExit(main())
