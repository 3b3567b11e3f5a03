"""Automation: new-data sensor on the dataset folder, nightly schedule, and the automation-condition sensor.

* ``new_data_sensor_<exp>`` hashes (relative path, size, mtime) of the dataset tree every
  ``automation.sensor_interval_s``; when the listing changes it requests ``raw_images``. The cursor is the
  listing hash, so an unchanged directory never requests a run; on its first tick the cursor starts from the
  stored state (the latest ``raw_images`` record's ``listing_hash``), so opening the UI on a finished data dir
  launches nothing; a missing dataset folder is a ``SkipReason`` naming the folder, never a run.
* ``<exp>_nightly`` requests the whole graph on ``automation.schedule_cron``: cheap, because every stage
  reuses its memoized units.
* The automation-condition sensor evaluates the assets' conditions: cheap assets follow upstream eagerly;
  GPU assets only when upstream data versions or their code version changed.

An experiment is *active* when ``automation.enabled`` (default true) and its dataset folder exists (the
built-in dataset always does). Only active experiments get RUNNING sensors/schedules; the others start
STOPPED (an example config, or a dataset not yet in place, never launches a run by itself) and can be turned
on in the UI once the data is there.
"""

import os
from pathlib import Path

import dagster as dg

from ..config import ExperimentConfig
from ..util import hash_obj


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


def stored_listing(instance, cfg: ExperimentConfig, root: Path) -> str | None:
    """The listing hash of the dataset folder as of the latest ``raw_images`` materialization or observation in
    the instance: its ``listing_hash`` metadata; for one made before that field existed, the current listing's
    hash when no file is newer than that record and its row count matches (None: never ingested, or changed)."""
    key = dg.AssetKey([cfg.experiment, "raw_images"])
    best = None
    for fetch in (instance.fetch_materializations, instance.fetch_observations):
        try:
            recs = fetch(dg.AssetRecordsFilter(asset_key=key), limit=1).records
        except Exception:  # noqa: BLE001 - an instance without this API/records: no stored state
            recs = []
        if recs and (best is None or recs[0].storage_id > best.storage_id):
            best = recs[0]
    if best is None:
        return None
    event = best.event_log_entry.asset_materialization or best.event_log_entry.asset_observation
    md = dict(event.metadata or {}) if event is not None else {}
    stored = md.get("listing_hash")
    if stored is not None:
        return str(getattr(stored, "value", stored))
    rows = md.get("rows")
    rows = getattr(rows, "value", rows)
    files = [p for p in Path(root).rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)]
    newest = max((p.stat().st_mtime for p in files), default=0.0)
    if rows is not None and int(rows) == len(files) and newest <= best.event_log_entry.timestamp:
        return listing_hash(root)
    return None


def dataset_folder(cfg: ExperimentConfig) -> Path | None:
    """The user's dataset folder, or None for the built-in dataset (written on demand under the data dir)."""
    if cfg.dataset.source == "builtin":
        return None
    if cfg.dataset.is_hf:  # a local Hugging Face dataset folder is watched; a hub id is not (None)
        from ..data.hf import locator

        p = Path(locator(cfg.dataset.source))
        return p if p.is_absolute() else None
    return Path(cfg.dataset.source).expanduser()


def missing_dataset_reason(cfg: ExperimentConfig) -> str | None:
    folder = dataset_folder(cfg)
    if folder is None or folder.is_dir():
        return None
    where = f" in {cfg.source_path}" if cfg.source_path else ""
    return (f"dataset folder {folder} does not exist (dataset.source{where}); put an imagefolder tree there "
            "(root/<class>/*) or point dataset.source at one")


def inactive_reason(cfg: ExperimentConfig) -> str | None:
    """Why an experiment's automation starts STOPPED (None: it is active)."""
    if not cfg.automation.enabled:
        return f"automation.enabled is false in {cfg.source_path or 'the config'}"
    return missing_dataset_reason(cfg)


