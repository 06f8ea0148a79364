"""Engine settings: SQLite pragmas, PostgreSQL driver, UTC timestamps, read-only units of work."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import select, text

from esource.domain.model import Enrollment
from esource.store import Store, StoreError, make_engine
from esource.store.schema import IntakeRow


def _enrollment(subject_key: str = "001-0001") -> Enrollment:
    return Enrollment(
        study_oid="CV01",
        subject_key=subject_key,
        site_oid="SITE.001",
        identifiers=(("urn:mrn:a", f"MRN-{subject_key}"),),
        consent_date=dt.date(2025, 1, 10),
        day1=dt.date(2025, 1, 15),
    )


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'e.db'}", busy_timeout_ms=1234)
    try:
        with engine.connect() as conn:
            pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
            assert pragma("journal_mode") == "wal"
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == 1234
            assert pragma("synchronous") == 1  # NORMAL
    finally:
        engine.dispose()


def test_postgresql_urls_use_psycopg_3():
    engine = make_engine("postgresql://someone@localhost:5432/esource")
    try:
        assert engine.url.drivername == "postgresql+psycopg"
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_other_databases_are_refused():
    with pytest.raises(StoreError, match="SQLite"):
        make_engine("mysql://someone@localhost/esource")


def test_in_memory_sqlite_is_shared_by_units_of_work():
    store = Store("sqlite://")
    try:
        with store.uow() as uow:
            uow.add_enrollment(_enrollment())
            uow.commit()
        with store.uow() as uow:
            assert [e.subject_key for e in uow.enrollments("CV01")] == ["001-0001"]
    finally:
        store.dispose()


def test_timestamps_are_stored_as_utc_and_come_back_timezone_aware(store_url, clock):
    paris = dt.timezone(dt.timedelta(hours=2))
    clock.current = dt.datetime(2025, 6, 1, 12, 30, tzinfo=paris)
    store = Store(store_url, clock=clock)
    try:
        with store.uow() as uow:
            uow.mark_intake("k1")
            uow.commit()
        with store.uow(read_only=True) as uow:
            received_at = uow.session.execute(select(IntakeRow.received_at)).scalar_one()
            raw = uow.session.execute(text("SELECT received_at FROM intake")).scalar_one()
        assert received_at == dt.datetime(2025, 6, 1, 10, 30, tzinfo=dt.timezone.utc)
        assert received_at.tzinfo is dt.timezone.utc
        if store.engine.dialect.name == "sqlite":  # stored as naive UTC text
            assert str(raw).startswith("2025-06-01 10:30:00")
        else:  # timestamptz: the same instant
            assert raw == received_at
    finally:
        store.dispose()


def test_a_naive_clock_is_refused(store_url):
    class NaiveClock:
        def now(self) -> dt.datetime:
            return dt.datetime(2025, 6, 1, 12, 0)

    store = Store(store_url, clock=NaiveClock())
    try:
        with store.uow() as uow, pytest.raises(StoreError, match="naive"):
            uow.mark_intake("k1")
    finally:
        store.dispose()


def test_read_only_units_of_work_refuse_writes(store):
    with store.uow(read_only=True) as uow:
        assert uow.enrollments("CV01") == []
        if store.engine.dialect.name == "postgresql":  # the database enforces it too
            assert uow.session.execute(text("SHOW transaction_read_only")).scalar_one() == "on"
        with pytest.raises(StoreError, match="read-only"):
            uow.add_enrollment(_enrollment())
        with pytest.raises(StoreError, match="read-only"):
            uow.repeat_keys.key_for("CV01", "001-0001", "F.MH", "x")


def test_readers_are_not_blocked_by_an_open_writer(store):
    """A writer holding its transaction open does not stop a read-only unit of work (WAL + BEGIN
    DEFERRED on SQLite), and the reader does not see the uncommitted write."""
    with store.uow() as uow:
        uow.add_enrollment(_enrollment("001-0001"))
        uow.commit()
    writing = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with store.uow() as uow:
            uow.add_enrollment(_enrollment("001-0002"))
            writing.set()
            release.wait(10)
            uow.commit()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(10)
        started = time.monotonic()
        with store.uow(read_only=True) as uow:
            seen = [e.subject_key for e in uow.enrollments("CV01")]
        assert time.monotonic() - started < 3
        assert seen == ["001-0001"]
    finally:
        release.set()
        thread.join(10)
    with store.uow(read_only=True) as uow:
        assert [e.subject_key for e in uow.enrollments("CV01")] == ["001-0001", "001-0002"]


def test_sqlite_writers_of_one_process_queue_on_the_gate_and_every_outcome_gives_it_back(tmp_path):
    """Threads writing one SQLite file wait for each other on the in-process gate (not SQLite's
    polling busy handler): a commit, a rollback, a failed statement and a closed connection each
    give it back, so no writer is left waiting (a leak would leave the last one stuck for the whole
    busy timeout, here 60 s against the test's 30 s)."""
    s = Store(f"sqlite:///{tmp_path / 'gate.db'}", busy_timeout_ms=60_000)
    raw = s.engine.raw_connection()
    gate = raw.dbapi_connection._esource_gate
    raw.close()
    try:
        with s.uow() as uow:  # a rollback: the unit of work ends without commit
            uow.add_enrollment(_enrollment("001-0000"))
            assert gate.locked()
        assert not gate.locked()
        with s.uow() as uow:
            uow.add_enrollment(_enrollment("001-0001"))
            uow.commit()
        assert not gate.locked()
        with pytest.raises(Exception, match="no such table"):  # a failing statement, then rollback
            with s.uow() as uow:
                uow.session.execute(text("INSERT INTO no_such_table VALUES (1)"))
        assert not gate.locked()
        with s.uow(read_only=True) as uow:
            uow.enrollments("CV01")
            assert not gate.locked()
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def writer(n: int) -> None:
            try:
                start.wait(10)
                for i in range(15):
                    with s.uow() as uow:
                        uow.add_enrollment(_enrollment(f"{n}{i:02d}-0000"))
                        uow.commit()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a writer is stuck: the gate leaked"
        assert not errors, errors
        s.engine.dispose()  # closing pooled connections gives nothing back twice
        with s.uow() as uow:
            assert len(uow.enrollments("CV01")) == 1 + 4 * 15
            uow.add_enrollment(_enrollment("999-9999"))
            uow.commit()
    finally:
        s.dispose()


def test_a_reader_does_not_take_the_sqlite_writer_gate(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'gate.db'}", busy_timeout_ms=60_000)
    try:
        with s.uow() as writer:
            writer.add_enrollment(_enrollment("001-0001"))  # holds the gate until commit
            done = threading.Event()

            def read() -> None:
                with s.uow(read_only=True) as uow:
                    uow.enrollments("CV01")
                done.set()

            t = threading.Thread(target=read)
            t.start()
            assert done.wait(20), "a read-only unit of work waited for the writer"
            t.join(5)
            writer.commit()
    finally:
        s.dispose()


def _write_pages(store: Store, megabytes: int) -> None:
    """One write transaction of about `megabytes` MB (well past SQLite's 1,000-page auto-checkpoint)."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS filler (x BLOB)")
        conn.exec_driver_sql(f"INSERT INTO filler SELECT randomblob(4096) FROM "
                             f"(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {megabytes * 256}) "
                             "SELECT i FROM n)")


def test_a_sqlite_store_checkpoints_its_wal_beside_the_writers_not_in_their_commits(tmp_path, monkeypatch):
    import esource.store.engine as engine_module

    monkeypatch.setattr(engine_module, "CHECKPOINT_INTERVAL_S", 3600.0)  # no pass during the test
    path = tmp_path / "e.db"
    store = Store(f"sqlite:///{path}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        before = path.stat().st_size
        _write_pages(store, 8)
        # the commit left its 8 MB in the WAL (SQLite's default would have copied it into the file)
        assert path.stat().st_size - before < 1024 * 1024
        busy, frames, done = store._checkpointer.checkpoint()
        assert busy == 0 and frames == done >= 2048
        assert path.stat().st_size - before >= 8 * 1024 * 1024
    finally:
        store.dispose()


def test_the_checkpointer_thread_runs_by_itself_and_stops_with_the_store(tmp_path, monkeypatch):
    import esource.store.engine as engine_module

    monkeypatch.setattr(engine_module, "CHECKPOINT_INTERVAL_S", 0.05)
    path = tmp_path / "e.db"
    store = Store(f"sqlite:///{path}")
    checkpointer = store._checkpointer
    thread = checkpointer._thread
    try:
        before = path.stat().st_size
        _write_pages(store, 4)
        deadline = time.monotonic() + 10
        while path.stat().st_size - before < 4 * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_size - before >= 4 * 1024 * 1024
    finally:
        store.dispose()
    assert checkpointer.passes >= 1 and not thread.is_alive()


def test_an_in_memory_store_has_no_checkpointer():
    store = Store("sqlite://")
    try:
        assert store._checkpointer is None
    finally:
        store.dispose()
