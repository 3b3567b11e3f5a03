"""The Dagster code location: one asset group per experiment config in ``assets_config/``.

Imports no torch/diffusers at module level, so the code server starts in about a second.
"""
from __future__ import annotations

import os as _os

# On small shared CPUs, OpenMP worker threads that spin-wait make every small torch op 50-250x slower while
# another process is busy; passive waiting avoids it. Must be set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import warnings

import dagster as dg

from .assets import build_experiment_assets, build_experiment_checks
from .automation import automation_condition_sensors, new_data_sensor, schedule
from .config import ExperimentConfig, discover_configs
from .resources import ManifestIOManager, MlflowTracker
from .scaleout import executor_for, pipes_resources

# `Output(data_version=...)` is marked beta in dagster 1.13; it is the documented way to report content versions
warnings.filterwarnings("ignore", category=dg.BetaWarning)


def experiment_defs(cfg: ExperimentConfig) -> dg.Definitions:
    assets = build_experiment_assets(cfg)
    checks = build_experiment_checks(cfg, assets) if cfg.checks.enabled else []
    data_dir = cfg.resolved_data_dir()
    partitioned = dg.AssetSelection.groups(cfg.experiment) - dg.AssetSelection.keys(
        dg.AssetKey([cfg.experiment, "raw_images"]), dg.AssetKey([cfg.experiment, "report"]))
    job = dg.define_asset_job(f"{cfg.experiment}_splits", selection=partitioned,
                              description=f"All partitioned assets of {cfg.experiment} for one split")
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[job],
        schedules=[schedule(cfg, job)],
        sensors=[new_data_sensor(cfg, dg.AssetSelection.keys(dg.AssetKey([cfg.experiment, "raw_images"])))],
        resources={f"manifests_{cfg.experiment}": ManifestIOManager(root=str(data_dir))},
    )


def build_definitions(configs: list[ExperimentConfig] | None = None) -> dg.Definitions:
    configs = discover_configs() if configs is None else configs
    first_dir = configs[0].resolved_data_dir() if configs else None
    mlflow_cfg = configs[0].mlflow if configs else None
    shared = dg.Definitions(
        sensors=automation_condition_sensors(configs),
        resources={"mlflow": MlflowTracker(
            tracking_uri=mlflow_cfg.tracking_uri if mlflow_cfg else None,
            default_root=str((first_dir or __import__("pathlib").Path("augment_data")) / "mlflow"),
            enabled=mlflow_cfg.enabled if mlflow_cfg else True), **pipes_resources(configs)},
        executor=executor_for(configs),  # execution.executor: in_process (default) | multiprocess | k8s_job | celery
    )
    return dg.Definitions.merge(shared, *[experiment_defs(c) for c in configs])


defs = build_definitions()
