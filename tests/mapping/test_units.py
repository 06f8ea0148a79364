"""UCUM units: the protocol's Quantity rule, annotations, and exact conversions via ucumvert."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esource.mapping import units
from esource.mapping.numbers import round_half_up, to_exact
from esource.mapping.units import (
    UCUM_SYSTEM,
    Conversion,
    UnitConverter,
    UnitResolution,
    convert,
    normalize_unit,
    strip_annotations,
)

SYNONYMS = {
    "mmHg": "mm[Hg]",
    "{beats}/min": "/min",
    "beats/min": "/min",
    "mmol/l": "mmol/L",
    "°C": "Cel",
    "score": "{score}",
}

# ------------------------------------------------------------------------- strip_annotations


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("{beats}/min", "/min"),
        ("{score}", "1"),
        ("mL/min/{1.73_m2}", "mL/min"),
        ("10*3{cells}/uL", "10*3/uL"),
        ("{cells}.10*3/uL", "10*3/uL"),
        ("%{HbA1c}", "%"),
        ("{RBC}/{HPF}", "1"),
        ("g/({x}.L)", "g/(L)"),
        ("mg/{x}/dL", "mg/dL"),
        ("mm[Hg]", "mm[Hg]"),
        (" kg ", "kg"),
        ("{unbalanced", "{unbalanced"),
    ],
)
def test_strip_annotations(code, expected):
    assert strip_annotations(code) == expected


# ----------------------------------------------------------------------------- normalize_unit


def q(**kw):
    return dict(kw)


@pytest.mark.parametrize(
    ("quantity", "ucum", "how"),
    [
        # UCUM system: the code, whatever the display text says
        (q(value=120, unit="mmHg", system=UCUM_SYSTEM, code="mm[Hg]"), "mm[Hg]", "ucum-code"),
        (q(unit="bpm", system=UCUM_SYSTEM, code="{beats}/min"), "/min", "ucum-code"),
        (q(unit="score", system=UCUM_SYSTEM, code="{score}"), "1", "ucum-code"),
        (q(unit="kg", system=UCUM_SYSTEM, code="kg"), "kg", "ucum-code"),
        # a UCUM code is not checked or corrected here (the converter rejects invalid UCUM)
        (q(unit="mm[Hg]", system=UCUM_SYSTEM, code="mmHg"), "mmHg", "ucum-code"),
        # no system: display text through the synonym table only
        (q(value=120, unit="mmHg"), "mm[Hg]", "synonym"),
        (q(unit="mmol/l"), "mmol/L", "synonym"),
        (q(unit="{beats}/min"), "/min", "synonym"),
        (q(unit="score"), "1", "synonym"),  # the synonym's own annotation is ignored
        (q(unit="mmHg "), "mm[Hg]", "synonym"),
        # ... case-sensitively, never guessed
        (q(unit="MMHG"), None, "unknown-unit-text"),
        (q(unit="mmol/L"), None, "unknown-unit-text"),  # valid UCUM, but not in the table
        (q(unit="kg"), None, "unknown-unit-text"),
        (q(unit="Mmhg"), None, "unknown-unit-text"),
        # annotations in the display text are ignored for the lookup
        (q(unit="{beat}/min"), "/min", "synonym-annotations-ignored"),
        (q(unit="mmHg{sitting}"), "mm[Hg]", "synonym-annotations-ignored"),
        # another system: its code is not UCUM; the display text goes through the table
        (q(unit="mmHg", system="http://snomed.info/sct", code="259018001"), "mm[Hg]", "synonym"),
        (q(unit="kg", system="http://snomed.info/sct", code="258683005"), None, "unknown-unit-text"),
        # UCUM system without a code: the display text, through the table
        (q(unit="mmHg", system=UCUM_SYSTEM), "mm[Hg]", "synonym"),
        (q(unit="kg", system=UCUM_SYSTEM), None, "unknown-unit-text"),
        # nothing to go on
        (q(value=5), None, "no-unit"),
        (q(value=5, unit=""), None, "no-unit"),
        (q(value=5, code="kg"), None, "no-unit"),  # a code without the UCUM system is not UCUM
    ],
)
def test_normalize_unit(quantity, ucum, how):
    result = normalize_unit(quantity, SYNONYMS)
    assert isinstance(result, UnitResolution)
    assert (result.ucum, result.how) == (ucum, how)
    assert result.known is (ucum is not None)


def test_normalize_unit_keeps_the_raw_text():
    assert normalize_unit(q(unit="bpm", system=UCUM_SYSTEM, code="{beats}/min"), {}).raw == "{beats}/min"
    assert normalize_unit(q(unit="mmHg"), SYNONYMS).raw == "mmHg"
    assert normalize_unit(q(unit="furlongs"), SYNONYMS).raw == "furlongs"


def test_normalize_unit_table_is_per_call():
    alt = {"[IU]/L": "U/L", "IU/L": "U/L"}  # the ALT/AST equivalence lives in the map, not in UCUM
    assert normalize_unit(q(unit="IU/L"), alt).ucum == "U/L"
    assert normalize_unit(q(unit="IU/L"), SYNONYMS).ucum is None


def test_normalize_unit_ambiguous_annotation_keys_are_unknown():
    table = {"{a}x": "mg", "{b}x": "g"}
    assert normalize_unit(q(unit="{c}x"), table).ucum is None
    assert normalize_unit(q(unit="{c}x"), {"{a}x": "mg", "{b}x": "mg"}).ucum == "mg"


def test_normalize_unit_non_mapping():
    assert normalize_unit("mmHg", SYNONYMS) == UnitResolution(None, None, "invalid")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- conversion

conv = UnitConverter()


@pytest.mark.parametrize(
    ("src", "dst", "factor", "offset"),
    [
        ("[lb_av]", "kg", Fraction(45359237, 100000000), 0),
        ("kg", "[lb_av]", Fraction(100000000, 45359237), 0),
        ("[in_i]", "cm", Fraction(254, 100), 0),
        ("[degF]", "Cel", Fraction(5, 9), Fraction(-160, 9)),
        ("Cel", "[degF]", Fraction(9, 5), Fraction(32)),
        ("K", "Cel", Fraction(1), Fraction("-273.15")),
        ("g", "kg", Fraction(1, 1000), 0),
        ("m", "cm", Fraction(100), 0),
        ("mm[Hg]", "mm[Hg]", Fraction(1), 0),
        ("/min", "/min", Fraction(1), 0),
        ("{beats}/min", "/min", Fraction(1), 0),
        ("/min", "/h", Fraction(60), 0),
        ("10*3/uL", "10*9/L", Fraction(1), 0),
        ("mg/dL", "g/L", Fraction(1, 100), 0),
        ("g/L", "g/dL", Fraction(1, 10), 0),
        ("umol/L", "mmol/L", Fraction(1, 1000), 0),
        ("meq/L", "mmol/L", Fraction(1), 0),
        ("kg.m-2", "kg/m2", Fraction(1), 0),
        ("%", "1", Fraction(1, 100), 0),
        ("[ft_i]", "cm", Fraction("30.48"), 0),
    ],
)
def test_conversion_factors_are_exact(src, dst, factor, offset):
    c = conv.conversion(src, dst)
    assert isinstance(c, Conversion)
    assert isinstance(c.factor, Fraction) and isinstance(c.offset, Fraction)
    assert c.factor == factor
    assert c.offset == offset


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("mg/dL", "mmol/L"),  # needs a molar mass: not a unit conversion
        ("mmol/L", "mg/dL"),
        ("[IU]/L", "U/L"),  # arbitrary units are not commensurable with enzyme units in UCUM
        ("kg", "m"),
        ("Cel", "kg"),
        ("C", "Cel"),  # C is the coulomb
        ("mmHg", "mm[Hg]"),  # not valid UCUM (that is what the synonym table is for)
        ("foo", "kg"),
        ("kg", "bar"),
        ("mEq/L", "mmol/L"),  # UCUM is case-sensitive: the equivalent is "eq"
        ("{unbalanced", "kg"),
        ("", "kg"),
    ],
)
def test_conversion_none_when_not_commensurable_or_invalid(src, dst):
    assert conv.conversion(src, dst) is None
    assert conv.commensurable(src, dst) is False


def test_conversion_is_not_the_clinical_hba1c_equation():
    # UCUM sees mmol/mol → % as a plain ratio (× 1/10). The IFCC→NGSP equation of the protocol
    # (% = 0.09148 × v + 2.152) must come from the study map, before this converter is asked.
    c = conv.conversion("mmol/mol", "%")
    assert c is not None and c.factor == Fraction(1, 10) and c.offset == 0


def test_fahrenheit_tie_rounds_half_up():
    c = conv.conversion("[degF]", "Cel")
    celsius = convert(to_exact(99.05), c)
    assert celsius == Fraction(149, 4)  # 37.25 exactly
    assert round_half_up(celsius, 1) == Decimal("37.3")
    assert round_half_up(convert(to_exact(98.6), c), 1) == Decimal("37.0")
    assert convert(Fraction(212), c) == 100


def test_weight_and_height_examples():
    lb = conv.conversion("[lb_av]", "kg")
    assert convert(Fraction(150), lb) == Fraction("68.0388555")
    assert round_half_up(convert(Fraction(150), lb), 1) == Decimal("68.0")
    inch = conv.conversion("[in_i]", "cm")
    assert convert(to_exact(69.3), inch) == Fraction("176.022")
    assert round_half_up(convert(to_exact(69.3), inch), 1) == Decimal("176.0")


def test_snap_rounds_float_noise_and_keeps_small_fractions():
    noisy = Fraction(0.45359237000000010)  # a binary double near the UCUM constant
    assert units._snap(noisy + Fraction(1, 10**17)) == Fraction(45359237, 100000000)
    assert units._snap(Fraction(5, 9)) == Fraction(5, 9)
    assert units._snap(Fraction(1, 10**6)) == Fraction(1, 10**6)
    assert units._snap(Fraction(1, 3 * 10**6)) == Fraction("3.33333333333333E-7")
    assert units._snap(Fraction(0)) == 0


def test_non_terminating_factor_is_rounded_to_15_significant_digits():
    c = conv.conversion("[psi]", "mm[Hg]")
    assert c is not None and c.offset == 0
    assert c.factor == Fraction("51.7149252038719")  # 15 significant digits
    back = conv.conversion("mm[Hg]", "[psi]")
    assert back.factor == 1 / c.factor  # the other direction is its exact inverse
    assert convert(convert(Fraction("120.5"), back), c) == Fraction("120.5")


def test_inverse_of_a_defined_constant_stays_exact():
    # kg → [lb_av] is 1/0.45359237, not a 15-digit approximation: 150 lb round-trips exactly.
    to_lb = conv.conversion("kg", "[lb_av]")
    assert to_lb.factor == Fraction(100000000, 45359237)
    to_kg = conv.conversion("[lb_av]", "kg")
    assert convert(convert(Fraction(150), to_kg), to_lb) == 150
    # whichever way the codes sort: L sorts before [gal_us], kg after [lb_av]
    assert conv.conversion("[gal_us]", "L").factor == Fraction("3.785411784")
    assert conv.conversion("L", "[gal_us]").factor == 1 / Fraction("3.785411784")


def test_identity_needs_no_registry():
    code = textwrap.dedent(
        """
        import sys
        from esource.mapping import units
        c = units.UnitConverter()
        for a, b in [("mm[Hg]", "mm[Hg]"), ("/min", "/min"), ("{beats}/min", "/min"),
                     ("mL/min/{1.73_m2}", "mL/min"), ("{score}", "1"), ("kg", " kg")]:
            r = c.conversion(a, b)
            assert r is not None and r.factor == 1 and r.offset == 0, (a, b, r)
        print(units.registry_loaded(), "ucumvert" in sys.modules, "pint" in sys.modules)
        c.conversion("g", "kg")
        print(units.registry_loaded())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False", "True"]


