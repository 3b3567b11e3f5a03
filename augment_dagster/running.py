"""Materialize one experiment in-process: raw_images, then the partitioned assets per split, then the report.

Shared by `augment run` and bench/incremental.py, so both follow the same plan. No torch at import time.

By default only what is **missing or stale** is materialized, using the staleness Dagster reports (the UI's
"Unsynced", `augment status`): an asset partition whose code version changed (code or its config block), whose
upstream data version changed, or that was never materialized — plus everything downstream of those in the same
partition (Dagster marks only the direct children of a changed asset stale; the grandchildren become stale once
the children rematerialize, so the plan takes the closure at once). ``force=True`` executes every selected asset
(the unit memo still reuses finished work). ``raw_images`` is always re-ingested: it is cheap and it is how a new
file is noticed (its data version is the listing's hash, so an unchanged tree leaves its children fresh)."""
from __future__ import annotations

import time
from typing import Callable

from .progress import Heartbeat, fmt_secs


def stale_keys(defs, instance, keys, partition: str | None) -> list:
    """Of ``keys`` (asset keys of one partition, or unpartitioned with ``partition=None``), those missing or stale
    in ``instance``, plus their descendants among ``keys``; in the order of ``keys``."""
    from dagster._core.definitions.data_version import StaleStatus

    from .commands import stale_resolver

    graph = defs.resolve_asset_graph()
    resolver = stale_resolver(instance, graph)
    keyset = set(keys)
    picked = {k for k in keys if resolver.get_status(k, partition) in (StaleStatus.MISSING, StaleStatus.STALE)}
    todo = list(picked)
    while todo:  # downstream closure within this partition's keys
        for child in graph.get(todo.pop()).child_keys:
            if child in keyset and child not in picked:
                picked.add(child)
                todo.append(child)
    return [k for k in keys if k in picked]


def _heartbeat_line(instance, plan_tag: dict, pk: str, i: int, n_parts: int, n_sel: int, t1: float, spent: list[float]):
    """The run-level progress line: partition i/n, assets materialized so far in its run, ETA of the whole run
    (the mean time of the partitions finished so far; unknown during the first)."""

    def line() -> str:
        import dagster as dg

        runs = instance.get_runs(filters=dg.RunsFilter(tags=plan_tag), limit=1)
        done = 0
        if runs:
            done = len(instance.get_records_for_run(runs[0].run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION,
                                                    limit=10_000).records)
        el = time.perf_counter() - t1
        left = (sum(spent) / len(spent) * (n_parts - i) - el) if spent else None
        return (f"[progress] augment run: partition {pk} ({i + 1}/{n_parts}): {done}/{n_sel} assets, {fmt_secs(el)} in it, "
                f"run ETA {fmt_secs(max(0.0, left) if left is not None else None)}")

    return line


def materialize_experiment(defs, cfg, instance, *, partitions: list[str] | None = None, methods: list[str] | None = None,
                           tags: dict[str, str] | None = None, run_config: dict | None = None,
                           on_partition: Callable[[str, float, str], None] | None = None,
                           data_versions: dict[str, str | None] | None = None, force: bool = False,
                           on_plan: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """Returns ``{asset key[partition]: materialization metadata}`` of what was materialized. The report is
    considered only for a full run (no ``partitions``/``methods`` subset); ``methods`` keeps those entries plus
    ``real_only``. ``data_versions``, if given, is filled with ``{asset key[partition]: Dagster data version}``.
    ``force``: execute every asset instead of only missing/stale ones. ``on_plan(partition or "-", n selected,
    n keys)`` is called per partition (and for the report) before it runs; ``on_partition(partition, seconds,
    run id)`` after a partition ran (not for a partition with nothing to do)."""
    import dagster as dg

    assets = list(defs.assets)
    resources = dict(defs.resources)
    exp = cfg.experiment
    head, report = dg.AssetKey([exp, "raw_images"]), dg.AssetKey([exp, "report"])
    part_keys = [k for a in assets for k in a.keys if k not in (head, report)]
    if methods:
        keep = set(methods) | {"real_only"}
        part_keys = [k for k in part_keys if len(k.path) < 3 or k.path[2] in keep]
    meta: dict[str, dict] = {}

    def run(selection, partition=None, extra_tags=None):
        r = dg.materialize(assets, selection=selection, partition_key=partition, instance=instance, resources=resources,
                           tags={**(tags or {}), **(extra_tags or {})}, run_config=run_config)
        for ev in r.get_asset_materialization_events():
            mat = ev.event_specific_data.materialization
            key = mat.asset_key.to_user_string() + (f"[{mat.partition}]" if mat.partition else "")
            meta[key] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
            if data_versions is not None:
                data_versions[key] = mat.tags.get("dagster/data_version") if mat.tags else None
        return r

    run([head])
    pks = list(partitions or cfg.splits.keys())
    spent: list[float] = []
    for i, pk in enumerate(pks):
        sel = part_keys if force else stale_keys(defs, instance, part_keys, pk)
        if on_plan is not None:
            on_plan(pk, len(sel), len(part_keys))
        if not sel:
            continue
        t1 = time.perf_counter()
        plan_tag = {"augment/plan": f"{pk}-{time.time_ns()}"}
        line = _heartbeat_line(instance, plan_tag, pk, i, len(pks), len(sel), t1, spent)
        with Heartbeat(line):  # a line at least every 30 s even while a step has no loop of its own
            r = run(sel, pk, extra_tags=plan_tag)
        spent.append(time.perf_counter() - t1)
        if on_partition is not None:
            on_partition(pk, spent[-1], r.run_id)
    if not partitions and not methods:
        sel = [report] if force else stale_keys(defs, instance, [report], None)
        if on_plan is not None:
            on_plan("-", len(sel), 1)
        if sel:
            run(sel)
    return meta
