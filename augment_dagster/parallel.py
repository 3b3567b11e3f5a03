"""Partitions on several device slots at once (slots.py): one worker process per slot, each running whole
partitions as Dagster runs (``dg.materialize``, the in-process executor, so its models stay loaded between the
partition's steps) against the same Dagster instance; the ``gpu`` pool's limit is raised to the number of slots.
A worker takes its slot lease at start and keeps it, so its steps are pinned to the slot's device.

Used by ``running.materialize_experiment`` when there are two or more slots and two or more partitions to run.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

GPU_POOL = "gpu"

_W: dict = {}


def ensure_pool_limit(instance, n: int) -> None:
    """Raise the instance's ``gpu`` pool limit to ``n`` (never lowers a larger limit a user set)."""
    try:
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        if (info.slot_count or 0) < n:
            instance.event_log_storage.set_concurrency_slots(GPU_POOL, n)
    except Exception:  # noqa: BLE001 - an instance without concurrency support just runs the steps
        pass


def _init(cfg, instance_ref, prefer_queue) -> None:
    import dagster as dg

    from . import slots
    from .definitions import build_definitions
    from .util import quick_exit_gc

    quick_exit_gc()  # the pool's shutdown waits for every worker to exit

    _W["cfg"] = cfg
    _W["defs"] = build_definitions([cfg])
    _W["instance"] = dg.DagsterInstance.from_ref(instance_ref)
    prefer = None
    try:
        prefer = prefer_queue.get_nowait()
    except Exception:  # noqa: BLE001
        pass
    _W["slot"] = slots.lease(cfg, prefer=prefer)


def _partition(pk: str, sel: list[str], tags: dict, run_config: dict | None, i: int, n_parts: int):
    """One partition's run in this worker: (pk, meta, data versions, run id, seconds, slot label)."""
    import dagster as dg

    from .progress import Heartbeat
    from .running import _heartbeat_line, materialize_selection

    slot = _W["slot"]
    t1 = time.perf_counter()
    plan_tag = {"augment/plan": f"{pk}-{time.time_ns()}", **_slot_tags(slot)}
    base = _heartbeat_line(_W["instance"], plan_tag, pk, i, n_parts, len(sel), t1, [])
    meta: dict = {}
    dvs: dict = {}
    try:
        with Heartbeat(lambda: base().replace(f"partition {pk} ", f"partition {pk} on {slot.label()} ", 1)):
            r = materialize_selection(_W["defs"], _W["instance"], [dg.AssetKey.from_user_string(k) for k in sel], pk,
                                      {**tags, **plan_tag}, run_config, meta, dvs)
    except Exception as e:  # noqa: BLE001 - see _for_parent
        raise _for_parent(e, f"partition {pk} on {slot.label()}") from None
    return pk, _plain(meta), dvs, r.run_id, time.perf_counter() - t1, slot.label()


def _unpartitioned(sel: list[str], tags: dict, run_config: dict | None):
    """An unpartitioned selection (the report) as one run in this worker, whose imports and loaded models the
    partitions left warm: (meta, data versions)."""
    import dagster as dg

    from .running import materialize_selection

    slot = _W["slot"]
    meta: dict = {}
    dvs: dict = {}
    try:
        materialize_selection(_W["defs"], _W["instance"], [dg.AssetKey.from_user_string(k) for k in sel], None,
                              {**tags, **_slot_tags(slot)}, run_config, meta, dvs)
    except Exception as e:  # noqa: BLE001 - see _for_parent
        raise _for_parent(e, f"{', '.join(sel)} on {slot.label()}") from None
    return _plain(meta), dvs


def _slot_tags(slot) -> dict[str, str]:
    return {"augment/slot": str(slot.index), "augment/slot_device": slot.device}


def _for_parent(e: Exception, what: str) -> RuntimeError:
    """A worker's failure as the parent gets it: picklable, and still naming a user error (``errors``) as such;
    anything else with the worker's traceback. Call from the ``except`` block."""
    from .errors import find_user_error

    user = find_user_error(e)
    if user is not None:
        return RuntimeError(f"{type(user).__name__}: {user}")
    import traceback

    return RuntimeError(f"{what} failed:\n{traceback.format_exc()[-4000:]}")


def _plain(meta: dict) -> dict:
    """Metadata values that survive pickling (anything else as its text)."""
    import pickle

    out = {}
    for k, md in meta.items():
        row = {}
        for name, v in md.items():
            try:
                pickle.dumps(v)
                row[name] = v
            except Exception:  # noqa: BLE001
                row[name] = str(v)
        out[k] = row
    return out


def run_partitions(cfg, instance, todo: list[tuple[str, list]], n_slots: int, *, tags: dict, run_config: dict | None,
                   meta: dict, data_versions: dict | None, on_partition=None, n_parts: int | None = None,
                   then=None) -> None:
    """Run ``todo`` = [(partition, selected asset keys)] on ``min(n_slots, len(todo))`` worker processes.
    ``then``: called here once every partition is done; the asset keys it returns (the report, if stale) run
    unpartitioned on one of the same workers, which has everything imported already (the parent has not)."""
    ref = instance.get_ref()  # the gpu pool's limit is already raised to n_slots (materialize_experiment)
    n = min(n_slots, len(todo))
    ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads or locks of the parent
    prefer = ctx.Queue()
    for i in range(n):
        prefer.put(i)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init, initargs=(cfg, ref, prefer)) as pool:
        futs = {pool.submit(_partition, pk, [k.to_user_string() for k in sel], tags, run_config, i, n_parts or len(todo)): pk
                for i, (pk, sel) in enumerate(todo)}
        try:
            pending = set(futs)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    pk, m, dvs, run_id, secs, label = f.result()
                    meta.update(m)
                    if data_versions is not None:
                        data_versions.update(dvs)
                    if on_partition is not None:
                        _call(on_partition, pk, secs, run_id, label)
            sel = then() if then is not None else []
            if sel:
                m, dvs = pool.submit(_unpartitioned, [k.to_user_string() for k in sel], tags, run_config).result()
                meta.update(m)
                if data_versions is not None:
                    data_versions.update(dvs)
        except BaseException:
            for f in futs:
                f.cancel()
            raise


def _call(fn, pk, secs, run_id, label) -> None:
    """``on_partition(pk, seconds, run id[, slot label])``: the slot only for callbacks that take it."""
    import inspect

    try:
        n = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n = 3
    fn(pk, secs, run_id, label) if n >= 4 else fn(pk, secs, run_id)
