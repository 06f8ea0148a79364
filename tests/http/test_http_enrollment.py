"""Enrollment over HTTP: create, list, read, update; validation against the study (422), conflicts (409),
unknown study (404); identifiers never come back; a withdrawal recorded through the API stops the
transfer of later data, end to end through POST /fhir."""

from __future__ import annotations

import json
from typing import Any

import pytest
from http_helpers import (
    CY_ID,
    FHIR,
    HR,
    SYSBP,
    WEIGHT,
    assert_outcome,
    bundle,
    dumps,
    observation,
    outbox,
    patient,
    sent_items,
    study_date,
)

NEW = {"subject_key": "002-0200", "site_oid": "SITE.002",
       "identifiers": [{"system": "http://hospital.example/mrn", "value": "MRN-00002"},
                       {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "2840575123456"}],
       "consent": "2024-04-10", "day1": "2024-05-01"}
DIABP = ("8462-4", "mm[Hg]")


def subjects(client: Any) -> dict[str, dict[str, Any]]:
    r = client.get("/studies/CV01/subjects")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    return {s["subject_key"]: s for s in r.json()}


def test_enroll_list_and_read_a_subject_without_ever_returning_identifiers(client):
    r = client.post("/studies/CV01/subjects", json=NEW)
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == "/studies/CV01/subjects/002-0200"
    assert r.json() == {"study_oid": "CV01", "subject_key": "002-0200", "site_oid": "SITE.002",
                        "consent": "2024-04-10", "day1": "2024-05-01", "withdrawn": None, "identifier_count": 2}
    listed = subjects(client)
    assert set(listed) == {"001-0001", "002-0001", "001-0100", "002-0200"}
    assert listed["001-0001"]["identifier_count"] == 1 and "identifiers" not in listed["001-0001"]
    one = client.get("/studies/CV01/subjects/002-0200")
    assert one.status_code == 200 and one.json() == r.json()
    everything = r.text + json.dumps(listed) + one.text
    for value in ("MRN-00002", "2840575123456", CY_ID[1], "hospital.example"):
        assert value not in everything  # privacy: identifiers go in, never come out
    assert_outcome(client.get("/studies/CV01/subjects/009-9999"), 404, code="not-found")


def test_conflicts_are_409_and_change_nothing(client):
    assert client.post("/studies/CV01/subjects", json=NEW).status_code == 201
    assert_outcome(client.post("/studies/CV01/subjects", json=NEW), 409, contains="already enrolled")
    # an identifier already enrolled for another subject (the Cypriot patient is 001-0001)
    other = {**NEW, "subject_key": "001-0300", "site_oid": "SITE.001",
             "identifiers": [{"system": CY_ID[0], "value": CY_ID[1]}]}
    body = assert_outcome(client.post("/studies/CV01/subjects", json=other), 409, code="conflict")
    assert CY_ID[1] not in json.dumps(body)
    assert "001-0300" not in subjects(client)
    # the same through PUT: taking another subject's identifier is refused
    r = client.put("/studies/CV01/subjects/002-0200", json={"identifiers": other["identifiers"]})
    assert_outcome(r, 409)
    assert subjects(client)["002-0200"]["identifier_count"] == 2


@pytest.mark.parametrize("change,needle", [
    ({"subject_key": "2-200"}, "pattern"),
    ({"subject_key": "002-0200 "}, "pattern"),
    ({"site_oid": "SITE.999"}, "not a site of CV01"),
    ({"consent": "2024-05-02"}, "after Day 1"),
    ({"withdrawn": "2024-04-01"}, "before consent"),
    ({"identifiers": []}, "identifiers"),
    ({"identifiers": [{"system": "urn:x"}]}, "identifiers.0.value"),
    ({"identifiers": [{"system": "urn:x", "value": ""}]}, "identifiers.0.value"),
    ({"identifiers": [{"system": "urn:x", "value": 42}]}, "identifiers.0.value"),
    ({"day1": "01/05/2024"}, "day1"),
    ({"day1": 1714521600}, "day1"),
    ({"day1": "2024-02-30"}, "day1"),
    ({"unexpected": True}, "unexpected"),
    ({"subject_key": None}, "subject_key"),
])
def test_an_enrollment_that_does_not_fit_the_study_is_422(client, change, needle):
    body = {**NEW, **change}
    r = client.post("/studies/CV01/subjects", json=body)
    out = assert_outcome(r, 422, contains=needle)
    assert "MRN-00002" not in json.dumps(out)  # the input is never echoed
    assert "002-0200" not in subjects(client)


