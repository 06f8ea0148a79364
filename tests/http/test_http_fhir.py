"""POST /fhir and /fhir/$process-message: accepted input, idempotence, and every kind of bad input — each
answered with a FHIR OperationOutcome, recorded as a dead letter where the body was read, nothing else
lost, and the service keeps serving."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from http_helpers import (
    ARLA_FILE,
    CY_FILE,
    CY_ID,
    FHIR,
    GEORGE_FILE,
    HR,
    MINIMAL_IPS_FILE,
    SYSBP,
    WEIGHT,
    LogCapture,
    accepted,
    all_fact_count,
    assert_outcome,
    bundle,
    dead_letters,
    dumps,
    facts,
    message,
    metric,
    observation,
    open_discrepancies,
    outbox,
    patient,
)

from esource.adapters.http import create_app
from esource.intake.parse import parse_fhir


def post(client: TestClient, body: bytes, rid: str | None = None, path: str = "/fhir", **headers: str) -> Any:
    h = {**FHIR, **headers}
    if rid:
        h["X-Request-ID"] = rid
    return client.post(path, content=body, headers=h)


def assert_still_serving(client: TestClient, container: Any, rid: str = "after") -> None:
    """A valid post right after the bad one works, and the bad one cost nothing else."""
    before = len(outbox(container))
    r = post(client, CY_FILE.read_bytes(), rid)
    assert_outcome(r, 202)
    assert len(outbox(container)) == before + 1


# ------------------------------------------------------------------------------------------- accepted


def test_ips_bundle_is_accepted_listing_every_resource_and_queues_one_transaction(client, container):
    data = CY_FILE.read_bytes()
    r = post(client, data, "ips-1")
    body = assert_outcome(r, 202)
    assert r.headers["X-Intake-Key"] == "http:ips-1" and r.headers["X-Request-ID"] == "ips-1"
    labels = [res.label for res in parse_fhir(data, "t").resources]
    assert accepted(body) == labels and len(labels) == 62 and "Patient/249867" in labels
    assert all(i["severity"] == "information" for i in body["issue"])  # a clean bundle: no warning
    (row,) = outbox(container)
    assert row.subject_key == "001-0001" and row.status == "pending" and row.item_count > 50
    assert b'SubjectKey="001-0001"' in row.odm and CY_ID[1].encode() not in row.odm
    assert dead_letters(container) == []
    m = client.get("/metrics").text
    assert metric(m, "esource_messages_consumed_total", channel="http", outcome="processed") == 1
    assert metric(m, "esource_fhir_resources_total", channel="http") == 62


def test_synthea_transaction_bundle_as_application_json(client, container):
    r = post(client, ARLA_FILE.read_bytes(), **{"Content-Type": "application/json; charset=utf-8"})
    body = assert_outcome(r, 202)
    assert len(accepted(body)) == 319
    assert r.headers["X-Intake-Key"] == f"http:{r.headers['X-Request-ID']}"  # a new UUID when none is sent
    (row,) = outbox(container)
    assert row.subject_key == "002-0001" and row.item_count > 20


@pytest.mark.parametrize("content_type", ["application/fhir+json", "application/json",
                                          "application/fhir+json; charset=utf-8",
                                          "application/fhir+json; fhirVersion=4.0",
                                          "Application/FHIR+JSON; charset=UTF-8; fhirVersion=4.0.1",
                                          "application/json;charset=utf-8"])
def test_accepted_media_types(client, content_type):
    r = client.post("/fhir", content=dumps(patient("MRN-99999", "p9")), headers={"Content-Type": content_type})
    assert_outcome(r, 202)


def test_the_same_request_id_twice_is_processed_once(client, container):
    data = CY_FILE.read_bytes()
    first = assert_outcome(post(client, data, "same-id"), 202)
    again = post(client, data, "same-id")
    body = assert_outcome(again, 202, code="duplicate", contains="already processed")
    assert accepted(body) == accepted(first)
    assert again.headers["X-Intake-Key"] == "http:same-id"
    (row,) = outbox(container)  # one transaction
    # the same content under a new id: processed, but the state diff has nothing new to send
    assert_outcome(post(client, data, "other-id"), 202)
    assert len(outbox(container)) == 1 and row.sequence == 1
    m = client.get("/metrics").text
    assert metric(m, "esource_messages_consumed_total", channel="http", outcome="duplicate") == 1
    assert metric(m, "esource_messages_consumed_total", channel="http", outcome="processed") == 2


def test_a_patient_who_is_not_enrolled_is_202_and_only_counted(client, container):
    for i, f in enumerate((GEORGE_FILE, MINIMAL_IPS_FILE)):
        r = post(client, f.read_bytes(), f"nobody-{i}")
        body = assert_outcome(r, 202)
        assert accepted(body) and all(i["severity"] == "information" for i in body["issue"])  # like any other
    assert outbox(container) == [] and dead_letters(container) == []
    assert all_fact_count(container) == 0  # nothing of them is kept
    m = client.get("/metrics").text
    assert metric(m, "esource_resources_not_enrolled_total") > 50


# ------------------------------------------------------------------------------------- not FHIR: 400

DEEP = b'{"resourceType": "Patient", "extension": ' + b"[" * 100 + b"]" * 100 + b"}"
BAD_INPUTS = {
    "malformed JSON": (b'{"resourceType": "Bundle", "type": "collection", "entry": [', "not valid JSON"),
    "JSON but not FHIR": (b'{"hello": 1}', "no resourceType"),
    "unknown resourceType": (b'{"resourceType": "Banana", "id": "b"}', "not a FHIR R4 resource type"),
    "resourceType not a string": (b'{"resourceType": 7}', "resourceType is a number"),
    "top level an array": (b'[{"resourceType": "Patient"}]', "expected a JSON object"),
    "invalid UTF-8": (b'{"resourceType": "Patient", "id": "\xff\xfe"}', "not valid UTF-8"),
    "nested too deep": (DEEP, "nested deeper than the limit of 64"),
    "empty body": (b"", "empty input"),
    "Bundle.entry not an array": (b'{"resourceType": "Bundle", "type": "collection", "entry": {}}', "Bundle.entry"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_input_that_is_not_fhir_is_400_a_dead_letter_with_the_payload_and_nothing_else(client, container, name):
    data, needle = BAD_INPUTS[name]
    r = post(client, data, f"bad-{len(data)}")
    body = assert_outcome(r, 400, code="structure", contains=needle)
    assert any("dead letter" in i.get("diagnostics", "") for i in body["issue"])
    assert r.headers["X-Intake-Key"] == f"http:bad-{len(data)}"
    (dl,) = dead_letters(container)
    assert dl.channel == "http" and dl.intake_key == f"http:bad-{len(data)}" and dl.status == "open"
    assert dl.payload == data and needle in dl.reason and f"POST /fhir (bad-{len(data)})" in dl.origin
    assert outbox(container) == [] and all_fact_count(container) == 0
    assert_still_serving(client, container)
    assert len(dead_letters(container)) == 1
    m = client.get("/metrics").text
    assert metric(m, "esource_dead_letters_total", channel="http") == 1


# ------------------------------------------------------------------------------- invalid FHIR: 422


def test_an_invalid_single_resource_is_422_naming_the_element_kept_as_dead_letter_and_not_processed(client, container):
    obs = observation("wt-1", WEIGHT, "78,2", 29, subject={"identifier": {"system": CY_ID[0], "value": CY_ID[1]}},
                      effectiveDateTime="2020-05-04T09:00:00+02:00")
    data = dumps(obs)
    r = post(client, data, "single-bad")
    body = assert_outcome(r, 422, code="invalid")
    expressions = [e for i in body["issue"] for e in i.get("expression", [])]
    assert "Observation.valueQuantity.value" in expressions
    assert any(i["severity"] == "error" and "Observation/wt-1" in i["diagnostics"] for i in body["issue"])
    (dl,) = dead_letters(container)
    assert dl.payload == data and "Observation.valueQuantity.value" in dl.reason
    assert "78,2" not in dl.reason and "wt-1" not in dl.reason  # the reason is logged: no values, no ids
    assert outbox(container) == [] and facts(container, "001-0001") == []  # not processed
    # the same reading, valid: processed as a single resource (matched by a logical reference)
    obs["valueQuantity"]["value"] = 78.2
    assert accepted(assert_outcome(post(client, dumps(obs), "single-ok"), 202)) == ["Observation/wt-1"]
    (row,) = outbox(container)
    assert re.search(rb'ItemOID="IT.VS.VSORRES"[^>]*Value="78.2"', row.odm)


def test_an_invalid_single_patient_is_422_too(client, container):
    p = patient()
    p["birthDate"] = "1961-13-45"
    body = assert_outcome(post(client, dumps(p), "bad-patient"), 422, code="invalid")
    assert "Patient.birthDate" in [e for i in body["issue"] for e in i.get("expression", [])]
    (dl,) = dead_letters(container)
    assert "Patient.birthDate" in dl.reason and "1961" not in dl.reason and "pat-1" not in dl.reason


def test_a_resource_no_study_reads_is_not_validated_and_accepted(client, container):
    r = post(client, dumps({"resourceType": "Practitioner", "id": "dr", "gender": "bogus"}))
    assert accepted(assert_outcome(r, 202)) == ["Practitioner/dr"]
    assert dead_letters(container) == []


def test_invalid_entries_in_a_bundle_are_warnings_and_do_not_block_the_others(client, container):
    doc = bundle(patient(), observation("bp-1", SYSBP, 132, 29), observation("wt-bad", WEIGHT, "eighty", 29))
    doc["entry"].append({"fullUrl": "urn:uuid:broken", "resource": {"no": "resourceType"}})
    r = post(client, dumps(doc), "mixed")
    body = assert_outcome(r, 202)
    assert accepted(body) == ["Patient/pat-1", "Observation/bp-1", "Observation/wt-bad"]
    warnings = [i for i in body["issue"] if i["severity"] == "warning"]
    invalid = [w for w in warnings if "Observation/wt-bad" in w["diagnostics"]]
    assert invalid and invalid[0]["expression"] == ["Observation.valueQuantity.value"]
    assert any(w["expression"] == ["Bundle.entry[3].resource.resourceType"] for w in warnings)
    (row,) = outbox(container)  # the valid reading went through
    assert row.subject_key == "001-0100" and b'Value="132"' in row.odm and b"eighty" not in row.odm
    kinds = {d.kind.value for d in open_discrepancies(container, "001-0100")}
    assert "invalid_source" in kinds  # the engine holds the invalid reading it selected
    assert dead_letters(container) == []


# ---------------------------------------------------------------------------------- too large: 413


@pytest.fixture
def small(make_container):
    """A service with a 4 KiB body limit."""
    c = make_container(max_body_bytes=4096)
    with TestClient(create_app(c)) as cl:
        yield c, cl


def padded_patient(size: int) -> bytes:
    doc = patient("MRN-77777", "p-pad")
    doc["name"] = [{"text": ""}]
    base = len(dumps(doc))
    doc["name"][0]["text"] = "p" * (size - base)
    data = dumps(doc)
    assert len(data) == size
    return data


def test_a_body_at_the_limit_is_accepted(small):
    c, cl = small
    assert_outcome(post(cl, padded_patient(4096), "at-limit"), 202)


def test_a_content_length_over_the_limit_is_413_recorded_without_the_payload(small):
    c, cl = small
    data = padded_patient(4097)
    r = post(cl, data, "big-1")
    assert_outcome(r, 413, code="too-long", contains="exceeds the limit of 4096 bytes")
    (dl,) = dead_letters(c)
    assert dl.intake_key == "http:big-1" and dl.payload == b"" and "4097" in dl.reason and "exceeds" in dl.reason
    assert outbox(c) == [] and all_fact_count(c) == 0
    assert_outcome(post(cl, padded_patient(1000), "after-big"), 202)


def test_a_chunked_body_over_the_limit_is_413_while_streaming(small):
    c, cl = small
    sent: list[int] = []

    def chunks():  # no Content-Length: Transfer-Encoding chunked
        for _ in range(50):
            sent.append(1)
            yield b" " * 1000

    r = cl.post("/fhir", content=chunks(), headers={**FHIR, "X-Request-ID": "big-chunked"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_outcome(r, 413, code="too-long", contains="more than 4096 bytes received")
    (dl,) = dead_letters(c)
    assert dl.payload == b"" and "exceeds the limit" in dl.reason
    assert_outcome(post(cl, padded_patient(1000), "after-chunked"), 202)


# ------------------------------------------------------------------------------ wrong media: 415


@pytest.mark.parametrize("headers", [
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/xml"},
    {"Content-Type": "application/fhir+xml"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "application/fhir+json; charset=iso-8859-1"},
    {"Content-Type": "application/fhir+json; fhirVersion=3.0"},
    {"Content-Type": "application/fhir+json", "Content-Encoding": "gzip"},
    {},
])
def test_a_wrong_media_type_is_415_refused_before_reading(client, container, headers):
    """415 is not dead-lettered: the body is never read (nothing arrived to lose) and the client is told
    to resend it as FHIR JSON; the refusal is in the logs and the client's answer."""
    r = client.post("/fhir", content=CY_FILE.read_bytes(), headers={"X-Request-ID": "media", **headers})
    assert_outcome(r, 415, code="not-supported")
    assert dead_letters(container) == [] and outbox(container) == []
    assert_still_serving(client, container)


