"""Fixtures for the delivery tests: the CV01 study, a sandbox EDC on loopback (fresh, in memory, per
test), and a Feeder writing real outbox rows into the `store` fixture (SQLite, and PostgreSQL when
ESOURCE_TEST_POSTGRES_DSN is set)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from delivery_helpers import Feeder, SandboxServer
from esource.connectors.sandbox_edc import create_sandbox_app
from esource.study.study import load_study


@pytest.fixture(scope="session")
def cv01():
    return load_study("CV01")


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    app = create_sandbox_app(None)
    server = SandboxServer(app).start()
    try:
        yield server
    finally:
        server.stop()
        app.state.sandbox.close()


@pytest.fixture
def feeder(cv01, store, clock) -> Feeder:
    return Feeder(cv01, store, clock, ["001-0001", "001-0002"])
