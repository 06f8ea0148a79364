"""The audit trail's vocabulary: who did what, when, why, to which value, from which source.

Every use case records `AuditEvent`s through its unit of work (`UnitOfWork.audit`), so an entry commits
in the same database transaction as the change it describes — or not at all. The store chains the
entries (each carries the hash of its predecessor) when the unit of work commits; the domain only
says what happened. Free text and patient identifiers never go into an event: subjects are named by
SubjectKey, sources by resource type, id and version (the store stays inside the hospital).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from operator import attrgetter
from typing import Any

from esource.domain.model import ItemKey, SourceRef

SYSTEM_ACTOR = "system"


def user_actor(username: str) -> str:
    """The actor string of a person (or service account) acting through the API."""
    return f"user:{username}"


class AuditAction(StrEnum):
    """What happened. Dotted: the first part is the object, the second what happened to it."""

    MESSAGE_RECEIVED = "message.received"  # an input was accepted for processing (intake key, channel)
    MESSAGE_DUPLICATE = "message.duplicate"  # a redelivered input changed nothing
    MESSAGE_DEAD_LETTERED = "message.dead_lettered"  # an input could not be processed (reason)
    PATIENT_MATCHED = "patient.matched"  # resources attributed to an enrolled subject
    PATIENT_DROPPED = "patient.dropped"  # resources of a patient not enrolled: count only, nothing identifying
    VALUE_MAPPED = "value.mapped"  # an item value produced and queued for the EDC (Insert or Update)
    VALUE_HELD = "value.held"  # a value held back (discrepancy or review-before-send)
    VALUE_FROZEN = "value.frozen"  # a sent value whose source was retracted
    TRANSFER_QUEUED = "transfer.queued"  # an ODM transaction written to the outbox
    TRANSFER_SENT = "transfer.sent"  # delivered to the EDC (attempt made)
    TRANSFER_ACKNOWLEDGED = "transfer.acknowledged"  # the EDC confirmed it (reference)
    TRANSFER_REJECTED = "transfer.rejected"  # the EDC refused it for good (vendor code and message)
    TRANSFER_FAILED = "transfer.failed"  # retries exhausted; stays pending and visible
    TRANSFER_REPUSHED = "transfer.repushed"  # a data manager asked to send again
    DISCREPANCY_OPENED = "discrepancy.opened"
    DISCREPANCY_CHANGED = "discrepancy.changed"  # status, assignee, content
    DISCREPANCY_RESOLVED = "discrepancy.resolved"  # accepted / overridden / re-mapped
    DISCREPANCY_DISMISSED = "discrepancy.dismissed"
    ENROLLMENT_CREATED = "enrollment.created"
    ENROLLMENT_CHANGED = "enrollment.changed"
    CONFIG_CHANGED = "config.changed"  # study configuration, review policy
    USER_CHANGED = "user.changed"  # API users, roles, tokens (never the token itself)
    DATA_READ = "data.read"  # clinical data read through the API (who read what)


ITEM_COLUMNS: tuple[str, ...] = ("study_event_oid", "study_event_repeat_key", "form_oid", "item_group_oid",
                                 "item_group_repeat_key", "item_oid")


_ITEM_VALUES = attrgetter(*ITEM_COLUMNS)
_NO_ITEM: dict[str, str | None] = dict.fromkeys(ITEM_COLUMNS)


def item_columns(item: ItemKey | None) -> dict[str, str | None]:
    """An entry's eCRF cell as its six columns (all None for entries about no single value). Built on
    every audit entry (one per mapped value): one C-level attribute fetch, no per-column getattr."""
    return dict(_NO_ITEM) if item is None else dict(zip(ITEM_COLUMNS, _ITEM_VALUES(item)))


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit entry before the store chains it. `at` defaults to the unit of work's clock."""

    action: AuditAction
    actor: str = SYSTEM_ACTOR
    study_oid: str | None = None
    subject_key: str | None = None
    site_oid: str | None = None
    item: ItemKey | None = None
    old_value: str | None = None
    new_value: str | None = None
    reason: str | None = None
    source: SourceRef | None = None  # the FHIR resource, id and version the value came from
    rule: str | None = None  # the map rule that produced the value
    detail: dict[str, Any] = field(default_factory=dict)  # JSON-ready: outbox id, sequence, EDC reference ...
    at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A chained audit entry as stored: the event plus its position and hashes."""

    id: int
    at: dt.datetime
    event: AuditEvent
    prev_hash: str
    hash: str