def _default_status(cfg: ExperimentConfig):
    return dg.DefaultSensorStatus.STOPPED if inactive_reason(cfg) else dg.DefaultSensorStatus.RUNNING


def new_data_sensor(cfg: ExperimentConfig, job_selection: dg.AssetSelection) -> dg.SensorDefinition:
    off = inactive_reason(cfg)

    @dg.sensor(
        name=f"new_data_sensor_{cfg.experiment}", minimum_interval_seconds=cfg.automation.sensor_interval_s,
        default_status=_default_status(cfg), asset_selection=job_selection,
        description=f"Requests {cfg.experiment}/raw_images when files in the dataset folder are added, changed or removed."
                    + (f" Starts stopped: {off}." if off else ""),
    )
    def _sensor(context: dg.SensorEvaluationContext):
        missing = missing_dataset_reason(cfg)
        if missing:
            return dg.SkipReason(missing)
        if cfg.dataset.source == "builtin":
            from .assets.data import dataset_root
            from .assets.common import Experiment

            root = dataset_root(Experiment(cfg))
        else:
            root = dataset_folder(cfg)
            if root is None:
                return dg.SkipReason(f"{cfg.dataset.source} is a hub dataset: pin dataset.hf.revision and run it on demand")
        h = listing_hash(root)
        cursor = context.cursor
        if cursor is None:  # first tick (a fresh `dagster dev`, a new DAGSTER_HOME): start from the stored state
            cursor = stored_listing(context.instance, cfg, root)
            if cursor == h:
                context.update_cursor(h)
                return dg.SkipReason(f"no change in {root} since its last ingest (raw_images is up to date)")
        if cursor == h:
            return dg.SkipReason(f"no change in {root}")
        context.update_cursor(h)
        return dg.RunRequest(run_key=f"{cfg.experiment}-{h}")

    return _sensor


def schedule(cfg: ExperimentConfig, job) -> dg.ScheduleDefinition:
    """Requests every split partition of the experiment's partitioned assets on ``automation.schedule_cron``."""
    off = inactive_reason(cfg)

    @dg.schedule(name=f"{cfg.experiment}_nightly", cron_schedule=cfg.automation.schedule_cron, job=job,
                 default_status=dg.DefaultScheduleStatus.STOPPED if off else dg.DefaultScheduleStatus.RUNNING,
                 description="Reruns every split of the graph; cheap, since unchanged units are reused from the memo."
                             + (f" Starts stopped: {off}." if off else ""))
    def _schedule(context: dg.ScheduleEvaluationContext):
        missing = missing_dataset_reason(cfg)
        if missing:
            yield dg.SkipReason(missing)
            return
        t = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        for pk in cfg.splits.keys():
            yield dg.RunRequest(run_key=f"{pk}@{t}", partition_key=pk)

    return _schedule


def automation_condition_sensors(configs: list[ExperimentConfig]) -> list[dg.AutomationConditionSensorDefinition]:
    """The RUNNING sensor covers the groups of active experiments; a STOPPED one covers the others, so their
    assets' automation conditions launch nothing (and Dagster adds no default sensor for them)."""
    inactive = [c.experiment for c in configs if inactive_reason(c)]
    off = dg.AssetSelection.groups(*inactive) if inactive else None
    sensors = [dg.AutomationConditionSensorDefinition(
        "automation_condition_sensor", target=dg.AssetSelection.all() - off if off is not None else dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=30,
        description="Evaluates the automation conditions of the active experiments' assets.")]
    if off is not None:
        sensors.append(dg.AutomationConditionSensorDefinition(
            "automation_condition_sensor_inactive", target=off, default_status=dg.DefaultSensorStatus.STOPPED,
            minimum_interval_seconds=30,
            description="Automation conditions of experiments that start stopped (automation.enabled: false or "
                        f"dataset missing): {', '.join(inactive)}. Turn on once their data is in place."))
    return sensors