def test_a_missing_field_and_malformed_json_are_422_outcomes(client):
    partial = {k: v for k, v in NEW.items() if k != "day1"}
    assert_outcome(client.post("/studies/CV01/subjects", json=partial), 422, code="required", contains="day1")
    r = client.post("/studies/CV01/subjects", content=b'{"subject_key": ', headers={"Content-Type": "application/json"})
    assert_outcome(r, 422, code="structure")


def test_an_unknown_study_is_404(client):
    assert_outcome(client.get("/studies/XX99/subjects"), 404, code="not-found", contains="XX99")
    assert_outcome(client.post("/studies/XX99/subjects", json=NEW), 404, code="not-found")
    assert_outcome(client.get("/studies/XX99/subjects/001-0001"), 404)
    assert_outcome(client.put("/studies/XX99/subjects/001-0001", json={"withdrawn": "2024-06-01"}), 404)


def test_update_a_subject(client):
    assert client.post("/studies/CV01/subjects", json=NEW).status_code == 201
    r = client.put("/studies/CV01/subjects/002-0200", json={"withdrawn": "2024-06-15"})
    assert r.status_code == 200 and r.json()["withdrawn"] == "2024-06-15" and r.json()["identifier_count"] == 2
    assert subjects(client)["002-0200"]["withdrawn"] == "2024-06-15"
    r = client.put("/studies/CV01/subjects/002-0200",
                   json={"identifiers": [{"system": "urn:new", "value": "N-1"}], "site_oid": "SITE.001"})
    assert r.status_code == 200 and r.json()["identifier_count"] == 1 and r.json()["site_oid"] == "SITE.001"
    assert r.json()["withdrawn"] == "2024-06-15"  # fields not given are kept
    r = client.put("/studies/CV01/subjects/002-0200", json={"withdrawn": None})
    assert r.status_code == 200 and r.json()["withdrawn"] is None
    assert_outcome(client.put("/studies/CV01/subjects/002-0200", json={"withdrawn": "2024-01-01"}), 422,
                   contains="before consent")
    assert_outcome(client.put("/studies/CV01/subjects/002-0200", json={"consent": "2024-06-01"}), 422,
                   contains="after Day 1")
    assert_outcome(client.put("/studies/CV01/subjects/002-0200", json={"site_oid": None}), 422, contains="site_oid")
    assert_outcome(client.put("/studies/CV01/subjects/002-0200", json={"subject_key": "002-0201"}), 422)
    assert_outcome(client.put("/studies/CV01/subjects/009-9999", json={"withdrawn": "2024-06-01"}), 404)
    assert subjects(client)["002-0200"]["withdrawn"] is None


def test_an_enrollment_body_over_the_limit_is_413(client):
    big = {**NEW, "identifiers": [{"system": "urn:x", "value": "v" * 70_000}]}
    assert_outcome(client.post("/studies/CV01/subjects", json=big), 413, code="too-long")

    def chunks():
        yield b'{"subject_key": "' + b"9" * 70_000 + b'"}'

    r = client.post("/studies/CV01/subjects", content=chunks(), headers={"Content-Type": "application/json"})
    assert_outcome(r, 413, code="too-long")
    assert client.post("/studies/CV01/subjects", json=NEW).status_code == 201


