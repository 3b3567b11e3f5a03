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


class StalenessIndex:
    """Dagster's staleness (what ``augment status`` / the UI's "Unsynced" report, ``CachingStaleStatusResolver``)
    for many asset partitions at once: the resolver issues ~14 event-log queries per asset partition (20 s for the
    demo's 350), this reads the latest materialization of every (asset, partition) in one query per asset plus
    one for all their records. Same rules: missing = never materialized; stale = its code version changed, a
    dependency was added or removed, an unpartitioned dependency's data version differs from the one it was
    computed from, or a partitioned dependency has a newer record (after the recorded input pointer) whose data
    version differs from the one at the pointer. ``tests/test_running.py`` checks it against the resolver."""

    MAT_TAG_CODE, MAT_TAG_DV = "dagster/code_version", "dagster/data_version"

    def __init__(self, defs, instance, keys):
        import dagster as dg
        from dagster._core.events import DagsterEventType

        self.dg, self.instance, self.graph = dg, instance, defs.resolve_asset_graph()
        self._mat = DagsterEventType.ASSET_MATERIALIZATION
        wanted = set(keys)
        for k in keys:
            wanted |= set(self.graph.get(k).parent_keys)
        self.tags: dict = {}
        self.sid: dict = {}
        for k in wanted:
            if self.graph.get(k).partitions_def is None:  # unpartitioned: its latest record (storage id + tags)
                r = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=k), limit=1).records
                if r:
                    self.sid[(k, None)], self.tags[(k, None)] = r[0].storage_id, dict(r[0].asset_materialization.tags or {})
                continue
            latest = instance.event_log_storage.get_latest_storage_id_by_partition(k, self._mat)  # {partition: id}
            if not latest:
                continue
            recs = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=k, storage_ids=list(latest.values())),
                                                   limit=len(latest)).records
            for r in recs:
                kp = (k, r.asset_materialization.partition)
                self.sid[kp], self.tags[kp] = r.storage_id, dict(r.asset_materialization.tags or {})

    def _dv(self, tags: dict | None, sid) -> str | None:
        if tags is None:
            return None
        return tags.get(self.MAT_TAG_DV) or f"storage:{sid}"

    def _version_at(self, key, partition, cursor: int) -> str | None:
        r = self.instance.fetch_materializations(
            self.dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition], before_storage_id=cursor + 1),
            limit=1).records
        return self._dv(dict(r[0].asset_materialization.tags or {}), r[0].storage_id) if r else None

    def status(self, key, partition) -> str:
        """``missing`` | ``stale`` | ``fresh``."""
        tags = self.tags.get((key, partition))
        if tags is None:
            return "missing"
        node = self.graph.get(key)
        if node.code_version is not None and tags.get(self.MAT_TAG_CODE) != node.code_version:
            return "stale"
        prefix, ptr = "dagster/input_data_version/", "dagster/input_event_pointer/"
        recorded = {t[len(prefix):] for t in tags if t.startswith(prefix)}
        parents = {p.to_user_string(): p for p in node.parent_keys}
        if recorded - set(parents) or set(parents) - recorded:
            return "stale"  # a dependency was removed / added
        for name, p in parents.items():
            pdef = self.graph.get(p).partitions_def
            if pdef is None:
                if tags[prefix + name] != self._dv(self.tags.get((p, None)), self.sid.get((p, None))):
                    return "stale"
                continue
            cursor = int(tags.get(ptr + name) or 0)
            for dp in ([partition] if node.partitions_def is not None else list(pdef.get_partition_keys())):
                sid = self.sid.get((p, dp))
                if sid is not None and sid > cursor:
                    if self._version_at(p, dp, cursor) != self._dv(self.tags.get((p, dp)), sid):
                        return "stale"
        return "fresh"


def stale_keys(defs, instance, keys, partition: str | None, index: StalenessIndex | None = None) -> list:
    """Of ``keys`` (asset keys of one partition, or unpartitioned with ``partition=None``), those missing or stale
    in ``instance``, plus their descendants among ``keys``; in the order of ``keys``."""
    index = index or StalenessIndex(defs, instance, keys)
    keyset = set(keys)
    picked = {k for k in keys if index.status(k, partition) != "fresh"}
    todo = list(picked)
    while todo:  # downstream closure within this partition's keys
        for child in index.graph.get(todo.pop()).child_keys:
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


class RunInterrupted(Exception):
    """Ctrl-C / SIGTERM stopped a run of ``materialize_experiment``; ``run_id`` (None if no run had started) is
    marked canceled in the instance. Every unit written before the signal is in the memo (a unit's record is
    written right after its bytes), so the next run reuses it."""

    def __init__(self, run_id: str | None):
        super().__init__(f"interrupted (run {run_id or '-'})")
        self.run_id = run_id

    def __reduce__(self):  # raised in a partition worker process, re-raised in the CLI's
        return (RunInterrupted, (self.run_id,))


