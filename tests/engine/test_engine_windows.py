"""Study days, visit windows and the selection rule (protocol: "Study days and visit windows")."""

from __future__ import annotations

import datetime as dt

import pytest

from engine_helpers import (DAY1, GLUC, HR, SYSBP, TEMP, bp, day, events, group, items, kinds, obs, vs)
from esource.mapping.dates import study_day

LB_GLUC = lambda value, date, time=None: {  # noqa: E731 - expected LB group for a mg/dL glucose
    "IT.LB.LBTESTCD": "GLUC", "IT.LB.LBORRES": value, "IT.LB.LBORRESU": "mg/dL", "IT.LB.LBDAT": date}


# ---------------------------------------------------------------- study days


def test_study_day_has_no_day_zero(study):
    from engine_helpers import enrollment

    enr = enrollment()
    assert enr.study_day(DAY1) == 1
    assert enr.study_day(DAY1 - dt.timedelta(days=1)) == -1
    assert enr.study_day(DAY1 + dt.timedelta(days=1)) == 2
    assert enr.study_day(DAY1 - dt.timedelta(days=28)) == -28
    assert study_day(DAY1 + dt.timedelta(days=28), DAY1) == 29
    assert study_day(DAY1 - dt.timedelta(days=28), DAY1) == -28


def test_the_day_before_day1_is_screening_and_day1_is_baseline(run):
    before = (DAY1 - dt.timedelta(days=1)).isoformat()
    res = run([obs(HR, 61, "/min", before), obs(HR, 62, "/min", DAY1.isoformat())])
    assert items(res) == {
        **{("SE.SCREEN", None, "HR", k): v for k, v in vs("HR", "61", before).items()},
        **{("SE.BASELINE", None, "HR", k): v for k, v in vs("HR", "62", DAY1.isoformat()).items()},
    }
    assert res.discrepancies == []


# ---------------------------------------------------------------- every window edge

# (study day, expected event for a VS reading, expected event for an LB reading); "date" = SE.UNSCHED
EDGES = [
    (-29, None, None),
    (-28, "SE.SCREEN", "SE.SCREEN"),
    (-1, "SE.SCREEN", "SE.SCREEN"),
    (1, "SE.BASELINE", "SE.BASELINE"),
    (2, "date", "date"),
    (25, "date", "date"),
    (26, "SE.WEEK4", "date"),
    (29, "SE.WEEK4", "date"),
    (32, "SE.WEEK4", "date"),
    (33, "date", "date"),
    (77, "date", "date"),
    (78, "SE.WEEK12", "SE.WEEK12"),
    (85, "SE.WEEK12", "SE.WEEK12"),
    (92, "SE.WEEK12", "SE.WEEK12"),
    (93, "date", "date"),
    (161, "date", "date"),
    (162, "SE.WEEK24", "SE.WEEK24"),
    (176, "SE.WEEK24", "SE.WEEK24"),
    (177, "date", "date"),
    (183, "date", "date"),
    (184, None, None),
    (400, None, None),
    (-100, None, None),
]


def _expect(where, date, group_items, repeat):
    if where is None:
        return {}
    event, erk = ("SE.UNSCHED", date) if where == "date" else (where, None)
    return {(event, erk, repeat, k): v for k, v in group_items.items()}


@pytest.mark.parametrize("n,vs_event,lb_event", EDGES, ids=[f"day{e[0]}" for e in EDGES])
def test_window_edges(run, n, vs_event, lb_event):
    date = day(n)
    res = run([obs(HR, 70, "/min", date), obs(GLUC, 5, "mmol/L", date)])
    expected = {**_expect(vs_event, date, vs("HR", "70", date), "HR"),
                **_expect(lb_event, date, LB_GLUC("90", date), "GLUC")}
    assert items(res) == expected
    assert res.discrepancies == []
    outside = [n_ for n_ in res.not_sent if "outside every visit window" in n_.reason]
    assert len(outside) == (vs_event is None) + (lb_event is None)


