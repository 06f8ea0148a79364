"""Units, conversions, rounding (protocol: "Numbers", "Units", the VS and LB tables) and the LB
reference range / LBNRIND."""

from __future__ import annotations

import pytest

from engine_helpers import (GLUC, HR, SYSBP, TEMP, UCUM, V3_INTERP, cc, day, group, items, kinds, obs, vs)

RANGE_MEANING = "http://terminology.hl7.org/CodeSystem/referencerange-meaning"


def baseline(res, test):
    return group(res, "SE.BASELINE", test)


def result(run, code, value, unit, test):
    res = run([obs(code, value, unit, day(1))])
    assert res.discrepancies == [], [d.message for d in res.discrepancies]
    return baseline(res, test).get("IT.VS.VSORRES") or baseline(res, test).get("IT.LB.LBORRES")


# ---------------------------------------------------------------- which unit a Quantity is in


def test_ucum_code_is_used_when_the_system_is_ucum_whatever_the_unit_text(run):
    q = {"value": 120, "unit": "no idea", "system": UCUM, "code": "mm[Hg]"}
    assert baseline(run([obs(SYSBP, None, None, day(1), valueQuantity=q)]), "SYSBP") == vs("SYSBP", "120", day(1))


@pytest.mark.parametrize("code,value,text,test,expected", [
    (SYSBP, 120, "mmHg", "SYSBP", "120"),
    (HR, 70, "{beats}/min", "HR", "70"),
    (HR, 70, "bpm", "HR", "70"),
    (GLUC, 5, "mmol/l", "GLUC", "90"),
    (TEMP, 37.2, "°C", "TEMP", "37.2"),
    ("2823-3", 4.2, "mEq/L", "K", "4.2"),
    ("1742-6", 35, "IU/L", "ALT", "35"),
])
def test_unit_text_is_read_through_the_synonym_table(run, code, value, text, test, expected):
    assert result(run, code, value, {"unit": text}, test) == expected


@pytest.mark.parametrize("q", [
    {"unit": "MMHG"},                                            # not a synonym (no case folding)
    {"unit": "millimetres of mercury"},
    {"system": "http://example.org/units", "code": "mm[Hg]"},    # a code is only read from UCUM
    {},                                                          # no unit at all
])
def test_an_unknown_unit_is_a_discrepancy_never_a_guess(run, q):
    o = obs(SYSBP, None, None, day(1), valueQuantity={"value": 120, **q})
    res = run([o])
    assert res.items == []
    assert kinds(res) == ["unknown_unit"]
    assert res.discrepancies[0].source.id == o["id"]


def test_ucum_annotations_are_ignored(run):
    q = {"value": 70, "system": UCUM, "code": "{beats}/min"}
    assert baseline(run([obs(HR, None, None, day(1), valueQuantity=q)]), "HR")["IT.VS.VSORRES"] == "70"


# ---------------------------------------------------------------- VS conversions and rounding


@pytest.mark.parametrize("code,value,unit,test,expected", [
    (TEMP, 99.05, "[degF]", "TEMP", "37.3"),       # (99.05 − 32) × 5/9 = 37.25 exactly -> half-up 37.3
    (TEMP, 98.6, "[degF]", "TEMP", "37.0"),
    (TEMP, 37, "Cel", "TEMP", "37.0"),
    (TEMP, 36.95, "Cel", "TEMP", "37.0"),
    ("8331-1", 38.25, "Cel", "TEMP", "38.3"),
    ("29463-7", 150, "[lb_av]", "WEIGHT", "68.0"),  # 68.0388555 kg
    ("29463-7", 70250, "g", "WEIGHT", "70.3"),      # 70.25 -> 70.3
    ("3141-9", 70, "kg", "WEIGHT", "70.0"),
    ("8302-2", 70, "[in_i]", "HEIGHT", "177.8"),
    ("8306-3", 1.755, "m", "HEIGHT", "175.5"),
    ("8302-2", 176, "cm", "HEIGHT", "176.0"),
    ("39156-5", 24.25, "kg/m2", "BMI", "24.3"),
    ("2708-6", 97.5, "%", "OXYSAT", "98"),
    ("59408-5", 96, "%", "OXYSAT", "96"),
    ("9279-1", 16, "/min", "RESP", "16"),
    (HR, 70.5, "/min", "HR", "71"),                 # half-up, not half-even
    (HR, 69.45, "/min", "HR", "69"),                # rounded once (69.45 -> 69.5 -> 70 would be wrong)
    (HR, 120.0, "/min", "HR", "120"),
    ("8462-4", 79.5, "mm[Hg]", "DIABP", "80"),
])
def test_vs_conversion_and_rounding(run, code, value, unit, test, expected):
    assert result(run, code, value, unit, test) == expected


