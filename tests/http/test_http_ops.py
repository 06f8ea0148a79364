"""Operations (/health, /ready, /metrics) and bearer authentication outside demo mode."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from http_helpers import CY_FILE, FHIR, SECRET, LogCapture, assert_outcome, metric

from esource.adapters.http import create_app, run_http


class FakeKafka:
    def __init__(self, ready: Any) -> None:
        self._ready = ready

    def ready(self) -> bool:
        if isinstance(self._ready, Exception):
            raise self._ready
        return self._ready


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"} and r.headers["X-Request-ID"]


def test_ready_when_the_database_answers_and_the_studies_are_loaded(client):
    r = client.get("/ready")
    assert r.status_code == 200
    body = r.json()
    assert {k: body[k] for k in ("status", "database", "studies")} == {"status": "ready", "database": "ok",
                                                                       "studies": ["CV01"]}
    assert [(e["studies"], e["state"]) for e in body["edc"]] == [(["CV01"], "closed")]


def test_ready_shows_an_edc_refusing_credentials_without_becoming_unready(client, container, monkeypatch):
    """An EDC down is the dispatcher's business (transactions wait): the service stays ready, says so."""
    states = [{"connector": "rave", "studies": ["CV01"], "state": "auth_failed", "until": None,
               "reason": "RWS00008 Invalid credentials", "since": "2025-03-01T09:00:00+00:00"}]
    monkeypatch.setattr(container.dispatcher, "endpoint_states", lambda: states)
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert r.json()["edc"] == [{"connector": "rave", "studies": ["CV01"], "state": "auth_failed", "until": None}]


@pytest.mark.parametrize("kafka,status,shown", [(FakeKafka(True), 200, "ok"), (FakeKafka(False), 503, "not ready"),
                                                (FakeKafka(RuntimeError("broker gone")), 503, "not ready")])
def test_ready_includes_the_kafka_intake(client, container, kafka, status, shown):
    container.extras["kafka"] = kafka
    r = client.get("/ready")
    assert r.status_code == status and r.json()["kafka"] == shown
    assert r.json()["status"] == ("ready" if status == 200 else "not ready")


def test_not_ready_when_the_database_is_unreachable(client, container, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def broken(*a: Any, **k: Any) -> Any:
        raise OperationalError("SELECT 1", {}, Exception("password=hunter2 refused"))

    monkeypatch.setattr(container.store, "uow", broken)
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "not ready"
    assert r.json()["database"] == "unreachable (OperationalError)" and "hunter2" not in r.text
    assert client.get("/health").status_code == 200  # alive all the same
    m = client.get("/metrics")  # the other metrics are still served
    assert m.status_code == 200 and "esource_messages_consumed_total" in m.text


def test_metrics_are_prometheus_text_with_a_fresh_outbox_depth(client, container):
    r = client.post("/fhir", content=CY_FILE.read_bytes(), headers=FHIR)
    assert r.status_code == 202
    container.metrics.outbox_depth.labels("pending").set(0)  # stale: the scrape refreshes it from the store
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert "# TYPE esource_outbox_depth gauge" in text
    assert metric(text, "esource_outbox_depth", status="pending") == 1
    assert metric(text, "esource_outbox_depth", status="failed") == 0
    assert metric(text, "esource_fhir_resources_total", channel="http") == 62
    assert metric(text, "esource_messages_consumed_total", channel="http", outcome="processed") == 1
    assert metric(text, "esource_items_mapped_total", study="CV01", transaction_type="Insert") > 50
    assert "esource_resources_not_enrolled_total" in text and "esource_dead_letters_total" in text


# ------------------------------------------------------------------------------------------ auth


@pytest.fixture
def prod(make_container):
    c = make_container(mode="production")
    with TestClient(create_app(c)) as cl:
        yield c, cl


AUTH = {"Authorization": f"Bearer {SECRET}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRET}"},
                                     {"Authorization": f"Bearer {SECRET}x"}, {"Authorization": f"Bearer {SECRET[:-1]}"},
                                     {"Authorization": "Bearer"}, {"Authorization": SECRET}])
def test_production_mode_refuses_a_missing_or_wrong_token(prod, headers):
    c, cl = prod
    with LogCapture() as logs:
        for method, path, kw in [("POST", "/fhir", {"content": CY_FILE.read_bytes(), "headers": {**FHIR, **headers}}),
                                 ("POST", "/fhir/$process-message", {"content": b"{}", "headers": {**FHIR, **headers}}),
                                 ("GET", "/studies/CV01/subjects", {"headers": headers}),
                                 ("POST", "/studies/CV01/subjects", {"json": {}, "headers": headers}),
                                 ("PUT", "/studies/CV01/subjects/001-0001", {"json": {}, "headers": headers}),
                                 ("GET", "/openapi.json", {"headers": headers}),
                                 ("GET", "/nope", {"headers": headers})]:
            r = cl.request(method, path, **kw)
            assert_outcome(r, 401, code="login")
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert SECRET not in r.text
    assert SECRET not in logs.text
    with c.store.uow(read_only=True) as uow:
        assert uow.outbox_entries(statuses=None) == [] and uow.dead_letters(statuses=None) == []


def test_production_mode_serves_the_right_token(prod):
    c, cl = prod
    with LogCapture() as logs:
        r = cl.post("/fhir", content=CY_FILE.read_bytes(), headers={**FHIR, **AUTH})
        assert_outcome(r, 202)
        assert cl.get("/studies/CV01/subjects", headers=AUTH).status_code == 200
        assert cl.get("/studies/CV01/subjects", headers={"Authorization": f"bearer  {SECRET} "}).status_code == 200
        new = {"subject_key": "002-0300", "site_oid": "SITE.002", "identifiers": [{"system": "urn:x", "value": "1"}],
               "consent": "2024-04-10", "day1": "2024-05-01"}
        assert cl.post("/studies/CV01/subjects", json=new, headers=AUTH).status_code == 201
        assert cl.get("/openapi.json", headers=AUTH).status_code == 200
        # health, readiness and metrics need no token
        assert cl.get("/health").status_code == 200
        assert cl.get("/ready").status_code == 200
        m = cl.get("/metrics")
        assert m.status_code == 200 and SECRET not in m.text
    assert SECRET not in logs.text


def test_demo_mode_needs_no_token(client):
    assert client.get("/studies/CV01/subjects").status_code == 200


def test_run_http_serves_the_app_with_uvicorn(container, monkeypatch):
    import uvicorn

    seen: dict[str, Any] = {}

    def fake_run(self: Any, sockets: Any = None) -> None:
        seen["config"] = self.config

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    run_http(container, "127.0.0.1", 8181)
    config = seen["config"]
    assert (config.host, config.port) == ("127.0.0.1", 8181) and config.access_log is False
    assert config.app.state.container is container
