"""FHIR HTTP intake and operations API, on SQLite and PostgreSQL (when ESOURCE_TEST_POSTGRES_DSN is set)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from esource.adapters.http import create_app
from esource.bootstrap import build
from esource.connectors.odm_file import OdmFileConnector
from esource.domain.model import Enrollment
from esource.services.process import enroll
from esource.settings import load_settings

DATA = Path(__file__).resolve().parents[1] / "data"
CY_ID = ("urn:oid:2.16.840.1.113883.3.9143.2.1.5", "CY/GHS-MI-1111")
FHIR = {"Content-Type": "application/fhir+json"}
SECRET = "s" * 40


def make_container(store_url, tmp_path, **kw):
    settings = load_settings(mode=kw.pop("mode", "demo"), database_url=store_url,
                             http={"max_body_bytes": kw.pop("max_body_bytes", 2 * 1024 * 1024)}, **kw)
    c = build(settings, connectors={"CV01": OdmFileConnector(tmp_path / "edc")})
    import datetime as dt
    enroll(c.store.uow, [Enrollment("CV01", "001-0001", "SITE.001", (CY_ID,), dt.date(2020, 3, 10), dt.date(2020, 4, 6))])
    return c


@pytest.fixture
def container(store_url, tmp_path):
    c = make_container(store_url, tmp_path)
    yield c
    c.close()


@pytest.fixture
def client(container):
    with TestClient(create_app(container)) as cl:
        yield cl


def outbox(container):
    with container.store.uow(read_only=True) as uow:
        return uow.outbox_entries(statuses=None)


def dead_letters(container):
    with container.store.uow(read_only=True) as uow:
        return uow.dead_letters()


def assert_outcome(r, status, code=None, contains=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"]
    if code:
        assert any(i["code"] == code for i in body["issue"]), body
    if contains:
        assert any(contains in i["diagnostics"] for i in body["issue"]), body
    return body


def test_post_ips_bundle_is_accepted_and_mapped(client, container):
    r = client.post("/fhir", content=(DATA / "ips" / "CY_249867.json").read_bytes(), headers=FHIR)
    body = assert_outcome(r, 202)
    accepted = [i["diagnostics"] for i in body["issue"] if i["severity"] == "information"]
    assert "accepted Patient/249867" in accepted and len(accepted) == 62
    assert r.headers["X-Intake-Key"].startswith("http:")
    rows = outbox(container)
    assert len(rows) == 1 and rows[0].subject_key == "001-0001" and rows[0].item_count > 50


def test_same_request_id_is_idempotent(client, container):
    data = (DATA / "ips" / "CY_249867.json").read_bytes()
    h = {**FHIR, "X-Request-ID": "req-42"}
    assert client.post("/fhir", content=data, headers=h).status_code == 202
    r = client.post("/fhir", content=data, headers=h)
    assert_outcome(r, 202, code="duplicate")
    assert len(outbox(container)) == 1


@pytest.mark.parametrize("body,needle", [
    (b'{"resourceType": "Bundle", "type": "collection", "entry": [', "not valid JSON"),
    (b'{"hello": 1}', "resourceType"),
    (b'{"resourceType": "Banana"}', "not a FHIR R4 resource type"),
    (b'\xff\xfe{"resourceType": "Patient"}', "UTF-8"),
    (b'{"resourceType": "Patient", "x": ' + b'[' * 200 + b']' * 200 + b'}', "nested deeper"),
])
def test_input_that_is_not_fhir_is_400_and_dead_lettered(client, container, body, needle):
    r = client.post("/fhir", content=body, headers=FHIR)
    assert_outcome(r, 400, code="structure", contains=needle)
    (dl,) = dead_letters(container)
    assert dl.payload == body and needle in dl.reason
    # the service keeps serving
    assert client.post("/fhir", content=(DATA / "ips" / "CY_249867.json").read_bytes(), headers=FHIR).status_code == 202


def test_invalid_single_resource_is_422_naming_the_element(client, container):
    obs = {"resourceType": "Observation", "id": "o1", "status": "bogus",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"identifier": {"system": CY_ID[0], "value": CY_ID[1]}},
           "effectiveDateTime": "2020-04-06T10:00:00+02:00", "valueQuantity": {"value": 70, "unit": "/min"}}
    r = client.post("/fhir", content=orjson.dumps(obs), headers=FHIR)
    body = assert_outcome(r, 422, code="invalid")
    assert any("status" in (i.get("expression") or [""])[0] for i in body["issue"])
    (dl,) = dead_letters(container)
    assert "status" in dl.reason and outbox(container) == []


def test_invalid_entry_in_a_bundle_does_not_block_the_rest(client, container):
    doc = orjson.loads((DATA / "ips" / "CY_249867.json").read_bytes())
    doc["entry"].append({"fullUrl": "urn:uuid:broken", "resource": {"no": "resourceType"}})
    r = client.post("/fhir", content=orjson.dumps(doc), headers=FHIR)
    body = assert_outcome(r, 202)
    assert any(i["severity"] == "warning" for i in body["issue"])
    assert len(outbox(container)) == 1


def test_body_over_the_limit_is_413_and_recorded(store_url, tmp_path):
    c = make_container(store_url, tmp_path, max_body_bytes=4096)
    try:
        with TestClient(create_app(c)) as cl:
            big = orjson.dumps({"resourceType": "Basic", "id": "x" * 10_000})
            assert_outcome(cl.post("/fhir", content=big, headers=FHIR), 413, contains="exceeds the limit")

            def chunks():  # chunked transfer: no Content-Length, the limit holds while streaming
                for _ in range(10):
                    yield b" " * 1000
            assert_outcome(cl.post("/fhir", content=chunks(), headers=FHIR), 413)
            dls = dead_letters(c)
            assert len(dls) == 2 and all(d.payload == b"" and "exceeds" in d.reason for d in dls)
            ok = cl.post("/fhir", content=b'{"resourceType": "Patient", "id": "p"}', headers=FHIR)
            assert ok.status_code == 202
    finally:
        c.close()


def test_wrong_media_type_is_415(client, container):
    assert_outcome(client.post("/fhir", content=b"<Patient/>", headers={"Content-Type": "application/xml"}), 415)


def test_process_message_needs_a_message_bundle(client, container):
    assert_outcome(client.post("/fhir/$process-message", content=(DATA / "ips" / "CY_249867.json").read_bytes(),
                               headers=FHIR), 422, contains="message")
    msg = {"resourceType": "Bundle", "type": "message", "entry": [
        {"fullUrl": "urn:uuid:h", "resource": {"resourceType": "MessageHeader", "id": "h",
                                               "eventCoding": {"code": "vitals"}, "source": {"endpoint": "urn:ehr"}}},
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p",
                                               "identifier": [{"system": CY_ID[0], "value": CY_ID[1]}]}},
        {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation", "id": "o", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}, "subject": {"reference": "urn:uuid:p"},
            "effectiveDateTime": "2020-04-06T09:00:00+02:00",
            "valueQuantity": {"value": 64, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}}]}
    assert_outcome(client.post("/fhir/$process-message", content=orjson.dumps(msg), headers=FHIR), 202)
    (row,) = outbox(container)
    assert b'Value="64"' in row.odm


def test_patient_not_enrolled_is_202_and_nothing_is_kept(client, container):
    r = client.post("/fhir", content=(DATA / "ips" / "HL7-IPS-IG-bundle-minimal.json").read_bytes(), headers=FHIR)
    assert_outcome(r, 202)
    assert outbox(container) == [] and dead_letters(container) == []
    metrics = client.get("/metrics").text
    assert "esource_resources_not_enrolled_total" in metrics
    line = [l for l in metrics.splitlines() if l.startswith("esource_resources_not_enrolled_total ")][0]
    assert float(line.split()[1]) > 0


def test_enrollment_endpoints(client, container):
    new = {"subject_key": "002-0009", "site_oid": "SITE.002", "identifiers": [{"system": "urn:x", "value": "42"}],
           "consent": "2024-01-02", "day1": "2024-01-20"}
    r = client.post("/studies/CV01/subjects", json=new)
    assert r.status_code == 201 and r.json()["identifier_count"] == 1
    assert_outcome(client.post("/studies/CV01/subjects", json=new), 409)
    listed = client.get("/studies/CV01/subjects").json()
    assert {s["subject_key"] for s in listed} == {"001-0001", "002-0009"}
    assert "42" not in json.dumps(listed) and CY_ID[1] not in json.dumps(listed)  # identifiers never returned
    assert_outcome(client.post("/studies/CV01/subjects", json={**new, "subject_key": "2-9"}), 422, contains="pattern")
    assert_outcome(client.post("/studies/CV01/subjects", json={**new, "subject_key": "002-0010", "site_oid": "SITE.9"}), 422)
    assert_outcome(client.post("/studies/CV01/subjects", json={**new, "subject_key": "002-0010", "consent": "2024-02-01"}), 422)
    same_id = {**new, "subject_key": "002-0011"}
    assert_outcome(client.post("/studies/CV01/subjects", json=same_id), 409)
    assert_outcome(client.get("/studies/XX99/subjects"), 404)
    r = client.put("/studies/CV01/subjects/002-0009", json={"withdrawn": "2024-03-01"})
    assert r.status_code == 200 and r.json()["withdrawn"] == "2024-03-01"
    assert_outcome(client.put("/studies/CV01/subjects/002-0999", json={"withdrawn": "2024-03-01"}), 404)


def test_withdrawal_through_the_api_stops_later_data(client, container):
    client.put("/studies/CV01/subjects/001-0001", json={"withdrawn": "2020-05-01"})
    client.post("/fhir", content=(DATA / "ips" / "CY_249867.json").read_bytes(), headers=FHIR)
    (row,) = outbox(container)
    assert b"2020-04-06" in row.odm and b"2020-05-06" not in row.odm and b"2020-07-06" not in row.odm


def test_production_mode_requires_the_bearer_token(store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("ESOURCE_AUTH_SECRET", SECRET)
    monkeypatch.setenv("ESOURCE_PSEUDONYM_KEY", "p" * 32)
    c = make_container(store_url, tmp_path, mode="production", edc={"connector": "sandbox", "url": "http://127.0.0.1:9"})
    try:
        with TestClient(create_app(c)) as cl:
            data = (DATA / "ips" / "CY_249867.json").read_bytes()
            assert_outcome(cl.post("/fhir", content=data, headers=FHIR), 401, code="login")
            assert_outcome(cl.post("/fhir", content=data, headers={**FHIR, "Authorization": "Bearer wrong"}), 401)
            assert_outcome(cl.get("/studies/CV01/subjects"), 401)
            r = cl.post("/fhir", content=data, headers={**FHIR, "Authorization": f"Bearer {SECRET}"})
            assert r.status_code == 202
            assert cl.get("/health").status_code == 200 and cl.get("/metrics").status_code == 200
            assert SECRET not in cl.get("/metrics").text
    finally:
        c.close()


def test_health_ready_metrics_and_unknown_route(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["database"] == "ok" and r.json()["studies"] == ["CV01"]
    m = client.get("/metrics")
    assert "esource_outbox_depth" in m.text and m.headers["content-type"].startswith("text/plain")
    assert_outcome(client.get("/nope"), 404, code="not-found")
    assert_outcome(client.get("/fhir"), 405)


def test_over_real_http(store_url, tmp_path):
    import httpx

    from esource.services.server import ThreadedServer, free_port

    c = make_container(store_url, tmp_path)
    port = free_port()
    server = ThreadedServer(create_app(c), "127.0.0.1", port)
    server.start()
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/fhir", content=(DATA / "ips" / "CY_249867.json").read_bytes(),
                       headers={**FHIR, "X-Request-ID": str(uuid.uuid4())}, timeout=30)
        assert r.status_code == 202 and len(outbox(c)) == 1
    finally:
        server.stop()
        c.close()