def test_vs_on_day_29_is_week4_and_lb_on_day_29_is_unscheduled_keyed_by_date(run):
    res = run([obs(HR, 70, "/min", day(29)), obs(GLUC, 5, "mmol/L", day(29))])
    assert events(res, "F.VS") == {("SE.WEEK4", None)}
    assert events(res, "F.LB") == {("SE.UNSCHED", "2024-01-29")}


def test_no_reading_outside_days_1_to_183_goes_to_unscheduled(run):
    res = run([obs(HR, 70, "/min", day(n)) for n in (-40, -29, 184, 200)])
    assert res.items == []
    assert len(res.not_sent) == 4


# ---------------------------------------------------------------- selection


def test_screening_takes_the_latest_day(run):
    a, b, c = obs(HR, 60, "/min", day(-20)), obs(HR, 61, "/min", day(-3)), obs(HR, 62, "/min", day(-10))
    res = run([a, b, c])
    assert group(res, "SE.SCREEN", "HR") == vs("HR", "61", day(-3))
    not_selected = {n.source.id for n in res.not_sent if n.study_event_oid == "SE.SCREEN"}
    assert not_selected == {a["id"], c["id"]}


def test_closest_to_target_day_wins(run):
    res = run([obs(HR, 60, "/min", day(32)), obs(HR, 61, "/min", day(27))])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "61", day(27))


@pytest.mark.parametrize("early,late,event", [(28, 30, "SE.WEEK4"), (80, 90, "SE.WEEK12"), (164, 174, "SE.WEEK24")])
def test_equal_distance_goes_to_the_earlier_day(run, early, late, event):
    # the later day is listed first: input order must not decide
    res = run([obs(HR, 99, "/min", day(late)), obs(HR, 60, "/min", day(early))])
    assert group(res, event, "HR") == vs("HR", "60", day(early))
    assert res.discrepancies == []


def test_a_closer_date_only_reading_beats_a_timed_one_further_away(run):
    res = run([obs(HR, 90, "/min", day(30, "08:00")), obs(HR, 60, "/min", day(29))])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "60", day(29))


def test_timed_readings_come_before_date_only_readings_on_the_same_day(run):
    date_only = obs(HR, 80, "/min", day(29))
    timed = obs(HR, 70, "/min", day(29, "10:00"))
    res = run([date_only, timed])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "70", day(29), "10:00")
    (ns,) = [n for n in res.not_sent if n.source.id == date_only["id"]]
    assert ns.study_event_oid == "SE.WEEK4" and "not selected" in ns.reason


def test_earliest_time_first(run):
    res = run([obs(HR, 75, "/min", day(1, "09:00")), obs(HR, 72, "/min", day(1, "08:30")),
               obs(HR, 71, "/min", day(1, "11:15"))])
    assert group(res, "SE.BASELINE", "HR") == vs("HR", "72", day(1), "08:30")


def test_times_are_taken_as_written_without_time_zone_shift(run):
    # 23:30 at UTC-5 on day 25 is day 26 in UTC: it must stay on day 25 (unscheduled), not go to Week 4
    when = f"{day(25)}T23:30:00-05:00"
    res = run([obs(HR, 70, "/min", when)])
    assert items(res) == {("SE.UNSCHED", day(25), "HR", k): v for k, v in vs("HR", "70", day(25), "23:30").items()}
    # ... and 00:30+02:00 on day 26 is day 25 in UTC: Week 4
    res = run([obs(HR, 71, "/min", f"{day(26)}T00:30:00+02:00")])
    assert group(res, "SE.WEEK4", "HR") == vs("HR", "71", day(26), "00:30")


