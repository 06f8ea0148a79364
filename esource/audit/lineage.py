"""Lineage of one eCRF value: where it came from and everything that happened to it.

For an item key (study, SubjectKey, StudyEventOID + repeat, FormOID, ItemGroupOID + repeat, ItemOID)
`item_lineage` joins what the store keeps:
- `audit_log`: every entry about the item (VALUE_MAPPED with its source, map rule, conversions,
  transaction type, outbox id and sequence; VALUE_FROZEN; manual actions on it), the discrepancies
  and held values naming it (their detail carries the item), and the transfer events (queued, sent,
  acknowledged with the EDC's reference, rejected with the vendor's code and message, failed,
  re-pushed) of the outbox rows that carried it;
- `item_state`: the value esource last sent, its source and rule, frozen or not;
- `subject_fact`: when esource first saw each source record and the newest version it keeps;
- `outbox`: each transaction's current status, attempts and last error.

Sources are shown as the dry-run lineage shows them (`SourceRef.outbound`): type, id, version — a
Patient's id never — plus the pseudonymous SourceID the EDC received. The functions take an open unit
of work, so the caller decides the transaction and records the DATA_READ (the API does).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from esource.domain.audit import SYSTEM_ACTOR, AuditAction, AuditEntry
from esource.domain.model import ItemKey, SourceRef
from esource.domain.ports import SentItem, StoredFact
from esource.privacy import Pseudonymizer

#: Actions found through their detail (outbox id, or the item named in the detail), not the item key.
TRANSFER_ACTIONS: tuple[str, ...] = (
    AuditAction.TRANSFER_QUEUED, AuditAction.TRANSFER_SENT, AuditAction.TRANSFER_ACKNOWLEDGED,
    AuditAction.TRANSFER_REJECTED, AuditAction.TRANSFER_FAILED, AuditAction.TRANSFER_REPUSHED,
)  # fmt: skip
DISCREPANCY_ACTIONS: tuple[str, ...] = (
    AuditAction.VALUE_HELD, AuditAction.DISCREPANCY_OPENED, AuditAction.DISCREPANCY_CHANGED,
    AuditAction.DISCREPANCY_RESOLVED, AuditAction.DISCREPANCY_DISMISSED,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LineageSource:
    """One version of a source resource. `id` is None for a Patient (never shown)."""

    resource_type: str
    id: str | None
    version: str
    source_id: str | None  # the pseudonymous SourceID the EDC received (Pseudonymizer.source_id)
    first_seen: dt.date | None = None  # when esource first saw the record
    latest_version: str | None = None  # the newest version of the record esource keeps now


@dataclass(frozen=True, slots=True)
class LineageStep:
    """One audit entry about the value."""

    audit_id: int
    at: dt.datetime
    action: str
    actor: str
    manual: bool  # a person (through the API), not esource itself
    old_value: str | None = None
    new_value: str | None = None
    reason: str | None = None
    rule: str | None = None
    source: LineageSource | None = None
    conversions: tuple[str, ...] = ()
    transaction_type: str | None = None
    outbox_id: int | None = None
    sequence: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LineageTransfer:
    """One ODM transaction that carried the value, and what the EDC said about it."""

    outbox_id: int
    sequence: int | None
    transaction_type: str | None  # of this item in the transaction (Insert, Update)
    value: str | None
    status: str | None  # the outbox row's status now (pending, sent, acked, rejected, failed)
    attempts: int | None = None
    created_at: dt.datetime | None = None
    sent_at: dt.datetime | None = None
    last_error: str | None = None
    connector: str | None = None
    edc_reference: str | None = None  # the EDC's acknowledgement reference
    edc_code: str | None = None  # the EDC's rejection code
    edc_message: str | None = None


@dataclass(frozen=True, slots=True)
class LineageDiscrepancy:
    kind: str
    severity: str
    message: str
    held_value: str | None
    rule: str | None


@dataclass(frozen=True, slots=True)
class ItemLineage:
    """The full history of one eCRF value."""

    key: ItemKey
    site_oid: str | None
    value: str | None  # the value esource last sent (None: never sent, e.g. held)
    frozen: bool
    rule: str | None
    source: LineageSource | None  # the source of the value last sent
    conversions: tuple[str, ...]  # applied to the value last mapped
    sources: list[LineageSource]  # every source version the value came from, oldest first
    transfers: list[LineageTransfer]
    manual_actions: list[LineageStep]
    open_discrepancies: list[LineageDiscrepancy]
    history: list[LineageStep]  # every audit entry about the value, oldest first


@dataclass(frozen=True, slots=True)
class ItemStatus:
    """One of a subject's items with its state (the subject's item list)."""

    key: ItemKey
    value: str
    frozen: bool
    rule: str
    source: LineageSource
    outbox_id: int | None  # the last transaction that carried it
    sequence: int | None
    transfer_status: str | None  # that transaction's status now
    updated_at: dt.datetime | None  # when it was last mapped (its last VALUE_MAPPED entry)


# ------------------------------------------------------------------------------------------ helpers


def _source(ref: SourceRef | None, pseudonymizer: Pseudonymizer,
            facts: dict[str, StoredFact] | None = None) -> LineageSource | None:
    if ref is None:
        return None
    from esource.audit.export import export_source_id

    fact = (facts or {}).get(ref.identity) if ref.identity else None
    return LineageSource(
        resource_type=ref.resource_type,
        id=None if ref.resource_type == "Patient" else ref.id,
        version=ref.version,
        source_id=export_source_id(ref, pseudonymizer),
        first_seen=fact.first_seen if fact else None,
        latest_version=fact.version if fact else None,
    )


def _state_ref(state: SentItem) -> SourceRef:
    return SourceRef(state.source_type, state.source_id, state.source_version, state.source_identity)


def item_sort_key(key: ItemKey) -> tuple[str, ...]:
    """A total order of item keys (absent repeat keys first; ItemKey's own order fails on None)."""
    return tuple("" if v is None else v for v in (key.study_oid, key.subject_key, key.study_event_oid,
                                                    key.study_event_repeat_key, key.form_oid, key.item_group_oid,
                                                    key.item_group_repeat_key, key.item_oid))


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _names_item(detail: dict[str, Any], key: ItemKey) -> bool:
    """A discrepancy's detail names this item (absent parts do not contradict it)."""
    if detail.get("item_oid") != key.item_oid:
        return False
    for name in ("study_event_oid", "form_oid", "item_group_repeat_key"):
        given = detail.get(name)
        if given not in (None, "") and given != getattr(key, name):
            return False
    return True


def _all_entries(uow: Any, **filters: Any) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    while True:
        page, total = uow.audit_entries(limit=2000, offset=len(out), **filters)
        out.extend(page)
        if not page or len(out) >= total:
            return out


def _step(entry: AuditEntry, pseudonymizer: Pseudonymizer, facts: dict[str, StoredFact]) -> LineageStep:
    e = entry.event
    d = dict(e.detail)
    conversions = d.get("conversions")
    return LineageStep(
        audit_id=entry.id, at=entry.at, action=str(e.action), actor=e.actor, manual=e.actor != SYSTEM_ACTOR,
        old_value=e.old_value, new_value=e.new_value, reason=e.reason, rule=e.rule,
        source=_source(e.source, pseudonymizer, facts),
        conversions=tuple(str(c) for c in conversions) if isinstance(conversions, list) else (),
        transaction_type=d.get("transaction_type") if isinstance(d.get("transaction_type"), str) else None,
        outbox_id=_int(d.get("outbox_id")), sequence=_int(d.get("sequence")), detail=d,
    )


# ------------------------------------------------------------------------------------------ use cases


def item_lineage(uow: Any, key: ItemKey, pseudonymizer: Pseudonymizer) -> ItemLineage | None:
    """The lineage of one value, or None when esource knows nothing about that item."""
    study, subject = key.study_oid, key.subject_key
    state = uow.sent_items(study, subject).get(key)
    own = _all_entries(uow, study_oid=study, subject_key=subject, item=key)
    related = _all_entries(uow, study_oid=study, subject_key=subject,
                           actions=[str(a) for a in TRANSFER_ACTIONS + DISCREPANCY_ACTIONS])
    mapped = [e for e in own if e.event.action == AuditAction.VALUE_MAPPED]
    outbox_ids = {i for i in (_int(e.event.detail.get("outbox_id")) for e in mapped) if i is not None}
    own_ids = {e.id for e in own}
    extra = [e for e in related if e.id not in own_ids and (
        (str(e.event.action) in DISCREPANCY_ACTIONS and _names_item(e.event.detail, key))
        or (str(e.event.action) in TRANSFER_ACTIONS and _int(e.event.detail.get("outbox_id")) in outbox_ids))]
    entries = sorted(own + extra, key=lambda e: e.id)
    open_d = [d for d in uow.open_discrepancies(study, subject)
              if d.item_oid == key.item_oid
              and _names_item({"item_oid": d.item_oid, "study_event_oid": d.study_event_oid, "form_oid": d.form_oid,
                               "item_group_repeat_key": d.item_group_repeat_key}, key)]
    if state is None and not entries and not open_d:
        return None

    facts = {f.identity: f for f in uow.facts(study, subject)}
    history = [_step(e, pseudonymizer, facts) for e in entries]

    sources: list[LineageSource] = []
    seen: set[tuple[str, str | None, str]] = set()
    for e in mapped:
        src = _source(e.event.source, pseudonymizer, facts)
        if src is not None and (src.resource_type, src.id, src.version) not in seen:
            seen.add((src.resource_type, src.id, src.version))
            sources.append(src)
    current = _source(_state_ref(state), pseudonymizer, facts) if state is not None else None
    if current is not None and (current.resource_type, current.id, current.version) not in seen:
        sources.append(current)

    rows = {r.id: r for r in uow.outbox_entries(statuses=None, study_oid=study, subject_key=subject)}
    transfers: list[LineageTransfer] = []
    for step in history:
        if step.action != AuditAction.VALUE_MAPPED or step.outbox_id is None:
            continue
        row = rows.get(step.outbox_id)
        about = [s for s in history if s.outbox_id == step.outbox_id and s.action in TRANSFER_ACTIONS]
        ack = next((s for s in reversed(about) if s.action == AuditAction.TRANSFER_ACKNOWLEDGED), None)
        rej = next((s for s in reversed(about) if s.action == AuditAction.TRANSFER_REJECTED), None)
        connector = next((s.detail.get("connector") for s in reversed(about) if s.detail.get("connector")), None)
        transfers.append(LineageTransfer(
            outbox_id=step.outbox_id, sequence=step.sequence if step.sequence is not None else (row.sequence if row else None),
            transaction_type=step.transaction_type, value=step.new_value, status=row.status if row else None,
            attempts=row.attempts if row else None, created_at=row.created_at if row else None,
            sent_at=row.sent_at if row else None, last_error=row.last_error if row else None,
            connector=str(connector) if connector else None,
            edc_reference=ack.detail.get("edc_reference") if ack else None,
            edc_code=rej.detail.get("code") if rej else None, edc_message=rej.detail.get("message") if rej else None,
        ))
    last_mapped = next((s for s in reversed(history) if s.action == AuditAction.VALUE_MAPPED), None)
    site = next((e.event.site_oid for e in reversed(entries) if e.event.site_oid), None)
    return ItemLineage(
        key=key, site_oid=site, value=state.value if state else None, frozen=bool(state.frozen) if state else False,
        rule=state.rule if state else (last_mapped.rule if last_mapped else None), source=current,
        conversions=last_mapped.conversions if last_mapped else (), sources=sources, transfers=transfers,
        manual_actions=[s for s in history if s.manual],
        open_discrepancies=[LineageDiscrepancy(d.kind.value, d.severity.value, d.message, d.held_value, d.rule)
                            for d in open_d],
        history=history,
    )


def subject_items(uow: Any, study_oid: str, subject_key: str, pseudonymizer: Pseudonymizer) -> list[ItemStatus]:
    """The subject's items with their state: value, source, rule, frozen, and the last transaction
    that carried each (with its status now)."""
    states = uow.sent_items(study_oid, subject_key)
    if not states:
        return []
    mapped = _all_entries(uow, study_oid=study_oid, subject_key=subject_key, actions=[AuditAction.VALUE_MAPPED.value])
    last: dict[ItemKey, AuditEntry] = {}
    for e in mapped:
        if e.event.item is not None:
            last[e.event.item] = e
    rows = {r.id: r for r in uow.outbox_entries(statuses=None, study_oid=study_oid, subject_key=subject_key)}
    facts = {f.identity: f for f in uow.facts(study_oid, subject_key)}
    out: list[ItemStatus] = []
    for key in sorted(states, key=item_sort_key):
        s = states[key]
        entry = last.get(key)
        outbox_id = _int(entry.event.detail.get("outbox_id")) if entry else None
        row = rows.get(outbox_id) if outbox_id is not None else None
        src = _source(_state_ref(s), pseudonymizer, facts)
        assert src is not None
        out.append(ItemStatus(key=key, value=s.value, frozen=bool(s.frozen), rule=s.rule, source=src,
                              outbox_id=outbox_id, sequence=_int(entry.event.detail.get("sequence")) if entry else None,
                              transfer_status=row.status if row else None, updated_at=entry.at if entry else None))
    return out