def test_the_unit_item_is_the_standard_unit_label(run):
    res = run([obs(TEMP, 99.05, "[degF]", day(1)), obs("29463-7", 150, "[lb_av]", day(1))])
    assert baseline(res, "TEMP")["IT.VS.VSORRESU"] == "C"
    assert baseline(res, "WEIGHT")["IT.VS.VSORRESU"] == "kg"


def test_conversion_lineage_is_recorded(run):
    res = run([obs(TEMP, 99.05, "[degF]", day(1))])
    (iv,) = [iv for iv in res.items if iv.key.item_oid == "IT.VS.VSORRES"]
    assert any("[degF]" in c for c in iv.conversions)
    assert iv.conversions[-1] == "rounded half-up to 1 decimal(s): 37.3"


@pytest.mark.parametrize("code,unit", [(HR, "mm[Hg]"), (TEMP, "kg"), ("29463-7", "cm"), ("8302-2", "kg")])
def test_incommensurable_units_are_not_convertible(run, code, unit):
    res = run([obs(code, 70, unit, day(1))])
    assert res.items == [] and kinds(res) == ["unit_not_convertible"]


# ---------------------------------------------------------------- LB conversions (the protocol table)


@pytest.mark.parametrize("code,value,unit,test,expected", [
    ("4548-4", 53, "mmol/mol", "HBA1C", "7.0"),      # 0.09148 × 53 + 2.152 = 7.00044
    ("17856-6", 48, "mmol/mol", "HBA1C", "6.5"),     # 6.54304
    ("59261-8", 7.25, "%", "HBA1C", "7.3"),
    (GLUC, 5.5, "mmol/L", "GLUC", "99"),             # 99.088
    ("2339-0", 99.5, "mg/dL", "GLUC", "100"),
    ("1558-6", 6.1, "mmol/L", "GLUC", "110"),        # 109.8976
    ("15074-8", 5, "mmol/L", "GLUC", "90"),          # 90.08
    ("14749-6", 7, "mmol/L", "GLUC", "126"),         # 126.112
    ("2160-0", 0.825, "mg/dL", "CREAT", "0.83"),
    ("38483-4", 88.42, "umol/L", "CREAT", "1.00"),
    ("14682-9", 72.94, "umol/L", "CREAT", "0.82"),   # 0.82493...
    ("2160-0", 0.0884, "mmol/L", "CREAT", "1.00"),   # mmol/L -> 88.4 umol/L ÷ 88.42 = 0.99977
    ("1742-6", 35, "U/L", "ALT", "35"),
    ("1743-4", 35.5, "[IU]/L", "ALT", "36"),
    ("76625-3", 40, "U/L", "ALT", "40"),
    ("1920-8", 40, "[IU]/L", "AST", "40"),
    ("30239-8", 0, "U/L", "AST", "0"),
    ("718-7", 13.45, "g/dL", "HGB", "13.5"),
    ("20509-6", 135, "g/L", "HGB", "13.5"),
    ("59260-0", 8.5, "mmol/L", "HGB", "13.7"),       # 13.6935
    ("2823-3", 4.25, "mmol/L", "K", "4.3"),
    ("6298-4", 4.25, "meq/L", "K", "4.3"),
    ("2951-2", 140, "meq/L", "SODIUM", "140"),
    ("2947-0", 139.5, "mmol/L", "SODIUM", "140"),
    ("2093-3", 5.2, "mmol/L", "CHOL", "201"),        # 201.084
    ("14647-2", 5.2, "mmol/L", "CHOL", "201"),
    ("18262-6", 3, "mmol/L", "LDL", "116"),          # 116.01
    ("13457-7", 2.5, "mmol/L", "LDL", "97"),         # 96.675
    ("2089-1", 100, "mg/dL", "LDL", "100"),
    ("22748-8", 2.5, "mmol/L", "LDL", "97"),
    ("39469-2", 2.5, "mmol/L", "LDL", "97"),
    ("3094-0", 15, "mg/dL", "UREAN", "15"),          # urea nitrogen by mass: as is
    ("6299-2", 15.5, "mg/dL", "UREAN", "16"),
    ("14937-7", 5, "mmol/L", "UREAN", "14"),         # urea nitrogen molar × 2.801 = 14.005
    ("22664-7", 5, "mmol/L", "UREAN", "14"),         # urea molar × 2.801
    ("3091-6", 30, "mg/dL", "UREAN", "14"),          # urea by mass × 0.4665 = 13.995
    ("3091-6", 0.3, "g/L", "UREAN", "14"),           # urea 0.3 g/L = 30 mg/dL urea -> × 0.4665
    ("3091-6", 5, "mmol/L", "UREAN", "14"),
])
def test_lb_conversions(run, code, value, unit, test, expected):
    assert result(run, code, value, unit, test) == expected


