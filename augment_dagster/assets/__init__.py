"""Asset factories: one file per stage; ``build_experiment_assets(cfg)`` wires one experiment's graph."""
from __future__ import annotations

from ..config import ExperimentConfig
from ..methods.registry import get_method
from .common import Experiment


def build_experiment_assets(cfg: ExperimentConfig) -> list:
    from . import captions, concepts, data, diff_ii, evaluation, prompts, report, synthetic

    exp = Experiment(cfg)
    needs = {n for name in cfg.enabled_methods() for n in get_method(cfg.method_algorithm(name)).needs}
    assets = data.build(exp)
    if "concepts" in needs:
        assets += concepts.build(exp)
    if "prompt_suffixes" in needs:
        needs.add("captions")
    if "captions" in needs:
        assets += captions.build(exp)
    if "class_prompts" in needs:
        assets += prompts.build(exp)
    assets += diff_ii.build(exp, needs)
    assets += synthetic.build(exp) + evaluation.build(exp) + report.build(exp)
    return assets


def build_experiment_checks(cfg: ExperimentConfig, assets: list) -> list:
    """The asset checks of one experiment's assets (``assets/checks.py``)."""
    from . import checks

    return checks.build(Experiment(cfg), assets)
