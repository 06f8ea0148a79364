"""Is a data manager's corrected value fit for its eCRF item? Checked against the study's ODM metadata
(DataType, Length, SignificantDigits, CodeList, Hard RangeChecks) and, for a findings result, the map's
decimals for the test - before anything is sent, so the EDC never has to refuse a manual value.

Pure (no I/O): `check_value(study, item_oid, value, test=...)` raises `InvalidDecision` naming the item
and what is wrong, or returns the value as it will be sent (surrounding blanks removed).
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal, InvalidOperation

from esource.reconciliation.model import InvalidDecision
from esource.study.mapspec import FindingsForm
from esource.study.metadata import ItemDef
from esource.study.study import Study

_INTEGER = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_PARTIAL_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?")
_PARTIAL_TIME = re.compile(r"\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?")
_TIME = re.compile(r"\d{2}:\d{2}:\d{2}(\.\d+)?")
_TEXT_TYPES = {"text", "string"}


def check_value(study: Study, item_oid: str, value: str, *, form_oid: str | None = None,
                test: str | None = None) -> str:
    """The value to send for `item_oid`, or InvalidDecision. `test` (a findings form's test code, i.e.
    the ItemGroupRepeatKey of VS/LB) adds the map's decimals for that test's result."""
    item = study.metadata.items.get(item_oid)
    if item is None:
        raise InvalidDecision(f"{item_oid} is not an item of study {study.oid}")
    if not isinstance(value, str) or not value.strip():
        raise InvalidDecision(f"{item_oid}: a value is required")
    value = value.strip()
    _check_type(item, value)
    if item.length is not None and item.data_type in _TEXT_TYPES | {"integer", "float", "double"}:
        if len(value.lstrip("+-")) > item.length:
            raise InvalidDecision(f"{item_oid}: {value!r} is longer than its Length ({item.length})")
    if item.significant_digits is not None and item.data_type in ("float", "double"):
        decimals = _decimals(value)
        if decimals > item.significant_digits:
            raise InvalidDecision(f"{item_oid}: {value!r} has {decimals} decimal(s); SignificantDigits allows "
                                  f"{item.significant_digits}")
    codelist = study.metadata.codelist_for(item_oid)
    if codelist is not None and value not in codelist:
        allowed = ", ".join(list(codelist.items)[:20])
        raise InvalidDecision(f"{item_oid}: {value!r} is not in its codelist {codelist.oid} ({allowed})")
    _check_ranges(item, value)
    if test is not None and form_oid is not None:
        form = study.spec.forms.get(form_oid)
        if isinstance(form, FindingsForm) and form.items.get("result") == item_oid and test in form.tests:
            want = form.tests[test].decimals
            if _decimals(value) != want:
                example = format(Decimal(value).quantize(Decimal(1).scaleb(-want)), "f") if _FLOAT.fullmatch(value) else ""
                raise InvalidDecision(f"{item_oid}: {test} results are written with exactly {want} decimal(s)"
                                      + (f", e.g. {example}" if example else ""))
    return value


def _decimals(value: str) -> int:
    return len(value.split(".", 1)[1]) if "." in value else 0


def _check_type(item: ItemDef, value: str) -> None:
    t = item.data_type
    ok = True
    if t == "integer":
        ok = bool(_INTEGER.fullmatch(value))
    elif t in ("float", "double"):
        ok = bool(_FLOAT.fullmatch(value))
    elif t == "date":
        ok = _iso(dt.date.fromisoformat, value) and len(value) == 10
    elif t == "partialDate":
        ok = bool(_PARTIAL_DATE.fullmatch(value)) and _partial_date_ok(value)
    elif t == "time":
        ok = bool(_TIME.fullmatch(value)) and _iso(dt.time.fromisoformat, value)
    elif t == "partialTime":
        ok = bool(_PARTIAL_TIME.fullmatch(value)) and _iso(dt.time.fromisoformat, value if ":" in value else value + ":00")
    elif t in ("datetime", "partialDatetime"):
        ok = _iso(dt.datetime.fromisoformat, value) or (t == "partialDatetime" and _partial_date_ok(value))
    elif t == "boolean":
        ok = value in ("true", "false", "1", "0")
    if not ok:
        raise InvalidDecision(f"{item.oid}: {value!r} is not a valid {t}")


def _iso(parse: object, value: str) -> bool:
    try:
        parse(value)  # type: ignore[operator]
    except (ValueError, TypeError):
        return False
    return True


def _partial_date_ok(value: str) -> bool:
    parts = value.split("-")
    if len(parts) == 3:
        return _iso(dt.date.fromisoformat, value)
    if len(parts) == 2:
        return 1 <= int(parts[1]) <= 12
    return len(parts) == 1 and len(parts[0]) == 4


def _check_ranges(item: ItemDef, value: str) -> None:
    """Hard RangeChecks of the metadata (Soft ones are the EDC's business: a query, not a refusal)."""
    for rc in item.range_checks:
        if rc.soft_hard != "Hard" or rc.comparator is None or not rc.values:
            continue
        if rc.comparator in ("IN", "NOTIN"):
            inside = value in rc.values
            if inside != (rc.comparator == "IN"):
                raise InvalidDecision(f"{item.oid}: {value!r} fails its hard range check {rc.comparator} "
                                      f"{', '.join(rc.values)}")
            continue
        try:
            x, y = Decimal(value), Decimal(rc.values[0])
        except InvalidOperation:
            x, y = value, rc.values[0]  # type: ignore[assignment]
        ok = {"LT": x < y, "LE": x <= y, "GT": x > y, "GE": x >= y, "EQ": x == y, "NE": x != y}.get(rc.comparator, True)
        if not ok:
            raise InvalidDecision(f"{item.oid}: {value!r} fails its hard range check {rc.comparator} {rc.values[0]}")
