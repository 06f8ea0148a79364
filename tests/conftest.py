"""Shared fixtures. Store tests run on SQLite (a temporary file) and, when
ESOURCE_TEST_POSTGRES_DSN is set (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test), on
PostgreSQL too, each test in a fresh schema (`esource_test_<random>`) dropped afterwards.

The PostgreSQL URL carries the schema as `?options=-csearch_path=<schema>` (psycopg passes it to the
server on connect), so `store_url` is a plain URL any code under test can open.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from esource.store import Store, make_engine

POSTGRES_DSN_ENV = "ESOURCE_TEST_POSTGRES_DSN"

_BACKENDS: list[Any] = ["sqlite"]
if os.environ.get(POSTGRES_DSN_ENV):
    _BACKENDS.append(pytest.param("postgresql", marks=pytest.mark.postgres))


class FakeClock:
    """A clock tests move by hand (timezone-aware UTC)."""

    def __init__(self, start: dt.datetime = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)) -> None:
        self.current = start

    def now(self) -> dt.datetime:
        return self.current

    def advance(self, **delta: float) -> dt.datetime:
        self.current += dt.timedelta(**delta)
        return self.current


@pytest.fixture(params=_BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'esource.db'}"
        return
    dsn = os.environ[POSTGRES_DSN_ENV]
    schema = f"esource_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(dsn)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = make_url(dsn).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def clean_esource_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ESOURCE_* variable of the developer's shell reaches the settings under test (the test
    database's DSN stays)."""
    for k in list(os.environ):
        if k.startswith("ESOURCE_") and k != POSTGRES_DSN_ENV:
            monkeypatch.delenv(k)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    """A migrated store on `store_url`, with the test's `clock`."""
    s = Store(store_url, clock=clock, busy_timeout_ms=10_000)
    try:
        yield s
    finally:
        s.dispose()
