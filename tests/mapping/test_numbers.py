"""Exact numbers: source value → Fraction → one half-up rounding → fixed-decimal text."""

from __future__ import annotations

import decimal
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from esource.mapping.numbers import format_fixed, fraction_str, round_half_up, to_exact

# ---------------------------------------------------------------------------------- to_exact


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (161.6696023890834, Fraction("161.6696023890834")),  # 16 significant digits, kept
        (0.1, Fraction(1, 10)),  # not the binary double 0.1000000000000000055…
        (2.675, Fraction("2.675")),
        (1.005, Fraction("1.005")),
        (99.05, Fraction("99.05")),
        (1e-05, Fraction(1, 100000)),
        (1e16, Fraction(10**16)),
        (-0.0, Fraction(0)),
        (120, Fraction(120)),
        (-7, Fraction(-7)),
        ("98.6", Fraction("98.6")),
        (" -1.5e3 ", Fraction(-1500)),
        ("+0.50", Fraction(1, 2)),
        (".5", Fraction(1, 2)),
        (Decimal("0.830"), Fraction(83, 100)),
        (Fraction(5, 9), Fraction(5, 9)),
    ],
)
def test_to_exact(value, expected):
    result = to_exact(value)
    assert isinstance(result, Fraction)
    assert result == expected


def test_to_exact_float_is_not_the_binary_value():
    assert to_exact(0.1) != Fraction(0.1)  # Fraction(0.1) is the binary double
    assert to_exact(161.6696023890834) != Fraction(161.6696023890834)


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), float("-inf"), True, False, Decimal("NaN"), Decimal("-Infinity"),
     "nan", "Infinity", "", "  ", "1/3", "1_000", "12,5", "0x10", "1.2.3", "abc"],
)
def test_to_exact_rejects(bad):
    with pytest.raises(ValueError):
        to_exact(bad)


@pytest.mark.parametrize("bad", [None, [1], {"value": 1}, b"1"])
def test_to_exact_rejects_other_types(bad):
    with pytest.raises(TypeError):
        to_exact(bad)


@given(st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
    lambda d: d.is_finite() and len(d.as_tuple().digits) <= 15 and -300 < d.adjusted() < 300))
def test_to_exact_float_equals_the_json_text_up_to_15_digits(d):
    # orjson parses the JSON text into the nearest double; repr gives the text back.
    assert to_exact(float(str(d))) == Fraction(d)


# ------------------------------------------------------------------------------ round_half_up


@pytest.mark.parametrize(
    ("x", "decimals", "expected"),
    [
        ("2.5", 0, "3"),
        ("-2.5", 0, "-3"),
        ("0.5", 0, "1"),
        ("-0.5", 0, "-1"),
        ("1.5", 0, "2"),  # half-up, not banker's (which would also give 2)
        ("2.5", 0, "3"),  # banker's would give 2
        ("119.5", 0, "120"),
        ("119.4999999999", 0, "119"),
        ("1.45", 1, "1.5"),
        ("-1.45", 1, "-1.5"),
        ("0.825", 2, "0.83"),
        ("-0.825", 2, "-0.83"),
        ("1.005", 2, "1.01"),  # float round(1.005, 2) gives 1.0
        ("2.675", 2, "2.68"),  # float round(2.675, 2) gives 2.67
        ("37.25", 1, "37.3"),
        ("37.2499999999999999999", 1, "37.2"),
        ("176", 1, "176.0"),
        ("0.04", 1, "0.0"),
        ("-0.04", 1, "0.0"),  # never -0.0
        ("-0.0001", 3, "0.000"),
        ("0.0005", 3, "0.001"),
        ("-0.0005", 3, "-0.001"),
        ("125", -1, "1.3E+2"),
        ("-125", -1, "-1.3E+2"),
        ("99999999999999999999999999999999.5", 0, "100000000000000000000000000000000"),
    ],
)
def test_round_half_up(x, decimals, expected):
    result = round_half_up(Fraction(x), decimals)
    assert isinstance(result, Decimal)
    assert result == Decimal(expected)
    assert result.as_tuple().exponent == -decimals
    assert not result.is_signed() or result != 0


def test_round_half_up_exact_tie_after_conversion():
    # 99.05 °F = (99.05 − 32) × 5/9 = 37.25 °C exactly: a tie that float arithmetic misses.
    celsius = (to_exact(99.05) - 32) * Fraction(5, 9)
    assert celsius == Fraction(149, 4)
    assert round_half_up(celsius, 1) == Decimal("37.3")
    assert round((99.05 - 32) * 5 / 9, 1) != 37.3  # the trap this module exists for


def test_round_half_up_exponent_is_exact():
    assert str(round_half_up(Fraction(120), 0)) == "120"
    assert str(round_half_up(Fraction(176), 1)) == "176.0"
    assert str(round_half_up(Fraction(83, 100), 2)) == "0.83"


