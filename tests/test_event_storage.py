"""The project instance's event log (defs/event_storage.py): Dagster's run-sharded sqlite storage with its
connections kept. Same files and records as the stock class; one connection per shard instead of one per event;
several processes writing one home at once; a fork; a moved home; PostgreSQL replacing it."""
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from sqlalchemy import event
from sqlalchemy.pool import Pool

from augment_dagster.defs.event_storage import PooledSqliteEventLogStorage
from augment_dagster.defs.scaleout import POOLED_EVENT_LOG_BLOCK, write_instance_yaml

TEMPLATE = Path(__file__).resolve().parents[1] / "dagster.yaml"
N_ASSETS = 12


def _graph():
    """A chain of N_ASSETS assets with a check each: ~10 events per asset, 4 of them mirrored into index.db."""
    out = []
    prev = None
    for i in range(N_ASSETS):
        deps = [prev] if prev is not None else []

        @dg.asset(name=f"a{i}", deps=deps, check_specs=[dg.AssetCheckSpec("positive", asset=f"a{i}")])
        def _a(context):
            yield dg.MaterializeResult(metadata={"i": len(context.asset_key.path[0])},
                                       check_results=[dg.AssetCheckResult(passed=True)])

        out.append(_a)
        prev = _a.key
    return out


def _home(tmp_path, name, template=True) -> Path:
    home = tmp_path / name
    home.mkdir()
    if template:
        shutil.copy(TEMPLATE, home / "dagster.yaml")
    return home


def _run_counting_connects(home: Path) -> tuple[str, int, list]:
    """Materialize the graph in an instance at ``home``: (run id, new sqlite connections opened to the event
    log's databases, event types)."""
    opened = []
    events_dir = str(home / "history" / "runs")

    def on_connect(dbapi_conn, rec):
        path = dbapi_conn.execute("PRAGMA database_list").fetchone()[2]
        if os.path.dirname(path) == events_dir:  # not history/runs.db (the run storage)
            opened.append(path)

    event.listen(Pool, "connect", on_connect)
    try:
        with dg.DagsterInstance.from_config(str(home)) as inst:
            r = dg.materialize(_graph(), instance=inst)
            assert r.success
            types = [e.dagster_event_type for e in inst.all_logs(r.run_id) if e.is_dagster_event]
    finally:
        event.remove(Pool, "connect", on_connect)
    return r.run_id, len(opened), types


def test_the_template_instance_keeps_one_connection_per_shard_and_stores_what_the_stock_class_stores(tmp_path):
    home = _home(tmp_path, "pooled")
    with dg.DagsterInstance.from_config(str(home)) as inst:
        st = inst.event_log_storage
        assert isinstance(st, PooledSqliteEventLogStorage)
        assert Path(st._base_dir) == home / "history" / "runs"  # Dagster's own place, no path in the yaml
    run_id, pooled_connects, types = _run_counting_connects(home)
    _, stock_connects, stock_types = _run_counting_connects(_home(tmp_path, "stock", template=False))

    assert sorted(t.value for t in types) == sorted(t.value for t in stock_types)
    n_events = len(types)
    assert n_events >= 8 * N_ASSETS
    # the stock class opens a connection per event (two for the mirrored ones); the pooled one per shard, plus
    # the schema check's second connection the first time a shard is opened
    assert stock_connects >= n_events
    assert pooled_connects <= 6, pooled_connects

    # the files are Dagster's: the stock class reads the same records from them
    stock = SqliteEventLogStorage(str(home / "history" / "runs"))
    with dg.DagsterInstance.from_config(str(home)) as inst:
        mine = [(e.storage_id, e.event_log_entry.dagster_event_type) for e in inst.get_records_for_run(run_id, limit=10_000).records]
        mats = inst.fetch_materializations(dg.AssetKey(f"a{N_ASSETS - 1}"), limit=5).records
        check = inst.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("a0"), "positive")])
    theirs = [(e.storage_id, e.event_log_entry.dagster_event_type) for e in stock.get_records_for_run(run_id, limit=10_000).records]
    assert mine == theirs and len(mine) == len(types)  # every row is one of the run's Dagster events
    assert len(mats) == 1 and mats[0].storage_id in {
        r.storage_id for r in stock.fetch_materializations(dg.AssetKey(f"a{N_ASSETS - 1}"), limit=5).records}
    assert list(check.values())[0].status.value == "SUCCEEDED"


