"""UCUM units: which unit a FHIR Quantity is in, and the exact map between two UCUM units.

Protocol ("Units"): use ``Quantity.code`` when ``Quantity.system`` is UCUM; otherwise
``Quantity.unit`` only through the map's synonym table. UCUM annotations in braces are ignored.
An unknown unit is a discrepancy, never a guess.

* :func:`normalize_unit` applies that rule and returns a :class:`UnitResolution` whose ``ucum``
  is ``None`` when the unit is unknown (the caller raises the "unknown unit" discrepancy).
* :class:`UnitConverter` answers "how do I turn a value in ``src`` into ``dst``?" with an exact
  affine map (:class:`Conversion`), or ``None`` when UCUM says the units are not commensurable
  (``mg/dL`` vs ``mmol/L``) or a unit is not valid UCUM. It uses ucumvert (UCUM on pint).
* :func:`convert` applies a :class:`Conversion` exactly.

Annotations (``{...}``) — the choice made here, following UCUM's own semantics (an annotation
standing alone as a term is the unit 1; one attached to a unit is a comment on it):

* an annotation attached to a unit is dropped: ``10*3{cells}/uL`` → ``10*3/uL``, ``%{HbA1c}`` → ``%``;
* an annotation standing alone is the unit 1, which is then tidied away:
  ``{beats}/min`` → ``/min`` (1/min, UCUM's unary division), ``mL/min/{1.73_m2}`` → ``mL/min``
  (÷ 1), ``{cells}.10*3/uL`` → ``10*3/uL`` (1 ×), ``kg/{x}.m2`` → ``kg.m2`` (UCUM reads
  left to right: (kg/1).m2), ``g/({x}.L)`` → ``g/(L)``; a unit that was nothing but
  annotations (``{score}``, ``{RBC}/{HPF}``) becomes ``1``.

Codes without braces are only trimmed of surrounding whitespace; a literal ``1`` (``1/min``)
is kept as written, so ``1/min`` and ``/min`` are not string-identical (the converter still
finds factor 1 between them).

Nothing else is rewritten: no case folding, no whitespace inside the code is removed, no
spelling is corrected (``mmHg`` is not ``mm[Hg]``, ``MG`` is mega-gauss, not mg). Such units
are either handled by the study map's synonym table or fail as invalid UCUM.

Domain code: no I/O. ucumvert/pint are imported lazily, on the first conversion that is not an
identity, and the registry (about 1 s to build) is built once per process.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Any

from esource.mapping.numbers import fraction_str

__all__ = [
    "UCUM_SYSTEM",
    "Conversion",
    "UnitConverter",
    "UnitResolution",
    "convert",
    "normalize_unit",
    "registry_loaded",
    "strip_annotations",
]

UCUM_SYSTEM = "http://unitsofmeasure.org"

# Fractions whose denominator is at most this are taken as exact (5/9, 1/1000, 127/50 ...).
_EXACT_DENOMINATOR_LIMIT = 10**6
# Other factors/offsets are rounded to this many significant digits (UCUM's defined constants
# have fewer), which removes float noise picked up inside pint.
_SIGNIFICANT_DIGITS = 15


# --------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------

_ANNOTATION = re.compile(r"\{[^{}]*\}")


def strip_annotations(code: str) -> str:
    """Remove UCUM annotations (``{...}``) from a unit code and tidy what they leave behind.

    See the module docstring for the rules. Surrounding whitespace is removed; unbalanced
    braces are left in place (such a code is not valid UCUM and fails later). The result is
    ``"1"`` when nothing but annotations (and operators) was written.
    """
    s = code.strip()
    if "{" not in s and "}" not in s:
        return s
    s = _ANNOTATION.sub("", s)
    if "{" in s or "}" in s:
        return code.strip()  # unbalanced / nested braces: leave it to the validator
    previous = None
    while s != previous:
        previous = s
        s = s.replace("()", "")  # a group that held only annotations: unit 1, a factor of 1
        s = re.sub(r"[./](?=[./)]|$)", "", s)  # "X/1" → "X", "X.1" → "X" (operator + nothing)
        s = re.sub(r"^\.", "", s)  # "1.X" → "X" at the start
        s = s.replace("(.", "(")  # ... and at the start of a group
        s = s.replace("(/", "(1/")  # a group cannot start with "/": write the 1
    if s in ("", "/"):
        return "1"
    return s


# --------------------------------------------------------------------------------------------
# Quantity → UCUM code
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitResolution:
    """The UCUM unit of a Quantity, or ``ucum=None`` when it is unknown.

    ``raw`` is the text the source wrote (the code for UCUM quantities, else the unit text);
    ``how`` says which rule gave the result: ``ucum-code``, ``synonym``,
    ``synonym-annotations-ignored``, ``unknown-unit-text``, ``no-unit``, ``invalid``.
    """

    ucum: str | None
    raw: str | None
    how: str

    @property
    def known(self) -> bool:
        return self.ucum is not None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def normalize_unit(quantity: Mapping[str, Any], synonyms: Mapping[str, str]) -> UnitResolution:
    """The UCUM unit of a FHIR ``Quantity`` (as a JSON dict) under the protocol's rule.

    1. ``system == "http://unitsofmeasure.org"`` and a ``code``: the code, annotations ignored.
    2. Otherwise ``unit`` (the display text) through ``synonyms``, case-sensitively (UCUM is
       case-sensitive, so ``mmol/l`` and ``mmol/L`` need their own entries):
       the exact text first, then the text with surrounding whitespace removed, then with its
       annotations ignored (``{beats}/min`` matches a ``/min`` key, or a key that is the same
       once its own annotations are ignored, if those keys all agree). The synonym's value has
       its annotations ignored too.
    3. Anything else is unknown: ``ucum=None``. Never guessed, never case-folded.
    """
    if not isinstance(quantity, Mapping):
        return UnitResolution(None, None, "invalid")
    system = quantity.get("system")
    code = _text(quantity.get("code"))
    unit = _text(quantity.get("unit"))

    if system == UCUM_SYSTEM and code is not None:
        return UnitResolution(strip_annotations(code), code, "ucum-code")

    if unit is None:
        return UnitResolution(None, code if system == UCUM_SYSTEM else None, "no-unit")

    for key in (unit, unit.strip()):
        if key in synonyms and _text(synonyms[key]) is not None:
            return UnitResolution(strip_annotations(synonyms[key]), unit, "synonym")

    bare = strip_annotations(unit)
    if bare != unit.strip():
        if bare in synonyms and _text(synonyms[bare]) is not None:
            return UnitResolution(
                strip_annotations(synonyms[bare]), unit, "synonym-annotations-ignored"
            )
        targets = {
            strip_annotations(target)
            for key, target in synonyms.items()
            if isinstance(key, str) and _text(target) is not None and strip_annotations(key) == bare
        }
        if len(targets) == 1:
            return UnitResolution(targets.pop(), unit, "synonym-annotations-ignored")
    return UnitResolution(None, unit, "unknown-unit-text")


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conversion:
    """An exact affine map between two units: ``value_dst = value_src × factor + offset``."""

    factor: Fraction
    offset: Fraction
    how: str

    @property
    def is_identity(self) -> bool:
        return self.factor == 1 and self.offset == 0

    def describe(self) -> str:
        """Lineage text, e.g. ``× 0.45359237`` or ``× ≈0.555555555556 + ≈-17.777777777778``."""
        text = f"× {fraction_str(self.factor)}"
        if self.offset:
            text += f" + {fraction_str(self.offset)}"
        return text


IDENTITY = Conversion(Fraction(1), Fraction(0), "identity")


def convert(value: Fraction, conv: Conversion) -> Fraction:
    """``value × factor + offset``, exactly."""
    return value * conv.factor + conv.offset


def _snap(x: Fraction) -> Fraction:
    """Keep small-denominator fractions; round the rest to 15 significant digits."""
    if x.denominator <= _EXACT_DENOMINATOR_LIMIT or x == 0:
        return x
    with localcontext() as ctx:
        ctx.prec = _SIGNIFICANT_DIGITS
        ctx.rounding = ROUND_HALF_UP
        # Exact division in a 15-digit context rounds the quotient once, correctly.
        d = Decimal(x.numerator) / Decimal(x.denominator)
    return Fraction(d)


# The ucumvert/pint registry, built at most once per process, on first need.
_lock = threading.RLock()
_ucum: _UcumBackend | None = None


class _UcumBackend:
    """ucumvert's pint registry in exact (Fraction) mode with a UCUM parser bound to it."""

    def __init__(self) -> None:
        from ucumvert import PintUcumRegistry
        from ucumvert.parser import get_ucum_parser
        from ucumvert.ucum_pint import UcumToPintTransformer

        self.registry = PintUcumRegistry(non_int_type=Fraction)
        # PintUcumRegistry.from_ucum builds its quantities in pint's *application* registry
        # (float arithmetic). Binding a transformer to our Fraction registry keeps every
        # definition's constants exact.
        self._parser = get_ucum_parser()
        self._transform = UcumToPintTransformer(ureg=self.registry).transform

    def quantity(self, code: str):
        from ucumvert.parser import parse_ucum

        return self._transform(parse_ucum(code, self._parser))