@pytest.mark.parametrize("code,test", [("2160-0", "CREAT"), ("4548-4", "HBA1C"), (GLUC, "GLUC"), ("2823-3", "K")])
def test_iu_per_litre_is_only_u_per_litre_for_alt_and_ast(run, code, test):
    res = run([obs(code, 35, "[IU]/L", day(1))])
    assert res.items == [] and kinds(res) == ["unit_not_convertible"]


def test_lb_unit_label_and_date(run):
    res = run([obs(GLUC, 5.5, "mmol/L", day(1, "07:45"))])
    assert baseline(res, "GLUC") == {"IT.LB.LBTESTCD": "GLUC", "IT.LB.LBORRES": "99", "IT.LB.LBORRESU": "mg/dL",
                                     "IT.LB.LBDAT": day(1)}


# ---------------------------------------------------------------- reference range and LBNRIND


def rng(low=None, high=None, unit="mmol/L", **extra):
    out = dict(extra)
    if low is not None:
        out["low"] = {"value": low, **({"unit": unit, "system": UCUM, "code": unit} if unit else {})}
    if high is not None:
        out["high"] = {"value": high, **({"unit": unit, "system": UCUM, "code": unit} if unit else {})}
    return out


def lb(value, unit="mmol/L", ranges=None, interp=None, code=GLUC):
    extra = {}
    if ranges is not None:
        extra["referenceRange"] = ranges
    if interp is not None:
        extra["interpretation"] = [cc(c, V3_INTERP) for c in interp]
    return obs(code, value, unit, day(1), **extra)


def test_the_first_range_without_applies_to_and_normal_or_no_type_is_used(run):
    ranges = [
        rng(1, 2, appliesTo=[cc("248153007", "http://snomed.info/sct")]),
        rng(1, 3, type=cc("treatment", RANGE_MEANING)),
        rng(3.9, 5.5, type=cc("normal", RANGE_MEANING)),
        rng(0, 100),
    ]
    g = baseline(run([lb(5.0, ranges=ranges)]), "GLUC")
    assert g == {"IT.LB.LBTESTCD": "GLUC", "IT.LB.LBORRES": "90", "IT.LB.LBORRESU": "mg/dL", "IT.LB.LBDAT": day(1),
                 "IT.LB.LBORNRLO": "70", "IT.LB.LBORNRHI": "99", "IT.LB.LBNRIND": "NORMAL"}


def test_a_range_without_type_comes_first_when_listed_first(run):
    g = baseline(run([lb(5.0, ranges=[rng(4, 6), rng(3.9, 5.5, type=cc("normal", RANGE_MEANING))])]), "GLUC")
    assert (g["IT.LB.LBORNRLO"], g["IT.LB.LBORNRHI"]) == ("72", "108")


def test_range_bounds_are_converted_and_rounded_like_the_result(run):
    g = baseline(run([lb(80, code="38483-4", unit="umol/L", ranges=[rng(53, 97.5, unit="umol/L")])]), "CREAT")
    # 53 / 88.42 = 0.5994 -> 0.60; 97.5 / 88.42 = 1.1027 -> 1.10; 80 / 88.42 = 0.9048 -> 0.90
    assert (g["IT.LB.LBORRES"], g["IT.LB.LBORNRLO"], g["IT.LB.LBORNRHI"], g["IT.LB.LBNRIND"]) == \
        ("0.90", "0.60", "1.10", "NORMAL")


def test_a_range_without_unit_is_in_the_results_unit(run):
    ranges = [{"low": {"value": 3.9}, "high": {"value": 5.5}}]
    g = baseline(run([lb(5.0, ranges=ranges)]), "GLUC")
    assert (g["IT.LB.LBORNRLO"], g["IT.LB.LBORNRHI"]) == ("70", "99")


@pytest.mark.parametrize("value,nrind", [
    (5.5, "NORMAL"),     # on the high bound: inclusive
    (3.9, "NORMAL"),     # on the low bound: inclusive
    (5.51, "HIGH"),      # 99.27 mg/dL: rounds to 99 like the bound, but the unrounded value is above
    (3.89, "LOW"),       # 70.08 mg/dL vs 70.26: rounds to 70 like the bound, but is below
    (2.0, "LOW"),
    (12, "HIGH"),
])
def test_nrind_compares_the_unrounded_converted_value_bounds_inclusive(run, value, nrind):
    g = baseline(run([lb(value, ranges=[rng(3.9, 5.5)])]), "GLUC")
    assert g["IT.LB.LBNRIND"] == nrind


