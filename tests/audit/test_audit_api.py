"""The audit and lineage API on a production-mode app (SQLite, and PostgreSQL when configured): roles and
site scoping, filters and paging, exports, verify, lineage and items — every clinical read audited —
and the enrollment endpoints' audit entries."""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
from audit_helpers import (
    ARLA,
    ARLA_SITE,
    ARLA_SUBJECT,
    DEMO_ENROLLMENT,
    WEIGHT,
    WEIGHT_OBSERVATION,
    FakeEdc,
    ingest_file,
    sql,
)
from lxml import etree

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

from esource.adapters.http import create_app

from esource.bootstrap import build
from esource.domain.audit import AuditAction
from esource.odm.xsd import validate_odm
from esource.services.demo import load_enrollment_file
from esource.services.process import enroll
from esource.settings import load_settings

SECRET = "audit-bootstrap-" + "x" * 40
USERS = {  # username -> roles, sites, studies
    "cra_a": (["cra"], ["SITE.001"], []),
    "cra_b": (["cra"], [ARLA_SITE], []),
    "dm": (["data_manager"], [], []),
    "admin": (["admin"], [], []),
    "edc": (["edc"], [], ["CV01"]),
    "ehr": (["system"], [], []),
}
LINEAGE = (f"/studies/CV01/subjects/{ARLA_SUBJECT}/lineage?event=SE.BASELINE&form=F.VS&group=IG.VS&repeat=WEIGHT"
           "&item=IT.VS.VSORRES")


