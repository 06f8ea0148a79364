"""CM (MedicationStatement, MedicationRequest) — protocol section CM."""

from __future__ import annotations

import datetime as dt

import pytest

from engine_helpers import (ATC, CONSENT, EDQM, RXNORM, SNOMED, UCUM, V3_ROUTE, V3_TIMING, group, items, kinds,
                      med_request, med_statement)
from esource.mapping.engine import MappingContext

CUTOFF = CONSENT - dt.timedelta(days=30)  # 2023-11-04


def cm(res, repeat="1"):
    return group(res, "SE.COMMON", repeat)


def test_cm_statement_all_items(run):
    m = med_statement(start="2023-06-01", dose=500, route=(SNOMED, "26643006"),
                      repeat={"frequency": 2, "period": 1, "periodUnit": "d"})
    res = run([m])
    assert cm(res) == {"IT.CM.CMTRT": "metformin", "IT.CM.CMCODE": "A10BA02", "IT.CM.CMCODESYS": "ATC",
                       "IT.CM.CMDOSE": "500", "IT.CM.CMDOSU": "mg", "IT.CM.CMROUTE": "ORAL", "IT.CM.CMDOSFRQ": "BID",
                       "IT.CM.CMSTDAT": "2023-06-01", "IT.CM.CMONGO": "Y"}
    assert len(items(res)) == 9 and res.discrepancies == []


def test_cm_treatment_prefers_text(run):
    assert cm(run([med_statement(text="Metformin 500 mg tablet")]))["IT.CM.CMTRT"] == "Metformin 500 mg tablet"


@pytest.mark.parametrize("system,code,name", [(ATC, "A10BA02", "ATC"), (RXNORM, "860975", "RxNorm"),
                                              (SNOMED, "109081006", "SNOMED CT")])
def test_cm_code_and_system(run, system, code, name):
    g = cm(run([med_statement(code=code, system=system)]))
    assert (g["IT.CM.CMCODE"], g["IT.CM.CMCODESYS"]) == (code, name)


def test_cm_medication_reference_is_resolved(run):
    med = {"resourceType": "Medication", "id": "med-1",
           "code": {"coding": [{"system": ATC, "code": "C09AA05", "display": "ramipril"}]}}
    m = med_statement(code=None, medicationReference={"reference": "Medication/med-1"})
    g = cm(run([med, m]))
    assert (g["IT.CM.CMTRT"], g["IT.CM.CMCODE"]) == ("ramipril", "C09AA05")


# ---------------------------------------------------------------- inclusion


@pytest.mark.parametrize("kwargs,included", [
    (dict(status="active"), True),                                         # active, undated
    (dict(status="intended"), True),
    (dict(status="completed"), False),                                     # undated and not active
    (dict(status="completed", start="2020-01-01", end="2020-06-01"), False),
    (dict(status="completed", start="2020-01-01", end=CUTOFF.isoformat()), True),        # end on the cut-off
    (dict(status="completed", start="2020-01-01", end=(CUTOFF - dt.timedelta(days=1)).isoformat()), False),
    (dict(status="completed", start=CUTOFF.isoformat()), True),            # start on the cut-off
    (dict(status="stopped", start=(CUTOFF - dt.timedelta(days=1)).isoformat()), False),
    (dict(status="completed", start="2023-11"), True),                     # partial: latest possible day counts
    (dict(status="active", start="2001-01-01"), True),                     # active: whatever the dates
])
def test_cm_inclusion_window(run, kwargs, included):
    res = run([med_statement(**kwargs)])
    assert bool(res.items) is included
    assert res.discrepancies == []


def test_cm_request_is_used_only_without_a_statement_for_the_same_code(run):
    req_same = med_request(code="A10BA02", authored="2023-12-01", dose=1000)
    req_other = med_request(code="C09AA05", display="ramipril", authored="2023-12-01", dose=5)
    st = med_statement(code="A10BA02", dose=500)
    res = run([req_same, req_other, st])
    terms = {g["IT.CM.CMTRT"] for g in (cm(res, "1"), cm(res, "2"))}
    assert terms == {"metformin", "ramipril"}
    assert ("SE.COMMON", None, "3", "IT.CM.CMTRT") not in items(res)
    doses = {cm(res, r)["IT.CM.CMTRT"]: cm(res, r)["IT.CM.CMDOSE"] for r in ("1", "2")}
    assert doses == {"metformin": "500", "ramipril": "5"}
    assert any(n.source.id == req_same["id"] and "MedicationStatement" in n.reason for n in res.not_sent)


def test_cm_request_dated_by_authored_on(run):
    g = cm(run([med_request(status="completed", authored="2023-11-20")]))
    assert g["IT.CM.CMSTDAT"] == "2023-11-20"
    res = run([med_request(status="completed", authored="2023-01-20")])
    assert res.items == []


