"""Builders for the engine tests (a uniquely named module, imported by the test files; `conftest.py`
re-exports them and holds the fixtures): crafted FHIR resources and readers of MappingResults.

Study days are computed from DAY1 with `day(n)` (no Day 0).
"""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any, Iterable

import orjson

from esource.domain.model import Enrollment, MappingResult
from esource.mapping.dates import date_of_study_day

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ATC = "http://www.whocc.no/atc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
EDQM = "http://standardterms.edqm.eu"
V3_ROUTE = "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration"
V3_TIMING = "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation"
V3_INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VER = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
IPS_ABSENT = "http://hl7.org/fhir/uv/ips/CodeSystem/absent-unknown-uv-ips"

DAY1 = dt.date(2024, 1, 1)
CONSENT = DAY1 - dt.timedelta(days=28)  # the dry-run default: 2023-12-04
TODAY = dt.date(2024, 9, 1)
SUBJECT = "001-0007"
SITE = "SITE.001"

# LOINC codes used a lot
SYSBP, DIABP, HR, TEMP, WEIGHT, HEIGHT = "8480-6", "8462-4", "8867-4", "8310-5", "29463-7", "8302-2"
GLUC = "2345-7"

_ids = itertools.count(1)
DROP = object()  # pass as a keyword value to remove an element from a built resource


def day(n: int, time: str | None = None, d1: dt.date = DAY1, tz: str = "+01:00") -> str:
    """The date (or dateTime, when `time` is "HH:MM[:SS]", with the zone `tz`) of study day `n`."""
    d = date_of_study_day(n, d1).isoformat()
    if time is None:
        return d
    if len(time) == 5:
        time += ":00"
    return f"{d}T{time}{tz}"


