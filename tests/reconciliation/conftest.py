"""Fixtures of the reconciliation tests: the CV01 study, and a Feeder writing real discrepancies, item
state and outbox rows into the `store` fixture (SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN
is set)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from recon_helpers import Feeder, reconciliation
from esource.reconciliation.policy import ReviewPolicies
from esource.study.study import load_study


@pytest.fixture(scope="session")
def cv01() -> Any:
    return load_study("CV01")


@pytest.fixture
def feeder(cv01, store, clock) -> Feeder:
    return Feeder(cv01, store, clock, ["001-0001", "002-0001"], policies=ReviewPolicies(store.uow))


@pytest.fixture
def recon(feeder):
    return reconciliation(feeder)


@pytest.fixture
def sandbox() -> Iterator[str]:
    """esource's sandbox EDC (in memory) served on a loopback port; yields its URL."""
    from esource.connectors.sandbox_edc import create_sandbox_app
    from esource.services.server import ThreadedServer, free_port

    app = create_sandbox_app(None)
    server = ThreadedServer(app, "127.0.0.1", free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        app.state.sandbox.close()


@pytest.fixture
def connector(sandbox: str) -> Iterator[Any]:
    from esource.connectors.sandbox import SandboxConnector

    with SandboxConnector(sandbox, timeout=10) as c:
        yield c
