"""Findings (VS, LB): readings, visit windows, selection, checks.

A *reading* is one test value in one Observation (or one component of a panel). Readings are placed
in visit windows by study day, the protocol's selection rule picks one per visit and test, and only
then is the selected reading checked (unit, comparator, hard range, FHIR validity): a failing
selected reading is *held* with a discrepancy naming the next candidate — selection never silently
falls through to another reading.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from esource.domain.model import DiscrepancyKind, SourceRef, SourceResource
from esource.mapping.dates import FhirDateTime, parse_fhir_datetime
from esource.mapping.numbers import format_fixed, fraction_str, round_half_up, to_exact
from esource.mapping.units import UnitConverter, convert, normalize_unit
from esource.study.mapspec import FindingsForm, TestDef, Visit

if TYPE_CHECKING:
    from esource.study.study import CompiledForm, Study


EVALUATION_MEMO_SIZE = 200_000  # evaluated readings kept (a few hundred bytes each)
READINGS_MEMO_SIZE = 50_000  # Observations whose extracted readings are kept (they hold the resource)


@dataclass(slots=True)
class Problem:
    kind: DiscrepancyKind
    message: str


@dataclass(slots=True)
class Reading:
    form_oid: str
    test: str
    tdef: TestDef
    code: str
    src: SourceResource
    ref: SourceRef
    node: dict[str, Any]  # the Observation, or the component carrying the value
    status: str | None
    when: FhirDateTime | None = None
    date_path: str | None = None
    day: int | None = None
    # evaluation (only for readings that selection reaches)
    evaluated: bool = False
    value: Fraction | None = None
    text: str | None = None
    problem: Problem | None = None
    conversions: list[str] = field(default_factory=list)
    unit_raw: str | None = None
    unit_ucum: str | None = None
    range_low: str | None = None
    range_high: str | None = None
    nrind: str | None = None

    @property
    def date(self) -> dt.date | None:
        return self.when.date() if self.when else None

    def time_key(self) -> tuple[int, Any]:
        """Readings with a time come before date-only readings on the same day, earliest first."""
        t = self.when.time if self.when else None
        return (0, t) if t is not None else (1, dt.time.min)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.ref.outbound())
        out["date"] = self.when.iso_date() if self.when else None
        if self.when and self.when.time is not None:
            out["time"] = self.when.hhmm()
        if self.evaluated:
            out["value"] = self.text
            if self.problem:
                out["problem"] = self.problem.message
        else:
            q = self.node.get("valueQuantity") or {}
            out["value"] = q.get("value")
            out["unit"] = q.get("code") or q.get("unit")
        return out


class FindingsMapper:
    """Extracts readings from Observations and evaluates selected ones, for one study."""

    def __init__(self, study: "Study", converter: UnitConverter) -> None:
        self.study = study
        self.converter = converter
        self.synonyms = study.spec.units.synonyms
        loinc_uris = set()
        for f in study.spec.forms.values():
            if isinstance(f, FindingsForm):
                loinc_uris.update(study.uris(f.code_system))
        self.code_uris = loinc_uris
        self._memo: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._readings_memo: dict[tuple[str, str], list[tuple[Any, ...]]] = {}

    # ------------------------------------------------------------------ extraction

    def _match(self, codings: list[Any]) -> tuple[Any, str] | None:
        index = self.study.test_index
        for c in codings:
            if isinstance(c, dict):
                key = (c.get("system"), c.get("code"))
                ref = index.get(key)  # type: ignore[arg-type]
                if ref is not None:
                    return ref, key[1]
        return None

    def readings(self, src: SourceResource) -> list[Reading]:
        """All readings in one Observation (its own code and its components'), fresh for this run.
        Extraction (codes, dates) is memoised by source identity + version: a subject's old
        Observations are placed in visits again on every run."""
        key = (src.ref.identity, src.ref.version)
        templates = self._readings_memo.get(key)
        if templates is None:
            found = self._extract(src)
            templates = [(r.form_oid, r.test, r.tdef, r.code, r.ref, r.node, r.status, r.when, r.date_path, r.problem)
                         for r in found]
            if len(self._readings_memo) >= READINGS_MEMO_SIZE:
                self._readings_memo.clear()
            self._readings_memo[key] = templates
            return found
        return [Reading(form_oid, test, tdef, code, src, ref, node, status, when, date_path, problem=problem)
                for form_oid, test, tdef, code, ref, node, status, when, date_path, problem in templates]

    def extract(self, src: SourceResource) -> list[Reading]:
        """The readings of one Observation, not memoised (clinical dates at intake)."""
        return self._extract(src)

    def _extract(self, src: SourceResource) -> list[Reading]:
        obs = src.resource
        code = obs.get("code")
        out: list[Reading] = []
        status = obs.get("status")
        if isinstance(code, dict):
            codings = code.get("coding")
            if isinstance(codings, list):
                m = self._match(codings)
                if m is not None:
                    tref, c = m
                    out.append(Reading(tref.form_oid, tref.test_code, tref.spec, c, src, src.ref, obs, status))
        comps = obs.get("component")
        if isinstance(comps, list):
            for i, comp in enumerate(comps):
                if not isinstance(comp, dict):
                    continue
                ccode = comp.get("code")
                codings = ccode.get("coding") if isinstance(ccode, dict) else None
                if not isinstance(codings, list):
                    continue
                m = self._match(codings)
                if m is not None:
                    tref, c = m
                    ref = SourceRef(src.ref.resource_type, src.ref.id, src.ref.version, src.ref.identity,
                                    src.ref.full_url, f"component[{i}]")
                    out.append(Reading(tref.form_oid, tref.test_code, tref.spec, c, src, ref, comp, status))
        if out:
            form = self.study.forms[out[0].form_oid]
            value, path = form.selectors["date"](obs)
            if value is None:
                for r in out:
                    r.date_path = None
            else:
                try:
                    when = parse_fhir_datetime(value) if isinstance(value, str) else None
                    if when is None:
                        raise ValueError(f"not a date: {value!r}")
                except ValueError as exc:
                    for r in out:
                        r.problem = Problem(DiscrepancyKind.INVALID_SOURCE, f"{path} is not a valid date ({exc})")
                else:
                    for r in out:
                        r.when, r.date_path = when, path
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, r: Reading, form: "CompiledForm") -> None:
        """Convert, round and check one reading (once). Sets r.text or r.problem.

        The result depends only on the reading's node (fixed by source identity + version) and the
        study, so it is memoised across runs: a subject's old readings are re-selected on every new
        message, but converted once."""
        if r.evaluated:
            return
        r.evaluated = True
        if r.problem is not None:
            return
        key = (r.ref.identity, r.ref.version, r.ref.element, r.form_oid, r.test, r.code)
        memo = self._memo.get(key)
        if memo is not None:
            (r.value, r.text, r.problem, conversions, r.unit_raw, r.unit_ucum) = memo
            r.conversions = list(conversions)
            return
        self._evaluate(r, form)
        if len(self._memo) >= EVALUATION_MEMO_SIZE:
            self._memo.clear()  # bounded memory whatever the backlog; refilled by the next runs
        self._memo[key] = (r.value, r.text, r.problem, tuple(r.conversions), r.unit_raw, r.unit_ucum)

    def _evaluate(self, r: Reading, form: "CompiledForm") -> None:
        tdef = r.tdef
        q_list = form.lists["quantity"](r.node)
        quantity = q_list[0] if q_list else None
        if not isinstance(quantity, dict):
            other, path = form.selectors["value_other"](r.node) if "value_other" in form.selectors else (None, None)
            if isinstance(other, str) and other.strip()[:1] in "<>≤≥":
                r.problem = Problem(DiscrepancyKind.COMPARATOR_VALUE,
                                    f"the value is {other!r}, a comparator result, not a number")
            elif other is not None:
                r.problem = Problem(DiscrepancyKind.MISSING_VALUE,
                                    f"no numeric value ({path} instead of valueQuantity)")
            else:
                r.problem = Problem(DiscrepancyKind.MISSING_VALUE, "the reading has no value")
            return
        comparator = quantity.get("comparator")
        raw_value = quantity.get("value")
        if comparator:
            r.problem = Problem(DiscrepancyKind.COMPARATOR_VALUE,
                                f"the value is {comparator}{raw_value}, a comparator result, not an exact number")
            return
        if raw_value is None:
            r.problem = Problem(DiscrepancyKind.MISSING_VALUE, "valueQuantity has no value")
            return
        if isinstance(raw_value, bool) or not isinstance(raw_value, (int, float)):
            # FHIR JSON decimals are JSON numbers: a string ("120") is invalid, even when it looks numeric
            r.problem = Problem(DiscrepancyKind.INVALID_SOURCE,
                                f"valueQuantity.value is not a JSON number: {raw_value!r}")
            return
        try:
            value = to_exact(raw_value)
        except (ValueError, TypeError):
            r.problem = Problem(DiscrepancyKind.INVALID_SOURCE, f"valueQuantity.value is not a number: {raw_value!r}")
            return
        res = normalize_unit(quantity, self.synonyms)
        r.unit_raw = res.raw
        r.unit_ucum = res.ucum
        if res.ucum is None:
            shown = quantity.get("code") or quantity.get("unit")
            r.problem = Problem(DiscrepancyKind.UNKNOWN_UNIT,
                                f"unit {shown!r} is not a known unit (no UCUM code and not in the study's unit table)"
                                if shown else "the value has no unit")
            return
        converted, steps = self.to_standard(value, res.ucum, tdef, r.code)
        if converted is None:
            r.problem = Problem(DiscrepancyKind.UNIT_NOT_CONVERTIBLE,
                                f"unit {res.ucum!r} cannot be converted to {tdef.unit!r} for {r.test}")
            return
        r.conversions.extend(steps)
        r.value = converted
        rounded = round_half_up(converted, tdef.decimals)
        r.text = format_fixed(rounded, tdef.decimals)
        if converted != Fraction(rounded):
            r.conversions.append(f"rounded half-up to {tdef.decimals} decimal(s): {r.text}")
        if tdef.range is not None:
            lo, hi = tdef.range
            if not (lo <= rounded <= hi):
                r.problem = Problem(DiscrepancyKind.OUT_OF_RANGE,
                                    f"{r.text} {tdef.label} is outside the hard range {lo}–{hi} {tdef.label}")

    def to_standard(self, value: Fraction, ucum: str, tdef: TestDef, code: str) -> tuple[Fraction | None, list[str]]:
        """Map conversions (analyte-specific, maybe code-specific) first, then identity, then UCUM,
        then UCUM into a map conversion's source unit (e.g. mmol/L -> umol/L -> mg/dL).

        A conversion restricted to some codes (urea by mass -> urea nitrogen) says what that analyte
        *is*: for those codes it is reached through UCUM (g/L -> mg/dL -> × 0.4665) before a plain
        UCUM conversion to the standard unit is tried, which would skip the analyte factor."""
        for conv in tdef.conversions:
            if conv.from_unit == ucum and (conv.codes is None or code in conv.codes):
                out = value * Fraction(conv.multiply) / Fraction(conv.divide) + Fraction(conv.add)
                return out, [self._describe(value, ucum, out, tdef.unit, conv)]
        specific = self._via_ucum(value, ucum, tdef, [c for c in tdef.conversions
                                                       if c.codes is not None and code in c.codes])
        if specific is not None:
            return specific
        if ucum == tdef.unit:
            return value, []
        c = self.converter.conversion(ucum, tdef.unit)
        if c is not None:
            out = convert(value, c)
            return out, [f"{fraction_str(value)} {ucum} -> {fraction_str(out)} {tdef.unit} (UCUM)"]
        general = self._via_ucum(value, ucum, tdef, [c for c in tdef.conversions if c.codes is None])
        if general is not None:
            return general
        return None, []

    def _via_ucum(self, value: Fraction, ucum: str, tdef: TestDef,
                  conversions: list[Any]) -> tuple[Fraction, list[str]] | None:
        """UCUM into the source unit of the first of `conversions` that allows it, then that conversion."""
        for conv in conversions:
            c = self.converter.conversion(ucum, conv.from_unit)
            if c is not None:
                mid = convert(value, c)
                out = mid * Fraction(conv.multiply) / Fraction(conv.divide) + Fraction(conv.add)
                return out, [f"{fraction_str(value)} {ucum} -> {fraction_str(mid)} {conv.from_unit} (UCUM)",
                             self._describe(mid, conv.from_unit, out, tdef.unit, conv)]
        return None

    @staticmethod
    def _describe(value: Fraction, unit: str, out: Fraction, target: str, conv: Any) -> str:
        ops = []
        if conv.multiply != 1:
            ops.append(f"× {conv.multiply}")
        if conv.divide != 1:
            ops.append(f"÷ {conv.divide}")
        if conv.add != 0:
            ops.append(f"+ {conv.add}")
        op = " ".join(ops) or "× 1"
        return f"{fraction_str(value)} {unit} {op} = {fraction_str(out)} {target} (study map)"

    def reference_range(self, r: Reading, form: "CompiledForm") -> None:
        """LBORNRLO/HI from the first normal range, converted like the result; LBNRIND from it or
        from Observation.interpretation (the range wins when both exist)."""
        spec: FindingsForm = form.spec
        if r.value is None:
            return
        low_v = high_v = None
        if "reference_range" in form.lists:
            rr = form.lists["reference_range"](r.node)
            rng = rr[0] if rr and isinstance(rr[0], dict) else None
            if rng is not None:
                for side in ("low", "high"):
                    q = rng.get(side)
                    if not isinstance(q, dict) or q.get("value") is None:
                        continue
                    try:
                        v = to_exact(q["value"])
                    except (ValueError, TypeError):
                        continue
                    if q.get("code") or q.get("unit"):
                        unit = normalize_unit(q, self.synonyms).ucum
                    else:
                        unit = r.unit_ucum  # a range without a unit is in the result's unit
                    if unit is None:
                        continue
                    conv, _ = self.to_standard(v, unit, r.tdef, r.code)
                    if conv is None:
                        continue
                    txt = format_fixed(round_half_up(conv, r.tdef.decimals), r.tdef.decimals)
                    if side == "low":
                        low_v, r.range_low = conv, txt
                    else:
                        high_v, r.range_high = conv, txt
        if low_v is not None or high_v is not None:
            if low_v is not None and r.value < low_v:
                r.nrind = "LOW"
            elif high_v is not None and r.value > high_v:
                r.nrind = "HIGH"
            else:
                r.nrind = "NORMAL"
        elif "interpretation" in form.lists:
            table = spec.codes.get("nrind", {})
            for code in form.lists["interpretation"](r.node):
                if code in table:
                    r.nrind = table[code]
                    break
            if r.nrind is None and r.node is not r.src.resource:
                for code in form.lists["interpretation"](r.src.resource):
                    if code in table:
                        r.nrind = table[code]
                        break


# ---------------------------------------------------------------------- windows and selection


def in_window(visit: Visit, day: int) -> bool:
    assert visit.window is not None
    return visit.window[0] <= day <= visit.window[1]


def selection_key(visit: Visit, r: Reading) -> tuple[Any, ...]:
    """Closest day to the target (SE.SCREEN: the latest day), earlier day on ties, then time order.

    Readings still tied after that (rule 4) are ordered by source identity, version and element, so
    which of several equal readings is named as the source (and which is "next") never depends on
    the order the resources arrived in."""
    assert r.day is not None
    if visit.target == "latest":
        primary: Any = -r.day
    elif visit.target == "earliest":
        primary = r.day
    elif isinstance(visit.target, int):
        primary = abs(r.day - visit.target)
    else:  # unscheduled: one date per repeat
        primary = 0
    return (primary, r.day, r.time_key(), r.ref.identity, r.ref.version, r.ref.element or "")
