"""`SqlEdcKeyMap` (esource/store/edc_key_map.py) and migration 0003, on SQLite and PostgreSQL (when
ESOURCE_TEST_POSTGRES_DSN is set): keys allocated 1, 2, 3 ... per scope, stable across processes,
unique both ways, race-safe. (Kept beside the conflict tests: tests/store belongs to the store's
owners; the migration-vs-model comparison there covers the new table.)"""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from esource.domain.ports import EdcKeyMap, InMemoryEdcKeyMap
from esource.store import SqlEdcKeyMap, Store, make_engine, upgrade
from esource.store.migrate import alembic_config
from esource.store.schema import EdcKeyMapRow

RAVE, REDCAP = "rave", "redcap"
S = ("CV01", "001-0001")


def test_keys_are_allocated_in_first_asked_order_per_scope_and_are_stable(store):
    km: EdcKeyMap = SqlEdcKeyMap(store)
    assert [km.edc_key(RAVE, *S, "SE.UNSCHED", d) for d in ("2024-06-03", "2024-05-20", "2024-06-03")] == [1, 2, 1]
    assert km.edc_key(RAVE, *S, "IG.VS", "WEIGHT") == 1  # another scope starts at 1
    assert km.edc_key(REDCAP, *S, "SE.UNSCHED", "2024-05-20") == 1  # another connector too
    assert km.edc_key(RAVE, "CV01", "001-0002", "SE.UNSCHED", "2024-05-20") == 1  # another subject too
    assert km.esource_key(RAVE, *S, "SE.UNSCHED", 2) == "2024-05-20"
    assert km.esource_key(RAVE, *S, "SE.UNSCHED", 3) is None
    # a new map (another process) finds the same keys in the database
    other = SqlEdcKeyMap(store.uow)
    assert other.edc_key(RAVE, *S, "SE.UNSCHED", "2024-05-20") == 2
    assert other.edc_key(RAVE, *S, "SE.UNSCHED", "2024-07-01") == 3
    assert other.esource_key(RAVE, *S, "SE.UNSCHED", 1) == "2024-06-03"
    with store.uow(read_only=True) as uow:
        assert uow.find_edc_key(RAVE, *S, "SE.UNSCHED", "2024-07-01") == 3
        assert uow.find_edc_key(RAVE, *S, "SE.UNSCHED", "2099-01-01") is None


def test_it_answers_like_the_in_memory_map():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        store = Store(f"sqlite:///{d}/k.db")
        try:
            sql, mem = SqlEdcKeyMap(store), InMemoryEdcKeyMap()
            asks = [(RAVE, "IG.MH", str(k)) for k in (3, 1, 2, 1, 7)] + [(REDCAP, "IG.MH", "1")]
            assert [sql.edc_key(c, *S, sc, k) for c, sc, k in asks] == [mem.edc_key(c, *S, sc, k) for c, sc, k in asks]
            assert [sql.esource_key(RAVE, *S, "IG.MH", n) for n in range(1, 6)] == \
                   [mem.esource_key(RAVE, *S, "IG.MH", n) for n in range(1, 6)]
        finally:
            store.dispose()


def test_the_table_is_unique_both_ways(store):
    SqlEdcKeyMap(store).edc_key(RAVE, *S, "IG.VS", "WEIGHT")
    t = EdcKeyMapRow.__table__
    now = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    for esource_key, edc_key in (("WEIGHT", 2), ("HEIGHT", 1)):  # same esource key again / same EDC key again
        with store.uow() as uow, pytest.raises(IntegrityError):
            uow.session.execute(t.insert().values(connector=RAVE, study_oid=S[0], subject_key=S[1], scope="IG.VS",
                                                  esource_key=esource_key, edc_key=edc_key, created_at=now))


def test_allocation_is_race_safe_across_stores(store, store_url):
    """Two processes (two Stores, two key maps, no shared cache) allocating for one scope at once:
    one key per esource key, no EDC key twice, no gaps."""
    rounds = 15
    second = Store(store_url, busy_timeout_ms=10_000)
    maps = {"a": SqlEdcKeyMap(store), "b": SqlEdcKeyMap(second)}
    got: dict[str, dict[str, int]] = {"a": {}, "b": {}}
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            start.wait(10)
            for n in range(rounds):
                for k in (f"{name}-{n}", f"shared-{n}"):
                    got[name][k] = maps[name].edc_key(RAVE, *S, "SE.UNSCHED", k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        second.dispose()
    assert not errors, errors
    for n in range(rounds):
        assert got["a"][f"shared-{n}"] == got["b"][f"shared-{n}"]
    allocated = got["a"] | got["b"]
    assert len(allocated) == 3 * rounds
    assert sorted(allocated.values()) == list(range(1, 3 * rounds + 1))


def test_migration_0003_upgrades_a_0002_database_with_queued_rows_and_downgrades(store_url):
    engine = make_engine(store_url)
    try:
        upgrade(engine, "0002")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO outbox (study_oid, subject_key, sequence, site_oid, odm, item_count, "
                              "status, attempts, created_at) VALUES ('CV01', '001-0001', 1, 'SITE.001', :odm, 1, "
                              "'pending', 0, :now)"),
                         {"odm": b"<ODM/>", "now": dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)})
        upgrade(engine)
        with engine.connect() as conn:
            assert "edc_key_map" in inspect(conn).get_table_names()
        store = Store(store_url)
        try:
            with store.uow(read_only=True) as uow:
                [row] = uow.outbox_entries()
            assert row.previous_values == {}  # queued before 0003: not conflict-checked
        finally:
            store.dispose()
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
        with engine.connect() as conn:
            insp = inspect(conn)
            assert "edc_key_map" not in insp.get_table_names()
            assert "previous_values" not in {c["name"] for c in insp.get_columns("outbox")}
            assert conn.execute(text("SELECT COUNT(*) FROM outbox")).scalar() == 1  # the queued row survives
    finally:
        engine.dispose()
