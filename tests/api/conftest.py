"""Fixtures of the role-based API tests: a production-mode Container (bootstrap.build) on `store_url`
(SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set) with OIDC configured against a locally
generated RSA key, two subjects at two sites whose patient summaries went through POST /fhir, one user
and API token per role, and a TestClient on create_app(container)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

from api_helpers import (  # noqa: E402
    ARLA_FILE,
    AUDIENCE,
    CY_FILE,
    ENROLLMENTS,
    FHIR,
    ISSUER,
    PSEUDONYM_KEY,
    SECRET,
    World,
    create_users,
    new_rsa_key,
    write_jwks,
)

from esource.adapters.http import create_app  # noqa: E402
from esource.bootstrap import Container, build  # noqa: E402
from esource.connectors.odm_file import OdmFileConnector  # noqa: E402
from esource.services.process import enroll  # noqa: E402
from esource.settings import load_settings  # noqa: E402


@pytest.fixture(scope="session")
def rsa_key() -> Any:
    return new_rsa_key()


@pytest.fixture
def make_world(store_url: str, tmp_path: Path, clock: Any, rsa_key: Any) -> Iterator[Callable[..., World]]:
    """make(mode="production", data=True, users=True, **settings overrides) -> World (closed afterwards)."""
    made: list[tuple[Container, Any]] = []

    def make(*, mode: str = "production", data: bool = True, users: bool = True, **overrides: Any) -> World:
        jwks = write_jwks(tmp_path / f"jwks{len(made)}.json", rsa_key)
        extra: dict[str, Any] = {"auth": {"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE,
                                          "oidc_jwks_file": str(jwks)}}
        if mode != "demo":
            extra.update(auth_secret=SECRET, pseudonym_key=PSEUDONYM_KEY,
                         edc={"connector": "odm_file", "folder": str(tmp_path / "edc")})
        extra.update(overrides)
        settings = load_settings(mode=mode, database_url=store_url, **extra)
        c = build(settings, clock=clock, connectors={"CV01": OdmFileConnector(tmp_path / f"odm{len(made)}")})
        client = TestClient(create_app(c))
        client.__enter__()
        made.append((c, client))
        enroll(c.store.uow, ENROLLMENTS)
        world = World(container=c, client=client, clock=clock, key=rsa_key)
        if data:
            for i, f in enumerate((CY_FILE, ARLA_FILE)):
                auth = {"Authorization": f"Bearer {SECRET}"} if mode != "demo" else {}
                r = client.post("/fhir", content=f.read_bytes(), headers={**FHIR, **auth, "X-Request-ID": f"seed-{i}"})
                assert r.status_code == 202, r.text
                clock.advance(hours=1)
        if users:
            from esource.api.auth import get_authenticator

            world.tokens = create_users(get_authenticator(c))
        return world

    yield make
    for c, client in made:
        client.__exit__(None, None, None)
        c.close()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()
