"""Helpers of the reconciliation tests: subjects enrolled and fed through the real ingest use case
(`Processor`) so the queue holds the discrepancies production would, the reconciliation service over the
same store, a sandbox EDC on loopback, and small readers of the outbox, the queue and the audit trail."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import orjson
from lxml import etree

from esource.domain.model import Enrollment
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.odm.xsd import validate_odm
from esource.privacy import Pseudonymizer
from esource.reconciliation.actions import Reconciliation
from esource.reconciliation.model import DiscrepancyFilter
from esource.reconciliation.policy import ReviewPolicies
from esource.services.process import Processor, content_key, enroll, intake_key_for
from esource.study.study import builtin_maps_dir, load_study

STUDY = "CV01"
MRN = "http://hospital.example/mrn"
LOINC, UCUM = "http://loinc.org", "http://unitsofmeasure.org"
ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
PSEUDONYMS = Pseudonymizer(b"recon-test-key-0123456789abcdef")
DAY1 = dt.date(2024, 5, 1)
CONSENT = dt.date(2024, 4, 15)
BASELINE = "2024-05-01T09:00:00+02:00"  # study day 1: SE.BASELINE
UNSCHEDULED = "2024-06-10T08:30:00+02:00"  # study day 41: no scheduled VS window -> SE.UNSCHED[2024-06-10]
ACTOR = "user:dm1"


class Feeder:
    """Enrolls subjects (001-* at SITE.001, 002-* at SITE.002) and ingests FHIR through the Processor."""

    def __init__(self, study: Any, store: Any, clock: Any, subjects: list[str], *,
                 policies: ReviewPolicies | None = None) -> None:
        self.study = study
        self.store = store
        self.clock = clock
        self.policies = policies
        self.processor = Processor(study, MappingEngine(study), store.uow, PSEUDONYMS, clock,
                                   hold_for_review=policies.hold_for_review if policies else None)
        self._n = 0
        enroll(store.uow, [Enrollment(STUDY, s, f"SITE.{s[:3]}", ((MRN, f"MRN-{s}"),), CONSENT, DAY1)
                           for s in subjects])

    @staticmethod
    def patient(subject: str, gender: str = "female") -> dict:
        return {"resourceType": "Patient", "id": f"p-{subject}", "identifier": [{"system": MRN, "value": f"MRN-{subject}"}],
                "gender": gender, "birthDate": "1961-07-14"}

    @staticmethod
    def obs(subject: str, oid: str, code: str, value: float, unit: str, *, when: str = BASELINE, version: int = 1,
            ucum: bool = True) -> dict:
        q: dict[str, Any] = {"value": value, "unit": unit}
        if ucum:
            q.update(system=UCUM, code=unit)
        return {"resourceType": "Observation", "id": oid, "meta": {"versionId": str(version)},
                "status": "final" if version == 1 else "amended",
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": f"Patient/p-{subject}"}, "effectiveDateTime": when, "valueQuantity": q}

    def sysbp(self, subject: str, value: float, *, version: int = 1, when: str = BASELINE) -> dict:
        return self.obs(subject, f"bp-{subject}", "8480-6", value, "mm[Hg]", when=when, version=version)

    def weight(self, subject: str, value: float, *, version: int = 1, when: str = BASELINE) -> dict:
        return self.obs(subject, f"wt-{subject}", "29463-7", value, "kg", when=when, version=version)

    def ingest(self, subject: str, *resources: dict, gender: str = "female") -> Any:
        data = orjson.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}",
                                        "resource": r} for r in (self.patient(subject, gender), *resources)]})
        self._n += 1
        return self.processor.ingest(parse_fhir(data, "test"), intake_key_for("test", self._n, content_key(data)))

    # -- reading back what the use cases wrote

    def outbox(self, statuses: tuple[str, ...] | None = None, subject: str | None = None) -> list:
        with self.store.uow(read_only=True) as uow:
            return uow.outbox_entries(statuses=statuses, subject_key=subject)

    def queue(self, **filters: Any) -> list:
        with self.store.uow(read_only=True) as uow:
            return uow.query_discrepancies(DiscrepancyFilter(STUDY, **filters))[0]

    def one(self, kind: str, **filters: Any) -> Any:
        found = [r for r in self.queue(**filters) if r.kind.value == kind]
        assert len(found) == 1, [(r.kind.value, r.discrepancy.message) for r in self.queue(**filters)]
        return found[0]

    def state(self, subject: str) -> dict:
        with self.store.uow(read_only=True) as uow:
            return uow.sent_items(STUDY, subject)

    def audit(self, action: str | None = None) -> list:
        with self.store.uow(read_only=True) as uow:
            entries, _total = uow.audit_entries(study_oid=STUDY)
        return [e for e in entries if action is None or e.event.action.value == action]


def reconciliation(feeder: Feeder, *, study: Any = None, processor: Any = None) -> Reconciliation:
    study = study or feeder.study
    return Reconciliation({STUDY: study}, feeder.store.uow, PSEUDONYMS, clock=feeder.clock,
                          processors={STUDY: processor or feeder.processor},
                          policies=feeder.policies or ReviewPolicies(feeder.store.uow))


def odm_items(odm: bytes) -> dict[str, tuple[str | None, str | None]]:
    """{EV[rk]/FORM/IG[rk]/ITEM: (TransactionType, Value)} of one ODM document."""
    from esource.services.conflicts import odm_items as items

    return {i.path: (i.transaction_type, i.value) for i in items(odm)}


def reasons_for_change(odm: bytes) -> list[str]:
    return [el.text or "" for el in etree.fromstring(odm).iter(f"{ODM}ReasonForChange")]


def assert_valid_odm(odm: bytes) -> None:
    problems = validate_odm(odm)
    assert problems == [], problems


def study_copy(tmp_path: Path, edit: Any) -> Any:
    """A copy of the CV01 study folder (and the CDASH templates) with `edit(map_text) -> map_text` applied,
    loaded as a Study: what a map change looks like."""
    root = tmp_path / "maps"
    src = builtin_maps_dir()
    shutil.copytree(src / STUDY, root / STUDY)
    shutil.copytree(src / "_cdash", root / "_cdash")
    map_file = root / STUDY / "map.yaml"
    map_file.write_text(edit(map_file.read_text(encoding="utf-8")), encoding="utf-8")
    return load_study(str(root / STUDY))


def site_edit(url: str, subject: str, path: str, value: str | None) -> None:
    """Site staff change (or clear) a value in the sandbox EDC, not through esource."""
    import httpx

    r = httpx.put(f"{url}/studies/{STUDY}/subjects/{subject}/items", timeout=10,
                  json={"path": path, "value": value, "reason": "corrected at the site"})
    r.raise_for_status()


def deliver(store: Any, connector: Any, clock: Any) -> Any:
    """One dispatcher pass to `connector` (no real sleeping: the fake clock moves instead)."""
    from esource.services.dispatch import Dispatcher

    d = Dispatcher(store.uow, {STUDY: connector}, {STUDY: "MDV.CV01.1"}, workers=1, clock=clock,
                   sleep=lambda s: clock.advance(seconds=s))
    report = d.drain()
    assert report.rejected == 0 and report.failed == 0, report
    return report