def _backend() -> _UcumBackend:
    global _ucum
    if _ucum is None:
        with _lock:
            if _ucum is None:
                _ucum = _UcumBackend()
    return _ucum


def registry_loaded() -> bool:
    """Whether the ucumvert registry has been built in this process (for tests/diagnostics)."""
    return _ucum is not None


def _conversion_errors() -> tuple[type[BaseException], ...]:
    from lark.exceptions import LarkError  # ucumvert's parse/transform errors (InvalidUcumError, VisitError)
    from pint.errors import PintError  # DimensionalityError, UndefinedUnitError, OffsetUnitCalculusError ...

    # ucumvert also fails with plain AttributeError/TypeError on some inputs (an annotation-only
    # code, say), and pint with ZeroDivisionError on a zero factor; all mean "no conversion".
    return (LarkError, PintError, AttributeError, TypeError, ValueError, ArithmeticError)


# (src, dst) → Conversion | None, shared by every UnitConverter in the process.
_pair_cache: dict[tuple[str, str], Conversion | None] = {}


def _evaluate(backend: _UcumBackend, src: str, dst: str) -> tuple[Fraction, Fraction] | None:
    """(factor, offset) from ``src`` to ``dst`` as pint computes it, unsnapped; None if impossible."""
    try:
        qs = backend.quantity(src)
        qd = backend.quantity(dst)
        ms = Fraction(qs.magnitude)  # 1, or a numeric factor written in the code (10*3, 10.L)
        md = Fraction(qd.magnitude)
        if md == 0:
            return None
        quantity = backend.registry.Quantity
        # Two evaluations give an affine map, so offset units (Cel, [degF], K) work.
        y0 = Fraction(quantity(Fraction(0) * ms, qs.units).to(qd.units).magnitude) / md
        y1 = Fraction(quantity(Fraction(1) * ms, qs.units).to(qd.units).magnitude) / md
    except _conversion_errors():
        # Never str() these: pint's DimensionalityError message fails to format Fraction powers.
        return None
    factor = y1 - y0
    return None if factor == 0 else (factor, y0)


