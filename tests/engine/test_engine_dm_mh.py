"""DM (Patient) and MH (Condition, AllergyIntolerance) — protocol sections DM and MH, and the
birth-date rule of "What never leaves the hospital"."""

from __future__ import annotations

import datetime as dt

import pytest

from engine_helpers import (CONSENT, ICD10, ICD10CM, IPS_ABSENT, SNOMED, allergy, cc, condition, day, group, items, kinds,
                      med_statement, obs, patient)
from esource.mapping.engine import MappingContext

MH_ITEMS = ("IT.MH.MHTERM", "IT.MH.MHCODE", "IT.MH.MHCODESYS", "IT.MH.MHCAT", "IT.MH.MHSTDAT", "IT.MH.MHENDAT",
            "IT.MH.MHONGO")


def mh(res, repeat="1"):
    return group(res, "SE.COMMON", repeat)


# ---------------------------------------------------------------- DM


@pytest.mark.parametrize("gender,sex", [("female", "F"), ("male", "M"), ("unknown", "U")])
def test_dm_birth_year_and_sex(run, gender, sex):
    res = run([patient(birth="1960-05-17", gender=gender)])
    assert items(res) == {("SE.SCREEN", None, None, "IT.DM.BRTHYR"): "1960", ("SE.SCREEN", None, None, "IT.DM.SEX"): sex}
    assert res.discrepancies == []


def test_dm_other_gender_is_a_discrepancy_for_review(run):
    res = run([patient(gender="other")])
    assert items(res) == {("SE.SCREEN", None, None, "IT.DM.BRTHYR"): "1960"}
    (d,) = res.discrepancies
    assert d.kind == "unknown_gender" and d.item_oid == "IT.DM.SEX"
    assert d.source.resource_type == "Patient"


@pytest.mark.parametrize("birth,year", [("1960", "1960"), ("1960-05", "1960"), ("1960-05-17", "1960")])
def test_dm_year_only_from_partial_birth_dates(run, birth, year):
    assert items(run([patient(birth=birth)]))[("SE.SCREEN", None, None, "IT.DM.BRTHYR")] == year


def test_dm_without_birth_date_or_gender_sends_nothing_for_them(run):
    res = run([patient(birth=None, gender=None)])
    assert res.items == [] and res.discrepancies == []


def test_dm_invalid_birth_date_is_an_invalid_source(run):
    res = run([patient(birth="1960-02-30")])
    assert ("SE.SCREEN", None, None, "IT.DM.BRTHYR") not in items(res)
    assert kinds(res) == ["invalid_source"]


def test_dm_without_patient_sends_no_dm(run):
    res = run([obs("8867-4", 70, "/min", day(1))])
    assert all(iv.key.form_oid != "F.DM" for iv in res.items)


def test_dm_several_patients_agreeing_send_once_and_disagreeing_are_ambiguous(run):
    res = run([patient("p1", birth="1960-05-17"), patient("p2", birth="1960-05-17")])
    assert items(res)[("SE.SCREEN", None, None, "IT.DM.BRTHYR")] == "1960"
    res = run([patient("p1", birth="1960-05-17", gender="female"), patient("p2", birth="1961-05-17", gender="male")])
    assert res.items == []
    assert kinds(res) == ["ambiguous_data", "ambiguous_data"]


def test_the_full_birth_date_is_never_sent(run):
    res = run([patient(birth="1960-05-17"), condition(onset="1960-05-17")])
    assert all("1960-05-17" not in iv.value for iv in res.items)


def test_any_date_equal_to_the_birth_date_is_sent_as_year_month(run):
    birth = day(-5)  # a reading on the day of birth, at screening
    res = run([
        patient(birth=birth),
        obs("8867-4", 120, "/min", birth),
        condition(onset=birth, abatementDateTime=birth, clinical="resolved"),
        med_statement(start=birth),
    ], consent=dt.date.fromisoformat(day(-2)))
    assert group(res, "SE.SCREEN", "HR")["IT.VS.VSDAT"] == birth[:7]
    assert mh(res)["IT.MH.MHSTDAT"] == birth[:7]
    assert mh(res)["IT.MH.MHENDAT"] == birth[:7]
    assert group(res, "SE.COMMON", "1")["IT.CM.CMSTDAT"] == birth[:7]
    assert all(birth not in iv.value for iv in res.items)


