"""Materialize one experiment in-process: raw_images, then every partitioned asset per split, then the report.

Shared by `augment run` and bench/incremental.py, so both follow the same plan. No torch at import time."""
from __future__ import annotations

import time
from typing import Callable


def materialize_experiment(defs, cfg, instance, *, partitions: list[str] | None = None, methods: list[str] | None = None,
                           tags: dict[str, str] | None = None, run_config: dict | None = None,
                           on_partition: Callable[[str, float, str], None] | None = None,
                           data_versions: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Returns ``{asset key[partition]: materialization metadata}``. The report is materialized only for a full
    run (no ``partitions``/``methods`` subset); ``methods`` keeps those entries plus ``real_only``.
    ``data_versions``, if given, is filled with ``{asset key[partition]: Dagster data version}``."""
    import dagster as dg

    assets = list(defs.assets) + list(defs.asset_checks or [])  # the checks of the selected assets run with them
    resources = dict(defs.resources)
    exp = cfg.experiment
    head, report = dg.AssetKey([exp, "raw_images"]), dg.AssetKey([exp, "report"])
    part_keys = [k for a in assets for k in a.keys if k not in (head, report)]
    if methods:
        keep = set(methods) | {"real_only"}
        part_keys = [k for k in part_keys if len(k.path) < 3 or k.path[2] in keep]
    meta: dict[str, dict] = {}

    def run(selection, partition=None):
        r = dg.materialize(assets, selection=selection, partition_key=partition, instance=instance, resources=resources,
                           tags=tags, run_config=run_config)
        for ev in r.get_asset_materialization_events():
            mat = ev.event_specific_data.materialization
            key = mat.asset_key.to_user_string() + (f"[{mat.partition}]" if mat.partition else "")
            meta[key] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
            if data_versions is not None:
                data_versions[key] = mat.tags.get("dagster/data_version") if mat.tags else None
        return r

    run([head])
    for pk in partitions or cfg.splits.keys():
        t1 = time.perf_counter()
        r = run(part_keys, pk)
        if on_partition is not None:
            on_partition(pk, time.perf_counter() - t1, r.run_id)
    if not partitions and not methods:
        run([report])
    return meta