def _apply(res: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if v is DROP:
            res.pop(k, None)
        else:
            res[k] = v
    return res


def quantity(value: Any, unit: Any) -> dict[str, Any]:
    """valueQuantity: `unit` a UCUM code (str), a dict of Quantity fields (e.g. {"unit": "mmHg"}) or None."""
    q: dict[str, Any] = {}
    if value is not None:
        q["value"] = value
    if isinstance(unit, dict):
        q.update(unit)
    elif unit is not None:
        q.update({"unit": unit, "system": UCUM, "code": unit})
    return q


def cc(code: str, system: str = LOINC, display: str | None = None, text: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    out: dict[str, Any] = {"coding": [coding]}
    if text:
        out["text"] = text
    return out


def obs(code: str | dict[str, Any] | None, value: Any, unit: Any, when: str | None, status: str = "final",
        components: Iterable[tuple[str, Any, Any] | dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """An Observation with a LOINC code (or a ready CodeableConcept), valueQuantity and effectiveDateTime (each left out when None).
    components: (code, value, unit) tuples or ready-made component dicts. extra: any other element
    (id=..., meta=..., referenceRange=..., effectivePeriod=..., effectiveDateTime=DROP ...)."""
    res: dict[str, Any] = {"resourceType": "Observation", "id": f"obs-{next(_ids)}", "status": status,
                           "subject": {"reference": "Patient/pat-1"}}
    if status is DROP:
        del res["status"]
    if code is not None:
        res["code"] = code if isinstance(code, dict) else cc(code)
    if value is not None or unit is not None:
        res["valueQuantity"] = quantity(value, unit)
    if when is not None:
        res["effectiveDateTime"] = when
    if components is not None:
        comps = []
        for c in components:
            if isinstance(c, dict):
                comps.append(c)
            else:
                ccode, cvalue, cunit = c
                comps.append({"code": cc(ccode), "valueQuantity": quantity(cvalue, cunit)})
        res["component"] = comps
    return _apply(res, extra)


def bp(sys_value: Any, dia_value: Any, when: str | None, status: str = "final", **extra: Any) -> dict[str, Any]:
    """A blood-pressure panel (85354-9) with systolic and diastolic components in mm[Hg]."""
    return obs("85354-9", None, None, when, status, components=[(SYSBP, sys_value, "mm[Hg]"),
                                                               (DIABP, dia_value, "mm[Hg]")], **extra)


def patient(pid: str = "pat-1", birth: str | None = "1960-05-17", gender: str | None = "female",
            **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    if birth is not None:
        res["birthDate"] = birth
    if gender is not None:
        res["gender"] = gender
    return _apply(res, extra)


def condition(code: str | None = "44054006", display: str | None = "Diabetes mellitus type 2",
              onset: str | None = "2015-03-02", *, system: str = SNOMED, clinical: str | None = "active",
              verification: str | None = "confirmed", category: str | None = "problem-list-item",
              codings: list[dict[str, Any]] | None = None, text: str | None = None, **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "Condition", "id": f"cond-{next(_ids)}",
                           "subject": {"reference": "Patient/pat-1"}}
    if codings is not None or code is not None:
        cs = codings if codings is not None else [{"system": system, "code": code, **({"display": display} if display else {})}]
        res["code"] = {"coding": cs}
        if text:
            res["code"]["text"] = text
    if clinical is not None:
        res["clinicalStatus"] = cc(clinical, COND_CLINICAL)
    if verification is not None:
        res["verificationStatus"] = cc(verification, COND_VER)
    if category is not None:
        res["category"] = [cc(category, COND_CAT)]
    if onset is not None:
        res["onsetDateTime"] = onset
    return _apply(res, extra)


def allergy(code: str = "91936005", display: str = "Allergy to penicillin", onset: str | None = "2001",
            clinical: str | None = "active", verification: str | None = "confirmed", **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "AllergyIntolerance", "id": f"alg-{next(_ids)}",
                           "patient": {"reference": "Patient/pat-1"},
                           "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]}}
    if clinical is not None:
        res["clinicalStatus"] = cc(clinical, ALLERGY_CLINICAL)
    if verification is not None:
        res["verificationStatus"] = cc(verification, ALLERGY_VER)
    if onset is not None:
        res["onsetDateTime"] = onset
    return _apply(res, extra)


def dosage(*, dose: Any = None, dose_unit: Any = "mg", route: tuple[str, str] | None = None,
           repeat: dict[str, Any] | None = None, timing_code: tuple[str, str] | None = None,
           as_needed: bool | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if dose is not None:
        d["doseAndRate"] = [{"doseQuantity": quantity(dose, dose_unit)}]
    if route is not None:
        d["route"] = cc(route[1], route[0])
    timing: dict[str, Any] = {}
    if repeat is not None:
        timing["repeat"] = repeat
    if timing_code is not None:
        timing["code"] = cc(timing_code[1], timing_code[0])
    if timing:
        d["timing"] = timing
    if as_needed is not None:
        d["asNeededBoolean"] = as_needed
    return d


def med_statement(code: str | None = "A10BA02", display: str | None = "metformin", *, system: str = ATC,
                  status: str = "active", start: str | None = None, end: str | None = None,
                  dose: Any = None, dose_unit: Any = "mg", route: tuple[str, str] | None = None,
                  repeat: dict[str, Any] | None = None, timing_code: tuple[str, str] | None = None,
                  as_needed: bool | None = None, text: str | None = None, **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "MedicationStatement", "id": f"ms-{next(_ids)}", "status": status,
                           "subject": {"reference": "Patient/pat-1"}}
    if code is not None:
        med: dict[str, Any] = {"coding": [{"system": system, "code": code, **({"display": display} if display else {})}]}
        if text:
            med["text"] = text
        res["medicationCodeableConcept"] = med
    if start is not None or end is not None:
        res["effectivePeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    d = dosage(dose=dose, dose_unit=dose_unit, route=route, repeat=repeat, timing_code=timing_code,
               as_needed=as_needed)
    if d:
        res["dosage"] = [d]
    return _apply(res, extra)


def med_request(code: str | None = "A10BA02", display: str | None = "metformin", *, system: str = ATC,
                status: str = "active", authored: str | None = None, dose: Any = None, dose_unit: Any = "mg",
                **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "MedicationRequest", "id": f"mr-{next(_ids)}", "status": status,
                           "intent": "order", "subject": {"reference": "Patient/pat-1"}}
    if code is not None:
        res["medicationCodeableConcept"] = {"coding": [{"system": system, "code": code,
                                                        **({"display": display} if display else {})}]}
    if authored is not None:
        res["authoredOn"] = authored
    d = dosage(dose=dose, dose_unit=dose_unit)
    if d:
        res["dosageInstruction"] = [d]
    return _apply(res, extra)


def bundle_bytes(resources: Iterable[dict[str, Any]]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "collection",
                         "entry": [{"resource": r} for r in resources]})


def enrollment(day1: dt.date = DAY1, consent: dt.date | None = None, withdrawn: dt.date | None = None) -> Enrollment:
    return Enrollment("CV01", SUBJECT, SITE, (), consent or day1 - dt.timedelta(days=28), day1, withdrawn)


# ------------------------------------------------------------------ reading results


def items(result: MappingResult) -> dict[tuple[str, str | None, str | None, str], str]:
    """{(event, event repeat, item group repeat, item OID): value}; duplicates fail the test."""
    out: dict[tuple[str, str | None, str | None, str], str] = {}
    for iv in result.items:
        k = (iv.key.study_event_oid, iv.key.study_event_repeat_key, iv.key.item_group_repeat_key, iv.key.item_oid)
        assert k not in out, f"item {k} produced twice"
        out[k] = iv.value
    return out


def group(result: MappingResult, event: str, repeat: str | None, event_repeat: str | None = None) -> dict[str, str]:
    """{item OID: value} of one item-group repeat at one event."""
    return {k[3]: v for k, v in items(result).items() if k[0] == event and k[2] == repeat and k[1] == event_repeat}


def events(result: MappingResult, form: str | None = None) -> set[tuple[str, str | None]]:
    return {(iv.key.study_event_oid, iv.key.study_event_repeat_key) for iv in result.items
            if form is None or iv.key.form_oid == form}


def kinds(result: MappingResult) -> list[str]:
    return sorted(d.kind.value for d in result.discrepancies)


def vs(test: str, value: str, date: str, time: str | None = None, unit: str | None = None) -> dict[str, str]:
    """The expected VS item group."""
    labels = {"SYSBP": "mmHg", "DIABP": "mmHg", "HR": "beats/min", "RESP": "breaths/min", "TEMP": "C",
              "WEIGHT": "kg", "HEIGHT": "cm", "BMI": "kg/m2", "OXYSAT": "%"}
    out = {"IT.VS.VSTESTCD": test, "IT.VS.VSORRES": value, "IT.VS.VSORRESU": unit or labels[test], "IT.VS.VSDAT": date}
    if time is not None:
        out["IT.VS.VSTIM"] = time
    return out
