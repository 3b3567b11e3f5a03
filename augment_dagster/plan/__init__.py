"""`augment plan --config FILE [--json]`: what an experiment config will do, before anything runs.

For every method entry: the resolved generation protocol (sampler, steps, start rule, guidance, images per real
image or per class, resolution, method params, concept / LoRA / inversion steps), the classifier recipe and the
evaluation protocol, where each value came from, and the work it implies (synthetic images, UNet image-passes,
classifier training steps) with an estimated GPU-hours figure at a stated UNet throughput.

No model is loaded and neither torch nor diffusers is imported: the config, the method registry (pydantic
params) and, where the dataset is a readable folder, a directory listing are all it reads. The SD-1.x schedules
in ``plan/work.py`` are diffusers' (``X.from_config`` of SD-1.x's scheduler config; tests/test_plan.py checks
them against diffusers). ``compute.py`` builds the plan, ``work.py`` counts its work, ``format.py`` prints it.

Where a value came from (``sources``): ``default`` (the project's default), ``method`` (the algorithm's paper
default in ``methods/<name>.py``), ``recipe`` (a classifier recipe of ``training/recipes.py``), ``paper preset`` (set
in a file under ``assets_config/papers/``) or ``config`` (set in any other config file).
"""
from __future__ import annotations

import json

from ..config import load_config
from .compute import plan_config
from .format import format_plan
from .work import DEFAULT_IMG_PER_S


def cmd_plan(args) -> int:
    cfg = load_config(args.config)
    if args.img_per_s <= 0 or (args.classes is not None and args.classes < 1) or \
            (args.train_per_class is not None and args.train_per_class < 1):
        from ..errors import UserError

        raise UserError("augment plan: --img-per-s, --classes and --train-per-class must be positive")
    p = plan_config(cfg, img_per_s=args.img_per_s, include_disabled=args.all, classes=args.classes,
                    train_per_class=args.train_per_class)
    print(json.dumps(p, indent=2, default=str) if args.json else format_plan(p))
    return 0


def register(sub, default_config: str) -> None:
    """The `augment plan` subcommand (cli.py)."""
    sp = sub.add_parser("plan", help="every method entry's resolved protocol, where each value came from, and the "
                                     "work it implies (no model is loaded)")
    sp.add_argument("--config", default=default_config, help="experiment YAML (default: assets_config/demo.yaml)")
    sp.add_argument("--json", action="store_true", help="machine-readable output (methods.<entry>.*, work)")
    sp.add_argument("--img-per-s", type=float, default=DEFAULT_IMG_PER_S,
                    help=f"UNet image-passes per second the GPU-hours estimate assumes (default {DEFAULT_IMG_PER_S:g})")
    sp.add_argument("--all", action="store_true", help="include disabled entries")
    sp.add_argument("--classes", type=int, default=None, help="assume this many classes (the dataset is elsewhere)")
    sp.add_argument("--train-per-class", type=int, default=None,
                    help="with --classes: train-pool images per class (default: the largest K + val_per_class)")
    sp.set_defaults(fn=cmd_plan)
