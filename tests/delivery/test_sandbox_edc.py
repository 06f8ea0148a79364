"""The sandbox EDC on its own (TestClient): it applies Transactional ODM atomically, de-duplicates on
the transaction key, keeps per-subject order, refuses hostile, oversized and invalid input, answers
a valid Snapshot, records site edits, survives a restart and injects faults on demand."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from delivery_helpers import STUDY, Feeder, edc_state, expected_state, snapshot_state
from esource.connectors.sandbox_edc import create_sandbox_app
from esource.odm.xsd import validate_odm
from esource.store import Store

A, B = "001-0001", "001-0002"


class _Clock:
    def now(self) -> dt.datetime:
        return dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def rows(tmp_path_factory, cv01) -> dict[tuple[str, int], object]:
    """Real outbox rows: A1 (Inserts), A2 (Update of the weight), A3 (height Inserts), B1."""
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('odm') / 'esource.db'}", clock=_Clock())
    try:
        f = Feeder(cv01, store, _Clock(), [A, B])
        f.weight(A, 1)
        f.weight(B, 1)
        f.weight(A, 2)
        f.height(A)
        return {(e.subject_key, e.sequence): e for e in f.outbox()}
    finally:
        store.dispose()


@pytest.fixture
def app():
    app = create_sandbox_app(None)
    yield app
    app.state.sandbox.close()


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


def post(client, row, *, header: bool = True, body: bytes | None = None, study: str = STUDY, **headers):
    h = {"Content-Type": "application/xml", **headers}
    if header:
        h["X-Esource-Transaction"] = f"{row.study_oid}/{row.subject_key}/{row.sequence}"
    return client.post(f"/studies/{study}/odm", content=body if body is not None else row.odm, headers=h)


def test_a_transaction_is_applied_and_answered_with_a_reference(client, rows):
    r = post(client, rows[(A, 1)])
    assert r.status_code == 201
    assert r.json() == {"reference": "SBX-1", "items": 7, "key": f"{STUDY}/{A}/1", "duplicate": False}
    items = client.get(f"/studies/{STUDY}/items").json()
    assert edc_state(items) == expected_state([rows[(A, 1)]])
    weight = next(i for i in items if i["item"] == "IT.VS.VSORRES")
    assert weight["transaction"] == f"{STUDY}/{A}/1" and weight["edited_by_site"] is False
    assert weight["source_id"].startswith("Observation:") and weight["user"] == "USR.ESOURCE"
    assert weight["date_time_stamp"] and weight["reason_for_change"] is None
    # the Update carries its ReasonForChange into the item and the audit trail
    assert post(client, rows[(A, 2)]).status_code == 201
    weight = next(i for i in client.get(f"/studies/{STUDY}/items").json() if i["item"] == "IT.VS.VSORRES")
    assert weight["transaction"] == f"{STUDY}/{A}/2" and "changed (version 2)" in weight["reason_for_change"]
    audit = [a for a in client.get(f"/studies/{STUDY}/audit").json() if a["item"] == "IT.VS.VSORRES"]
    assert [(a["action"], a["previous_value"], a["value"]) for a in audit] == [
        ("Insert", None, "70.5"), ("Update", "70.5", "71.0")]


def test_a_repeated_key_returns_the_original_receipt_and_applies_nothing(client, rows):
    first = post(client, rows[(A, 1)]).json()
    # site staff change a value in between: a re-delivered Insert must not touch it
    client.put(f"/studies/{STUDY}/subjects/{A}/items",
               json={"path": "SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES", "value": "99"})
    again = post(client, rows[(A, 1)])
    assert again.status_code == 200
    assert again.json() == {**first, "duplicate": True}
    weight = next(i for i in client.get(f"/studies/{STUDY}/items").json() if i["item"] == "IT.VS.VSORRES")
    assert weight["value"] == "99" and weight["edited_by_site"]
    [tx] = client.get(f"/studies/{STUDY}/transactions").json()
    assert tx["reference"] == first["reference"] and tx["duplicates_seen"] == 1
    assert len([a for a in client.get(f"/studies/{STUDY}/audit").json() if a["action"] == "Insert"]) == 7


def test_the_file_oid_is_the_key_without_the_header(client, rows):
    first = post(client, rows[(A, 1)], header=False)
    assert first.status_code == 201
    assert first.json()["key"] == f"ESOURCE.{STUDY}.{A}.000001"
    again = post(client, rows[(A, 1)], header=False)
    assert again.status_code == 200 and again.json()["reference"] == first.json()["reference"]


def test_a_key_reused_for_other_content_is_refused(client, rows):
    post(client, rows[(A, 1)])
    r = post(client, rows[(A, 1)], body=rows[(A, 2)].odm)
    assert r.status_code == 409 and r.json()["code"] == "KEY_REUSED"
    assert "different content" in r.json()["message"]


def test_out_of_order_transactions_are_refused_and_nothing_is_applied(client, rows):
    r = post(client, rows[(A, 2)])
    assert r.status_code == 409 and r.json()["code"] == "OUT_OF_ORDER"
    assert "out of order" in r.json()["message"] and "expects transaction sequence 1, got 2" in r.json()["message"]
    assert client.get(f"/studies/{STUDY}/items").json() == []
    assert post(client, rows[(A, 1)]).status_code == 201
    assert post(client, rows[(A, 3)]).status_code == 409  # 3 before 2
    assert post(client, rows[(A, 2)]).status_code == 201
    assert post(client, rows[(A, 3)]).status_code == 201
    assert post(client, rows[(B, 1)]).status_code == 201  # order is per subject
    assert edc_state(client.get(f"/studies/{STUDY}/items").json()) == expected_state(list(rows.values()))


def test_a_refused_transaction_counts_as_arrived_for_the_order(client, rows):
    """esource may give a refused transaction up (the data manager closed the rejection) and go on with
    the next, or send it again after a fix while nothing later was applied; order is still enforced."""
    assert post(client, rows[(A, 1)]).status_code == 201
    client.post("/_faults", json={"mode": "reject", "message": "form locked"}).raise_for_status()
    assert post(client, rows[(A, 2)]).status_code == 422
    assert post(client, rows[(A, 2)]).status_code == 201  # fixed and re-queued: allowed
    client.post("/_faults", json={"mode": "reject"}).raise_for_status()
    assert post(client, rows[(A, 3)]).status_code == 422
    client.post("/_faults", json={"mode": "500"}).raise_for_status()  # not a refusal: does not count
    assert post(client, rows[(B, 1)]).status_code == 500
    assert post(client, rows[(B, 1)]).status_code == 201  # the 500 consumed nothing: B1 is still B's next
    items = {(i["subject"], i["group_repeat"]) for i in client.get(f"/studies/{STUDY}/items").json()}
    assert (A, "HEIGHT") not in items  # A3 was refused: nothing of it applied


def test_a_given_up_transaction_cannot_come_back_after_a_later_one(client, rows):
    assert post(client, rows[(A, 1)]).status_code == 201
    client.post("/_faults", json={"mode": "reject"}).raise_for_status()
    assert post(client, rows[(A, 2)]).status_code == 422
    assert post(client, rows[(A, 3)]).status_code == 201  # A2 given up: A3 is next
    r = post(client, rows[(A, 2)])
    assert r.status_code == 409 and r.json()["code"] == "OUT_OF_ORDER"  # too late: A3 was applied after it
    assert "expects transaction sequence 4, got 2" in r.json()["message"]
    assert post(client, rows[(A, 1)]).status_code == 200  # a duplicate is still a duplicate


def test_a_conflicting_item_rejects_the_whole_transaction(client, rows):
    post(client, rows[(A, 1)])
    post(client, rows[(A, 2)])
    # site staff entered the height before esource sends it: the Insert conflicts
    client.put(f"/studies/{STUDY}/subjects/{A}/items",
               json={"event": "SE.BASELINE", "form": "F.VS", "group": "IG.VS", "group_repeat": "HEIGHT",
                     "item": "IT.VS.VSDAT", "value": "2024-05-02", "reason": "entered from the paper chart"})
    before = client.get(f"/studies/{STUDY}/items").json()
    r = post(client, rows[(A, 3)])
    assert r.status_code == 409 and r.json()["code"] == "ITEM_EXISTS"
    assert r.json()["message"] == (f"Insert of subject {A}, SE.BASELINE/F.VS/IG.VS[HEIGHT]/IT.VS.VSDAT: the item "
                                   "already has a value (entered by site staff); nothing applied")
    # atomic: the four height items before the conflicting one were not kept, nor the transaction
    assert client.get(f"/studies/{STUDY}/items").json() == before
    assert [t["sequence"] for t in client.get(f"/studies/{STUDY}/transactions").json()] == [1, 2]


def test_update_of_a_missing_item_or_subject_is_refused(client, rows):
    r = post(client, rows[(A, 2)], header=False)  # SubjectData Update of a subject the EDC does not have
    assert r.status_code == 409 and r.json()["code"] == "UNKNOWN_SUBJECT"
    post(client, rows[(A, 1)])
    body = rows[(A, 2)].odm.replace(b'ItemGroupRepeatKey="WEIGHT"', b'ItemGroupRepeatKey="BMI"')
    r = post(client, rows[(A, 2)], body=body)
    assert r.status_code == 409 and r.json()["code"] == "ITEM_MISSING"
    assert "Update of subject 001-0001, SE.BASELINE/F.VS/IG.VS[BMI]/IT.VS.VSORRES" in r.json()["message"]


@pytest.mark.parametrize("body, needle", [
    (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
     b"<ODM>&lol2;</ODM>", "DOCTYPE"),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><ODM>&xxe;</ODM>', "DOCTYPE"),
    (b"<ODM><unclosed></ODM>", "not well-formed"),
    (b"", "not well-formed"),
])
def test_hostile_or_broken_xml_is_refused(client, rows, body, needle):
    r = post(client, rows[(A, 1)], body=body)
    assert r.status_code == 400 and r.json()["code"] == "BAD_XML"
    assert needle in r.json()["message"]
    assert client.get(f"/studies/{STUDY}/transactions").json() == []


def test_invalid_odm_is_refused_with_the_schema_messages(client, rows):
    body = rows[(A, 1)].odm.replace(b'ItemOID="IT.VS.VSORRES" ', b"")
    r = post(client, rows[(A, 1)], body=body)
    assert r.status_code == 422 and r.json()["code"] == "INVALID_ODM"
    assert any("ItemOID" in e and "required" in e for e in r.json()["errors"])
    assert r.json()["errors"][0].startswith("line ")
    assert "ItemOID" in r.json()["message"]
    snapshot = rows[(A, 1)].odm.replace(b'FileType="Transactional"', b'FileType="Snapshot" Granularity="All"')
    snapshot = snapshot.replace(b' TransactionType="Insert"', b"").replace(b' TransactionType="Upsert"', b"")
    assert validate_odm(snapshot) == []
    r = post(client, rows[(A, 1)], body=snapshot)
    assert r.status_code == 422 and r.json()["code"] == "NOT_TRANSACTIONAL"
    r = post(client, rows[(A, 1)], study="OTHER", header=False)
    assert r.status_code == 422 and r.json()["code"] == "WRONG_STUDY"


def test_oversized_bodies_are_refused(rows):
    app = create_sandbox_app(None, max_body_bytes=1024)
    with TestClient(app) as c:
        r = post(c, rows[(A, 1)])
        assert r.status_code == 413 and r.json()["code"] == "TOO_LARGE"

        def chunks():  # no Content-Length: the limit holds while streaming
            for _ in range(10):
                yield b"<!-- padding -->" * 20

        r = c.post(f"/studies/{STUDY}/odm", content=chunks(), headers={"Content-Type": "application/xml"})
        assert r.status_code == 413
        assert c.get(f"/studies/{STUDY}/transactions").json() == []
    app.state.sandbox.close()


def test_bad_requests(client, rows):
    assert post(client, rows[(A, 1)], **{"Content-Type": "application/json"}).status_code == 415
    r = post(client, rows[(A, 1)], header=False, **{"X-Esource-Transaction": "CV01/001-0001/zero"})
    assert r.status_code == 400 and r.json()["code"] == "BAD_TRANSACTION_KEY"
    r = post(client, rows[(A, 1)], header=False, **{"X-Esource-Transaction": "CV02/001-0001/1"})
    assert r.status_code == 400
    r = post(client, rows[(A, 1)], header=False, **{"X-Esource-Transaction": f"{STUDY}/{B}/1"})
    assert r.status_code == 422 and r.json()["code"] == "WRONG_SUBJECT"


def test_the_snapshot_is_valid_odm_with_the_current_values(client, rows):
    for key in ((A, 1), (B, 1), (A, 2), (A, 3)):
        assert post(client, rows[key]).status_code == 201
    r = client.get(f"/studies/{STUDY}/subjects/{A}/clinicaldata")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    assert validate_odm(r.content) == []
    assert b'FileType="Snapshot"' in r.content and b"TransactionType" not in r.content
    want = {k: v for k, v in expected_state(list(rows.values())).items() if k[0] == A}
    assert snapshot_state(r.content) == want
    assert b"<ReasonForChange>" in r.content and b"<SourceID>Observation:" in r.content
    # a site edit shows with the site's audit record, and the snapshot stays valid
    client.put(f"/studies/{STUDY}/subjects/{A}/items",
               json={"path": "SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES", "value": "72.4", "user": "USR.NURSE1"})
    r = client.get(f"/studies/{STUDY}/subjects/{A}/clinicaldata")
    assert validate_odm(r.content) == []
    assert b'<UserRef UserOID="USR.NURSE1"/>' in r.content
    assert client.get(f"/studies/{STUDY}/subjects/999-9999/clinicaldata").status_code == 404


def test_site_edits_are_marked_and_audited(client, rows):
    assert client.put(f"/studies/{STUDY}/subjects/{A}/items",
                      json={"path": "SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES", "value": "1"}).status_code == 404
    post(client, rows[(A, 1)])
    r = client.put(f"/studies/{STUDY}/subjects/{A}/items",
                   json={"path": "SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES", "value": "72.4",
                         "reason": "transcription error"})
    assert r.status_code == 200
    assert r.json()["previous_value"] == "70.5" and r.json()["edited_by_site"] is True
    item = next(i for i in client.get(f"/studies/{STUDY}/items").json() if i["item"] == "IT.VS.VSORRES")
    assert item["value"] == "72.4" and item["edited_by_site"] and item["transaction"] is None
    assert client.get(f"/studies/{STUDY}/audit").json()[-1]["action"] == "SiteEdit"
    bad = client.put(f"/studies/{STUDY}/subjects/{A}/items", json={"path": "SE.BASELINE/IT.X", "value": "1"})
    assert bad.status_code == 422


def test_the_store_survives_a_restart(tmp_path: Path, rows):
    db = tmp_path / "edc.sqlite"
    app = create_sandbox_app(db)
    with TestClient(app) as c:
        ref = post(c, rows[(A, 1)]).json()["reference"]
    app.state.sandbox.close()
    app = create_sandbox_app(db)
    with TestClient(app) as c:
        again = post(c, rows[(A, 1)])
        assert again.status_code == 200 and again.json()["reference"] == ref
        assert post(c, rows[(A, 3)]).status_code == 409  # the order survives too
        assert post(c, rows[(A, 2)]).json()["reference"] == "SBX-2"
        assert c.get("/health").json() == {"status": "ok", "transactions": 2, "persistent": True}
    app.state.sandbox.close()


def test_credentials_when_configured(rows):
    app = create_sandbox_app(None, api_key="s3cret-key")
    with TestClient(app) as c:
        r = post(c, rows[(A, 1)])
        assert r.status_code == 401 and "s3cret" not in r.text
        assert post(c, rows[(A, 1)], Authorization="Bearer s3cret-key").status_code == 201
        assert c.get(f"/studies/{STUDY}/items").status_code == 401
        assert c.get("/health").status_code == 200
    app.state.sandbox.close()


def test_fault_injection_api(client, rows):
    assert client.post("/_faults", json={"mode": "teapot"}).status_code == 422
    assert client.post("/_faults", json={"count": 1}).status_code == 422
    client.post("/_faults", json={"mode": "503", "count": 2, "retry_after": 7})
    for _ in range(2):
        r = post(client, rows[(A, 1)])
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
    assert post(client, rows[(A, 1)]).status_code == 201
    client.post("/_faults", json={"mode": "reject", "status": 403, "message": "form F.VS is locked"})
    r = post(client, rows[(A, 2)])
    assert r.status_code == 403 and r.json()["message"].startswith("form F.VS is locked")
    client.post("/_faults", json={"mode": "500", "count": None})
    assert post(client, rows[(A, 2)]).status_code == 500
    client.delete("/_faults")
    assert post(client, rows[(A, 2)]).status_code == 201
    # after_commit: applied, then failed; the retry is a duplicate
    client.post("/_faults", json={"mode": "500", "after_commit": True})
    r = post(client, rows[(A, 3)])
    assert r.status_code == 500 and "WAS applied" in r.json()["message"]
    assert post(client, rows[(A, 3)]).status_code == 200
    state = client.get("/_faults").json()
    assert state["injected"] == {"503": 2, "reject": 1, "500": 1, "500+after_commit": 1}
    # a rate below 1 with a seed is reproducible
    client.post("/_faults", json={"mode": "503", "count": None, "rate": 0.5, "seed": 7})
    hits = [post(client, rows[(A, 1)]).status_code for _ in range(20)]
    assert 3 < hits.count(503) < 17 and set(hits) == {200, 503}


def test_reset_without_a_server_transport_raises(client, rows):
    client.post("/_faults", json={"mode": "reset"})
    with pytest.raises(ConnectionResetError):  # (the real drop is tested over HTTP in test_sandbox_connector)
        post(client, rows[(A, 1)])
    assert client.get(f"/studies/{STUDY}/transactions").json() == []