def test_an_unscheduled_repeat_key_equal_to_the_birth_date_is_masked(run):
    birth = day(10)
    res = run([patient(birth=birth), obs("2345-7", 5, "mmol/L", birth)])
    keys = {iv.key.study_event_repeat_key for iv in res.items if iv.key.study_event_oid == "SE.UNSCHED"}
    assert keys == {birth[:7]}
    assert all(birth not in (iv.value, iv.key.study_event_repeat_key) for iv in res.items)


# ---------------------------------------------------------------- MH basics


def test_mh_condition_before_consent(run):
    res = run([condition(onset="2015-03-02")])
    assert mh(res) == {"IT.MH.MHTERM": "Diabetes mellitus type 2", "IT.MH.MHCODE": "44054006",
                       "IT.MH.MHCODESYS": "SNOMED CT", "IT.MH.MHCAT": "GENERAL", "IT.MH.MHSTDAT": "2015-03-02",
                       "IT.MH.MHONGO": "Y"}
    assert len(items(res)) == 6 and res.discrepancies == []


def test_mh_term_prefers_code_text(run):
    res = run([condition(text="Type 2 diabetes")])
    assert mh(res)["IT.MH.MHTERM"] == "Type 2 diabetes"


def test_mh_without_any_term_is_a_missing_value(run):
    res = run([condition(display=None)])
    assert res.items == [] and kinds(res) == ["missing_value"]


@pytest.mark.parametrize("extra,start", [
    ({"onsetDateTime": "2015-03-02T10:00:00+01:00"}, "2015-03-02"),
    ({"onsetPeriod": {"start": "2016-04", "end": "2017"}}, "2016-04"),
    ({"recordedDate": "2017"}, "2017"),
    ({"onsetPeriod": {"start": "2016-04-01"}, "recordedDate": "2020-01-01"}, "2016-04-01"),
])
def test_mh_onset_chain_partial_dates_kept_partial(run, extra, start):
    res = run([condition(onset=None, **extra)])
    assert mh(res)["IT.MH.MHSTDAT"] == start


def test_mh_onset_falls_back_to_the_date_esource_first_saw_it(run):
    c = condition(onset=None)
    # first seen before consent: medical history, without a start date (the first-seen date is not an onset)
    res = run([c], ctx=MappingContext(today=CONSENT - dt.timedelta(days=1)))
    assert mh(res)["IT.MH.MHTERM"] == "Diabetes mellitus type 2"
    assert "IT.MH.MHSTDAT" not in mh(res)
    # first seen on/after consent: a possible adverse event
    res = run([c], ctx=MappingContext(today=CONSENT))
    assert res.items == [] and kinds(res) == ["possible_adverse_event"]


@pytest.mark.parametrize("onset,is_ae", [
    ("2023-12-03", False), ("2023-12-04", True), ("2023-12-05", True),
    ("2023-11", False), ("2023-12", True), ("2023", True), ("2022", False),
    ("2023-12-03T23:59:00+01:00", False),
])
def test_mh_onset_on_or_after_consent_is_a_possible_adverse_event(run, onset, is_ae):
    assert CONSENT == dt.date(2023, 12, 4)
    res = run([condition(onset=onset)])
    if is_ae:
        assert res.items == []
        (d,) = res.discrepancies
        assert d.kind == "possible_adverse_event" and d.form_oid == "F.MH"
        assert "never filled automatically" in d.message
    else:
        assert mh(res)["IT.MH.MHSTDAT"] == onset[:10]
        assert res.discrepancies == []


