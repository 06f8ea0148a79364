"""Conflicts with the EDC: a value site staff changed in the EDC is never overwritten by esource.

The protocol (CV01, "Changes, corrections, deletions"): a value changed in the EDC by site staff is
never overwritten by the middleware; the next source change for that item becomes a conflict
discrepancy. How esource keeps that promise:

1. Every outbox row remembers, for each ItemData it Updates, the value esource last sent for that
   item (`outbox.previous_values`, {item path: value}, written by `add_outbox` from the
   transaction's `ItemChange.previous_value`).
2. Before the dispatcher delivers a row that Updates items, it reads the subject back from the EDC
   (`EdcConnector.read_back`) — on every attempt, so a value changed while a row waited for a retry
   is seen too. For each Updated item it compares the EDC's current value with the value esource
   last sent:
   - the same (or, for numbers, numerically equal: "71" = "71.0"): nobody touched it, send;
   - equal to the value this row proposes: an earlier attempt of this very row was applied (the
     answer was lost), send again: the EDC recognises the duplicate;
   - anything else, including no value at all: site staff changed (or cleared) it in the EDC. That
     item's ItemData is withheld (removed from the ODM, the rest of the transaction still goes),
     an EDC_CONFLICT discrepancy records the EDC's value, esource's proposed value and the source,
     and the item's state is frozen, so later source changes are never sent over it either.
3. The frozen state keeps esource's own value and lineage (what the map produced); the EDC's value
   lives in the discrepancy. The ingest diff never sends a frozen item again; `conflict_followups`
   (called by the ingest use case after the diff) refreshes the open EDC_CONFLICT discrepancy with
   each later proposed value. A data manager who settles the conflict unfreezes the item (with the
   value the EDC then holds as its state, so the next Update's previous value matches the EDC).
4. The reduced ODM replaces the row's ODM in the outbox (every later attempt sends the same bytes,
   so an EDC that de-duplicates on content still recognises a retry). When nothing is left, the
   row still goes as a SubjectData without data: EDCs that enforce the per-subject sequence
   (the sandbox does) would otherwise wait forever for the missing sequence number.

Limits, deliberately:
- Connectors without read-back (`capabilities().read_back` False, e.g. the ODM file drop) are not
  checked: nothing can be compared. Neither are rows queued before migration 0003 (no previous
  values) nor a read-back that returns None (the EDC does not know the subject).
- Inserts are not checked (no previous value): an EDC refuses an Insert over a value that exists
  (the sandbox answers 409), which becomes an EDC_REJECTED discrepancy and holds the subject.
- Between the read-back and the write there is a window (no EDC offers compare-and-set over ODM);
  it is as short as one request.
- A site edit made AFTER an attempt of the row was applied but before esource learnt it (answer
  lost), of an item the same row carries, makes the retry withhold that item: the EDC then sees the
  transaction key again with other content and refuses it (the sandbox: 409), i.e. an EDC_REJECTED
  discrepancy holds the subject for a data manager. Nothing is overwritten either way.
- `read_back` must answer in esource's keys (a connector with integer EDC keys maps them back
  through its `EdcKeyMap`), with every item the EDC holds for the subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from lxml import etree

from esource.domain.model import (
    Discrepancy,
    DiscrepancyKind,
    ItemChange,
    ItemKey,
    ItemValue,
    Severity,
    SourceRef,
    TransactionType,
)
from esource.domain.ports import SentItem
from esource.odm.xsd import safe_parse

ItemPathKey = tuple[str, "str | None", str, str, "str | None", str]
"""(study_event_oid, study_event_repeat_key, form_oid, item_group_oid, item_group_repeat_key, item_oid)"""

_XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'
_MISSING = object()


# ---------------------------------------------------------------------------------------- item paths


def item_path(event: str, event_repeat: str | None, form: str, group: str, group_repeat: str | None,
              item: str) -> str:
    """`SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES`: one item of a subject, repeat keys in brackets
    (the sandbox EDC's notation). Used as the key of `outbox.previous_values`."""
    ev = f"{event}[{event_repeat}]" if event_repeat else event
    ig = f"{group}[{group_repeat}]" if group_repeat else group
    return f"{ev}/{form}/{ig}/{item}"


def key_path(key: ItemKey) -> str:
    return item_path(key.study_event_oid, key.study_event_repeat_key, key.form_oid, key.item_group_oid,
                     key.item_group_repeat_key, key.item_oid)


def previous_values_of(changes: Iterable[ItemChange]) -> dict[str, str]:
    """{item path: the value esource last sent} for every Update of a transaction."""
    return {key_path(c.item.key): c.previous_value for c in changes
            if c.transaction_type is TransactionType.UPDATE and c.previous_value is not None}


# ---------------------------------------------------------------------------------------- ODM reading


@dataclass(frozen=True, slots=True)
class OdmItem:
    """One ItemData of one subject in an ODM document."""

    subject_key: str
    key: ItemPathKey
    transaction_type: str | None
    value: str | None  # None for IsNull="Yes"

    @property
    def path(self) -> str:
        return item_path(*self.key)


def _parse(odm: bytes, origin: str = "ODM") -> etree._Element:
    return safe_parse(odm, origin)  # EDC answers are untrusted: no DTD, no entities, no network


def _walk(root: etree._Element) -> Iterable[tuple[etree._Element, OdmItem]]:
    for sd in root.iter("{*}SubjectData"):
        subject = sd.get("SubjectKey", "")
        for se in sd.iterchildren("{*}StudyEventData"):
            for fd in se.iterchildren("{*}FormData"):
                for ig in fd.iterchildren("{*}ItemGroupData"):
                    for it in ig.iterchildren("{*}ItemData"):
                        key = (se.get("StudyEventOID", ""), se.get("StudyEventRepeatKey") or None,
                               fd.get("FormOID", ""), ig.get("ItemGroupOID", ""),
                               ig.get("ItemGroupRepeatKey") or None, it.get("ItemOID", ""))
                        value = None if it.get("IsNull") == "Yes" else it.get("Value")
                        yield it, OdmItem(subject, key, it.get("TransactionType"), value)


def odm_items(odm: bytes, origin: str = "ODM") -> list[OdmItem]:
    """Every ItemData of an ODM document (any subject), in document order."""
    return [item for _, item in _walk(_parse(odm, origin))]


def edc_values(snapshot: bytes, subject_key: str) -> dict[str, str | None]:
    """{item path: value} of one subject in an EDC's read-back (a Snapshot, in esource's keys). Raises
    `IntakeError` for XML that is not well-formed or hostile (then nothing is sent unchecked)."""
    return {item.path: item.value for item in odm_items(snapshot, "EDC read-back")
            if item.subject_key == subject_key}


def same_value(a: str | None, b: str | None) -> bool:
    """Whether two ItemData values mean the same: equal text (ignoring surrounding blanks), or equal
    numbers ("71" and "71.0": EDCs may normalise decimals). No value equals only no value."""
    if a is None or b is None:
        return a is None and b is None
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    try:
        x, y = Decimal(a), Decimal(b)
    except InvalidOperation:
        return False
    return x.is_finite() and y.is_finite() and x == y


# ---------------------------------------------------------------------------------------- detection


@dataclass(frozen=True, slots=True)
class Conflict:
    """An Updated item whose EDC value is neither the value esource last sent nor the one proposed."""

    key: ItemPathKey
    edc_value: str | None  # None: the EDC holds no value (cleared or removed in the EDC)
    last_sent: str
    proposed: str | None

    @property
    def path(self) -> str:
        return item_path(*self.key)


def find_conflicts(odm: bytes, subject_key: str, previous_values: Mapping[str, str],
                   edc: Mapping[str, str | None]) -> list[Conflict]:
    """The Updated ItemData of `odm` (for `subject_key`) that site staff changed in the EDC."""
    found: list[Conflict] = []
    for item in odm_items(odm):
        if item.subject_key != subject_key or item.transaction_type != TransactionType.UPDATE.value:
            continue
        last = previous_values.get(item.path)
        if last is None:
            continue  # unknown previous value (a row queued before migration 0003): not checked
        current = edc.get(item.path, _MISSING)
        if current is not _MISSING and (same_value(current, last) or same_value(current, item.value)):
            continue  # untouched, or this row was applied already (its answer was lost)
        edc_value = None if current is _MISSING else current
        found.append(Conflict(item.key, edc_value, last, item.value))  # type: ignore[arg-type]
    return found


def strip_items(odm: bytes, subject_key: str, paths: Iterable[str]) -> tuple[bytes, int]:
    """`odm` without the subject's ItemData at `paths` (item groups, forms and events left empty go
    too; everything else is kept as it was). Returns the new document and its ItemData count."""
    targets = set(paths)
    root = _parse(odm, "outbox ODM")
    for element, item in list(_walk(root)):
        if item.subject_key == subject_key and item.path in targets:
            _remove(element)
    for tag, child in (("ItemGroupData", "ItemData"), ("FormData", "ItemGroupData"),
                       ("StudyEventData", "FormData")):
        for element in list(root.iter("{*}" + tag)):
            if next(element.iterchildren("{*}" + child), None) is None:
                _remove(element)
    remaining = sum(1 for _ in root.iter("{*}ItemData"))
    return _XML_DECLARATION + etree.tostring(root, encoding="UTF-8", xml_declaration=False), remaining


def _remove(element: etree._Element) -> None:
    """Remove an element and keep the indentation of what follows it."""
    parent = element.getparent()
    previous = element.getprevious()
    if previous is not None:
        previous.tail = element.tail
    else:
        parent.text = element.tail
    parent.remove(element)


# ---------------------------------------------------------------------------------------- discrepancies


def _source_of(state: SentItem | None) -> SourceRef | None:
    if state is None:
        return None
    return SourceRef(state.source_type, state.source_id, state.source_version, state.source_identity)


def _shown(value: str | None) -> str:
    return "no value" if value is None else repr(value)


def conflict_discrepancy(conflict: Conflict, study_oid: str, subject_key: str, state: SentItem | None, *,
                         connector: str, outbox_id: int | None = None, sequence: int | None = None) -> Discrepancy:
    """The EDC_CONFLICT discrepancy for an item withheld from a transaction."""
    event, _erk, form, _group, group_repeat, item_oid = conflict.key
    source = _source_of(state)
    where = f"{source.resource_type} version {source.version}" if source else "the source"
    return Discrepancy(
        kind=DiscrepancyKind.EDC_CONFLICT,
        severity=Severity.ERROR,
        study_oid=study_oid,
        subject_key=subject_key,
        source=source,
        item_oid=item_oid,
        study_event_oid=event,
        form_oid=form,
        item_group_repeat_key=group_repeat,
        held_value=conflict.proposed,
        message=(f"{conflict.path}: the EDC ({connector}) holds {_shown(conflict.edc_value)}, not the value esource "
                 f"last sent ({_shown(conflict.last_sent)}): it was changed in the EDC, by site staff. esource's new "
                 f"value {_shown(conflict.proposed)} (from {where}) was not sent, and the item is frozen: later source "
                 "changes are not sent over the site's value either. A data manager decides."),
        candidates=({"item": conflict.path, "edc_value": conflict.edc_value, "last_sent_value": conflict.last_sent,
                     "proposed_value": conflict.proposed, "connector": connector, "outbox_id": outbox_id,
                     "sequence": sequence},),
        rule=f"edc:{connector}:conflict",
    )


def record_conflict(uow: Any, discrepancy: Discrepancy) -> bool:
    """Upsert the discrepancy; one closed earlier (resolved, dismissed) for the same item and source
    is re-opened: the EDC differs again. True when it is new."""
    if uow.upsert_discrepancy(discrepancy):
        return True
    status_of = getattr(uow, "discrepancy_status", None)
    set_status = getattr(uow, "set_discrepancy_status", None)
    if status_of and set_status and status_of(discrepancy.key) not in ("open", "in_review", None):
        set_status(discrepancy.key, "open")
    return False


def freeze(uow: Any, key: ItemKey, state: SentItem | None) -> None:
    """Freeze one item's state (value and lineage kept): the diff never sends it again."""
    freeze_item = getattr(uow, "freeze_item", None)
    if freeze_item is not None:
        freeze_item(key)  # one UPDATE: no lost update against a concurrent ingest
    elif state is not None and not state.frozen:
        uow.put_sent_item(SentItem(state.key, state.value, state.source_identity, state.source_version,
                                   state.source_type, state.source_id, state.rule, frozen=True))


def conflict_followups(produced: Iterable[ItemValue], sent: Mapping[ItemKey, SentItem],
                       open_discrepancies: Iterable[Discrepancy]) -> list[Discrepancy]:
    """For the ingest use case (esource/services/process.py, after `diff_state`): a frozen item in
    conflict with the EDC whose source changed again gets its EDC_CONFLICT discrepancy refreshed with
    the new proposed value (the diff itself never sends frozen items). Items frozen for another
    reason (entered-in-error) are left alone."""
    conflicts: dict[str, Discrepancy] = {}
    for d in open_discrepancies:
        if d.kind is DiscrepancyKind.EDC_CONFLICT and d.candidates:
            conflicts[str(d.candidates[0].get("item"))] = d
    out: list[Discrepancy] = []
    for iv in produced:
        state = sent.get(iv.key)
        if state is None or not state.frozen:
            continue
        d = conflicts.get(key_path(iv.key))
        if d is None or d.held_value == iv.value:
            continue
        first = dict(d.candidates[0])
        edc_value = first.get("edc_value")
        first["proposed_value"] = iv.value
        out.append(Discrepancy(
            kind=DiscrepancyKind.EDC_CONFLICT, severity=d.severity, study_oid=d.study_oid, subject_key=d.subject_key,
            source=iv.source, item_oid=d.item_oid, study_event_oid=d.study_event_oid, form_oid=d.form_oid,
            item_group_repeat_key=d.item_group_repeat_key, held_value=iv.value, rule=d.rule,
            candidates=(first,),
            message=(f"{key_path(iv.key)}: the source changed again ({iv.source.resource_type} version "
                     f"{iv.source.version}) and would now send {_shown(iv.value)}, but the item is frozen in "
                     f"conflict with the EDC, which holds {_shown(edc_value)} (changed by site staff): nothing "
                     "is sent. A data manager decides."),
        ))
    return out