# ------------------------------------------------------------------------------- FHIR messaging


def test_process_message_accepts_a_message_bundle(client, container):
    msg = message(patient(), observation("hr-1", HR, 64, 29))
    r = post(client, dumps(msg), "msg-1", path="/fhir/$process-message")
    body = assert_outcome(r, 202)
    assert accepted(body) == ["MessageHeader/msg-1", "Patient/pat-1", "Observation/hr-1"]
    assert r.headers["X-Intake-Key"] == "http:msg-1"
    (row,) = outbox(container)
    assert b'Value="64"' in row.odm
    # a message is also fine on POST /fhir; the same request id again changes nothing
    assert_outcome(post(client, dumps(msg), "msg-1"), 202, code="duplicate")
    assert len(outbox(container)) == 1


@pytest.mark.parametrize("doc,needle", [
    (bundle(patient(), observation("hr-1", HR, 64, 29)), "needs a Bundle of type 'message'"),
    (observation("hr-1", HR, 64, 29), "needs a Bundle of type 'message'"),
    ({**message(patient()), "entry": list(reversed(message(patient())["entry"]))}, "first entry"),
])
def test_process_message_refuses_what_is_not_a_message(client, container, doc, needle):
    data = dumps(doc)
    r = post(client, data, "not-a-message", path="/fhir/$process-message")
    assert_outcome(r, 422, code="structure", contains=needle)
    (dl,) = dead_letters(container)
    assert dl.payload == data and needle in dl.reason and "$process-message" in dl.origin
    assert outbox(container) == []


