"""Builders for the process tests (FHIR inputs, outbox reads) and the fixtures' parts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
from lxml import etree

from esource.domain.model import Enrollment
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.privacy import Pseudonymizer
from esource.services.process import Processor, content_key, enroll, intake_key_for

ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
DATA = Path(__file__).resolve().parents[1] / "data"
MRN = ("http://hospital.example/mrn", "MRN-778899")
L, U = "http://loinc.org", "http://unitsofmeasure.org"


def make_processor(study, store, clock) -> Processor:
    p = Processor(study, MappingEngine(study), store.uow, Pseudonymizer(b"test-key-0123456789abcdef"), clock)
    enroll(store.uow, [Enrollment("CV01", "001-0007", "SITE.001", (MRN,), dt.date(2024, 4, 15),
                                  dt.date(2024, 5, 1))])
    return p


def patient(pid: str = "MRN-778899") -> dict:
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": MRN[0], "value": MRN[1]}],
            "name": [{"family": "Dupont", "given": ["Jeanne"]}], "gender": "female", "birthDate": "1961-07-14",
            "telecom": [{"system": "phone", "value": "+33 1 23 45 67 89"}]}


def obs(oid: str, code: str, value, unit: str, when: str, version: str = "1", status: str = "final") -> dict:
    return {"resourceType": "Observation", "id": oid, "meta": {"versionId": version}, "status": status,
            "code": {"coding": [{"system": L, "code": code}]}, "subject": {"reference": "Patient/MRN-778899"},
            "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": unit, "system": U, "code": unit},
            "note": [{"text": "patient anxious, lives alone"}]}


def condition(cid: str, term: str, onset: str, version: str = "1") -> dict:
    return {"resourceType": "Condition", "id": cid, "meta": {"versionId": version},
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": term}], "text": term},
            "subject": {"reference": "Patient/MRN-778899"}, "onsetDateTime": onset}


def bundle(*resources: dict) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "collection",
                         "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}", "resource": r}
                                   for r in resources]})


def ingest(processor: Processor, data: bytes, key: str | None = None):
    parsed = parse_fhir(data, "test")
    return processor.ingest(parsed, key or intake_key_for("test", content_key(data)))


def outbox(store) -> list:
    with store.uow(read_only=True) as uow:
        return uow.outbox_entries(statuses=None)


def item_data(odm: bytes) -> dict[tuple, tuple]:
    root = etree.fromstring(odm)
    out = {}
    for it in root.iter(f"{ODM}ItemData"):
        ig = it.getparent()
        se = ig.getparent().getparent()
        reason = it.find(f"{ODM}AuditRecord/{ODM}ReasonForChange")
        out[(se.get("StudyEventOID"), ig.get("ItemGroupRepeatKey"), it.get("ItemOID"))] = (
            it.get("Value"), it.get("TransactionType"), reason.text if reason is not None else None)
    return out