def test_a_withdrawal_through_the_api_stops_the_transfer_of_later_data(client, container):
    """Enroll over HTTP, send week-4 vital signs, record a withdrawal, then send a week-12 reading (after
    the withdrawal: not sent) and a late-arriving week-4 reading (before it: still sent)."""
    assert client.post("/studies/CV01/subjects", json=NEW).status_code == 201
    me = {"reference": "Patient/pat-2"}
    week4 = bundle(patient("MRN-00002", "pat-2"), observation("wt-4", WEIGHT, 81.5, 29, subject=me),
                   observation("hr-4", HR, 72, 29, subject=me))
    assert_outcome(client.post("/fhir", content=dumps(week4), headers=FHIR), 202)
    (first,) = outbox(container)
    assert first.subject_key == "002-0200" and b'StudyEventOID="SE.WEEK4"' in first.odm

    withdrawn = study_date(60)
    r = client.put("/studies/CV01/subjects/002-0200", json={"withdrawn": withdrawn.isoformat()})
    assert r.status_code == 200

    later = bundle(patient("MRN-00002", "pat-2"), observation("bp-12", SYSBP, 141, 85, subject=me),
                   observation("dbp-4", DIABP, 88, 30, subject=me))
    assert_outcome(client.post("/fhir", content=dumps(later), headers=FHIR), 202)
    rows = outbox(container)
    assert len(rows) == 2
    assert b'Value="88"' in rows[1].odm  # dated before the withdrawal: transferred
    assert not any(b"SE.WEEK12" in row.odm or b'Value="141"' in row.odm for row in rows)  # after it: not
    events = {key.study_event_oid for key in sent_items(container, "002-0200")}
    assert "SE.WEEK4" in events and "SE.WEEK12" not in events

    # the withdrawal withdrawn (a data-entry error): the subject is re-mapped at once, the held reading goes
    assert client.put("/studies/CV01/subjects/002-0200", json={"withdrawn": None}).status_code == 200
    rows = outbox(container)
    assert len(rows) == 3 and b"SE.WEEK12" in rows[2].odm and b'Value="141"' in rows[2].odm
    again = bundle(patient("MRN-00002", "pat-2"), observation("hr-12", HR, 70, 85, subject=me))
    assert_outcome(client.post("/fhir", content=dumps(again), headers=FHIR), 202)
    rows = outbox(container)
    assert len(rows) == 4 and b'Value="70"' in rows[3].odm and b'Value="141"' not in rows[3].odm


def test_the_openapi_document_describes_the_api(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for path, method in [("/fhir", "post"), ("/fhir/$process-message", "post"), ("/studies/{study}/subjects", "get"),
                         ("/studies/{study}/subjects", "post"), ("/studies/{study}/subjects/{subject_key}", "put"),
                         ("/health", "get"), ("/ready", "get"), ("/metrics", "get")]:
        op = paths[path][method]
        assert op["summary"] and op.get("description"), (path, method)
    assert "never returned" in paths["/studies/{study}/subjects"]["get"]["description"]
    fhir = paths["/fhir"]["post"]
    assert {"application/fhir+json", "application/json"} <= set(fhir["requestBody"]["content"])
    assert {"202", "400", "413", "415", "422"} <= set(fhir["responses"])
    assert "OperationOutcome" in json.dumps(fhir["responses"]["202"]) and "OperationOutcome" in doc["components"]["schemas"]
    assert "identifiers" not in doc["components"]["schemas"]["SubjectOut"]["properties"]
    assert client.get("/docs").status_code == 200


def test_a_store_that_is_down_is_503_on_the_enrollment_api(client, container, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def down(*a: Any, **k: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(container.store, "uow", down)
    assert_outcome(client.get("/studies/CV01/subjects"), 503, code="transient")
    r = client.post("/studies/CV01/subjects", json=NEW)
    assert_outcome(r, 503, code="transient")
    assert "MRN-00002" not in r.text