def _is_clean(pair: tuple[Fraction, Fraction]) -> bool:
    return all(_snap(x) == x for x in pair)


def _inverse(pair: tuple[Fraction, Fraction]) -> tuple[Fraction, Fraction]:
    factor, offset = pair
    return 1 / factor, -offset / factor


def _ucum_conversion(src: str, dst: str) -> Conversion | None:
    """The snapped conversion src → dst, chosen so that src → dst → src is exactly the identity.

    * If pint's exact result is "clean" (every number is kept as is by the snap rule: small
      denominator, or a decimal of at most 15 significant digits) it is used: [lb_av] → kg is
      0.45359237, [degF] → Cel is × 5/9 − 160/9.
    * Else, if the reverse direction is clean, this direction is its exact inverse:
      kg → [lb_av] is 1/0.45359237 = 100000000/45359237, not a 15-digit approximation of it.
    * Else both are rounded: the direction whose source code sorts first is snapped to 15
      significant digits and the other is its exact inverse ([psi] ↔ mm[Hg]).
    """
    backend = _backend()
    forward = _evaluate(backend, src, dst)
    if forward is None:
        return None
    how = f"ucum:{src}->{dst}"
    if _is_clean(forward):
        return Conversion(forward[0], forward[1], how)
    reverse = _evaluate(backend, dst, src)
    if reverse is None:  # not expected: commensurability is symmetric
        return Conversion(_snap(forward[0]), _snap(forward[1]), how + " (rounded)")
    if _is_clean(reverse):
        factor, offset = _inverse(reverse)
        return Conversion(factor, offset, how + " (exact inverse)")
    if src <= dst:
        return Conversion(_snap(forward[0]), _snap(forward[1]), how + " (rounded)")
    factor, offset = _inverse((_snap(reverse[0]), _snap(reverse[1])))
    return Conversion(factor, offset, how + " (inverse of rounded)")


class UnitConverter:
    """Exact conversions between UCUM units, decided and computed by ucumvert (UCUM on pint).

    ``conversion(src, dst)`` returns ``None`` when the units are not commensurable in UCUM or
    either is not valid UCUM. Codes are compared after annotations are ignored; the same code
    on both sides is the identity without loading the registry. Results are cached per
    (src, dst) for the whole process.

    Exactness: pint runs in Fraction mode. A factor/offset is kept as is when its denominator
    is ≤ 10**6 (5/9, 127/50) or it is a decimal of ≤ 15 significant digits (0.45359237);
    otherwise it is rounded to 15 significant digits, which removes any float noise picked up
    inside pint. The two directions of a pair are always exact inverses of each other, so
    a → b → a is exactly the identity (see :func:`_ucum_conversion`).

    Note: UCUM only knows *units*. It will happily convert ``mmol/mol`` to ``%`` (× 1/10), which
    is not the clinical IFCC→NGSP HbA1c equation; study-specific conversions (molar masses,
    HbA1c) must be applied from the study map before falling back to this converter.
    """

    def conversion(self, src_ucum: str, dst_ucum: str) -> Conversion | None:
        if not isinstance(src_ucum, str) or not isinstance(dst_ucum, str):
            return None
        src, dst = strip_annotations(src_ucum), strip_annotations(dst_ucum)
        if not src or not dst:
            return None
        if src == dst:
            return IDENTITY
        key = (src, dst)
        try:
            return _pair_cache[key]
        except KeyError:
            pass
        with _lock:
            if key not in _pair_cache:
                _pair_cache[key] = _ucum_conversion(src, dst)
            return _pair_cache[key]

    def commensurable(self, src_ucum: str, dst_ucum: str) -> bool:
        return self.conversion(src_ucum, dst_ucum) is not None
