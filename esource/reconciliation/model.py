"""The reconciliation queue's vocabulary: statuses, resolutions, review modes, the filter every list and
bulk action shares, and a stored discrepancy as the queue shows it.

Plain dataclasses (no I/O): the store fills them, the services act on them, the API renders them with
`to_json`. Sources are shown in their outbound form only (`SourceRef.outbound()`: a Patient's id never
appears, nor a source identity, which may be an identifier value); subjects by SubjectKey.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from esource.domain.model import Discrepancy, DiscrepancyKind
from esource.errors import EsourceError


class ReconciliationError(EsourceError):
    """A reconciliation action that cannot be done as asked (the API answers 4xx with the message)."""

    status_code = 409


class DiscrepancyNotFound(ReconciliationError):
    status_code = 404


class DiscrepancyStateError(ReconciliationError):
    """The discrepancy is not in a status the action applies to (closed already, changed meanwhile)."""

    status_code = 409


class InvalidDecision(ReconciliationError):
    """The decision itself is not acceptable: a value that does not fit the item, a missing reason."""

    status_code = 422


class DiscrepancyStatus(StrEnum):
    OPEN = "open"
    IN_REVIEW = "in_review"
    RESOLVED = "resolved"
    DISMISSED = "dismissed"


OPEN_STATUSES: tuple[str, ...] = (DiscrepancyStatus.OPEN.value, DiscrepancyStatus.IN_REVIEW.value)
CLOSED_STATUSES: tuple[str, ...] = (DiscrepancyStatus.RESOLVED.value, DiscrepancyStatus.DISMISSED.value)


class Resolution(StrEnum):
    """How a data manager closed a discrepancy."""

    ACCEPTED = "accepted"  # the held value was sent
    OVERRIDDEN = "overridden"  # a corrected value was sent instead
    DISMISSED = "dismissed"  # nothing sent; the reason says why
    REMAPPED = "remapped"  # the map was re-run and no longer reports it
    REPUSHED = "repushed"  # the rejected transaction(s) went back to the outbox


class ReviewMode(StrEnum):
    """A form's review-before-send policy."""

    AUTO = "auto"  # values go to the EDC at once
    ADJUDICATE = "adjudicate"  # values wait as REVIEW_REQUIRED discrepancies until approved


@dataclass(frozen=True, slots=True)
class DiscrepancyFilter:
    """What the queue lists and bulk actions act on. None means "any"; tuples mean "one of".
    `site_oids` is also how a CRA's site scope is applied (the subject's site, from the enrollment)."""

    study_oid: str
    site_oids: tuple[str, ...] | None = None
    subject_keys: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    statuses: tuple[str, ...] | None = None
    assignee: str | None = None
    unassigned: bool = False
    item_oid: str | None = None
    form_oid: str | None = None
    study_event_oid: str | None = None
    created_from: dt.datetime | None = None  # created at or after
    created_to: dt.datetime | None = None  # created before
    ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class DiscrepancyRecord:
    """One discrepancy as stored: the domain object plus its place in the queue."""

    id: int
    discrepancy: Discrepancy
    status: str
    site_oid: str | None  # from the subject's enrollment
    assignee: str | None
    resolution: str | None
    resolved_by: str | None
    resolved_at: dt.datetime | None
    resolution_reason: str | None
    resolution_value: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def kind(self) -> DiscrepancyKind:
        return self.discrepancy.kind

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def age(self, now: dt.datetime) -> dt.timedelta:
        """Time since it was opened (for a closed one: until it was closed)."""
        end = self.resolved_at if (not self.is_open and self.resolved_at is not None) else now
        return max(end - self.created_at, dt.timedelta(0))

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        d = self.discrepancy
        age = self.age(now)
        return {
            "id": self.id,
            "kind": d.kind.value,
            "severity": d.severity.value,
            "status": self.status,
            "message": d.message,
            "study_oid": d.study_oid,
            "site_oid": self.site_oid,
            "subject_key": d.subject_key,
            "study_event_oid": d.study_event_oid,
            "study_event_repeat_key": d.study_event_repeat_key,
            "form_oid": d.form_oid,
            "item_group_oid": d.item_group_oid,
            "item_group_repeat_key": d.item_group_repeat_key,
            "item_oid": d.item_oid,
            "held_value": d.held_value,
            "source": d.source.outbound() if d.source else None,
            "rule": d.rule,
            "candidates": [dict(c) for c in d.candidates],
            "assignee": self.assignee,
            "resolution": self.resolution,
            "resolved_by": self.resolved_by,
            "resolved_at": _iso(self.resolved_at),
            "resolution_reason": self.resolution_reason,
            "resolution_value": self.resolution_value,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "age_seconds": int(age.total_seconds()),
            "age_days": age.days,
        }


def _iso(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
