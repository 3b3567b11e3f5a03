"""Asset factories: one module per stage; ``build_experiment_assets(cfg)`` wires one experiment's graph.

The stage assets an experiment gets come from the stage table (``augment_dagster/stages``): every stage its enabled
methods need, plus the stages those require (e.g. ``prompt_suffixes`` reads ``captions``), each built by the module
of the same name here (``<stage>.py`` with ``build(exp) -> [asset]``). The real-only classifier is always built (it is
the real_only baseline).
"""
from __future__ import annotations

import importlib

from ...config import ExperimentConfig
from ...methods.registry import get_method
from ...stages import with_requirements
from .common import Experiment

ALWAYS = ("real_classifier",)  # stages every experiment has, whatever its methods need


def stage_names(cfg: ExperimentConfig) -> list[str]:
    """The stages of ``cfg``'s graph, in stage-table order."""
    needs = {n for name in cfg.enabled_methods() for n in get_method(cfg.method_algorithm(name)).needs}
    return with_requirements(needs | set(ALWAYS))


def build_stage(exp: Experiment, stage: str) -> list:
    return importlib.import_module(f"{__name__}.{stage}").build(exp)


def build_experiment_assets(cfg: ExperimentConfig) -> list:
    from . import data, evaluation, report, synthetic

    exp = Experiment(cfg)
    assets = data.build(exp)
    for stage in stage_names(cfg):
        assets += build_stage(exp, stage)
    assets += synthetic.build(exp) + evaluation.build(exp) + report.build(exp)
    return assets


def build_experiment_checks(cfg: ExperimentConfig, assets: list) -> list:
    """The asset checks of one experiment's assets that run in a step of their own (``defs/checks.py``)."""
    from .. import checks

    return checks.build(Experiment(cfg), assets)
