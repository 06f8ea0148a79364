"""Checks after selection, statuses, missing dates and withdrawal (protocol: selection rule 5,
"Enrollment and identity", "Changes, corrections, deletions")."""

from __future__ import annotations

import datetime as dt

import pytest

from engine_helpers import (GLUC, HR, SYSBP, TEMP, UCUM, DROP, condition, day, group, items, kinds, med_statement, obs,
                      vs)
from esource.mapping.engine import MappingContext


def _held(res, selected, nxt, kind, event="SE.WEEK4", test="HR"):
    """The visit/test is held: nothing sent, one discrepancy of `kind` on the selected reading naming `nxt`."""
    assert [k for k in items(res) if k[0] == event and k[2] == test] == []
    (d,) = res.discrepancies
    assert d.kind == kind
    assert d.source.id == selected["id"]
    assert d.study_event_oid == event and d.item_group_repeat_key == test
    if nxt is None:
        assert d.candidates == ()
        assert "no other candidate" in d.message
    else:
        assert [c["id"] for c in d.candidates] == [nxt["id"]]
        assert f"Next candidate: Observation/{nxt['id']}" in d.message
    reasons = {n.source.id: n.reason for n in res.not_sent}
    assert reasons[selected["id"]] == "held: the selected reading failed a check"
    if nxt is not None:
        assert reasons[nxt["id"]] == "not selected (the selected reading is held)"
    return d


BAD = {
    "unknown_unit": dict(value=70, unit={"unit": "beats per minute"}),
    "unknown_unit_no_unit": dict(value=70, unit=None),
    "unit_not_convertible": dict(value=70, unit="kg"),
    "comparator_value": dict(value=70, unit={"value": 70, "comparator": "<", "system": UCUM, "code": "/min"}),
    "out_of_range": dict(value=251, unit="/min"),
    "invalid_source": dict(value="abc", unit="/min"),
}
KIND = {"unknown_unit_no_unit": "unknown_unit"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_failing_selected_reading_is_held_and_never_falls_through(run, case):
    selected = obs(HR, BAD[case]["value"], BAD[case]["unit"], day(29))
    nxt = obs(HR, 72, "/min", day(30))
    third = obs(HR, 73, "/min", day(32))
    res = run([third, nxt, selected])
    _held(res, selected, nxt, KIND.get(case, case))


def test_comparator_as_value_string_is_held(run):
    selected = obs(GLUC, None, None, day(1), valueString="<2.0")
    res = run([selected])
    _held(res, selected, None, "comparator_value", event="SE.BASELINE", test="GLUC")


def test_out_of_range_holds_the_rounded_value(run):
    selected = obs(HR, 250.5, "/min", day(29))  # rounds to 251
    res = run([selected])
    d = _held(res, selected, None, "out_of_range")
    assert d.held_value == "251"


@pytest.mark.parametrize("value,sent", [(250, "250"), (250.4, "250"), (20, "20"), (19.5, "20")])
def test_hard_range_bounds_are_inclusive_on_the_rounded_value(run, value, sent):
    res = run([obs(HR, value, "/min", day(29))])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", sent, day(29))
    assert res.discrepancies == []


@pytest.mark.parametrize("value", [19.4, 250.5, 0, -70])
def test_outside_the_hard_range_is_held(run, value):
    selected = obs(HR, value, "/min", day(29))
    _held(run([selected]), selected, None, "out_of_range")


@pytest.mark.parametrize("test,code,unit,low,high,decimals", [
    ("SYSBP", "8480-6", "mm[Hg]", 50, 260, 0), ("DIABP", "8462-4", "mm[Hg]", 20, 160, 0),
    ("RESP", "9279-1", "/min", 4, 60, 0), ("TEMP", "8310-5", "Cel", 30, 44, 1),
    ("WEIGHT", "29463-7", "kg", 20, 300, 1), ("HEIGHT", "8302-2", "cm", 100, 230, 1),
    ("BMI", "39156-5", "kg/m2", 10, 80, 1), ("OXYSAT", "2708-6", "%", 50, 100, 0),
])
def test_every_vs_hard_range(run, test, code, unit, low, high, decimals):
    fmt = (lambda v: f"{v:.{decimals}f}")
    for v in (low, high):
        res = run([obs(code, v, unit, day(1))])
        assert group(res, "SE.BASELINE", test)["IT.VS.VSORRES"] == fmt(v), (test, v)
    step = 10 ** -decimals
    for v in (low - step, high + step):
        res = run([obs(code, round(v, decimals), unit, day(1))])
        assert res.items == [] and kinds(res) == ["out_of_range"], (test, v)


def test_invalid_fhir_elsewhere_in_the_read_elements_holds_the_reading(run):
    # a valueString and a valueQuantity at once (value[x] twice) is invalid FHIR
    selected = obs(HR, 70, "/min", day(29), valueString="seventy")
    nxt = obs(HR, 71, "/min", day(30))
    _held(run([selected, nxt]), selected, nxt, "invalid_source")


@pytest.mark.parametrize("status", ["bogus", "FINAL", "", 5])
def test_an_invalid_status_is_an_invalid_resource_held_with_the_next_candidate(run, status):
    selected = obs(HR, 70, "/min", day(29), status=status)
    nxt = obs(HR, 72, "/min", day(30))
    _held(run([selected, nxt]), selected, nxt, "invalid_source")


def test_a_missing_status_is_an_invalid_resource(run):
    selected = obs(HR, 70, "/min", day(29), status=DROP)
    nxt = obs(HR, 72, "/min", day(30))
    _held(run([selected, nxt]), selected, nxt, "invalid_source")


def test_a_failing_reading_that_is_not_selected_changes_nothing(run):
    res = run([obs(HR, 70, "/min", day(29)), obs(HR, "abc", "/min", day(30)), obs(HR, 70, "kg", day(31))])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "70", day(29))
    assert res.discrepancies == []


