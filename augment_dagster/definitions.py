"""The Dagster code location: one asset group per experiment config in ``assets_config/`` (built in ``defs/``).

Imports no torch/diffusers at module level, so the code server starts in about a second.
"""
from __future__ import annotations

import os as _os

# On small shared CPUs, OpenMP worker threads that spin-wait make every small torch op 50-250x slower while
# another process is busy; passive waiting avoids it. Must be set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .defs.experiments import build_definitions, experiment_defs  # noqa: E402

__all__ = ["build_definitions", "defs", "experiment_defs"]

defs = build_definitions()
