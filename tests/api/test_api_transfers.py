"""Transfers (the outbox) and the ODM ClinicalData pull: filters by site, subject, visit, status and
creation time, paging, the ODM body only for data managers and admins and only after a DATA_READ audit
entry, and an XSD-valid ODM 1.3.2 Snapshot of what esource sent since a time."""

from __future__ import annotations

import datetime as dt

from api_helpers import ARLA_ID, CY_ID, SITE_A, SITE_B, assert_problem, transfers
from lxml import etree
from sqlalchemy import delete, func, select

from esource.domain.audit import AuditAction
from esource.odm.xsd import validate_odm
from esource.store.schema import OutboxVisitRow

ODM_NS = "{http://www.cdisc.org/ns/odm/v1.3}"
T0 = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)  # the clock at the first seed message (conftest)


def data_reads(world) -> list:
    with world.container.store.uow(read_only=True) as uow:
        return uow.audit_entries(actions=[AuditAction.DATA_READ])[0]


def test_filters_and_paging(world):
    everything = transfers(world)
    rows = everything["items"]
    assert everything["total"] == len(rows) >= 2
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)  # newest first
    assert all(set(r) >= {"subject_key", "site_oid", "visits", "status", "created_at"} and "odm" not in r for r in rows)
    assert {r["subject_key"]: r["site_oid"] for r in rows} == {"001-0001": SITE_A, "002-0001": SITE_B}
    assert {r["site_oid"] for r in transfers(world, site=SITE_B)["items"]} == {SITE_B}
    assert {r["subject_key"] for r in transfers(world, subject="001-0001")["items"]} == {"001-0001"}
    # visit: a StudyEventOID inside the transaction
    visits = {v for r in rows for v in r["visits"]}
    assert "SE.SCREEN" in visits
    for visit in visits:
        got = transfers(world, visit=visit)
        assert got["total"] == sum(1 for r in rows if visit in r["visits"]) and got["total"] > 0
    assert transfers(world, visit="SE.NOPE")["total"] == 0
    # status
    with world.container.store.uow() as uow:
        uow.set_outbox_status(rows[0]["id"], "acked", attempted=True)
        uow.commit()
    assert [r["id"] for r in transfers(world, status="acked")["items"]] == [rows[0]["id"]]
    both = world.get("/studies/CV01/transfers", "dm", params=[("status", "acked"), ("status", "pending")]).json()
    assert both["total"] == everything["total"]
    # creation time: the first seed message at T0, the second an hour later; `until` is excluded
    first = transfers(world, until=(T0 + dt.timedelta(minutes=30)).isoformat())
    assert {r["subject_key"] for r in first["items"]} == {"001-0001"}
    later = transfers(world, since="2025-03-01T09:30:00Z")
    assert {r["subject_key"] for r in later["items"]} == {"002-0001"}
    assert transfers(world, since="2025-03-01T10:30:00+01:00")["total"] == later["total"]  # 09:30 UTC
    assert transfers(world, since=T0.isoformat(), until=T0.isoformat())["total"] == 0
    # paging
    page = world.get("/studies/CV01/transfers", "dm", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == everything["total"] and page["limit"] == 1 and page["offset"] == 1
    assert [r["id"] for r in page["items"]] == [rows[1]["id"]]
    assert_problem(world.get("/studies/CV01/transfers", "dm", params={"limit": 0}), 422)
    assert_problem(world.get("/studies/CV01/transfers", "dm", params={"status": "lost"}), 422)
    assert_problem(world.get("/studies/CV01/transfers", "dm", params={"since": "yesterday"}), 422)


def test_the_visit_index_is_rebuilt_from_the_stored_odm(world):
    before = {r["id"]: r["visits"] for r in transfers(world)["items"]}
    with world.container.store.uow() as uow:
        uow.session.execute(delete(OutboxVisitRow.__table__))
        uow.commit()
    assert {r["id"]: r["visits"] for r in transfers(world, visit="SE.SCREEN")["items"]} == before
    with world.container.store.uow(read_only=True) as uow:
        assert uow.session.execute(select(func.count()).select_from(OutboxVisitRow.__table__)).scalar() > 0


def test_one_transfer_with_its_odm_for_data_managers_only_and_audited(world):
    rows = transfers(world)["items"]
    a = next(r for r in rows if r["site_oid"] == SITE_A)
    assert data_reads(world) == []
    # a CRA of the site: the metadata, never the ODM, and nothing to audit
    r = world.get(f"/studies/CV01/transfers/{a['id']}", "cra_a")
    assert r.status_code == 200 and r.json()["odm"] is None and r.json()["previous_values"] is None
    assert {k: v for k, v in r.json().items() if k not in ("odm", "previous_values")} == a
    assert data_reads(world) == []
    # a data manager: the ODM as sent, and a DATA_READ entry naming who read which transaction
    r = world.get(f"/studies/CV01/transfers/{a['id']}", "dm")
    assert r.status_code == 200
    odm = r.json()["odm"].encode()
    assert validate_odm(odm) == []
    assert etree.fromstring(odm).find(f".//{ODM_NS}SubjectData").get("SubjectKey") == "001-0001"
    [read] = data_reads(world)
    assert read.event.actor == "user:dm" and read.event.subject_key == "001-0001" and read.event.site_oid == SITE_A
    assert read.event.detail["outbox_id"] == a["id"]
    assert world.get(f"/studies/CV01/transfers/{a['id']}", "admin").json()["odm"] == r.json()["odm"]
    assert len(data_reads(world)) == 2
    assert_problem(world.get("/studies/CV01/transfers/999999", "dm"), 404)
    assert_problem(world.get("/studies/CV01/transfers/abc", "dm"), 422)


def _subjects(odm: bytes) -> dict[str, int]:
    root = etree.fromstring(odm)
    return {s.get("SubjectKey"): len(s.findall(f".//{ODM_NS}ItemData")) for s in root.iter(f"{ODM_NS}SubjectData")}


def test_the_odm_pull_is_a_valid_snapshot_of_what_was_sent(world):
    r = world.get("/studies/CV01/odm/clinicaldata", "edc")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    assert validate_odm(r.content) == [], validate_odm(r.content)[:3]
    root = etree.fromstring(r.content)
    assert root.get("FileType") == "Snapshot" and root.get("ODMVersion") == "1.3.2"
    assert root.find(f"{ODM_NS}ClinicalData").get("StudyOID") == "CV01"
    assert root.find(f".//{ODM_NS}TransactionType") is None and "TransactionType" not in r.text
    with world.container.store.uow(read_only=True) as uow:
        sent = {k: len(uow.sent_items("CV01", k)) for k in ("001-0001", "002-0001")}
    assert _subjects(r.content) == sent and int(r.headers["X-Esource-Item-Count"]) == sum(sent.values())
    sites = {s.get("SubjectKey"): s.find(f"{ODM_NS}SiteRef").get("LocationOID")
             for s in root.iter(f"{ODM_NS}SubjectData")}
    assert sites == {"001-0001": SITE_A, "002-0001": SITE_B}
    for value in (CY_ID[1], ARLA_ID[1], "249867"):  # identifiers and resource ids never leave
        assert value not in r.text
    # the next `since` overlaps the read (a Snapshot is idempotent)
    assert r.headers["X-Esource-Next-Since"] == "2025-03-01T10:59:00Z"  # the clock is at 11:00 after seeding


def test_the_odm_pull_since_a_time_and_for_one_subject(world):
    later = world.get("/studies/CV01/odm/clinicaldata", "dm", params={"since": "2025-03-01T09:30:00Z"})
    assert later.status_code == 200 and validate_odm(later.content) == []
    assert set(_subjects(later.content)) == {"002-0001"}
    one = world.get("/studies/CV01/odm/clinicaldata", "admin", params={"subject": "001-0001"})
    assert set(_subjects(one.content)) == {"001-0001"}
    none = world.get("/studies/CV01/odm/clinicaldata", "edc", params={"since": "2030-01-01T00:00:00Z"})
    assert none.status_code == 200 and _subjects(none.content) == {} and validate_odm(none.content) == []
    assert none.headers["X-Esource-Item-Count"] == "0"
    assert_problem(world.get("/studies/CV01/odm/clinicaldata", "edc", params={"since": "soon"}), 422)


def test_every_pull_is_audited(world):
    world.get("/studies/CV01/odm/clinicaldata", "edc", params={"since": "2025-03-01T09:30:00Z"})
    world.get("/studies/CV01/odm/clinicaldata", "dm", params={"subject": "001-0001"})
    reads = data_reads(world)
    assert [(e.event.actor, e.event.subject_key) for e in reads] == [("user:edc", None), ("user:dm", "001-0001")]
    assert reads[0].event.detail["since"] == "2025-03-01T09:30:00+00:00" and reads[0].event.detail["item_count"] > 0
    # a refused pull reads nothing and records nothing
    assert world.get("/studies/CV01/odm/clinicaldata", "edc_other").status_code == 403
    assert len(data_reads(world)) == 2