def test_only_the_failing_test_of_a_panel_is_held(run):
    panel = obs("85354-9", None, None, day(1), components=[(SYSBP, 120, "mm[Hg]"), ("8462-4", 80, "kg")])
    res = run([panel])
    assert group(res, "SE.BASELINE", "SYSBP") == vs("SYSBP", "120", day(1))
    assert group(res, "SE.BASELINE", "DIABP") == {}
    assert kinds(res) == ["unit_not_convertible"]


# ---------------------------------------------------------------- statuses


@pytest.mark.parametrize("status", ["final", "amended", "corrected"])
def test_final_amended_corrected_are_sent(run, status):
    res = run([obs(HR, 70, "/min", day(29), status=status)])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "70", day(29))


@pytest.mark.parametrize("status", ["preliminary", "registered"])
def test_preliminary_waits_and_does_not_block_selection(run, status):
    prelim = obs(HR, 99, "/min", day(29), status=status)
    final = obs(HR, 70, "/min", day(31))
    res = run([prelim, final])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "70", day(31))
    assert res.discrepancies == []
    (ns,) = [n for n in res.not_sent if n.source.id == prelim["id"]]
    assert "waiting for the final version" in ns.reason


@pytest.mark.parametrize("status", ["cancelled", "unknown"])
def test_other_valid_statuses_are_not_sent(run, status):
    o = obs(HR, 99, "/min", day(29), status=status)
    res = run([o])
    assert res.items == [] and res.discrepancies == []
    assert [n.source.id for n in res.not_sent] == [o["id"]]


def test_entered_in_error_goes_to_retracted_sources(run):
    bad = obs(HR, 99, "/min", day(29), status="entered-in-error", identifier=[{"system": "urn:lab", "value": "L-1"}])
    good = obs(HR, 70, "/min", day(31))
    res = run([bad, good])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "70", day(31))
    assert list(res.retracted_sources) == ["Observation|urn:lab|L-1"]
    assert res.retracted_sources["Observation|urn:lab|L-1"].id == bad["id"]
    assert any(n.source.id == bad["id"] and "entered-in-error" in n.reason for n in res.not_sent)


def test_a_deleted_source_goes_to_retracted_sources(engine):
    from engine_helpers import enrollment
    res = engine.map_subject(enrollment(), [], MappingContext(), deletions=["Observation/obs-x"])
    assert list(res.retracted_sources) == ["Observation/obs-x"]