def test_cm_entered_in_error_is_retracted(run):
    m = med_statement(status="entered-in-error", identifier=[{"system": "urn:meds", "value": "M1"}])
    res = run([m])
    assert res.items == [] and list(res.retracted_sources) == ["MedicationStatement|urn:meds|M1"]


def test_cm_invalid_date_is_an_invalid_source(run):
    res = run([med_statement(start="2023-02-30")])
    assert res.items == [] and kinds(res) == ["invalid_source"]


# ---------------------------------------------------------------- route


ROUTES = [
    (SNOMED, "26643006", "ORAL"), (EDQM, "20053000", "ORAL"), (V3_ROUTE, "PO", "ORAL"),
    (SNOMED, "47625008", "INTRAVENOUS"), (EDQM, "20045000", "INTRAVENOUS"),
    (SNOMED, "34206005", "SUBCUTANEOUS"), (EDQM, "20066000", "SUBCUTANEOUS"),
    (SNOMED, "78421000", "INTRAMUSCULAR"), (EDQM, "20035000", "INTRAMUSCULAR"),
    (SNOMED, "46713006", "NASAL"), (EDQM, "20049000", "NASAL"),
    (SNOMED, "45890007", "TRANSDERMAL"), (EDQM, "20070000", "TRANSDERMAL"),
    ("urn:oid:0.4.0.127.0.16.1.1.2.1", "20053000", "ORAL"),
]


@pytest.mark.parametrize("system,code,route", ROUTES)
def test_cm_routes(run, system, code, route):
    res = run([med_statement(route=(system, code))])
    assert cm(res)["IT.CM.CMROUTE"] == route
    assert res.discrepancies == []


@pytest.mark.parametrize("system,code", [(SNOMED, "37161004"), (EDQM, "20061000"), (V3_ROUTE, "IV"),
                                         ("urn:local", "26643006")])
def test_cm_unknown_route_is_a_discrepancy(run, system, code):
    res = run([med_statement(route=(system, code))])
    assert "IT.CM.CMROUTE" not in cm(res)
    (d,) = res.discrepancies
    assert d.kind == "unmapped_code" and d.item_oid == "IT.CM.CMROUTE" and d.item_group_repeat_key == "1"


# ---------------------------------------------------------------- frequency


FREQS = [
    (dict(repeat={"frequency": 1, "period": 1, "periodUnit": "d"}), "QD"),
    (dict(repeat={"frequency": 2, "period": 1, "periodUnit": "d"}), "BID"),
    (dict(repeat={"frequency": 3, "period": 1, "periodUnit": "d"}), "TID"),
    (dict(repeat={"frequency": 4, "period": 1, "periodUnit": "d"}), "QID"),
    (dict(repeat={"frequency": 1, "period": 2, "periodUnit": "d"}), "QOD"),
    (dict(repeat={"frequency": 1, "period": 1, "periodUnit": "wk"}), "EVERY WEEK"),
    (dict(repeat={"period": 1, "periodUnit": "d"}), "QD"),
    (dict(repeat={"frequency": 1, "period": 1.0, "periodUnit": "d"}), "QD"),
    (dict(repeat={"when": ["MORN"]}), "QAM"),
    (dict(repeat={"when": ["EVE"]}), "QPM"),
    (dict(as_needed=True), "PRN"),
    (dict(timing_code=(V3_TIMING, "QD")), "QD"),
    (dict(timing_code=(V3_TIMING, "BID")), "BID"),
    (dict(timing_code=(V3_TIMING, "TID")), "TID"),
    (dict(timing_code=(V3_TIMING, "QID")), "QID"),
    (dict(timing_code=(V3_TIMING, "QOD")), "QOD"),
    (dict(timing_code=(V3_TIMING, "AM")), "QAM"),
    (dict(timing_code=(V3_TIMING, "PM")), "QPM"),
]


@pytest.mark.parametrize("kwargs,freq", FREQS)
def test_cm_frequency(run, kwargs, freq):
    res = run([med_statement(**kwargs)])
    assert cm(res)["IT.CM.CMDOSFRQ"] == freq
    assert res.discrepancies == []


@pytest.mark.parametrize("kwargs", [
    dict(repeat={"frequency": 5, "period": 1, "periodUnit": "d"}),
    dict(repeat={"frequency": 1, "period": 3, "periodUnit": "d"}),
    dict(repeat={"frequency": 1, "period": 1, "periodUnit": "mo"}),
    dict(repeat={"when": ["HS"]}),
    dict(repeat={"when": ["MORN", "EVE"]}),
    dict(timing_code=(V3_TIMING, "Q4H")),
])
def test_cm_unknown_frequency_is_a_discrepancy(run, kwargs):
    res = run([med_statement(**kwargs)])
    assert "IT.CM.CMDOSFRQ" not in cm(res)
    (d,) = res.discrepancies
    assert d.kind == "unmapped_code" and d.item_oid == "IT.CM.CMDOSFRQ"


