"""Which eCRF cells a decision on a discrepancy writes, with the full ItemKey.

Discrepancies from the map name the event, form, item and ItemGroupRepeatKey, but not the item group
nor the StudyEventRepeatKey. They are derived here, from the study rather than guessed:
- ItemGroupOID: the form's item group in the study map (`forms.<F>.item_group`), else the form's only
  ItemGroupDef in the metadata;
- StudyEventRepeatKey: None for an event that is not Repeating in the metadata; for the map's
  unscheduled visit (`repeat_key: date`) the date of the source reading, read from the stored fact
  exactly as the map reads it; anything else cannot be derived and the decision is refused;
- a held findings value (VS/LB) goes with the rest of its item group, rebuilt from the same reading
  the map selected (test code, standard unit label, date, time, converted reference range, NRIND),
  because a result without its test code, unit and date is no eCRF entry;
- EDC conflicts carry the item's path (`candidates[0].item`), review holds the full key, and
  entered-in-error discrepancies are matched to the frozen item states of their source.
Privacy: a date or repeat key equal to the birth date is masked to YYYY-MM, as the map does.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from esource.domain.model import Discrepancy, ItemKey, ItemValue, SourceRef, SourceResource
from esource.domain.ports import StoredFact
from esource.mapping.engine import MappingEngine
from esource.privacy import mask_if_birth_date
from esource.reconciliation.model import InvalidDecision, ReconciliationError
from esource.study.mapspec import FindingsForm
from esource.study.study import Study

_DATE_TYPES = {"date", "partialDate", "datetime", "partialDatetime"}


def item_group_of(study: Study, form_oid: str) -> str:
    form = study.spec.forms.get(form_oid)
    if form is not None:
        return form.item_group
    try:
        return study.metadata.item_group_of_form(form_oid).oid
    except (KeyError, ValueError) as exc:
        raise ReconciliationError(f"cannot tell the item group of form {form_oid}: {exc}") from None


def event_of(study: Study, d: Discrepancy) -> str:
    """The discrepancy's StudyEventOID, else the single event its form is collected at by the map."""
    if d.study_event_oid:
        return d.study_event_oid
    if d.form_oid:
        form = study.spec.forms.get(d.form_oid)
        event = getattr(form, "event", None)
        if event:
            return event
    raise ReconciliationError("the discrepancy names no visit (StudyEventOID): there is no eCRF cell to write; "
                              "dismiss it once handled in the EDC")


def is_repeating(study: Study, event_oid: str) -> bool:
    ev = study.metadata.study_events.get(event_oid)
    return bool(ev and ev.repeating)


def derive_key(study: Study, d: Discrepancy, *, item_oid: str | None = None,
               event_repeat: str | None = None) -> ItemKey:
    """The full ItemKey of the cell `d` is about (or of `item_oid` in the same item group)."""
    item = item_oid or d.item_oid
    if not item:
        raise InvalidDecision("the discrepancy names no item: say which item (item_oid)")
    if not d.form_oid:
        raise ReconciliationError("the discrepancy names no form: there is no eCRF cell to write")
    event = event_of(study, d)
    group = d.item_group_oid or item_group_of(study, d.form_oid)
    ig = study.metadata.item_groups.get(group)
    if ig is None or item not in ig.item_oids:
        raise InvalidDecision(f"{item} is not an item of {group} (form {d.form_oid})")
    erk = d.study_event_repeat_key or event_repeat
    if erk is None and is_repeating(study, event):
        raise ReconciliationError(f"{event} repeats and the discrepancy does not say which repeat: the cell cannot "
                                  "be derived")
    return ItemKey(d.study_oid, d.subject_key, event, erk, d.form_oid, group, d.item_group_repeat_key, item)


