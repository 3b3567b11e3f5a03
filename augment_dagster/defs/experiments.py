"""Experiments → definitions: one asset group (assets, checks, job, schedule, sensor, resources) per experiment
config, merged with what they share (the automation-condition sensors, the Pipes clients, the executor)."""
from __future__ import annotations

import warnings

import dagster as dg

from ..config import ExperimentConfig, discover_configs
from .assets import build_experiment_assets, build_experiment_checks
from .automation import automation_condition_sensors, new_data_sensor, schedule
from .resources import experiment_resources
from .scaleout import executor_for, pipes_resources
from .tracking import MlflowTracker

# `Output(data_version=...)` is marked beta in dagster 1.13; it is the documented way to report content versions
warnings.filterwarnings("ignore", category=dg.BetaWarning)


def experiment_defs(cfg: ExperimentConfig) -> dg.Definitions:
    assets = build_experiment_assets(cfg)
    checks = build_experiment_checks(cfg, assets) if cfg.checks.enabled else []
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
        resources=experiment_resources(cfg),  # store, models, llm, mlflow, manifests: keyed <kind>_<experiment>
    )


def build_definitions(configs: list[ExperimentConfig] | None = None) -> dg.Definitions:
    configs = discover_configs() if configs is None else configs
    # "mlflow": the first experiment's tracker, for the CLI's closing line (each experiment's assets use their own)
    first = {"mlflow": MlflowTracker.for_config(configs[0])} if configs else {}
    shared = dg.Definitions(
        sensors=automation_condition_sensors(configs),
        resources={**first, **pipes_resources(configs)},
        executor=executor_for(configs),  # execution.executor: in_process (default) | multiprocess | k8s_job | celery
    )
    return dg.Definitions.merge(shared, *[experiment_defs(c) for c in configs])
