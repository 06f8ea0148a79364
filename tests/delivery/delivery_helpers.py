"""Shared helpers for the delivery tests: real outbox rows from `Processor`, a sandbox EDC served by
uvicorn on loopback, and what the EDC should hold after replaying the outbox's ODM in order."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import orjson
from lxml import etree

from esource.domain.model import Enrollment
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.privacy import Pseudonymizer
from esource.services.process import Processor, content_key, enroll, intake_key_for
from esource.services.server import ThreadedServer, free_port

__all__ = ["Feeder", "SandboxServer", "free_port", "odm_items", "expected_state", "edc_state", "snapshot_state"]

ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
MRN_SYSTEM = "http://hospital.example/mrn"
LOINC, UCUM = "http://loinc.org", "http://unitsofmeasure.org"
STUDY = "CV01"


# ------------------------------------------------------------------------------------------ outbox rows


class Feeder:
    """Enrolls subjects and ingests FHIR through the real use case, so the outbox holds the ODM
    transactions production would send (one per subject per ingest)."""

    def __init__(self, study, store, clock, subjects: list[str]) -> None:
        self.study = study
        self.store = store
        self.processor = Processor(study, MappingEngine(study), store.uow, Pseudonymizer(b"test-key-0123456789abcdef"),
                                   clock)
        self.subjects = subjects
        self._n = 0
        enroll(store.uow, [Enrollment(STUDY, s, "SITE.001" if i % 2 == 0 else "SITE.002", ((MRN_SYSTEM, self.mrn(s)),),
                                      dt.date(2024, 4, 15), dt.date(2024, 5, 1)) for i, s in enumerate(subjects)])

    @staticmethod
    def mrn(subject: str) -> str:
        return f"MRN-{subject}"

    def patient(self, subject: str) -> dict:
        return {"resourceType": "Patient", "id": f"p-{subject}",
                "identifier": [{"system": MRN_SYSTEM, "value": self.mrn(subject)}],
                "gender": "female" if subject.endswith(("1", "3", "5", "7", "9")) else "male", "birthDate": "1961-07-14"}

    def obs(self, subject: str, oid: str, code: str, value: float, unit: str, when: str, version: int) -> dict:
        return {"resourceType": "Observation", "id": oid, "meta": {"versionId": str(version)},
                "status": "final" if version == 1 else "amended",
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": f"Patient/p-{subject}"}, "effectiveDateTime": when,
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}

    def ingest(self, *resources: dict) -> Any:
        data = orjson.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}",
                                        "resource": r} for r in resources]})
        self._n += 1
        return self.processor.ingest(parse_fhir(data, "test"), intake_key_for("test", self._n, content_key(data)))

    def weight(self, subject: str, version: int, value: float | None = None) -> Any:
        """Baseline weight of `subject`: version 1 makes the first transaction (Inserts), every later
        version an Update of the result."""
        value = value if value is not None else 70.0 + version * 0.5
        return self.ingest(self.patient(subject),
                           self.obs(subject, f"wt-{subject}", "29463-7", value, "kg", "2024-05-01T09:00:00+02:00",
                                    version))

    def height(self, subject: str, value: float = 170.0, version: int = 1) -> Any:
        """Baseline height: a new item group (Inserts) for a subject that already has its weight."""
        return self.ingest(self.patient(subject),
                           self.obs(subject, f"ht-{subject}", "8302-2", value, "cm", "2024-05-01T09:00:00+02:00",
                                    version))

    def rounds(self, versions: int) -> None:
        """`versions` transactions per subject, interleaved across subjects (subject order per round)."""
        for v in range(1, versions + 1):
            for s in self.subjects:
                self.weight(s, v)

    def outbox(self, statuses: tuple[str, ...] | None = None) -> list:
        with self.store.uow(read_only=True) as uow:
            return uow.outbox_entries(statuses=statuses)


def odm_items(odm: bytes) -> list[tuple[tuple, str, str | None]]:
    """(item key, TransactionType, Value) of every ItemData, in document order."""
    root = etree.fromstring(odm)
    out = []
    for cd in root.iter(f"{ODM}ClinicalData"):
        for sd in cd.iter(f"{ODM}SubjectData"):
            for se in sd.iter(f"{ODM}StudyEventData"):
                for fd in se.iter(f"{ODM}FormData"):
                    for ig in fd.iter(f"{ODM}ItemGroupData"):
                        for it in ig.iter(f"{ODM}ItemData"):
                            key = (sd.get("SubjectKey"), se.get("StudyEventOID"), se.get("StudyEventRepeatKey"),
                                   fd.get("FormOID"), ig.get("ItemGroupOID"), ig.get("ItemGroupRepeatKey"),
                                   it.get("ItemOID"))
                            out.append((key, it.get("TransactionType") or "Snapshot", it.get("Value")))
    return out


def expected_state(entries: list) -> dict[tuple, str | None]:
    """What the EDC must hold after applying every transaction once, in sequence per subject."""
    state: dict[tuple, str | None] = {}
    for e in sorted(entries, key=lambda e: (e.study_oid, e.subject_key, e.sequence)):
        for key, tt, value in odm_items(e.odm):
            if tt == "Remove":
                state.pop(key, None)
            elif tt != "Context":
                state[key] = value
    return state


def edc_state(items: list[dict]) -> dict[tuple, str | None]:
    return {(i["subject"], i["event"], i["event_repeat"], i["form"], i["group"], i["group_repeat"], i["item"]): i["value"]
            for i in items}


def snapshot_state(odm: bytes) -> dict[tuple, str | None]:
    return {key: value for key, _tt, value in odm_items(odm)}


# ------------------------------------------------------------------------------------------ HTTP server


class SandboxServer:
    """A sandbox EDC app served on a free loopback port (esource's ThreadedServer), with test conveniences."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.app = app
        self.server = ThreadedServer(app, "127.0.0.1", port or free_port(), log_level="critical",
                                     graceful_shutdown_s=1)

    @property
    def port(self) -> int:
        return self.server.config.port

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> SandboxServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        assert not self.server.thread.is_alive(), "sandbox EDC did not stop"

    # ------------------------------------------------------------------ test conveniences (own client)

    def _get(self, path: str) -> Any:
        r = httpx.get(self.url + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def faults(self, **plan: Any) -> dict:
        r = httpx.post(self.url + "/_faults", json=plan, timeout=10)
        r.raise_for_status()
        return r.json()

    def fault_state(self) -> dict:
        return self._get("/_faults")

    def clear_faults(self) -> None:
        httpx.delete(self.url + "/_faults", timeout=10).raise_for_status()

    def transactions(self, study: str = STUDY) -> list[dict]:
        return self._get(f"/studies/{study}/transactions")

    def items(self, study: str = STUDY) -> list[dict]:
        return self._get(f"/studies/{study}/items")

    def audit(self, study: str = STUDY) -> list[dict]:
        return self._get(f"/studies/{study}/audit")
