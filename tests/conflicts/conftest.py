"""Fixtures for the conflict tests: real outbox rows from `Processor` on the `store` fixture (SQLite,
and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set), and an in-memory EDC connector whose read-back,
failures and site edits the tests control."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import orjson
import pytest
from lxml import etree

from esource.domain.model import Enrollment, SubjectTransaction
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.privacy import Pseudonymizer
from esource.services.conflicts import item_path, odm_items
from esource.services.dispatch import TransientDeliveryError
from esource.services.process import Processor, content_key, enroll, intake_key_for
from esource.study.study import load_study

STUDY = "CV01"
ODM_NS = "http://www.cdisc.org/ns/odm/v1.3"
MRN = "http://hospital.example/mrn"


class Feeder:
    def __init__(self, study: Any, store: Any, clock: Any, subjects: list[str]) -> None:
        self.store = store
        self.processor = Processor(study, MappingEngine(study), store.uow, Pseudonymizer(b"conflict-key-0123456789ab"),
                                   clock)
        self._n = 0
        enroll(store.uow, [Enrollment(STUDY, s, "SITE.001", ((MRN, f"MRN-{s}"),), dt.date(2024, 4, 15),
                                      dt.date(2024, 5, 1)) for s in subjects])

    @staticmethod
    def obs(subject: str, oid: str, code: str, value: float, unit: str, version: int) -> dict:
        return {"resourceType": "Observation", "id": oid, "meta": {"versionId": str(version)},
                "status": "final" if version == 1 else "amended", "code": {"coding": [{"system": "http://loinc.org",
                                                                                        "code": code}]},
                "subject": {"reference": f"Patient/p-{subject}"}, "effectiveDateTime": "2024-05-01T09:00:00+02:00",
                "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}

    def weight_obs(self, subject: str, version: int, value: float | None = None) -> dict:
        return self.obs(subject, f"wt-{subject}", "29463-7", 70.0 + version * 0.5 if value is None else value, "kg",
                        version)

    def height_obs(self, subject: str, version: int) -> dict:
        return self.obs(subject, f"ht-{subject}", "8302-2", 169.0 + version, "cm", version)

    def ingest(self, subject: str, *resources: dict) -> Any:
        patient = {"resourceType": "Patient", "id": f"p-{subject}", "identifier": [{"system": MRN,
                                                                                    "value": f"MRN-{subject}"}],
                   "gender": "female", "birthDate": "1961-07-14"}
        data = orjson.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}",
                                        "resource": r} for r in (patient, *resources)]})
        self._n += 1
        return self.processor.ingest(parse_fhir(data, "test"), intake_key_for("test", self._n, content_key(data)))

    def weight(self, subject: str, version: int, value: float | None = None) -> Any:
        return self.ingest(subject, self.weight_obs(subject, version, value))

    def outbox(self, statuses: tuple[str, ...] | None = None) -> list:
        with self.store.uow(read_only=True) as uow:
            return uow.outbox_entries(statuses=statuses)


class FakeEdc:
    """An in-memory EDC connector: applies ItemData, de-duplicates on (subject, sequence) and refuses a
    known key with different content (like the sandbox's 409), reads back a Snapshot in esource's keys."""

    def __init__(self, *, read_back: bool = True) -> None:
        self.can_read_back = read_back
        self.values: dict[str, dict[str, str | None]] = {}
        self.seen: dict[tuple[str, int], bytes] = {}
        self.bodies: list[tuple[tuple[str, int], bytes]] = []
        self.reads = 0
        self.fail_reads = 0  # the next read-backs raise
        self.lose_answers = 0  # the next sends are applied, then raise (the ambiguous case)
        self.read_none = False
        self._lock = threading.Lock()

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities("fake", read_back=self.can_read_back, idempotency_key=True,
                                     integer_repeat_keys=False)

    def send(self, transaction: SubjectTransaction, odm: bytes) -> DeliveryReceipt:
        key = (transaction.subject_key, transaction.sequence)
        with self._lock:
            self.bodies.append((key, odm))
            if key in self.seen:
                if self.seen[key] != odm:
                    return DeliveryReceipt(False, permanent=True, code="409", message="key reused with other content")
                return DeliveryReceipt(True, reference=f"F-{key[0]}-{key[1]}", code="duplicate")
            self.seen[key] = odm
            subject = self.values.setdefault(transaction.subject_key, {})
            for item in odm_items(odm):
                subject[item.path] = item.value
            if self.lose_answers:
                self.lose_answers -= 1
                raise TransientDeliveryError("answer lost after the EDC committed", ambiguous=True)
        return DeliveryReceipt(True, reference=f"F-{key[0]}-{key[1]}")

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        with self._lock:
            self.reads += 1
            if self.fail_reads:
                self.fail_reads -= 1
                raise TransientDeliveryError("read-back: HTTP 503")
            if self.read_none or subject_key not in self.values:
                return None
            return snapshot(study_oid, subject_key, self.values[subject_key])

    def site_edit(self, subject: str, path: str, value: str | None) -> None:
        with self._lock:
            if value is None:
                self.values[subject].pop(path, None)
            else:
                self.values[subject][path] = value


def snapshot(study: str, subject: str, values: dict[str, str | None]) -> bytes:
    """A Snapshot ODM of one subject from {item path: value} (paths as `item_path` writes them)."""
    n = "{" + ODM_NS + "}"
    root = etree.Element(n + "ODM", nsmap={None: ODM_NS}, FileOID="SNAP", FileType="Snapshot",
                         CreationDateTime="2025-03-01T09:00:00Z", ODMVersion="1.3.2")
    cd = etree.SubElement(root, n + "ClinicalData", StudyOID=study, MetaDataVersionOID="MDV.CV01.1")
    sd = etree.SubElement(cd, n + "SubjectData", SubjectKey=subject)
    for path, value in values.items():
        ev, form, ig, item = path.split("/")
        se = etree.SubElement(sd, n + "StudyEventData", StudyEventOID=ev.split("[")[0])
        if "[" in ev:
            se.set("StudyEventRepeatKey", ev.split("[")[1].rstrip("]"))
        fd = etree.SubElement(se, n + "FormData", FormOID=form)
        g = etree.SubElement(fd, n + "ItemGroupData", ItemGroupOID=ig.split("[")[0])
        if "[" in ig:
            g.set("ItemGroupRepeatKey", ig.split("[")[1].rstrip("]"))
        it = etree.SubElement(g, n + "ItemData", ItemOID=item)
        if value is None:
            it.set("IsNull", "Yes")
        else:
            it.set("Value", value)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


WEIGHT = item_path("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
HEIGHT = item_path("SE.BASELINE", None, "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSORRES")


@pytest.fixture(scope="session")
def cv01() -> Any:
    return load_study(STUDY)


@pytest.fixture
def feeder(cv01, store, clock) -> Feeder:
    return Feeder(cv01, store, clock, ["001-0001", "001-0002"])


@pytest.fixture
def fake_edc() -> FakeEdc:
    return FakeEdc()


@pytest.fixture
def make_fake_edc():
    return FakeEdc


@pytest.fixture
def make_snapshot():
    return snapshot