def parse_item_path(path: str) -> tuple[str, str | None, str, str, str | None, str]:
    """Inverse of `esource.services.conflicts.item_path`: `EV[rk]/FORM/IG[rk]/ITEM`."""
    parts = path.split("/")
    if len(parts) != 4:
        raise ReconciliationError(f"not an item path: {path!r}")

    def split(text: str) -> tuple[str, str | None]:
        if text.endswith("]") and "[" in text:
            oid, _, rest = text.partition("[")
            return oid, rest[:-1] or None
        return text, None

    event, erk = split(parts[0])
    group, igrk = split(parts[2])
    return event, erk, parts[1], group, igrk, parts[3]


def key_from_path(study_oid: str, subject_key: str, path: str) -> ItemKey:
    ev, erk, form, group, igrk, item = parse_item_path(path)
    return ItemKey(study_oid, subject_key, ev, erk, form, group, igrk, item)


def source_resource(fact: StoredFact) -> SourceResource:
    ref = SourceRef(fact.resource_type, fact.resource_id, fact.version, fact.identity, fact.full_url)
    return SourceResource(fact.resource_type, fact.resource_id, fact.full_url, fact.resource, ref, "store", 0)


def birth_date(facts: list[StoredFact]) -> dt.date | None:
    """The subject's birth date from the stored Patient facts (only when they agree), for masking."""
    found = set()
    for f in facts:
        if f.resource_type == "Patient":
            bd = f.resource.get("birthDate")
            if isinstance(bd, str) and len(bd) == 10:
                try:
                    found.add(dt.date.fromisoformat(bd))
                except ValueError:
                    pass
    return found.pop() if len(found) == 1 else None


def mask(study: Study, values: list[ItemValue], born: dt.date | None) -> list[ItemValue]:
    """Dates and repeat keys equal to the birth date become YYYY-MM (the map's privacy rule)."""
    if born is None:
        return values
    out = []
    for iv in values:
        key, value, notes = iv.key, iv.value, list(iv.conversions)
        if key.study_event_repeat_key is not None:
            masked = mask_if_birth_date(key.study_event_repeat_key, born)
            if masked != key.study_event_repeat_key:
                key = ItemKey(key.study_oid, key.subject_key, key.study_event_oid, masked, key.form_oid,
                              key.item_group_oid, key.item_group_repeat_key, key.item_oid)
                notes.append("StudyEventRepeatKey equal to the birth date: YYYY-MM only")
        item = study.metadata.items.get(key.item_oid)
        if item is not None and item.data_type in _DATE_TYPES:
            masked = mask_if_birth_date(value, born)
            if masked != value:
                value = masked
                notes.append("equal to the birth date: sent as YYYY-MM only")
        out.append(ItemValue(key, value, iv.source, iv.rule, tuple(notes)))
    return out