def test_cm_no_timing_sends_no_frequency_and_no_discrepancy(run):
    res = run([med_statement(dose=5)])
    assert "IT.CM.CMDOSFRQ" not in cm(res) and res.discrepancies == []


# ---------------------------------------------------------------- dose


@pytest.mark.parametrize("unit,dose,expected", [
    ("mg", 500, ("500", "mg")),
    ("g", 1, ("1", "g")),
    ("ug", 0.5, ("0.5", "ug")),
    ("mL", 10, ("10", "mL")),
    ({"unit": "mg"}, 2.5, ("2.5", "mg")),
    ({"system": SNOMED, "code": "732936001", "unit": "tablet"}, 1, ("1", "TABLET")),
    ({"system": SNOMED, "code": "428673006", "unit": "tablet"}, 2, ("2", "TABLET")),
    ({"system": SNOMED, "code": "732937005", "unit": "capsule"}, 1, ("1", "CAPSULE")),
])
def test_cm_dose_and_unit(run, unit, dose, expected):
    res = run([med_statement(dose=dose, dose_unit=unit)])
    g = cm(res)
    assert (g["IT.CM.CMDOSE"], g["IT.CM.CMDOSU"]) == expected
    assert res.discrepancies == []


@pytest.mark.parametrize("unit", [{"unit": "puff"}, {"system": SNOMED, "code": "415818006", "unit": "vial"},
                                  {"system": UCUM, "code": "mg/kg"}, {"unit": "MG"}])
def test_cm_unknown_dose_unit_holds_the_dose(run, unit):
    res = run([med_statement(dose=2, dose_unit=unit)])
    g = cm(res)
    assert "IT.CM.CMDOSE" not in g and "IT.CM.CMDOSU" not in g
    (d,) = res.discrepancies
    assert d.kind == "unmapped_code" and d.item_oid == "IT.CM.CMDOSU" and d.held_value == "2"


def test_cm_non_numeric_dose_is_an_invalid_source(run):
    res = run([med_statement(dose="two")])
    assert "IT.CM.CMDOSE" not in cm(res)
    assert kinds(res) == ["invalid_source"]


# ---------------------------------------------------------------- CMONGO and dates


@pytest.mark.parametrize("kwargs,ongo", [
    (dict(status="active"), "Y"),
    (dict(status="active", start="2023-01-01"), "Y"),
    (dict(status="intended", start="2024-02"), "Y"),
    (dict(status="active", start="2023-01-01", end="2024-03-01"), "N"),
    (dict(status="completed", start="2023-01-01", end="2023-12-01"), "N"),
    (dict(status="stopped", start="2023-12-01"), "N"),
])
def test_cm_ongoing(run, kwargs, ongo):
    assert cm(run([med_statement(**kwargs)]))["IT.CM.CMONGO"] == ongo


def test_cm_partial_dates_stay_partial(run):
    g = cm(run([med_statement(status="completed", start="2023-11", end="2024")]))
    assert (g["IT.CM.CMSTDAT"], g["IT.CM.CMENDAT"]) == ("2023-11", "2024")


def test_cm_effective_date_time_is_a_start(run):
    g = cm(run([med_statement(status="completed", effectiveDateTime="2023-12-24")]))
    assert g["IT.CM.CMSTDAT"] == "2023-12-24" and "IT.CM.CMENDAT" not in g


def test_cm_repeat_keys_are_stable_across_versions(run):
    ctx = MappingContext(today=dt.date(2024, 9, 1))
    ident = [{"system": "urn:meds", "value": "RX-9"}]
    a = med_statement(code="A10BA02", identifier=ident, meta={"versionId": "1"}, dose=500)
    b = med_statement(code="C09AA05", display="ramipril", dose=5)
    run([a, b], ctx=ctx)
    a2 = med_statement(code="A10BA02", identifier=ident, meta={"versionId": "2"}, dose=1000)
    res = run([b, a2], ctx=ctx)
    assert cm(res, "1")["IT.CM.CMDOSE"] == "1000"
    assert cm(res, "2")["IT.CM.CMTRT"] == "ramipril"


@pytest.mark.parametrize("code", ["no-known-medications", "no-medication-info"])
def test_cm_no_known_medications_is_not_a_medication(run, code):
    from engine_helpers import IPS_ABSENT
    res = run([med_statement(code=code, display="No known medications", system=IPS_ABSENT, status="active")])
    assert res.items == [] and res.discrepancies == []
    assert [n.reason for n in res.not_sent] == ["a 'no known / no information' entry: not a medication"]


def test_cm_an_entered_in_error_statement_does_not_hide_the_request(run):
    st = med_statement(code="A10BA02", status="entered-in-error")
    req = med_request(code="A10BA02", authored="2023-12-01", dose=1000)
    res = run([st, req])
    assert cm(res)["IT.CM.CMDOSE"] == "1000"
    assert [iv.source.id for iv in res.items if iv.key.item_oid == "IT.CM.CMTRT"] == [req["id"]]