def test_round_half_up_is_independent_of_the_decimal_context():
    with decimal.localcontext() as ctx:
        ctx.prec = 3
        assert round_half_up(Fraction("123456.78"), 1) == Decimal("123456.8")
        assert round_half_up(Fraction("123456.78"), 1).as_tuple().digits == (1, 2, 3, 4, 5, 6, 8)


fractions_ = st.fractions(max_denominator=10**9).filter(lambda f: abs(f) < 10**12)


@given(fractions_, fractions_, st.integers(min_value=-2, max_value=6))
def test_round_half_up_is_monotone(a, b, decimals):
    lo, hi = min(a, b), max(a, b)
    assert round_half_up(lo, decimals) <= round_half_up(hi, decimals)


@given(fractions_, st.integers(min_value=0, max_value=6))
def test_round_half_up_is_symmetric_and_close(x, decimals):
    r = round_half_up(x, decimals)
    assert round_half_up(-x, decimals) == -r  # half away from zero
    assert abs(Fraction(r) - x) <= Fraction(1, 2) / 10**decimals


@given(
    st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
        lambda d: d.is_finite() and -20 < d.adjusted() < 20),
    st.integers(min_value=0, max_value=8),
)
@example(Decimal("2.5"), 0)
@example(Decimal("-2.5"), 0)
@example(Decimal("0.045"), 2)
@example(Decimal("-0.045"), 2)
def test_round_half_up_agrees_with_decimal_quantize(d, decimals):
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        expected = d.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    result = round_half_up(Fraction(d), decimals)
    assert result == expected
    assert result.as_tuple().exponent == expected.as_tuple().exponent


def test_round_half_up_accepts_only_int_decimals():
    with pytest.raises(TypeError):
        round_half_up(Fraction(1), 1.0)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- format_fixed


@pytest.mark.parametrize(
    ("d", "decimals", "expected"),
    [
        (Decimal("176"), 1, "176.0"),
        (Decimal("176.0"), 1, "176.0"),
        (Decimal("0.83"), 2, "0.83"),
        (Decimal("120"), 0, "120"),
        (Decimal("1.2E+2"), 0, "120"),
        (Decimal("1E+2"), 0, "100"),
        (Decimal("1E+2"), 2, "100.00"),
        (Decimal("-0"), 0, "0"),
        (Decimal("-0.00"), 2, "0.00"),
        (Decimal("0.5"), 3, "0.500"),
        (Decimal("-0.05"), 2, "-0.05"),
        (Decimal("1.50"), 1, "1.5"),
        (Decimal("5E-7"), 7, "0.0000005"),
        (Decimal("-37.3"), 1, "-37.3"),
        (Decimal("12345678901234567890123456789012345"), 0, "12345678901234567890123456789012345"),
    ],
)
def test_format_fixed(d, decimals, expected):
    assert format_fixed(d, decimals) == expected


@pytest.mark.parametrize(
    ("d", "decimals"),
    [(Decimal("0.83"), 1), (Decimal("0.5"), 0), (Decimal("NaN"), 1), (Decimal("Infinity"), 0),
     (Decimal("1"), -1)],
)
def test_format_fixed_never_rounds_a_second_time(d, decimals):
    with pytest.raises(ValueError):
        format_fixed(d, decimals)


@given(fractions_, st.integers(min_value=0, max_value=8))
def test_format_fixed_of_rounded_value(x, decimals):
    text = format_fixed(round_half_up(x, decimals), decimals)
    assert "E" not in text and "e" not in text
    assert not text.startswith("-0") or text.strip("-0.") != ""
    if decimals:
        assert len(text.split(".")[1]) == decimals
    else:
        assert "." not in text
    assert Decimal(text) == round_half_up(x, decimals)
    assert text != "-" + "0" * 1 and not (Decimal(text) == 0 and text.startswith("-"))


# ------------------------------------------------------------------------------- fraction_str


@pytest.mark.parametrize(
    ("x", "places", "expected"),
    [
        (Fraction("68.0388555"), 12, "68.0388555"),
        (Fraction("150") * Fraction(45359237, 100000000), 12, "68.0388555"),
        (Fraction(149, 4), 12, "37.25"),
        (Fraction(3), 12, "3"),
        (Fraction(-1, 2), 12, "-0.5"),
        (Fraction(5, 9), 12, "≈0.555555555556"),
        (Fraction(-1, 3), 4, "≈-0.3333"),
        (Fraction(1, 1024), 12, "0.0009765625"),  # terminates within 12 places: exact
        (Fraction(1, 1024), 10, "0.0009765625"),
        (Fraction(1, 1024), 8, "≈0.00097656"),
        (Fraction(-1, 10**20), 12, "≈0"),
    ],
)
def test_fraction_str(x, places, expected):
    assert fraction_str(x, places) == expected
