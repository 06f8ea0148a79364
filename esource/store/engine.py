"""Engines for the two supported databases: SQLite (default, one file) and PostgreSQL (psycopg 3).

SQLite transaction control. Python's sqlite3 module (3.11) opens transactions lazily, only before
INSERT/UPDATE/DELETE, so a unit of work that reads `max(key)` and then inserts would read outside any
transaction, and a deferred transaction that later wants to write fails with "database is locked"
(SQLITE_BUSY_SNAPSHOT, which busy_timeout does not retry) when another writer committed meanwhile.
So the driver's own transaction handling is switched off and the engine emits its own BEGIN:
`BEGIN IMMEDIATE` for read-write units of work (the write lock is taken up front; concurrent writers
queue on busy_timeout and every read inside the transaction is consistent with its writes), and
`BEGIN DEFERRED` for read-only ones (readers run alongside the writer thanks to WAL). This is the
SQLAlchemy-documented recipe for pysqlite; it also makes SAVEPOINT and transactional DDL work.

Writers of one process queue on an in-process gate (a lock taken before `BEGIN IMMEDIATE`, released
by the connection's commit or rollback) rather than on SQLite's busy handler: that handler polls with
sleeps of up to 100 ms and is not fair, so under steady load (intake batches and dispatcher status
updates from several threads) a writer could wait seconds while the lock was free most of the time.
Other processes (the CLI, a second service) still meet busy_timeout, as before.

PostgreSQL runs at its default READ COMMITTED isolation; races are settled by unique constraints
(see `sqlalchemy_uow`). Read-only units of work run `SET TRANSACTION READ ONLY`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import StaticPool

from esource.store.errors import StoreError

log = logging.getLogger("esource.store")

#: Execution option marking an engine (or connection) whose transactions only read.
READ_ONLY_OPTION = "esource_read_only"

DEFAULT_BUSY_TIMEOUT_MS = 30_000
MIN_SQLITE = (3, 35)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # keep every digit
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot store {type(value).__name__} in a JSON column")


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, default=_json_default).decode()


class _GatedConnection(sqlite3.Connection):
    """A pysqlite connection that gives the engine's writer gate back when its transaction ends."""

    _esource_gate: threading.Lock | None = None
    _esource_holds = False

    def _esource_release(self) -> None:
        if self._esource_holds:
            self._esource_holds = False
            gate = self._esource_gate
            if gate is not None:
                gate.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            if not self.in_transaction:  # a failed COMMIT (SQLITE_BUSY) keeps the transaction and the gate
                self._esource_release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._esource_release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._esource_release()


def _take_gate(dbapi_connection: Any, timeout: float) -> None:
    """Wait for this process's other writers (see the module docstring). After `timeout` the
    transaction starts anyway and SQLite's busy handler decides, as without the gate."""
    gate = getattr(dbapi_connection, "_esource_gate", None)
    if gate is None or dbapi_connection._esource_holds:
        return
    if gate.acquire(timeout=timeout):
        dbapi_connection._esource_holds = True