def is_interrupt(e: BaseException) -> bool:
    """A Ctrl-C / SIGTERM as Dagster or Python raises it (also wrapped in a step failure)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "DagsterExecutionInterruptedError":
            return True
        e = e.__cause__ or e.__context__
    return False


def mark_canceled(instance, attempt_tag: dict) -> str | None:
    """Mark the run carrying ``attempt_tag`` canceled (Dagster records an interrupt it did not request as a
    failure): the UI then shows it as stopped by the user, not as a failure to debug."""
    import dagster as dg

    runs = instance.get_runs(filters=dg.RunsFilter(tags=attempt_tag), limit=1)
    if not runs:
        return None
    run = runs[0]
    if run.status != dg.DagsterRunStatus.CANCELED:
        instance.report_run_canceled(run, message="interrupted by the user (SIGINT/SIGTERM); finished units are kept "
                                                  "in the memo and reused by the next `augment run`")
    return run.run_id
def materialize_selection(defs, instance, selection, partition, tags, run_config, meta: dict, data_versions: dict | None):
    """One Dagster run of ``selection`` (in-process executor); its materializations' metadata go to ``meta``."""
    import dagster as dg

    attempt = {"augment/attempt": f"{partition or '-'}-{time.time_ns()}"}  # finds this run to mark it canceled
    try:
        r = dg.materialize(list(defs.assets) + list(defs.asset_checks or []), selection=selection, partition_key=partition,
                           instance=instance, resources=dict(defs.resources), tags={**tags, **attempt},
                           run_config=run_config)
    except BaseException as e:
        if is_interrupt(e):
            raise RunInterrupted(mark_canceled(instance, attempt)) from e
        raise
    for ev in r.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        key = mat.asset_key.to_user_string() + (f"[{mat.partition}]" if mat.partition else "")
        meta[key] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        if data_versions is not None:
            data_versions[key] = mat.tags.get("dagster/data_version") if mat.tags else None
    return r


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

    assets = list(defs.assets) + list(defs.asset_checks or [])  # the checks of the selected assets run with them
    exp = cfg.experiment
    head, report = dg.AssetKey([exp, "raw_images"]), dg.AssetKey([exp, "report"])
    part_keys = [k for a in assets for k in a.keys if k not in (head, report)]
    if methods:
        keep = set(methods) | {"real_only"}
        part_keys = [k for k in part_keys if len(k.path) < 3 or k.path[2] in keep]
    meta: dict[str, dict] = {}

    def run(selection, partition=None, extra_tags=None):
        return materialize_selection(defs, instance, selection, partition, {**(tags or {}), **(extra_tags or {})},
                                     run_config, meta, data_versions)

    def plan_report() -> list:
        sel = [report] if force else stale_keys(defs, instance, [report], None)
        if on_plan is not None:
            on_plan("-", len(sel), 1)
        return sel

    full = not partitions and not methods  # the report is considered only for a full run
    run([head])
    pks = list(partitions or cfg.splits.keys())
    spent: list[float] = []
    index = None if force else StalenessIndex(defs, instance, part_keys)  # a partition's runs touch only its records
    todo = []
    for pk in pks:
        sel = part_keys if force else stale_keys(defs, instance, part_keys, pk, index)
        if on_plan is not None:
            on_plan(pk, len(sel), len(part_keys))
        if sel:
            todo.append((pk, sel))
    from . import slots as _slots  # device slots (slots.py): several partitions at once, one worker per slot

    n_slots = len(_slots.resolve(cfg)) if todo else 0
    if todo:
        from .parallel import ensure_pool_limit

        ensure_pool_limit(instance, n_slots)  # the gpu pool admits one step per device slot
    if n_slots > 1 and len(todo) > 1 and getattr(instance, "_ref", None) is not None:
        from .parallel import run_partitions

        run_partitions(cfg, instance, todo, n_slots, tags=tags or {}, run_config=run_config, meta=meta,
                       data_versions=data_versions, on_partition=on_partition, n_parts=len(pks),
                       then=plan_report if full else None)
        todo, full = [], False
    held = _slots.current() is not None
    if todo and not held:
        _slots.lease(cfg)  # one slot: this process computes on it (same device and thread count as a worker)
    try:
        for pk, sel in todo:
            i = pks.index(pk)
            t1 = time.perf_counter()
            plan_tag = {"augment/plan": f"{pk}-{time.time_ns()}"}
            line = _heartbeat_line(instance, plan_tag, pk, i, len(pks), len(sel), t1, spent)
            with Heartbeat(line):  # a line at least every 30 s even while a step has no loop of its own
                r = run(sel, pk, extra_tags=plan_tag)
            spent.append(time.perf_counter() - t1)
            if on_partition is not None:
                from .parallel import _call  # the slot for callbacks that take it (the CLI's "done" line names it)

                slot = _slots.current()
                _call(on_partition, pk, spent[-1], r.run_id, slot.label() if slot is not None else None)
    finally:
        if todo and not held:
            _slots.release()
    if full:
        sel = plan_report()
        if sel:
            run(sel)
    return meta