def test_tied_readings_with_equal_rounded_values_are_sent_once(run):
    a = obs(HR, 70.4, "/min", day(1, "08:00"))
    b = obs(HR, 69.6, "/min", day(1, "08:00"))
    res = run([a, b])
    assert items(res) == {("SE.BASELINE", None, "HR", k): v for k, v in vs("HR", "70", day(1), "08:00").items()}
    assert res.discrepancies == []
    assert [n.reason for n in res.not_sent] == ["tied with the selected reading, same value: sent once"]


def test_tied_date_only_readings_in_different_units_equal_after_conversion(run):
    res = run([obs(TEMP, 98.6, "[degF]", day(1)), obs(TEMP, 37, "Cel", day(1))])
    assert group(res, "SE.BASELINE", "TEMP") == vs("TEMP", "37.0", day(1))
    assert res.discrepancies == []


def test_tied_readings_with_different_values_are_ambiguous_and_nothing_is_sent(run):
    a = obs(HR, 70, "/min", day(29, "08:00"))
    b = obs(HR, 75, "/min", day(29, "08:00"))
    later = obs(HR, 80, "/min", day(30))
    other = obs(TEMP, 37, "Cel", day(29))
    res = run([a, b, later, other])
    assert items(res) == {("SE.WEEK4", None, "TEMP", k): v for k, v in vs("TEMP", "37.0", day(29)).items()}
    (d,) = res.discrepancies
    assert d.kind == "ambiguous_data"
    assert d.study_event_oid == "SE.WEEK4" and d.item_group_repeat_key == "HR" and d.item_oid == "IT.VS.VSORRES"
    assert sorted((c["id"], c["value"]) for c in d.candidates) == sorted([(a["id"], "70"), (b["id"], "75")])
    assert "70" in d.message and "75" in d.message
    assert {n.source.id for n in res.not_sent} == {a["id"], b["id"], later["id"]}


def test_tied_date_only_readings_with_different_values_are_ambiguous(run):
    res = run([obs(HR, 70, "/min", day(-3)), obs(HR, 71, "/min", day(-3))])
    assert res.items == []
    assert kinds(res) == ["ambiguous_data"]
    assert res.discrepancies[0].study_event_oid == "SE.SCREEN"


def test_unscheduled_has_one_repeat_per_date(run):
    res = run([obs(GLUC, 5, "mmol/L", day(40, "09:00")), obs(GLUC, 6, "mmol/L", day(40, "08:00")),
               obs(GLUC, 7, "mmol/L", day(50))])
    assert events(res) == {("SE.UNSCHED", day(40)), ("SE.UNSCHED", day(50))}
    assert group(res, "SE.UNSCHED", "GLUC", day(40))["IT.LB.LBORRES"] == "108"  # 6 mmol/L at 08:00
    assert group(res, "SE.UNSCHED", "GLUC", day(50))["IT.LB.LBORRES"] == "126"


def test_a_reading_in_a_scheduled_window_is_never_unscheduled_even_when_not_selected(run):
    sel, unsel = obs(HR, 60, "/min", day(29)), obs(HR, 61, "/min", day(26))
    res = run([sel, unsel])
    assert events(res) == {("SE.WEEK4", None)}
    (ns,) = [n for n in res.not_sent if n.source.id == unsel["id"]]
    assert ns.study_event_oid == "SE.WEEK4"
    assert "not selected for SE.WEEK4" in ns.reason


def test_bp_panel_components_are_readings_of_their_tests(run):
    res = run([bp(120, 80, day(1, "08:00"))])
    assert group(res, "SE.BASELINE", "SYSBP") == vs("SYSBP", "120", day(1), "08:00")
    assert group(res, "SE.BASELINE", "DIABP") == vs("DIABP", "80", day(1), "08:00")
    srcs = {iv.source.element for iv in res.items}
    assert srcs == {"component[0]", "component[1]"}