def findings_group(study: Study, engine: MappingEngine, d: Discrepancy, fact: StoredFact, value: str, *,
                   result_rule: str, result_notes: tuple[str, ...] = (), recompute: bool = False) -> list[ItemValue]:
    """The item group of a held VS/LB reading with `value` as its result: what the map would have sent
    for that reading. `recompute` (an overridden value) re-derives NRIND from `value` against the
    reading's converted reference range. Raises ReconciliationError when the reading is not found."""
    form = study.forms.get(d.form_oid or "")
    if form is None or not isinstance(form.spec, FindingsForm):
        raise ReconciliationError(f"{d.form_oid} is not a findings form")
    spec: FindingsForm = form.spec
    element = d.source.element if d.source else None
    fm = engine.findings
    reading = next((r for r in fm.readings(source_resource(fact))
                    if r.form_oid == form.oid and r.test == d.item_group_repeat_key and r.ref.element == element), None)
    if reading is None or reading.when is None or reading.date is None:
        raise ReconciliationError(f"the source reading of {d.item_group_repeat_key} (with its date) is no longer in "
                                  "the subject's facts: re-map the subject")
    r = reading
    fm.evaluate(r, form)
    event = event_of(study, d)
    visit = next((v for v in study.spec.visits if v.oid == event), None)
    erk = d.study_event_repeat_key
    if erk is None and visit is not None and visit.unscheduled and visit.repeat_key == "date":
        erk = r.date.isoformat()
    if erk is None and is_repeating(study, event):
        raise ReconciliationError(f"{event} repeats and the repeat of this reading cannot be derived")
    r.range_low = r.range_high = r.nrind = None
    if recompute:
        try:
            r.value = Fraction(Decimal(value))
        except (InvalidOperation, ValueError):
            r.value = None
    if r.value is not None and ("reference_range" in form.lists or "interpretation" in form.lists):
        try:
            fm.reference_range(r, form)
        except Exception:  # a range that does not convert is simply not sent (as the map does)
            r.range_low = r.range_high = r.nrind = None
    group = spec.item_group
    test = r.test
    rule = f"{form.oid}/{test}"

    def iv(role: str, text: str | None, rule_: str, notes: tuple[str, ...] = ()) -> ItemValue | None:
        item_oid = spec.items.get(role)
        if item_oid is None or text is None or text == "":
            return None
        key = ItemKey(d.study_oid, d.subject_key, event, erk, form.oid, group, test, item_oid)
        return ItemValue(key, text, r.ref, rule_, notes)

    when = r.when
    out = [
        iv("testcd", test, f"{rule}/testcd"),
        iv("result", value, result_rule, result_notes if recompute else tuple(r.conversions) + result_notes),
        iv("unit", r.tdef.label, f"{rule}/unit"),
        iv("date", when.iso_date(), f"{rule}/date", (f"from {r.date_path}",) if r.date_path else ()),
        iv("time", when.hhmm() if when.time is not None else None, f"{rule}/time"),
        iv("range_low", r.range_low, f"{rule}/range_low"),
        iv("range_high", r.range_high, f"{rule}/range_high"),
        iv("nrind", r.nrind, f"{rule}/nrind"),
    ]
    return [x for x in out if x is not None]


def is_findings_result(study: Study, d: Discrepancy, item_oid: str | None) -> bool:
    form = study.spec.forms.get(d.form_oid or "")
    return (isinstance(form, FindingsForm) and item_oid is not None and form.items.get("result") == item_oid
            and d.item_group_repeat_key in form.tests and d.source is not None
            and d.source.resource_type == "Observation")


def source_summary(fact: StoredFact | None, element: str | None) -> dict[str, Any] | None:
    """What the EHR said, side by side with the proposed value - only the elements a map reads, never
    identifiers: Observation value/unit/date/status, Patient gender, a record's code and status."""
    if fact is None:
        return None
    res = fact.resource
    out: dict[str, Any] = {"resourceType": fact.resource_type, "versionId": fact.version}
    if fact.resource_type != "Patient" and fact.resource_id:
        out["id"] = fact.resource_id
    if fact.resource_type == "Patient":
        out["gender"] = res.get("gender")
        return out
    node: Any = res
    if element and element.startswith("component[") and isinstance(res.get("component"), list):
        try:
            node = res["component"][int(element[len("component["):-1])]
            out["element"] = element
        except (ValueError, IndexError):
            node = res
    out["status"] = res.get("status")
    code = node.get("code") if isinstance(node, dict) else None
    if isinstance(code, dict):
        codings = [c for c in code.get("coding") or [] if isinstance(c, dict)]
        if codings:
            out["code"] = {"system": codings[0].get("system"), "code": codings[0].get("code"),
                           "display": codings[0].get("display")}
    for name in ("effectiveDateTime", "effectiveInstant", "authoredOn", "onsetDateTime", "recordedDate"):
        if isinstance(res.get(name), str):
            out[name] = res[name]
    if isinstance(res.get("effectivePeriod"), dict):
        out["effectivePeriod"] = {k: v for k, v in res["effectivePeriod"].items() if k in ("start", "end")}
    q = node.get("valueQuantity") if isinstance(node, dict) else None
    if isinstance(q, dict):
        out["value"] = q.get("value")
        out["unit"] = q.get("code") or q.get("unit")
        if q.get("comparator"):
            out["comparator"] = q.get("comparator")
    return out