def test_registry_and_pairs_are_cached():
    first = conv.conversion("mg", "g")
    backend = units._backend()
    assert units.registry_loaded()
    assert UnitConverter().conversion("mg", "g") is first  # cached per process, not per instance
    assert conv.conversion("ug", "g") is not None
    assert units._backend() is backend
    assert ("mg", "g") in units._pair_cache and ("mg/dL", "mmol/L") in units._pair_cache


LINEAR = ["kg", "g", "[lb_av]", "[oz_av]", "[stone_av]", "cm", "m", "[in_i]", "[ft_i]", "mg/dL",
          "g/L", "g/dL", "mmol/L", "umol/L", "/min", "/h", "Hz", "%", "1", "mm[Hg]", "kPa", "[psi]",
          "cm[H2O]", "10*3/uL", "10*9/L", "kg/m2", "[lb_av]/[in_i]2"]


@given(st.sampled_from(LINEAR), st.sampled_from(LINEAR),
       st.fractions(max_denominator=1000).filter(lambda f: abs(f) < 10**6))
def test_round_trip_is_exact_for_linear_units(a, b, value):
    there = conv.conversion(a, b)
    back = conv.conversion(b, a)
    assert (there is None) == (back is None)
    if there is None:
        return
    assert there.offset == 0 and back.offset == 0
    assert there.factor * back.factor == 1
    assert convert(convert(value, there), back) == value


TEMPERATURES = ["Cel", "[degF]", "K", "[degR]"]


@given(st.sampled_from(TEMPERATURES), st.sampled_from(TEMPERATURES),
       st.fractions(max_denominator=100).filter(lambda f: abs(f) < 10**4))
def test_temperature_round_trip_is_exact(a, b, value):
    there, back = conv.conversion(a, b), conv.conversion(b, a)
    assert there is not None and back is not None
    assert convert(convert(value, there), back) == value
    assert convert(convert(value, back), there) == value


def test_describe_for_lineage():
    assert conv.conversion("[lb_av]", "kg").describe() == "× 0.45359237"
    assert conv.conversion("Cel", "[degF]").describe() == "× 1.8 + 32"