@pytest.mark.parametrize("dates,expected", [
    ({"effectiveDateTime": day(29)}, day(29)),
    ({"effectivePeriod": {"start": day(30, "07:00"), "end": day(31, "07:00")}}, day(30)),
    ({"effectiveInstant": f"{day(31)}T06:00:00Z"}, day(31)),
])
def test_date_of_an_observation(run, dates, expected):
    o = obs(HR, 70, "/min", None, **dates)
    res = run([o])
    assert group(res, "SE.WEEK4", "HR")["IT.VS.VSDAT"] == expected


def test_each_test_is_selected_independently(run):
    res = run([obs(HR, 70, "/min", day(29)), obs(SYSBP, 120, "mm[Hg]", day(27)), obs(HR, 60, "/min", day(27))])
    assert group(res, "SE.WEEK4", "HR")["IT.VS.VSORRES"] == "70"
    assert group(res, "SE.WEEK4", "SYSBP")["IT.VS.VSORRES"] == "120"
    assert group(res, "SE.WEEK4", "SYSBP")["IT.VS.VSDAT"] == day(27)



def test_two_effective_choices_at_once_is_an_invalid_resource_and_is_held(run):
    o = obs(HR, 70, "/min", None, effectiveDateTime=day(28), effectivePeriod={"start": day(29)})
    res = run([o])
    assert res.items == []
    assert kinds(res) == ["invalid_source"]


def test_screening_takes_the_earliest_time_of_the_latest_day(run):
    res = run([obs(HR, 64, "/min", day(-3, "17:00")), obs(HR, 63, "/min", day(-3, "08:00")),
               obs(HR, 62, "/min", day(-3)), obs(HR, 61, "/min", day(-4, "07:00"))])
    assert group(res, "SE.SCREEN", "HR") == vs("HR", "63", day(-3), "08:00")


@pytest.mark.parametrize("codings", [
    [{"system": "urn:local:codes", "code": "HR1"}, {"system": "http://loinc.org", "code": "8867-4"}],
    [{"system": "urn:oid:2.16.840.1.113883.6.1", "code": "8867-4"}],
])
def test_loinc_code_anywhere_in_the_codings_and_by_oid(run, codings):
    res = run([obs({"coding": codings}, 70, "/min", day(1))])
    assert group(res, "SE.BASELINE", "HR") == vs("HR", "70", day(1))


@pytest.mark.parametrize("codings", [
    [{"system": "urn:local:codes", "code": "8867-4"}],        # the right code in the wrong system
    [{"system": "http://loinc.org", "code": "8889-8"}],       # another LOINC heart rate code
])
def test_codes_outside_the_map_are_not_readings(run, codings):
    res = run([obs({"coding": codings}, 70, "/min", day(1))])
    assert res.items == [] and res.discrepancies == [] and res.not_sent == []


@pytest.mark.parametrize("readings,why", [
    ([(27, None), (32, None)], "closer to the target day"),
    ([(28, None), (30, None)], "same distance to the target day: the earlier day"),
    ([(29, "08:00"), (29, None)], "a reading with a time comes before a date-only one"),
    ([(29, "08:00"), (29, "09:00")], "earlier reading on the same date"),
])
def test_lineage_says_why_a_reading_was_not_selected(run, readings, why):
    sel = obs(HR, 70, "/min", day(readings[0][0], readings[0][1]))
    other = obs(HR, 71, "/min", day(readings[1][0], readings[1][1]))
    res = run([other, sel])
    assert group(res, "SE.WEEK4", "HR")["IT.VS.VSORRES"] == "70"
    (ns,) = res.not_sent
    assert ns.source.id == other["id"]
    assert ns.reason == f"not selected for SE.WEEK4: the reading of {day(readings[0][0])} was preferred ({why})"


def test_lineage_says_why_for_screening(run):
    other = obs(HR, 71, "/min", day(-5))
    res = run([other, obs(HR, 70, "/min", day(-2))])
    (ns,) = res.not_sent
    assert ns.reason.endswith("(later day)")