@dataclass
class Api:
    container: Any
    client: Any
    tokens: dict[str, str] = field(default_factory=dict)

    def get(self, path: str, who: str | None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return self.client.get(path, headers=headers, **kw)

    def entries(self, **filters: Any) -> list[Any]:
        with self.container.store.uow(read_only=True) as uow:
            return uow.audit_entries(**filters)[0]


@pytest.fixture
def api(store_url, tmp_path, clock):
    from esource.api.auth import get_authenticator
    from esource.domain.model import Enrollment

    settings = load_settings(mode="production", database_url=store_url, auth_secret=SECRET, pseudonym_key="k" * 32,
                             edc={"connector": "odm_file", "folder": str(tmp_path / "edc")})
    c = build(settings, clock=clock, connectors={"CV01": FakeEdc("ack")})
    client = TestClient(create_app(c))
    client.__enter__()
    try:
        _, enrollments, _ = load_enrollment_file(DEMO_ENROLLMENT)
        enroll(c.store.uow, [e for e in enrollments if e.subject_key == ARLA_SUBJECT]
               + [Enrollment("CV01", "001-0001", "SITE.001", (("urn:x", "1"),), enrollments[0].consent_date,
                             enrollments[0].day1)])
        ingest_file(c.processors["CV01"], ARLA)
        c.dispatcher.drain()
        auth = get_authenticator(c)
        tokens = {}
        for name, (roles, sites, studies) in USERS.items():
            auth.create_user(name, roles, sites=sites, studies=studies)
            tokens[name] = auth.issue_token(name, ttl_days=1).token
        yield Api(c, client, tokens)
    finally:
        client.__exit__(None, None, None)
        c.close()


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    return r.json()


@pytest.mark.parametrize("path", ["/studies/CV01/audit", "/studies/CV01/audit/export?format=csv",
                                  f"/studies/CV01/subjects/{ARLA_SUBJECT}/items", LINEAGE,
                                  "/studies/CV01/audit/verify"])
def test_roles(api, path):
    problem(api.get(path, None), 401)
    for who in ("edc", "ehr"):
        problem(api.get(path, who), 403)
    for who in ("dm", "admin"):
        assert api.get(path, who).status_code == 200, (who, path)
    expected_cra = 403 if path.endswith("/verify") else 200
    assert api.get(path, "cra_b").status_code == expected_cra


def test_cras_see_their_sites_only(api):
    body = api.get("/studies/CV01/audit", "cra_b", params={"limit": 500}).json()
    assert body["total"] > 50
    assert {e["site_oid"] for e in body["items"]} == {ARLA_SITE}
    assert api.get("/studies/CV01/audit", "cra_a").json()["total"] == 0  # nothing happened at SITE.001
    # everything of another site's subject is refused, not just filtered
    problem(api.get("/studies/CV01/audit", "cra_a", params={"subject": ARLA_SUBJECT}), 403)
    problem(api.get(LINEAGE, "cra_a"), 403)
    problem(api.get(f"/studies/CV01/subjects/{ARLA_SUBJECT}/items", "cra_a"), 403)
    csv_text = api.get("/studies/CV01/audit/export", "cra_a", params={"format": "csv"}).text
    assert len(list(csv.DictReader(io.StringIO(csv_text)))) == 0
    # a data manager also sees entries without a site (messages received)
    dm = api.get("/studies/CV01/audit", "dm", params={"action": "message.received"}).json()
    assert dm["total"] == 1 and dm["items"][0]["site_oid"] is None


def test_listing_filters_pages_and_records_the_read(api):
    r = api.get("/studies/CV01/audit", "dm", params={"subject": ARLA_SUBJECT, "item": "IT.VS.VSORRES",
                                                     "action": "value.mapped", "limit": 3, "offset": 1})
    body = r.json()
    assert r.status_code == 200 and (body["limit"], body["offset"]) == (3, 1) and len(body["items"]) == 3
    assert body["total"] == 5  # HEIGHT, WEIGHT, BMI, DIABP, SYSBP at baseline
    assert all(e["action"] == "value.mapped" and e["item"]["item_oid"] == "IT.VS.VSORRES" for e in body["items"])
    ids = [e["id"] for e in body["items"]]
    assert ids == sorted(ids, reverse=True)  # newest first
    weight = next(e for e in api.get("/studies/CV01/audit", "dm", params={
        "subject": ARLA_SUBJECT, "item": "IT.VS.VSORRES", "action": "value.mapped", "order": "asc",
        "limit": 500}).json()["items"] if e["item"]["item_group_repeat_key"] == "WEIGHT")
    assert weight["new_value"] == "78.4" and weight["rule"] == "F.VS/WEIGHT/result"
    assert weight["source"]["id"] == WEIGHT_OBSERVATION and weight["source"]["source_id"].startswith("Observation:")
    assert weight["detail"]["transaction_type"] == "Insert"
    reads = api.entries(actions=[AuditAction.DATA_READ.value])
    assert reads and reads[-1].event.actor == "user:dm"
    assert reads[-1].event.detail["endpoint"] == "GET /studies/{study}/audit"
    problem(api.get("/studies/CV01/audit", "dm", params={"action": "value.stolen"}), 422)
    problem(api.get("/studies/CV99/audit", "dm"), 404)


def test_intake_keys_are_not_shown(api):
    """Intake keys carry file names (which can name a patient): the trail stores a keyed hash only."""
    (entry,) = api.get("/studies/CV01/audit", "dm", params={"action": "message.received"}).json()["items"]
    assert "intake_key" not in entry["detail"] and entry["detail"]["intake"].startswith("intake:")
    assert ".json" not in str(entry)


def test_export_csv_and_odm(api):
    r = api.get("/studies/CV01/audit/export", "dm", params={"format": "csv", "subject": ARLA_SUBJECT})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows and {row["subject_key"] for row in rows} == {ARLA_SUBJECT}
    assert WEIGHT_OBSERVATION not in r.text
    r = api.get("/studies/CV01/audit/export", "cra_b", params={"format": "odm"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    assert validate_odm(r.content) == []
    assert etree.fromstring(r.content).get("FileType") == "Transactional"
    reads = api.entries(actions=[AuditAction.DATA_READ.value])
    assert [(e.event.actor, e.event.detail["format"]) for e in reads[-2:]] == [("user:dm", "csv"), ("user:cra_b", "odm")]
    assert reads[-1].event.detail["sites"] == [ARLA_SITE]
    problem(api.get("/studies/CV01/audit/export", "dm", params={"format": "pdf"}), 422)


def test_verify_reports_tampering(api):
    body = api.get("/studies/CV01/audit/verify", "dm").json()
    assert body["intact"] is True and body["broken"] is None and body["entries"] > 50
    sql(api.container.store, "UPDATE audit_log SET new_value = '80.0' WHERE id = 12")
    body = api.get("/studies/CV01/audit/verify", "admin").json()
    assert body["intact"] is False
    assert body["broken"]["entry_id"] == 12 and body["broken"]["kind"] == "altered"


def test_lineage_and_items(api):
    r = api.get(LINEAGE, "cra_b")
    assert r.status_code == 200, r.text
    lin = r.json()
    assert (lin["value"], lin["rule"], lin["site_oid"]) == ("78.4", "F.VS/WEIGHT/result", ARLA_SITE)
    assert lin["item"] == {"study_event_oid": "SE.BASELINE", "study_event_repeat_key": None, "form_oid": "F.VS",
                           "item_group_oid": "IG.VS", "item_group_repeat_key": "WEIGHT", "item_oid": "IT.VS.VSORRES"}
    assert lin["conversions"] == ["rounded half-up to 1 decimal(s): 78.4"]
    assert lin["source"]["id"] == WEIGHT_OBSERVATION
    (t,) = lin["transfers"]
    assert (t["sequence"], t["status"], t["edc_reference"]) == (1, "acked", f"REF-{ARLA_SUBJECT}-1")
    assert [s["action"] for s in lin["history"]] == ["value.mapped", "transfer.queued", "transfer.sent",
                                                     "transfer.acknowledged"]
    (read,) = api.entries(actions=[AuditAction.DATA_READ.value])
    assert read.event.actor == "user:cra_b" and read.event.item == WEIGHT and read.event.site_oid == ARLA_SITE

    items = api.get(f"/studies/CV01/subjects/{ARLA_SUBJECT}/items", "dm").json()
    w = next(i for i in items if i["item"]["item_group_repeat_key"] == "WEIGHT"
             and i["item"]["item_oid"] == "IT.VS.VSORRES" and i["item"]["study_event_oid"] == "SE.BASELINE")
    assert (w["value"], w["transfer_status"], w["sequence"]) == ("78.4", "acked", 1)
    assert len(api.entries(actions=[AuditAction.DATA_READ.value])) == 2

    problem(api.get(LINEAGE.replace("SE.BASELINE", "SE.WEEK52"), "dm"), 404)
    problem(api.get(f"/studies/CV01/subjects/{ARLA_SUBJECT}/lineage", "dm", params={"event": "SE.BASELINE"}), 422)
    problem(api.get("/studies/CV01/subjects/009-0009/items", "dm"), 404)
    assert len(api.entries(actions=[AuditAction.DATA_READ.value])) == 2  # failed reads returned nothing


def test_enrollment_changes_are_audited_without_identifiers(api):
    headers = {"Authorization": f"Bearer {api.tokens['admin']}"}
    body = {"subject_key": "001-0002", "site_oid": "SITE.001", "consent": "2023-02-20", "day1": "2023-03-06",
            "identifiers": [{"system": "https://nhi.example", "value": "ZZZ0016"}]}
    assert api.client.post("/studies/CV01/subjects", json=body, headers=headers).status_code == 201, "create"
    r = api.client.put("/studies/CV01/subjects/001-0002", headers=headers,
                       json={"withdrawn": "2023-06-01", "identifiers": [{"system": "https://nhi.example",
                                                                          "value": "ZZZ0017"}]})
    assert r.status_code == 200, r.text
    created, changed = api.entries(actions=["enrollment.created", "enrollment.changed"])
    assert (created.event.action, created.event.actor, created.event.subject_key, created.event.site_oid) == \
        (AuditAction.ENROLLMENT_CREATED, "user:admin", "001-0002", "SITE.001")
    assert created.event.detail["identifier_count"] == 1
    assert changed.event.action is AuditAction.ENROLLMENT_CHANGED
    assert changed.event.detail["changed"] == {"withdrawn": [None, "2023-06-01"]}
    assert changed.event.detail["identifiers_changed"] is True
    dumped = json.dumps([str(e.event) for e in (created, changed)])
    assert "ZZZ001" not in dumped and "nhi.example" not in dumped
