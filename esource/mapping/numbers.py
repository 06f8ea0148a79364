"""Exact decimal arithmetic for eCRF values: convert exactly, round once, format exactly.

Protocol ("Numbers"): convert with decimal arithmetic, then round **once**, half-up (away from
zero), to the item's decimals, and write the value with exactly that many decimals
(``176.0``, ``0.83``, ``120``).

Every value is carried as a :class:`fractions.Fraction` from the moment it leaves the source
until it is rounded, so no binary floating point ever touches a clinical value:

* :func:`to_exact` turns a JSON number (orjson gives a ``float``), a FHIR decimal string, an
  ``int`` or a ``Decimal`` into the exact rational the source *wrote*.
* :func:`round_half_up` rounds a rational half away from zero, exactly, into a ``Decimal``
  whose exponent is exactly ``-decimals``.
* :func:`format_fixed` writes that ``Decimal`` in plain fixed-point notation.
* :func:`fraction_str` renders intermediate values for lineage ("68.0388555").

Pure domain code: no I/O, no third-party imports.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

__all__ = ["format_fixed", "fraction_str", "round_half_up", "to_exact"]

# A JSON / FHIR decimal as text (FHIR `decimal` regex, with an optional leading '+' tolerated).
_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def to_exact(v: int | float | str | Decimal | Fraction) -> Fraction:
    """The exact rational value of a source number.

    * ``float``: JSON numbers arrive as floats from orjson. They are converted through their
      shortest round-tripping ``repr``, which is the decimal text of the JSON number whenever it
      had at most 15 significant digits, so ``161.6696023890834`` stays exactly that (and ``0.1``
      is 1/10, not the binary double nearest to it).
    * ``str``: a decimal literal (``"98.6"``, ``"-1.5e3"``); surrounding whitespace is ignored.
    * ``int``, ``Decimal``, ``Fraction``: taken exactly.

    Raises ``ValueError`` for NaN, infinities, booleans and malformed text, ``TypeError`` for
    any other type.
    """
    if isinstance(v, bool):  # bool is an int subclass: True is not a measurement
        raise ValueError(f"a boolean ({v!r}) is not a number")
    if isinstance(v, Fraction):
        return v
    if isinstance(v, int):
        return Fraction(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"not a finite number: {v!r}")
        return Fraction(repr(v))
    if isinstance(v, Decimal):
        if not v.is_finite():
            raise ValueError(f"not a finite number: {v!r}")
        return Fraction(v)
    if isinstance(v, str):
        text = v.strip()
        if not _DECIMAL_TEXT.fullmatch(text):
            raise ValueError(f"not a decimal number: {v!r}")
        return Fraction(Decimal(text))
    raise TypeError(f"cannot take {type(v).__name__} as an exact number")


def _round_to_int_half_up(numerator: int, denominator: int) -> int:
    """Nearest integer to ``numerator / denominator`` (denominator > 0), ties away from zero (exact).
    Plain integers: Fraction arithmetic and comparisons cost several times more, on every value."""
    q, r = divmod(abs(numerator), denominator)
    if 2 * r >= denominator:
        q += 1
    return -q if numerator < 0 else q


def round_half_up(x: Fraction, decimals: int) -> Decimal:
    """Round ``x`` to ``decimals`` places, half away from zero (``-2.5`` → ``-3``), exactly.

    The result's exponent is exactly ``-decimals`` (``Decimal('176.0')`` for 1 decimal,
    ``Decimal('120')`` for 0). A negative ``decimals`` rounds to tens, hundreds, …
    A result of zero is always positive zero (never ``-0``).
    """
    if not isinstance(decimals, int) or isinstance(decimals, bool):
        raise TypeError("decimals must be an int")
    x = to_exact(x) if not isinstance(x, Fraction) else x
    if decimals >= 0:
        n = _round_to_int_half_up(x.numerator * 10**decimals, x.denominator)
    else:
        n = _round_to_int_half_up(x.numerator, x.denominator * 10**-decimals)
    sign = 1 if n < 0 else 0
    digits = tuple(int(c) for c in str(abs(n)))
    # Built from a tuple: exact, independent of the decimal context's precision.
    return Decimal((sign, digits, -decimals))


def format_fixed(d: Decimal, decimals: int) -> str:
    """Write ``d`` with exactly ``decimals`` decimal places in plain notation.

    ``176`` → ``"176.0"`` (1), ``Decimal('0.83')`` → ``"0.83"`` (2), ``Decimal('1.2E+2')`` →
    ``"120"`` (0). Never scientific notation, never ``-0``.

    This function does not round: the protocol rounds once, in :func:`round_half_up`. A value
    that needs more than ``decimals`` places to be written exactly raises ``ValueError``
    (trailing zeros are fine: ``Decimal('1.50')`` formats as ``"1.5"`` with 1 decimal).
    """
    if not isinstance(decimals, int) or isinstance(decimals, bool) or decimals < 0:
        raise ValueError(f"decimals must be a non-negative int, got {decimals!r}")
    if isinstance(d, (int, Fraction)) and not isinstance(d, bool):
        exact = Fraction(d)
    elif isinstance(d, Decimal):
        if not d.is_finite():
            raise ValueError(f"not a finite number: {d!r}")
        exact = Fraction(d)
    else:
        raise TypeError(f"format_fixed takes a Decimal, got {type(d).__name__}")
    scaled = exact * 10**decimals
    if scaled.denominator != 1:
        raise ValueError(
            f"{d} cannot be written with {decimals} decimal(s) without rounding; "
            "round it once with round_half_up first"
        )
    n = scaled.numerator
    sign = "-" if n < 0 else ""
    digits = str(abs(n))
    if decimals == 0:
        return sign + digits
    digits = digits.rjust(decimals + 1, "0")
    return f"{sign}{digits[:-decimals]}.{digits[-decimals:]}"


def _terminating_places(x: Fraction) -> int | None:
    """Number of decimal places of ``x`` if its decimal expansion terminates, else None."""
    den = x.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    return max(twos, fives) if den == 1 else None


def fraction_str(x: Fraction, max_places: int = 12) -> str:
    """Human-readable decimal text for lineage (never used for eCRF values).

    Exact when the decimal expansion terminates within ``max_places`` places, with no trailing
    zeros (``68.0388555``, ``37.25``, ``3``). Otherwise the value rounded half-up to
    ``max_places`` places, trailing zeros removed, prefixed with ``≈`` to say it is not exact
    (5/9 → ``≈0.555555555556``).
    """
    if max_places < 0:
        raise ValueError("max_places must be >= 0")
    x = to_exact(x) if not isinstance(x, Fraction) else x
    places = _terminating_places(x)
    approx = places is None or places > max_places
    shown = max_places if approx else places
    text = format_fixed(round_half_up(x, shown), shown)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text == "-0":
        text = "0"
    return ("≈" + text) if approx else text
