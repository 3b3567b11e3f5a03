"""Automation: new-data sensor on the dataset folder, nightly schedule, and the automation-condition sensor.

* ``new_data_sensor_<exp>`` (RUNNING by default) hashes (relative path, size, mtime) of the dataset tree
  every ``automation.sensor_interval_s``; when the listing changes it requests ``raw_images``. The cursor is
  the listing hash, so an unchanged directory never requests a run.
* ``<exp>_nightly`` requests the whole graph on ``automation.schedule_cron``: cheap, because every stage
  reuses its memoized units.
* The automation-condition sensor (RUNNING) evaluates the assets' conditions: cheap assets follow upstream
  eagerly; GPU assets only when upstream data versions or their code version changed.
"""

import os
from pathlib import Path

import dagster as dg

from .config import ExperimentConfig
from .util import hash_obj


def listing_hash(root: str | os.PathLike) -> str:
    """Cheap fingerprint of a folder tree: (relative path, size, mtime_ns) of every non-hidden file."""
    root = Path(root)
    if not root.exists():
        return "missing"
    items = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        st = p.stat()
        items.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
    return hash_obj(items)[:24]


def new_data_sensor(cfg: ExperimentConfig, job_selection: dg.AssetSelection) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"new_data_sensor_{cfg.experiment}", minimum_interval_seconds=cfg.automation.sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING, asset_selection=job_selection,
        description=f"Requests {cfg.experiment}/raw_images when files in the dataset folder are added, changed or removed.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        if cfg.dataset.source == "builtin":
            from .assets.data import dataset_root
            from .assets.common import Experiment

            root = dataset_root(Experiment(cfg))
        else:
            root = Path(cfg.dataset.source).expanduser()
        h = listing_hash(root)
        if context.cursor == h:
            return dg.SkipReason(f"no change in {root}")
        context.update_cursor(h)
        return dg.RunRequest(run_key=f"{cfg.experiment}-{h}")

    return _sensor


def schedule(cfg: ExperimentConfig, job) -> dg.ScheduleDefinition:
    """Requests every split partition of the experiment's partitioned assets on ``automation.schedule_cron``."""

    @dg.schedule(name=f"{cfg.experiment}_nightly", cron_schedule=cfg.automation.schedule_cron, job=job,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Reruns every split of the graph; cheap, since unchanged units are reused from the memo.")
    def _schedule(context: dg.ScheduleEvaluationContext):
        t = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        for pk in cfg.splits.keys():
            yield dg.RunRequest(run_key=f"{pk}@{t}", partition_key=pk)

    return _schedule