def test_nrind_against_a_range_in_another_unit(run):
    # 5.5 mmol/L = 99.088 mg/dL, above a 99 mg/dL bound although both are written 99
    g = baseline(run([lb(5.5, ranges=[rng(70, 99, unit="mg/dL")])]), "GLUC")
    assert (g["IT.LB.LBORRES"], g["IT.LB.LBORNRHI"], g["IT.LB.LBNRIND"]) == ("99", "99", "HIGH")


def test_a_range_with_only_a_low_bound(run):
    g = baseline(run([lb(4.0, ranges=[rng(low=3.9)])]), "GLUC")
    assert (g.get("IT.LB.LBORNRLO"), g.get("IT.LB.LBORNRHI"), g["IT.LB.LBNRIND"]) == ("70", None, "NORMAL")


@pytest.mark.parametrize("code,nrind", [("L", "LOW"), ("LL", "LOW"), ("LU", "LOW"), ("H", "HIGH"), ("HH", "HIGH"),
                                        ("HU", "HIGH"), ("N", "NORMAL"), ("A", None), ("POS", None)])
def test_nrind_from_interpretation_without_a_range(run, code, nrind):
    g = baseline(run([lb(5.0, interp=[code])]), "GLUC")
    assert g.get("IT.LB.LBNRIND") == nrind
    assert "IT.LB.LBORNRLO" not in g and "IT.LB.LBORNRHI" not in g


def test_the_range_wins_over_the_interpretation(run):
    g = baseline(run([lb(5.0, ranges=[rng(3.9, 5.5)], interp=["H"])]), "GLUC")
    assert g["IT.LB.LBNRIND"] == "NORMAL"


def test_only_non_normal_ranges_fall_back_to_interpretation(run):
    g = baseline(run([lb(5.0, ranges=[rng(1, 2, type=cc("treatment", RANGE_MEANING))], interp=["L"])]), "GLUC")
    assert g["IT.LB.LBNRIND"] == "LOW"
    assert "IT.LB.LBORNRLO" not in g


def test_no_range_and_no_interpretation_sends_no_nrind(run):
    g = baseline(run([lb(5.0)]), "GLUC")
    assert set(g) == {"IT.LB.LBTESTCD", "IT.LB.LBORRES", "IT.LB.LBORRESU", "IT.LB.LBDAT"}


def test_vs_never_gets_range_items(run):
    res = run([obs(HR, 70, "/min", day(1), referenceRange=[rng(60, 100, unit="/min")], interpretation=[cc("N", V3_INTERP)])])
    assert set(baseline(res, "HR")) == {"IT.VS.VSTESTCD", "IT.VS.VSORRES", "IT.VS.VSORRESU", "IT.VS.VSDAT"}
    assert len(items(res)) == 4


def test_ucum_system_without_a_code_falls_back_to_the_unit_text(run):
    q = {"value": 120, "unit": "mmHg", "system": UCUM}
    assert baseline(run([obs(SYSBP, None, None, day(1), valueQuantity=q)]), "SYSBP")["IT.VS.VSORRES"] == "120"


@pytest.mark.parametrize("code,unit,low,high,decimals,test", [
    ("4548-4", "%", 3, 20, 1, "HBA1C"), (GLUC, "mg/dL", 10, 1500, 0, "GLUC"), ("2160-0", "mg/dL", 0.1, 20, 2, "CREAT"),
    ("1742-6", "U/L", 0, 5000, 0, "ALT"), ("1920-8", "U/L", 0, 5000, 0, "AST"), ("718-7", "g/dL", 2, 25, 1, "HGB"),
    ("2823-3", "mmol/L", 1, 10, 1, "K"), ("2951-2", "mmol/L", 100, 180, 0, "SODIUM"),
    ("2093-3", "mg/dL", 30, 1000, 0, "CHOL"), ("18262-6", "mg/dL", 5, 800, 0, "LDL"),
    ("3094-0", "mg/dL", 1, 250, 0, "UREAN"),
])
def test_every_lb_hard_range_bounds_inclusive(run, code, unit, low, high, decimals, test):
    for v in (low, high):
        res = run([obs(code, v, unit, day(1))])
        assert baseline(res, test)["IT.LB.LBORRES"] == f"{v:.{decimals}f}", (test, v)
    step = 10 ** -decimals
    for v in (low - step, high + step):
        res = run([obs(code, round(v, decimals), unit, day(1))])
        assert res.items == [] and kinds(res) == ["out_of_range"], (test, v)