def test_partial_onset_compared_by_its_latest_possible_day(run):
    res = run([condition(onset="2024-05")], day1=dt.date(2024, 6, 1), consent=dt.date(2024, 5, 10))
    assert res.items == [] and kinds(res) == ["possible_adverse_event"]


@pytest.mark.parametrize("category,sent", [("problem-list-item", True), ("encounter-diagnosis", True), (None, True),
                                           ("health-concern", False)])
def test_mh_condition_categories(run, category, sent):
    res = run([condition(category=category)])
    assert bool(res.items) is sent
    assert res.discrepancies == []


def test_mh_loinc_problem_category_is_accepted(run):
    c = condition(category=None)
    c["category"] = [cc("75326-9", "http://loinc.org")]
    assert mh(run([c]))["IT.MH.MHCAT"] == "GENERAL"


@pytest.mark.parametrize("verification", ["refuted", "entered-in-error"])
def test_mh_refuted_and_entered_in_error_are_excluded(run, verification):
    c = condition(verification=verification, onset=day(10))  # even after consent: not an AE either
    res = run([c])
    assert res.items == [] and res.discrepancies == []
    assert (c["id"] in [r.id for r in res.retracted_sources.values()]) is (verification == "entered-in-error")


@pytest.mark.parametrize("verification", ["unconfirmed", "provisional", "differential", "confirmed", None])
def test_mh_other_verification_statuses_are_history(run, verification):
    assert mh(run([condition(verification=verification)]))["IT.MH.MHTERM"]


@pytest.mark.parametrize("codings", [
    [{"system": IPS_ABSENT, "code": "no-problem-info", "display": "No information about problems"}],
    [{"system": IPS_ABSENT, "code": "no-known-problems", "display": "No known problems"}],
    [{"system": SNOMED, "code": "716186003", "display": "No known allergy"}],
    [{"system": SNOMED, "code": "160245001", "display": "No current problems or disability"}],
])
def test_mh_no_known_and_no_information_entries_are_neither_history_nor_events(run, codings):
    res = run([condition(codings=codings, onset=day(5)), condition(codings=codings, onset="2001")])
    assert res.items == [] and res.discrepancies == []
    assert all("no known" in n.reason for n in res.not_sent)


def test_allergy_no_known_allergy_is_excluded(run):
    res = run([allergy(code="716186003", display="No known allergy")])
    assert res.items == [] and res.discrepancies == []


@pytest.mark.parametrize("codings,code,system", [
    ([{"system": ICD10CM, "code": "E11.9"}, {"system": ICD10, "code": "E11"},
      {"system": SNOMED, "code": "44054006", "display": "T2DM"}], "44054006", "SNOMED CT"),
    ([{"system": ICD10CM, "code": "E11.9", "display": "T2DM"}, {"system": ICD10, "code": "E11"}], "E11", "ICD-10"),
    ([{"system": ICD10CM, "code": "E11.9", "display": "T2DM"}], "E11.9", "ICD-10-CM"),
    ([{"system": "urn:oid:2.16.840.1.113883.6.96", "code": "44054006", "display": "T2DM"}], "44054006", "SNOMED CT"),
])
def test_mh_code_preference(run, codings, code, system):
    g = mh(run([condition(codings=codings)]))
    assert (g["IT.MH.MHCODE"], g["IT.MH.MHCODESYS"]) == (code, system)


def test_mh_local_code_only_sends_no_code_and_says_so(run):
    res = run([condition(codings=[{"system": "urn:local", "code": "X1", "display": "Local thing"}])])
    g = mh(res)
    assert g["IT.MH.MHTERM"] == "Local thing"
    assert "IT.MH.MHCODE" not in g and "IT.MH.MHCODESYS" not in g
    assert kinds(res) == ["unmapped_code"]


@pytest.mark.parametrize("clinical,ongo", [("active", "Y"), ("recurrence", "Y"), ("relapse", "Y"), ("inactive", "N"),
                                           ("remission", "N"), ("resolved", "N"), (None, "U")])