# ---------------------------------------------------------------- dates


@pytest.mark.parametrize("when", [None, "2024-01", "2024"])
def test_missing_or_imprecise_date_is_a_missing_date_discrepancy(run, when):
    o = obs(HR, 70, "/min", when)
    res = run([o])
    assert res.items == []
    (d,) = res.discrepancies
    assert d.kind == "missing_date" and d.source.id == o["id"] and d.item_oid == "IT.VS.VSDAT"
    assert [n.reason for n in res.not_sent] == ["missing date"]


def test_an_unparseable_date_is_an_invalid_source(run):
    o = obs(HR, 70, "/min", "2024-02-30")
    res = run([o])
    assert res.items == []
    assert kinds(res) == ["invalid_source"]


# ---------------------------------------------------------------- withdrawal

WITHDRAWN = dt.date.fromisoformat(day(40))


def test_data_on_the_withdrawal_date_is_sent_and_after_is_not(run):
    on = obs(GLUC, 5, "mmol/L", day(40))
    after = obs(GLUC, 6, "mmol/L", day(41))
    wk12 = obs(HR, 70, "/min", day(85))
    res = run([on, after, wk12], withdrawn=WITHDRAWN)
    assert set(k[:2] for k in items(res)) == {("SE.UNSCHED", day(40))}
    reasons = {n.source.id: n.reason for n in res.not_sent}
    assert reasons[after["id"]] == reasons[wk12["id"]] == "dated after the subject's withdrawal"


def test_a_late_correction_of_earlier_data_is_still_sent(run):
    corrected = obs(HR, 71, "/min", day(29), status="corrected", meta={"versionId": "2"})
    res = run([corrected], withdrawn=WITHDRAWN)
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "71", day(29))


def test_possible_adverse_events_are_still_raised_after_withdrawal(run):
    c = condition(onset=day(60))
    res = run([c], withdrawn=WITHDRAWN)
    assert res.items == []
    assert kinds(res) == ["possible_adverse_event"]


def test_medication_started_after_withdrawal_is_not_sent(run):
    m = med_statement(start=day(41))
    res = run([m], withdrawn=WITHDRAWN)
    assert res.items == []
    assert [n.reason for n in res.not_sent] == ["started after the subject's withdrawal"]


def test_undated_medication_learnt_after_withdrawal_is_not_sent(run):
    m = med_statement()  # active, no date
    res = run([m], withdrawn=WITHDRAWN, today=WITHDRAWN + dt.timedelta(days=1))
    assert res.items == []
    assert [n.reason for n in res.not_sent] == ["undated, learnt after the subject's withdrawal"]
    # learnt on the withdrawal date: still sent
    res = run([m], withdrawn=WITHDRAWN, today=WITHDRAWN)
    assert items(res)[("SE.COMMON", None, "1", "IT.CM.CMTRT")] == "metformin"


def test_undated_medication_learnt_before_withdrawal_stays_sent(run):
    m = med_statement()
    ctx = MappingContext(today=WITHDRAWN - dt.timedelta(days=10))
    run([m], withdrawn=WITHDRAWN, ctx=ctx)
    ctx.today = WITHDRAWN + dt.timedelta(days=30)
    res = run([m], withdrawn=WITHDRAWN, ctx=ctx)
    assert items(res)[("SE.COMMON", None, "1", "IT.CM.CMTRT")] == "metformin"


def test_temp_is_checked_after_conversion(run):
    # 112 [degF] = 44.4 Cel: outside 30–44
    o = obs(TEMP, 112, "[degF]", day(1))
    res = run([o])
    assert res.items == [] and kinds(res) == ["out_of_range"]
    assert res.discrepancies[0].held_value == "44.4"


def test_undated_condition_learnt_after_withdrawal_is_still_a_possible_adverse_event(run):
    c = condition(onset=None)
    res = run([c], withdrawn=WITHDRAWN, today=WITHDRAWN + dt.timedelta(days=3))
    assert res.items == []
    assert kinds(res) == ["possible_adverse_event"]