def make_engine(url: str | URL, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
                background_checkpoint: bool = False, **engine_kwargs: Any) -> Engine:
    """An engine for `sqlite:///path.db` or `postgresql+psycopg://...` (`postgresql://` is taken to
    mean psycopg 3). Extra keyword arguments go to `sqlalchemy.create_engine` (e.g. `echo`,
    `connect_args`, pool sizes). `background_checkpoint`: the engine's SQLite connections never
    checkpoint the WAL themselves (a `WalCheckpointer` must run; see there).

    SQLite connections get `journal_mode=WAL` (file databases), `synchronous=NORMAL` (durable at
    checkpoints, safe with WAL), `foreign_keys=ON` and `busy_timeout` (wait for the writer instead of
    failing at once). An in-memory SQLite database is shared by all users of the engine (one
    connection): fine for tests, not for concurrency.
    """
    u = make_url(url)
    backend = u.get_backend_name()
    # statement parameters can hold patient identifiers (enrollment, facts): never in error texts or logs
    engine_kwargs.setdefault("hide_parameters", True)
    # JSON columns (facts, candidates, details) through orjson: several times faster both ways
    engine_kwargs.setdefault("json_serializer", _json_dumps)
    engine_kwargs.setdefault("json_deserializer", orjson.loads)
    if backend == "postgresql":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        engine_kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(u, **engine_kwargs)
    elif backend == "sqlite":
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old: esource needs {'.'.join(map(str, MIN_SQLITE))} "
                "or later (INSERT ... ON CONFLICT ... RETURNING)"
            )
        memory = sqlite_file(u) is None
        if memory:
            engine_kwargs.setdefault("poolclass", StaticPool)
            connect_args = dict(engine_kwargs.pop("connect_args", {}))
            connect_args.setdefault("check_same_thread", False)
            engine_kwargs["connect_args"] = connect_args
        else:  # one writer gate per engine (a file database has one engine per process in esource)
            connect_args = dict(engine_kwargs.pop("connect_args", {}))
            connect_args.setdefault("factory", _GatedConnection)
            engine_kwargs["connect_args"] = connect_args
        engine = create_engine(u, **engine_kwargs)
        _configure_sqlite(engine, busy_timeout_ms=busy_timeout_ms, wal=not memory,
                          auto_checkpoint=not background_checkpoint)
    else:
        raise StoreError(
            f"unsupported database {u.drivername!r}: esource stores data in SQLite (sqlite:///file.db) "
            "or PostgreSQL (postgresql+psycopg://user@host/db)"
        )

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        read_only = bool(conn.get_execution_options().get(READ_ONLY_OPTION, False))
        if conn.dialect.name == "sqlite":
            if read_only:
                conn.exec_driver_sql("BEGIN DEFERRED")
                return
            dbapi = conn.connection.dbapi_connection
            _take_gate(dbapi, busy_timeout_ms / 1000.0)
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                if isinstance(dbapi, _GatedConnection):
                    dbapi._esource_release()
                raise
        elif read_only:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    return engine


def sqlite_file(url: URL) -> str | None:
    """The file of a SQLite URL; None for an in-memory database (or a URL of another backend)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") \
            or url.query.get("mode") == "memory":
        return None
    return url.database


def _configure_sqlite(engine: Engine, *, busy_timeout_ms: int, wal: bool, auto_checkpoint: bool = True) -> None:
    gate = threading.Lock()

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Stop pysqlite from issuing BEGIN/COMMIT on its own: the "begin" listener does it.
        dbapi_connection.isolation_level = None
        if isinstance(dbapi_connection, _GatedConnection):
            dbapi_connection._esource_gate = gate
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            if wal and not auto_checkpoint:
                cursor.execute("PRAGMA wal_autocheckpoint = 0")
                cursor.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        finally:
            cursor.close()


#: How often the background checkpointer copies the WAL into the database file (seconds).
CHECKPOINT_INTERVAL_S = 1.0
#: The WAL file is truncated back to this size after a checkpoint that emptied it (bytes).
WAL_SIZE_LIMIT = 64 * 1024 * 1024


class WalCheckpointer:
    """Checkpoints a SQLite database's WAL from a thread of its own. Why: by default the connection
    whose commit takes the WAL past 1,000 pages copies it into the database file there and then,
    inside that commit, and the intake's commits are the large ones: a Kafka batch of 2,000
    events writes about 80 MB, and the checkpoint took ~0.5 s of the intake thread per batch. Here
    the copy happens beside it, on the other core (SQLite runs without the interpreter lock), while
    the engine's connections are told never to checkpoint (`make_engine(background_checkpoint=True)`).

    PASSIVE checkpoints wait for no one: frames still needed by a reader stay until a later pass.
    The thread holds no connection between passes, stops with `stop()` (one last pass) or when the
    database file is gone."""

    def __init__(self, path: str, *, interval: float | None = None) -> None:
        self.path = path
        self.interval = CHECKPOINT_INTERVAL_S if interval is None else interval
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WalCheckpointer:
        self._thread = threading.Thread(target=self._run, name="esource-wal-checkpoint", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def checkpoint(self) -> tuple[int, int, int] | None:
        """One PASSIVE pass: (busy, frames in the WAL, frames checkpointed), None when the database
        file is gone."""
        if not os.path.exists(self.path):
            return None
        db = sqlite3.connect(self.path, timeout=DEFAULT_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        try:
            row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            db.close()
        self.passes += 1
        return tuple(row) if row else None  # type: ignore[return-value]

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            try:
                if self.checkpoint() is None:
                    return
            except Exception as exc:  # e.g. disk full: retried at the next pass, the service goes on
                log.warning("WAL checkpoint failed", extra={"reason": type(exc).__name__})
            if stopping:
                return

