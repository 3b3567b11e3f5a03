"""`augment run | status | lineage | report | export | plan` — the command line."""
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


def _usable_dir(path: Path, what: str) -> None:
    """``path`` is a folder or can be made one; else a DataDirError naming it (a file, or under a file)."""
    from .errors import DataDirError

    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise DataDirError(f"{what} {path} is not a folder: {p} is a file" if p != path
                                   else f"{what} {path} is a file, not a folder")
            return


def _setup(args) -> ExperimentConfig:
    if getattr(args, "data_dir", None):
        _usable_dir(Path(args.data_dir).expanduser().resolve(), "--data-dir")
        os.environ["AUGMENT_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    cfg = load_config(args.config)
    data_dir = cfg.resolved_data_dir()
    _usable_dir(data_dir, "the data dir")
    home = Path(os.environ.get("DAGSTER_HOME") or data_dir / "dagster_home").expanduser().resolve()  # Dagster: absolute
    _usable_dir(home, "DAGSTER_HOME")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    from .defs.scaleout import write_instance_yaml  # the project's dagster.yaml; PostgreSQL with $AUGMENT_POSTGRES_URL

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


def check_names(cfg: ExperimentConfig, partitions=None, methods=None) -> None:
    """Every partition / method named on the command line exists in the config; else the error lists the valid ones."""
    from .errors import UnknownNameError

    where = cfg.source_path or "the config"
    bad = [p for p in partitions or [] if p not in cfg.splits.keys()]
    if bad:
        raise UnknownNameError(f"--partition {', '.join(bad)}: no such split in {where}; valid: "
                               f"{', '.join(cfg.splits.keys())}")
    valid = ["real_only", *cfg.methods]
    bad = [m for m in methods or [] if m not in valid]
    if bad:
        import difflib

        near = {m: difflib.get_close_matches(m, valid, n=1) for m in bad}
        hint = "; ".join(f"did you mean {near[m][0]!r} for {m!r}?" for m in bad if near[m])
        raise UnknownNameError(f"--methods {', '.join(bad)}: no such method entry in {where}; valid: {', '.join(valid)}",
                               hint=(hint + " " if hint else "") + "use one of the valid names, or add the entry under "
                               "methods: in the config")
    off = [m for m in methods or [] if m in cfg.methods and not cfg.methods[m].enabled]
    if off:
        raise UnknownNameError(f"--methods {', '.join(off)}: disabled (enabled: false) in {where}",
                               hint="set enabled: true for it in the config, or leave it out of --methods")


def _forward_sigterm() -> None:
    """SIGTERM takes the same path as Ctrl-C (Dagster maps it to its SIGINT handler while a run executes; this
    covers the moments between runs): the step stops, the run is marked canceled, finished units stay in the memo."""
    import signal

    def on_term(signo, frame):
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass


def units_written_since(data_dir: Path, t: float) -> int:
    """Memo records (finished units of every stage) written at or after ``t`` (seconds since the epoch)."""
    memo = data_dir / "memo"
    n = 0
    if not memo.is_dir():
        return 0
    for sub in os.scandir(memo):
        if sub.is_dir():
            for f in os.scandir(sub.path):
                try:
                    n += f.name.endswith(".json") and f.stat().st_mtime >= t
                except FileNotFoundError:
                    pass
    return n


def check_writable(*folders: Path) -> None:
    """A run writes under the data dir and DAGSTER_HOME: probe both now, so a read-only or not-permitted folder is
    one short error naming it, before any work (the probe's OSError becomes a SystemFaultError)."""
    import tempfile

    from .errors import system_fault

    for d in folders:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d, prefix=".augment-probe-"):
                pass
        except OSError as e:
            fault = system_fault(e)
            if fault is None:
                raise
            raise type(fault)(f"{str(fault).split(':')[0]}: cannot write in {d}") from e


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
    check_names(cfg, partitions=args.partition, methods=args.methods)
    check_writable(cfg.resolved_data_dir(), Path(os.environ["DAGSTER_HOME"]))
    preflight(cfg)
    src = Path(cfg.dataset.source).expanduser() if cfg.dataset.source != "builtin" else None
    if src is not None and src.is_dir() and not (src / "test").is_dir():
        print(f"augment run: note: {src / 'test'} does not exist, so every ID accuracy (acc_id) will be \"-\"; "
              "add test/<class>/* images to measure it", file=sys.stderr)
    import dagster as dg

    from .definitions import build_definitions

    defs = build_definitions([cfg])
    instance = dg.DagsterInstance.get()
    for rid in release_dead_runs(instance):
        print(f"  released GPU slot / marked failed: run {rid[:8]} (its process is gone)")
    exp = cfg.experiment
    import socket

    from .running import materialize_experiment
    from .defs.scaleout import redact

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

    from .running import RunInterrupted

    started = time.time()
    _forward_sigterm()
    try:
        meta = materialize_experiment(
            defs, cfg, instance, partitions=args.partition, methods=args.methods, tags=tags, force=args.force,
            run_config={"loggers": {"console": {"config": {"log_level": level}}}}, on_plan=plan,
            on_partition=lambda pk, secs, rid, slot=None: print(
                f"  partition {pk}: done in {secs:.1f}s (run {rid[:8]}{'; ' + slot if slot else ''}; "
                f"{time.perf_counter() - t0:.0f}s since start)", flush=True))
    except (RunInterrupted, KeyboardInterrupt) as e:
        if args.trace or args.verbose:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        run_id = getattr(e, "run_id", None)
        kept = units_written_since(cfg.resolved_data_dir(), started)
        print(f"augment run: interrupted (Ctrl-C / SIGTERM); {kept} finished unit(s) of this run are kept in the memo"
              + (f"; run {run_id[:8]} is marked canceled" if run_id else ""), file=sys.stderr)
        print(f"  `augment run --config {args.config}` resumes: finished units are reused", file=sys.stderr)
        return 130
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
    from .util import quick_exit_gc

    quick_exit_gc()
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

    __import__(f"{__package__}.plan", fromlist=["register"]).register(sub, str(DEFAULT_CONFIG))  # augment plan

    args = p.parse_args(argv)
    if not (args.trace or getattr(args, "verbose", False)):
        from .errors import quiet_interrupt_traces, quiet_user_error_logs

        quiet_user_error_logs()
        quiet_interrupt_traces()
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside a run (`augment run` handles its own: see cmd_run)
        if args.trace or getattr(args, "verbose", False):
            raise
        print(f"augment {args.cmd}: interrupted", file=sys.stderr)
        return 130
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
