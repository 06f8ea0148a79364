"""Shared helpers for the OpenClinica tests: real outbox rows made by esource's use case (`Processor`),
the OpenClinica 4 emulator served by uvicorn on loopback, and small ODM readers."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import orjson
from lxml import etree

from esource.domain.model import Enrollment, SubjectTransaction
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.privacy import Pseudonymizer
from esource.services.process import Processor, content_key, enroll, intake_key_for
from esource.services.server import ThreadedServer, free_port

__all__ = ["Served", "Feeder", "FixedClock", "free_port", "tx", "odm_values", "replace_value", "STUDY", "MDV", "TOKEN",
           "A", "B", "WEIGHT", "HEIGHT", "ODM", "OC"]

STUDY, MDV = "CV01", "MDV.CV01.1"
TOKEN = "oc-test-token-7f3a91"
MRN_SYSTEM = "http://hospital.example/mrn"
LOINC, UCUM = "http://loinc.org", "http://unitsofmeasure.org"
ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
OC = "{http://www.openclinica.org/ns/odm_ext_v130/v3.1}"
WEIGHT = ("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
HEIGHT = ("SE.BASELINE", None, "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSORRES")


class FixedClock:
    def now(self) -> dt.datetime:
        return dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)


class Feeder:
    """Enrolls subjects and ingests FHIR through the real use case: the outbox then holds the ODM
    transactions production would send."""

    def __init__(self, study: Any, store: Any, subjects: list[str]) -> None:
        self.store = store
        self.processor = Processor(study, MappingEngine(study), store.uow, Pseudonymizer(b"oc-test-key-0123456789abc"),
                                   FixedClock())
        self._n = 0
        enroll(store.uow, [Enrollment(STUDY, s, "SITE.001", ((MRN_SYSTEM, f"MRN-{s}"),), dt.date(2024, 4, 15),
                                      dt.date(2024, 5, 1)) for s in subjects])

    def ingest(self, subject: str, *resources: dict) -> Any:
        patient = {"resourceType": "Patient", "id": f"p-{subject}",
                   "identifier": [{"system": MRN_SYSTEM, "value": f"MRN-{subject}"}],
                   "gender": "female", "birthDate": "1961-07-14"}
        data = orjson.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}",
                                        "resource": r} for r in (patient, *resources)]})
        self._n += 1
        return self.processor.ingest(parse_fhir(data, "oc-test"), intake_key_for("oc-test", self._n, content_key(data)))

    @staticmethod
    def obs(subject: str, oid: str, code: str, value: float, unit: str, version: int) -> dict:
        return {"resourceType": "Observation", "id": oid, "meta": {"versionId": str(version)},
                "status": "final" if version == 1 else "amended", "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": f"Patient/p-{subject}"}, "effectiveDateTime": "2024-05-01T09:00:00+02:00",
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}

    def weight(self, subject: str, version: int) -> Any:
        return self.ingest(subject, self.obs(subject, f"wt-{subject}", "29463-7", 70.0 + version * 0.5, "kg", version))

    def height(self, subject: str, version: int = 1) -> Any:
        return self.ingest(subject, self.obs(subject, f"ht-{subject}", "8302-2", 169.0 + version, "cm", version))

    def outbox(self) -> list:
        with self.store.uow(read_only=True) as uow:
            return uow.outbox_entries()


def tx(row: Any) -> SubjectTransaction:
    return SubjectTransaction(row.study_oid, MDV, row.subject_key, row.site_oid, None, [], row.sequence)


def odm_values(odm: bytes, subject: str | None = None) -> dict[tuple, str | None]:
    """{(event, event repeat, form, group, group repeat, item): value} of the ItemData in `odm`."""
    out: dict[tuple, str | None] = {}
    root = etree.fromstring(odm)
    for sd in root.iter(f"{ODM}SubjectData"):
        if subject is not None and sd.get("SubjectKey") != subject:
            continue
        for se in sd.iter(f"{ODM}StudyEventData"):
            for fd in se.iter(f"{ODM}FormData"):
                for ig in fd.iter(f"{ODM}ItemGroupData"):
                    for it in ig.iter(f"{ODM}ItemData"):
                        out[(se.get("StudyEventOID"), se.get("StudyEventRepeatKey"), fd.get("FormOID"),
                             ig.get("ItemGroupOID"), ig.get("ItemGroupRepeatKey"), it.get("ItemOID"))] = it.get("Value")
    return out


def replace_value(odm: bytes, item_oid: str, value: str | None, *, group_repeat: str | None = None) -> bytes:
    """`odm` with one ItemData's Value changed (None: the Value attribute removed, IsNull="Yes")."""
    root = etree.fromstring(odm)
    for ig in root.iter(f"{ODM}ItemGroupData"):
        if group_repeat is not None and ig.get("ItemGroupRepeatKey") != group_repeat:
            continue
        for it in ig.iter(f"{ODM}ItemData"):
            if it.get("ItemOID") == item_oid:
                if value is None:
                    del it.attrib["Value"]
                    it.set("IsNull", "Yes")
                else:
                    it.set("Value", value)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


class Served:
    """An OpenClinica emulator app served on a free loopback port (esource's ThreadedServer)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.edc = app.state.openclinica
        self.server = ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1)

    @property
    def root(self) -> str:
        return self.server.url

    @property
    def url(self) -> str:
        """The OpenClinica web-app root (what the connector is given)."""
        return f"{self.root}/OpenClinica"

    def start(self) -> Served:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self.edc.close()

    # -- HTTP helpers ----------------------------------------------------------------------------------

    def faults(self, **plan: Any) -> dict:
        r = httpx.post(f"{self.root}/_faults", json=plan, timeout=5)
        r.raise_for_status()
        return r.json()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.root}/_faults", timeout=5).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f"{self.root}/_test/stats", timeout=5).json()

    def job_count(self) -> int:
        return sum(self.stats()["jobs"].values())

# the two subjects the OpenClinica tests use
A, B = "001-0001", "001-0002"