def _writer(home: str, tag: str, n_runs: int, q) -> None:
    try:
        with dg.DagsterInstance.from_config(home) as inst:
            ids = [dg.materialize(_graph(), instance=inst, tags={"writer": tag}).run_id for _ in range(n_runs)]
        q.put(("ok", ids))
    except Exception as e:  # noqa: BLE001
        q.put(("error", repr(e)))


def test_two_processes_writing_one_home_at_once_lose_nothing(tmp_path):
    home = _home(tmp_path, "shared")
    with dg.DagsterInstance.from_config(str(home)):
        pass  # the instance's databases exist before the writers start (as `augment run` does)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(home), t, 3, q)) for t in ("x", "y")]
    for p in procs:
        p.start()
    results = [q.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    run_ids = [rid for _, ids in results for rid in ids]
    assert len(set(run_ids)) == 6
    with dg.DagsterInstance.from_config(str(home)) as inst:
        for rid in run_ids:
            assert inst.get_run_by_id(rid).status == dg.DagsterRunStatus.SUCCESS
            assert len(inst.get_records_for_run(rid, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records) == N_ASSETS
        for i in range(N_ASSETS):  # every materialization is mirrored into index.db
            assert len(inst.fetch_materializations(dg.AssetKey(f"a{i}"), limit=100).records) == 6


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available on this platform")
def test_a_forked_child_opens_its_own_connections(tmp_path):
    home = _home(tmp_path, "fork")
    with dg.DagsterInstance.from_config(str(home)) as inst:
        first = dg.materialize(_graph(), instance=inst).run_id
        parent_engines = dict(inst.event_log_storage._engines)
        pid = os.fork()
        if pid == 0:  # the child: a run of its own through the same storage object
            code = 1
            try:
                st = inst.event_log_storage
                ok = dg.materialize(_graph(), instance=inst, tags={"child": "1"}).success
                fresh = all(st._engines[k] is not parent_engines.get(k) for k in st._engines)
                code = 0 if ok and fresh else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        again = dg.materialize(_graph(), instance=inst).run_id  # the parent's kept connections still work
        assert inst.event_log_storage._engines["index"] is parent_engines["index"]
        runs = inst.get_runs()
        assert {first, again} <= {r.run_id for r in runs} and len(runs) == 3
        assert len(inst.fetch_materializations(dg.AssetKey("a0"), limit=10).records) == 3


def test_a_moved_home_keeps_its_events_and_postgres_replaces_the_block(tmp_path, monkeypatch):
    home = _home(tmp_path, "before")
    with dg.DagsterInstance.from_config(str(home)) as inst:
        rid = dg.materialize(_graph(), instance=inst).run_id
    moved = tmp_path / "after"
    shutil.move(str(home), str(moved))
    with dg.DagsterInstance.from_config(str(moved)) as inst:
        assert Path(inst.event_log_storage._base_dir) == moved / "history" / "runs"
        assert len(inst.get_records_for_run(rid, limit=10_000).records) > 8 * N_ASSETS

    assert POOLED_EVENT_LOG_BLOCK in TEMPLATE.read_text()  # the block write_instance_yaml knows is the template's
    older = tmp_path / "older"  # a home made from the template before it had the block gets it, nothing else
    older.mkdir()
    (older / "dagster.yaml").write_text(TEMPLATE.read_text().replace(POOLED_EVENT_LOG_BLOCK, ""))
    monkeypatch.delenv("AUGMENT_POSTGRES_URL", raising=False)
    assert write_instance_yaml(older, TEMPLATE).read_text() == TEMPLATE.read_text()
    (older / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # a user's own file is left as it is
    assert write_instance_yaml(older, TEMPLATE).read_text() == "telemetry:\n  enabled: false\n"
    fresh = tmp_path / "pg"
    fresh.mkdir()
    monkeypatch.setenv("AUGMENT_POSTGRES_URL", "postgresql://aug:pw@db.example:5432/augment")
    pytest.importorskip("dagster_postgres", reason="the postgres extra is not installed")
    conf = yaml.safe_load(write_instance_yaml(fresh, TEMPLATE).read_text())
    assert "event_log_storage" not in conf and conf["storage"] == {"postgres": {"postgres_url": {"env": "AUGMENT_POSTGRES_URL"}}}
    assert conf["concurrency"]["pools"]["granularity"] == "op"  # the rest of the template is kept
    # an existing home made from the template switches too; its sqlite history stays where it was
    conf = yaml.safe_load(write_instance_yaml(moved, TEMPLATE).read_text())
    assert "event_log_storage" not in conf and "postgres" in conf["storage"]
