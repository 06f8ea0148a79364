"""Exports of the audit trail: CSV and ODM 1.3.2 AuditRecords (XSD-valid), pseudonymised, per study or
subject, each export itself recorded as a read."""

from __future__ import annotations

import csv
import io

import pytest
from audit_helpers import (
    ARLA,
    ARLA_SUBJECT,
    PSEUDONYM_KEY,
    WEIGHT_OBSERVATION,
    demo_processor,
    ingest_file,
    mapped,
    record,
)
from lxml import etree

from esource.audit.export import CSV_COLUMNS, export_csv, export_odm, export_study, study_entries
from esource.domain.audit import AuditAction, AuditEvent, user_actor
from esource.domain.model import SourceRef
from esource.odm.xsd import validate_odm
from esource.privacy import Pseudonymizer

ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
PSEUDO = Pseudonymizer(PSEUDONYM_KEY)


@pytest.fixture
def trail(store, clock):
    record(store,
           AuditEvent(AuditAction.MESSAGE_RECEIVED, study_oid="CV01",
                      detail={"intake_key": "CV01|file:/data/Jeanne_Dupont_record.json:ab12", "resources": 4}),
           mapped("128", subject="001-0001"),
           AuditEvent(AuditAction.DISCREPANCY_OPENED, study_oid="CV01", subject_key="001-0001", site_oid="SITE.001",
                      reason="Observation/obs-1: value out of range", source=SourceRef("Observation", "obs-1", "1",
                                                                                       "Observation/obs-1"),
                      detail={"kind": "out_of_range", "item_oid": "IT.VS.VSORRES"}))
    clock.advance(minutes=5)
    record(store, mapped("131", old="128", subject="001-0001", actor=user_actor("dm"), version="2"),
           mapped("77", subject="002-0001", site="SITE.002"),
           AuditEvent(AuditAction.PATIENT_MATCHED, study_oid="CV01", subject_key="001-0001", site_oid="SITE.001",
                      source=SourceRef("Patient", "MRN-778899", "1", "Patient|mrn|MRN-778899")))
    return store


def test_csv_export_has_every_entry_pseudonymised(trail):
    text = export_csv(study_entries(trail, "CV01"), PSEUDO)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[1]["new_value"] == "128" and rows[1]["item_oid"] == "IT.VS.VSORRES"
    assert rows[1]["item_group_repeat_key"] == "SYSBP" and rows[1]["study_event_repeat_key"] == ""
    assert rows[3]["old_value"] == "128" and rows[3]["actor"] == "user:dm"
    expected = PSEUDO.source_id(SourceRef("Observation", "obs-1", "2", "Observation/obs-1"))
    assert rows[3]["source_id"] == expected and rows[3]["source_version"] == "2"
    assert rows[5]["source_id"] == "Patient|v=1"
    # nothing names a source by its id, nor a patient by name or identifier
    assert "obs-1" not in text and "MRN-778899" not in text and "Dupont" not in text
    assert rows[2]["reason"].startswith(PSEUDO.reference(SourceRef("Observation", "obs-1", "1", "Observation/obs-1")))
    assert '"intake_key":"intake:' in rows[0]["detail"]
    assert rows[5]["hash"] and rows[5]["prev_hash"] == rows[4]["hash"]


def test_csv_export_per_subject(trail):
    rows = list(csv.DictReader(io.StringIO(export_csv(study_entries(trail, "CV01", "002-0001"), PSEUDO))))
    assert [r["subject_key"] for r in rows] == ["002-0001"]


def test_odm_export_is_valid_and_holds_every_entry(trail, clock):
    entries = study_entries(trail, "CV01")
    odm = export_odm(entries, PSEUDO, study_oid="CV01", metadata_version_oid="MDV.CV01.1", creation=clock.now())
    assert validate_odm(odm) == []
    root = etree.fromstring(odm)
    assert root.get("FileType") == "Transactional"
    records = root.findall(f".//{ODM}AuditRecord")
    assert sorted(r.get("ID") for r in records) == [f"AR.{i}" for i in range(1, 7)]
    # value changes are ItemData with the value and their AuditRecord
    items = root.findall(f".//{ODM}ItemData")
    assert [(i.get("Value"), i.get("TransactionType")) for i in items] == [("128", "Insert"), ("131", "Update"),
                                                                           ("77", "Insert")]
    update = items[1].find(f"{ODM}AuditRecord")
    assert update.find(f"{ODM}UserRef").get("UserOID") == "USR.dm"
    assert update.find(f"{ODM}LocationRef").get("LocationOID") == "SITE.001"
    assert update.find(f"{ODM}SourceID").text == PSEUDO.source_id(SourceRef("Observation", "obs-1", "2", "x"))
    group = items[1].getparent()
    assert (group.get("ItemGroupOID"), group.get("ItemGroupRepeatKey")) == ("IG.VS", "SYSBP")
    # everything else is in ClinicalData/AuditRecords, at the study location when it has no site
    others = root.find(f".//{ODM}ClinicalData/{ODM}AuditRecords").findall(f"{ODM}AuditRecord")
    assert [r.get("ID") for r in others] == ["AR.1", "AR.3", "AR.6"]
    assert others[0].find(f"{ODM}LocationRef").get("LocationOID") == "LOC.CV01"
    assert others[0].find(f"{ODM}ReasonForChange").text.startswith("message.received")
    users = {u.get("OID") for u in root.iter(f"{ODM}User")}
    assert users == {"USR.ESOURCE", "USR.dm"}
    assert b"obs-1" not in odm and b"MRN-778899" not in odm and b"Dupont" not in odm


def test_an_empty_export_is_valid(store, clock):
    odm = export_odm([], PSEUDO, study_oid="CV01", metadata_version_oid="MDV.CV01.1", creation=clock.now())
    assert validate_odm(odm) == []


def test_the_export_of_mapped_demo_data_is_valid_and_recorded_as_a_read(store, clock):
    processor = demo_processor(store, clock)
    ingest_file(processor, ARLA)
    before = len(study_entries(store, "CV01"))
    data = export_study(store, "CV01", "odm", PSEUDO, metadata_version_oid=processor.study.metadata_version_oid,
                        subject_key=ARLA_SUBJECT, actor=user_actor("dm"), creation=clock.now())
    assert validate_odm(data) == []
    assert WEIGHT_OBSERVATION.encode() not in data
    root = etree.fromstring(data)
    assert len(root.findall(f".//{ODM}ItemData")) > 50
    after = study_entries(store, "CV01")
    assert len(after) == before + 1
    read = after[-1].event
    assert (read.action, read.actor, read.subject_key) == (AuditAction.DATA_READ, "user:dm", ARLA_SUBJECT)
    assert read.detail["format"] == "odm" and read.detail["entries"] > 50


def test_export_study_refuses_unknown_formats(store):
    with pytest.raises(ValueError, match="csv or odm"):
        export_study(store, "CV01", "xlsx", PSEUDO)


def test_a_dead_letters_file_name_does_not_leave_in_the_export(store):
    key = "/feeds/2024/Jeanne_Dupont_0c89b627.json:0123abcd4567ef89"
    record(store, AuditEvent(AuditAction.MESSAGE_DEAD_LETTERED,
                             reason="/feeds/2024/Jeanne_Dupont_0c89b627.json: not JSON",
                             detail={"intake_key": key, "channel": "file"}))
    text = export_csv(study_entries(store, None), PSEUDO)  # no study: every entry
    assert "Dupont" not in text
    (row,) = csv.DictReader(io.StringIO(text))
    assert row["reason"].endswith(": not JSON") and row["reason"].startswith("intake:")