def test_process_message_with_input_that_is_not_fhir_is_400(client, container):
    assert_outcome(post(client, b"{nope", "m-bad", path="/fhir/$process-message"), 400, contains="not valid JSON")
    assert len(dead_letters(container)) == 1


# --------------------------------------------------------------------------------- other errors


def test_an_unexpected_error_is_a_500_outcome_without_details(client, container, monkeypatch):
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError(f"patient {CY_ID[1]} exploded")

    monkeypatch.setattr(container.ingest, "ingest_parsed", boom)
    with LogCapture() as logs:
        r = post(client, CY_FILE.read_bytes(), "boom")
    assert_outcome(r, 500, code="exception", contains="boom")  # names the request id, nothing else
    assert CY_ID[1] not in r.text and "exploded" not in r.text
    assert CY_ID[1] not in logs.text and "exploded" not in logs.text and "RuntimeError" in logs.text
    monkeypatch.undo()
    assert_still_serving(client, container)


def test_a_store_that_is_down_is_503_retry(client, container, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def down(*a: Any, **k: Any) -> Any:
        raise OperationalError("SELECT secret", {"p": CY_ID[1]}, Exception("connection refused"))

    monkeypatch.setattr(container.ingest, "ingest_parsed", down)
    r = post(client, CY_FILE.read_bytes(), "down")
    assert_outcome(r, 503, code="transient", contains="retry")
    assert r.headers["Retry-After"] and CY_ID[1] not in r.text


def test_a_concurrent_update_that_won_is_503_retry_and_not_a_dead_letter(client, container, monkeypatch):
    from esource.store.errors import StoreConflictError

    def lost(*a: Any, **k: Any) -> Any:
        raise StoreConflictError("outbox sequence 1 is already taken")

    monkeypatch.setattr(container.ingest, "ingest_parsed", lost)
    r = post(client, CY_FILE.read_bytes(), "race")
    assert_outcome(r, 503, code="transient", contains="retry with the same X-Request-ID")
    assert r.headers["Retry-After"] == "1" and dead_letters(container) == []
    monkeypatch.undo()
    assert_outcome(post(client, CY_FILE.read_bytes(), "race"), 202)  # the retry goes through
    assert len(outbox(container)) == 1


def test_a_patient_matching_two_subjects_is_422_and_a_dead_letter(client, container):
    p = patient()  # MRN-00001 is subject 001-0100 ...
    p["identifier"].append({"system": CY_ID[0], "value": CY_ID[1]})  # ... and the Cypriot identifier 001-0001
    data = dumps(bundle(p, observation("hr-x", HR, 70, 29)))
    r = post(client, data, "ambiguous")
    assert_outcome(r, 422, code="multiple-matches", contains="more than one enrolled subject")
    assert CY_ID[1] not in r.text and "MRN-00001" not in r.text
    (dl,) = dead_letters(container)
    assert dl.payload == data and dl.intake_key == "http:ambiguous"
    assert outbox(container) == []


@pytest.mark.parametrize("rid", ["has space", "x" * 201, "semi;colon", "new\u00e9"])
def test_a_request_id_that_cannot_be_an_intake_key_is_400(client, container, rid):
    r = client.post("/fhir", content=CY_FILE.read_bytes(),
                    headers={**FHIR, "X-Request-ID": rid.encode("utf-8")})
    assert_outcome(r, 400, code="value", contains="X-Request-ID")
    assert r.headers["X-Request-ID"] != rid  # a fresh id names the refused request
    assert dead_letters(container) == [] and outbox(container) == []


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/nope", 404, "not-found"),
    ("GET", "/fhir", 405, "not-supported"),
    ("DELETE", "/fhir", 405, "not-supported"),
    ("PUT", "/fhir/$process-message", 405, "not-supported"),
    ("GET", "/studies/CV01/subjects/001-0001/nope", 404, "not-found"),
])
def test_framework_errors_are_operation_outcomes(client, method, path, status, code):
    r = client.request(method, path)
    assert_outcome(r, status, code=code)
    assert r.headers["X-Request-ID"]


def test_logs_carry_no_patient_data(client, container):
    bad_patient = patient()
    bad_patient["birthDate"] = "1961-13-45"
    with LogCapture() as logs:
        post(client, CY_FILE.read_bytes(), "log-1")
        post(client, ARLA_FILE.read_bytes(), "log-2")
        post(client, dumps(bad_patient), "log-3")
        post(client, dumps({"resourceType": "Banana", "identifier": CY_ID[1]}), "log-4")
        post(client, dumps(bundle(patient(), observation("wt-bad", WEIGHT, "eighty", 29))), "log-5")
    text = logs.text
    assert "http request" in text and "log-3" in text  # request ids are there ...
    for secret in (CY_ID[1], "249867", "IOSIF", "Maria", ARLA_ID_VALUE, "Doe-Secret", "MRN-00001", "1961-13-45",
                   "eighty"):
        assert secret not in text, secret  # ... patient data is not


ARLA_ID_VALUE = "0c89b627-646b-40ff-a620-c8509a10912c"