def test_mh_ongoing(run, clinical, ongo):
    assert mh(run([condition(clinical=clinical)]))["IT.MH.MHONGO"] == ongo


@pytest.mark.parametrize("extra,end", [({"abatementDateTime": "2019-04-12"}, "2019-04-12"),
                                       ({"abatementDateTime": "2019-04"}, "2019-04"),
                                       ({"abatementPeriod": {"start": "2019", "end": "2020-02"}}, "2020-02")])
def test_mh_end_from_abatement(run, extra, end):
    assert mh(run([condition(clinical="resolved", **extra)]))["IT.MH.MHENDAT"] == end


def test_allergy_is_history_with_category_allergy(run):
    res = run([allergy(onset="2001", clinical="active")])
    assert mh(res) == {"IT.MH.MHTERM": "Allergy to penicillin", "IT.MH.MHCODE": "91936005",
                       "IT.MH.MHCODESYS": "SNOMED CT", "IT.MH.MHCAT": "ALLERGY", "IT.MH.MHSTDAT": "2001",
                       "IT.MH.MHONGO": "Y"}


def test_allergy_with_onset_after_consent_is_a_possible_adverse_event(run):
    res = run([allergy(onset=day(3))])
    assert res.items == [] and kinds(res) == ["possible_adverse_event"]


@pytest.mark.parametrize("verification", ["refuted", "entered-in-error"])
def test_allergy_refuted_or_entered_in_error_is_excluded(run, verification):
    res = run([allergy(verification=verification)])
    assert res.items == [] and res.discrepancies == []


def test_mh_invalid_onset_is_an_invalid_source_not_a_first_seen_date(run):
    c = condition(onset="2019-13-45")
    res = run([c], ctx=MappingContext(today=CONSENT - dt.timedelta(days=5)))
    assert res.items == []
    (d,) = res.discrepancies
    assert d.kind == "invalid_source" and d.source.id == c["id"]


# ---------------------------------------------------------------- log repeat keys


def test_mh_repeat_keys_in_first_seen_order(run):
    a, b, c = condition(text="A"), allergy(), condition(text="C")
    res = run([a, b, c])
    assert mh(res, "1")["IT.MH.MHTERM"] == "A"
    assert mh(res, "2")["IT.MH.MHTERM"] == "Allergy to penicillin"
    assert mh(res, "3")["IT.MH.MHTERM"] == "C"


def test_mh_repeat_keys_are_stable_when_a_record_comes_again_with_a_new_version(run):
    ident = [{"system": "urn:ehr:problems", "value": "PB-1"}]
    ctx = MappingContext(today=dt.date(2024, 9, 1))
    a1 = condition(text="Hypertension", identifier=ident, meta={"versionId": "1"}, id="c-a")
    b = condition(text="Asthma", id="c-b")
    run([a1, b], ctx=ctx)
    # A comes again: new version, new resource id (same first identifier); a new record C listed first
    a2 = condition(text="Hypertension, essential", identifier=ident, meta={"versionId": "2"}, id="c-a-v2",
                   clinical="resolved")
    c = condition(text="Gout", id="c-c")
    b2 = dict(b, meta={"versionId": "7"})
    res = run([c, b2, a2], ctx=ctx)
    assert mh(res, "1")["IT.MH.MHTERM"] == "Hypertension, essential"
    assert mh(res, "1")["IT.MH.MHONGO"] == "N"
    assert mh(res, "2")["IT.MH.MHTERM"] == "Asthma"
    assert mh(res, "3")["IT.MH.MHTERM"] == "Gout"
    (src,) = {iv.source for iv in res.items if iv.key.item_group_repeat_key == "1"}
    assert src.version == "2" and src.identity == "Condition|urn:ehr:problems|PB-1"


def test_a_possible_adverse_event_takes_no_repeat_key(run):
    res = run([condition(text="New", onset=day(10)), condition(text="Old")])
    assert mh(res, "1")["IT.MH.MHTERM"] == "Old"
