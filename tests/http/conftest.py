"""Fixtures of the HTTP API tests: a Container built by `bootstrap.build` on the `store_url` database
(SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set) with an ODM file connector, subjects
enrolled, and a TestClient on `create_app(container)`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # starlette >= 1.x warns about httpx once, on import: keep the summary clean
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

from http_helpers import ENROLLMENTS, PSEUDONYM_KEY, SECRET  # noqa: E402

from esource.adapters.http import create_app  # noqa: E402
from esource.bootstrap import Container, build  # noqa: E402
from esource.connectors.odm_file import OdmFileConnector  # noqa: E402
from esource.services.process import enroll  # noqa: E402
from esource.settings import load_settings  # noqa: E402


@pytest.fixture
def make_container(store_url: str, tmp_path: Path) -> Iterator[Callable[..., Container]]:
    """make(mode="demo", max_body_bytes=2 MiB, enrolled=True) -> a Container (closed after the test)."""
    made: list[Container] = []

    def make(*, mode: str = "demo", max_body_bytes: int = 2 * 1024 * 1024, enrolled: bool = True,
             **overrides: Any) -> Container:
        extra: dict[str, Any] = {}
        if mode != "demo":
            extra = {"auth_secret": SECRET, "pseudonym_key": PSEUDONYM_KEY,
                     "edc": {"connector": "odm_file", "folder": str(tmp_path / "edc")}}
        extra.update(overrides)
        settings = load_settings(mode=mode, database_url=store_url, http={"max_body_bytes": max_body_bytes}, **extra)
        c = build(settings, connectors={"CV01": OdmFileConnector(tmp_path / f"odm{len(made)}")})
        made.append(c)
        if enrolled:
            enroll(c.store.uow, ENROLLMENTS)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def container(make_container: Callable[..., Container]) -> Container:
    return make_container()


@pytest.fixture
def client(container: Container) -> Iterator[TestClient]:
    with TestClient(create_app(container)) as c:
        yield c
