"""Sample data, FHIR builders and store readers shared by the HTTP API tests."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import orjson

from esource.bootstrap import Container
from esource.domain.model import Enrollment
from esource.observability import JsonFormatter

DATA = Path(__file__).resolve().parents[1] / "data"
CY_FILE = DATA / "ips" / "CY_249867.json"  # IPS document Bundle, Patient/249867, 62 resources
ARLA_FILE = DATA / "synthea" / "Arla_Lang_0c89b627-646b-40ff-a620-c8509a10912c.json"  # Synthea transaction
GEORGE_FILE = DATA / "synthea" / "George_Kutch_7b02ca1b-7983-47e3-9206-a50bbfb1b386.json"  # nobody enrolled him
MINIMAL_IPS_FILE = DATA / "ips" / "HL7-IPS-IG-bundle-minimal.json"

FHIR = {"Content-Type": "application/fhir+json"}
SECRET = "t0ken-" + "x" * 40
PSEUDONYM_KEY = "p" * 32
LOINC, UCUM = "http://loinc.org", "http://unitsofmeasure.org"
MRN = "http://hospital.example/mrn"

CY_ID = ("urn:oid:2.16.840.1.113883.3.9143.2.1.5", "CY/GHS-MI-1111")
ARLA_ID = ("http://hospital.smarthealthit.org", "0c89b627-646b-40ff-a620-c8509a10912c")
# a crafted patient (MRN-00001) for readings at chosen study days
DAY1 = dt.date(2024, 5, 1)
CRAFTED = Enrollment("CV01", "001-0100", "SITE.001", ((MRN, "MRN-00001"),), dt.date(2024, 4, 10), DAY1)
ENROLLMENTS = [
    Enrollment("CV01", "001-0001", "SITE.001", (CY_ID,), dt.date(2020, 3, 10), dt.date(2020, 4, 6)),
    Enrollment("CV01", "002-0001", "SITE.002", (ARLA_ID,), dt.date(2019, 3, 1), dt.date(2019, 3, 26)),
    CRAFTED,
]

WEIGHT = ("29463-7", "kg")
SYSBP = ("8480-6", "mm[Hg]")
HR = ("8867-4", "/min")


def study_date(day: int) -> dt.date:
    """The calendar date of a study day (no Day 0) for the crafted subject."""
    return DAY1 + dt.timedelta(days=day - 1 if day > 0 else day)


def patient(mrn: str = "MRN-00001", pid: str = "pat-1") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": MRN, "value": mrn}],
            "name": [{"family": "Doe-Secret", "given": ["Jane"]}], "gender": "female", "birthDate": "1961-07-14"}


def observation(oid: str, test: tuple[str, str], value: Any, day: int, *, subject: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    code, unit = test
    return {"resourceType": "Observation", "id": oid, "meta": {"versionId": "1"}, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": subject or {"reference": "Patient/pat-1"},
            "effectiveDateTime": f"{study_date(day).isoformat()}T09:00:00+02:00",
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}, **extra}


def bundle(*resources: dict[str, Any], btype: str = "collection") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": btype,
            "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}", "resource": r}
                      for r in resources]}


def message(*resources: dict[str, Any]) -> dict[str, Any]:
    header = {"resourceType": "MessageHeader", "id": "msg-1", "eventCoding": {"system": "urn:ehr", "code": "update"},
              "source": {"endpoint": "urn:ehr:lab"}}
    return bundle(header, *resources, btype="message")


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


# ---------------------------------------------------------------- reading the store


def outbox(c: Container) -> list[Any]:
    with c.store.uow(read_only=True) as uow:
        return uow.outbox_entries(statuses=None)


def dead_letters(c: Container) -> list[Any]:
    with c.store.uow(read_only=True) as uow:
        return uow.dead_letters(statuses=None)


def facts(c: Container, subject_key: str) -> list[Any]:
    with c.store.uow(read_only=True) as uow:
        return uow.facts("CV01", subject_key)


def all_fact_count(c: Container) -> int:
    from sqlalchemy import func, select

    from esource.store.schema import SubjectFactRow

    with c.store.uow(read_only=True) as uow:
        return int(uow.session.execute(select(func.count()).select_from(SubjectFactRow.__table__)).scalar_one())


def sent_items(c: Container, subject_key: str) -> dict[Any, Any]:
    with c.store.uow(read_only=True) as uow:
        return uow.sent_items("CV01", subject_key)


def open_discrepancies(c: Container, subject_key: str) -> list[Any]:
    with c.store.uow(read_only=True) as uow:
        return uow.open_discrepancies("CV01", subject_key)


# ---------------------------------------------------------------- answers


def assert_outcome(r: Any, status: int, code: str | None = None, contains: str | None = None) -> dict[str, Any]:
    """`r` is a FHIR OperationOutcome with this status (and an issue of this code / containing this text)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"], body
    for i in body["issue"]:
        assert i["severity"] in ("fatal", "error", "warning", "information") and i["code"], i
    if code:
        assert any(i["code"] == code for i in body["issue"]), body
    if contains:
        assert any(contains in i.get("diagnostics", "") for i in body["issue"]), body
    assert "Traceback" not in r.text
    return body


def accepted(body: dict[str, Any]) -> list[str]:
    return [i["diagnostics"].removeprefix("accepted ") for i in body["issue"]
            if i["severity"] == "information" and i["code"] == "informational"
            and i.get("diagnostics", "").startswith("accepted ")]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head == name and not labels:
            return float(value)
        if head.startswith(name + "{") and head.endswith("}"):
            got = ",".join(sorted(head[len(name) + 1:-1].split(",")))
            if got == want:
                return float(value)
    return 0.0


class LogCapture(logging.Handler):
    """Every record of the `esource` loggers, formatted as the service writes them (JSON)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def __enter__(self) -> "LogCapture":
        logger = logging.getLogger("esource")
        self._level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("esource")
        logger.removeHandler(self)
        logger.setLevel(self._level)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
