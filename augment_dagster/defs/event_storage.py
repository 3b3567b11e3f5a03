"""The local instance's event log: Dagster's own run-sharded sqlite storage (``SqliteEventLogStorage``: one
database per run plus ``index.db`` under ``<DAGSTER_HOME>/history/runs``; the same files, schema and queries),
with one SQLAlchemy engine and one pooled connection kept per shard for the process.

Why: the stock class builds a new engine, opens a new sqlite connection and closes it again (with the WAL
checkpoint that closing the last connection runs) for every event it stores, and a partition of the demo stores
~1,500 of them (step start/success, inputs, outputs, materializations, check evaluations; materializations and
check evaluations also go to ``index.db``, and each of those asked whether a table exists through yet another
engine). With two partition workers writing at once that was 4–5 ms per plain event and ~12 ms per
materialization; a kept connection makes it 0.5–0.8 ms and 4–5 ms, and a cold demo partition ~10 s shorter
(README "Devices").

The project's ``dagster.yaml`` selects it (``event_log_storage:``); without a ``base_dir`` it uses Dagster's
default place under the instance's root, so a moved data dir keeps working. ``write_instance_yaml`` swaps the
block for PostgreSQL storage when ``$AUGMENT_POSTGRES_URL`` is set.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import contextmanager

import dagster as dg
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool

CLASS = "PooledSqliteEventLogStorage"


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """``SqliteEventLogStorage`` with its engines kept: ``index.db``'s for the process, the run shards' for the
    ``RUN_SHARDS_KEPT`` most recently used runs (a worker writes one run at a time). Access stays serialized by
    the parent class's lock, as before. A forked child never uses its parent's connections."""

    RUN_SHARDS_KEPT = 4

    def __init__(self, base_dir: str | None = None, inst_data=None):
        self._inst_data = inst_data
        self._engines: OrderedDict = OrderedDict()
        self._engines_pid = os.getpid()
        self._inherited: list = []  # engines of the process this one was forked from: kept open, never used
        self._tables: set[str] = set()  # tables known to exist (a table is added by a migration, never dropped)
        if base_dir is not None:
            super().__init__(base_dir, inst_data)

    @classmethod
    def config_type(cls):
        return {"base_dir": dg.Field(dg.StringSource, is_required=False,
                                     description="Default: <instance root>/history/runs, Dagster's own place.")}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **dict(config_value or {}))

    def register_instance(self, instance) -> None:
        if not hasattr(self, "_base_dir"):  # no base_dir configured: Dagster's default under the instance root
            root = instance.root_directory
            if not root:
                raise dg.DagsterInvariantViolationError(
                    f"{CLASS} without a base_dir needs an instance with a root directory (a local instance)")
            super().__init__(os.path.join(root, "history", "runs"), self._inst_data)
        super().register_instance(instance)

    def _engine(self, shard: str):
        """The kept engine of ``shard`` (created on first use; least recently used run shards are disposed)."""
        if self._engines_pid != os.getpid():
            # forked: sqlite connections must not cross a fork. Keep the parent's objects referenced (closing
            # them here could disturb the parent's use of the same files) and start afresh.
            self._inherited.append(self._engines)
            self._engines, self._engines_pid = OrderedDict(), os.getpid()
        engine = self._engines.pop(shard, None)
        if engine is None:
            # pool_size 1: one connection kept; the overflow serves Dagster's schema check, which opens a second
            # connection while its first is still checked out (closed on return)
            engine = create_engine(self.conn_string_for_shard(shard), poolclass=QueuePool, pool_size=1, max_overflow=2,
                                   connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False})
        self._engines[shard] = engine
        runs = [k for k in self._engines if k != INDEX_SHARD_NAME]
        for k in runs[:max(0, len(runs) - self.RUN_SHARDS_KEPT)]:
            self._engines.pop(k).dispose()
        return engine

    @contextmanager
    def _connect(self, shard: str):
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    def has_table(self, table_name: str) -> bool:
        """The stock check (a new engine each time) once per table that exists: Dagster asks it for every check
        evaluation and every materialization's tags. A missing table is asked again (a migration may add it)."""
        if table_name in self._tables:
            return True
        found = super().has_table(table_name)
        if found:
            self._tables.add(table_name)
        return found

    def _dispose_engines(self, keep_index: bool = False) -> None:
        with self._db_lock:
            for k in [k for k in self._engines if not (keep_index and k == INDEX_SHARD_NAME)]:
                self._engines.pop(k).dispose()

    def wipe(self) -> None:
        self._dispose_engines(keep_index=True)  # the run shards' files are deleted next
        super().wipe()

    def dispose(self) -> None:
        if self._engines_pid == os.getpid():
            self._dispose_engines()
        super().dispose()
