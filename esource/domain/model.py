"""The domain vocabulary of esource, in the words CDISC ODM and FHIR use.

Plain dataclasses, no I/O: the mapping engine, the ODM writer, the store and the connectors all speak
these types. Identifying data (Patient ids, names, identifiers) never appears in anything that can
leave the hospital; `SourceRef.outbound()` is what lineage and ODM may carry.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Which FHIR resource version a value came from.

    `identity` is the protocol's source identity: the first identifier (system|value), else the
    resource id, else the fullUrl; it keys repeat keys and updates. `version` is meta.versionId, else
    "sha256:<hex>" of the canonical JSON. `element` names the part used (e.g. "component[1]").
    """

    resource_type: str
    id: str | None
    version: str
    identity: str
    full_url: str | None = None
    element: str | None = None

    @property
    def is_patient(self) -> bool:
        return self.resource_type == "Patient"

    def outbound(self) -> dict[str, Any]:
        """Lineage form for `esource map --format lineage`: the Patient's id is never shown."""
        out: dict[str, Any] = {"resourceType": self.resource_type, "versionId": self.version}
        if not self.is_patient and self.id is not None:
            out["id"] = self.id
        if self.element:
            out["element"] = self.element
        return out


@dataclass(frozen=True, slots=True)
class SourceResource:
    """One FHIR resource as received: raw JSON (not yet validated) plus where it came from."""

    resource_type: str
    id: str | None
    full_url: str | None
    resource: dict[str, Any]
    ref: SourceRef
    origin: str  # file name, message id or request id: for error messages
    index: int  # position inside its Bundle (-1 for a single resource)

    @property
    def label(self) -> str:
        """Human label for messages: `Observation/abc` or `Bundle.entry[3] (Observation)`."""
        if self.id:
            return f"{self.resource_type}/{self.id}"
        if self.index >= 0:
            return f"Bundle.entry[{self.index}] ({self.resource_type})"
        return self.resource_type


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A subject enrolled in a study, matched to EHR patients by identifier system + value only."""

    study_oid: str
    subject_key: str
    site_oid: str
    identifiers: tuple[tuple[str, str], ...]  # (system, value)
    consent_date: dt.date
    day1: dt.date
    withdrawal_date: dt.date | None = None

    def study_day(self, d: dt.date) -> int:
        """Study day with no Day 0: d − Day1 + 1 on or after Day 1, else d − Day1."""
        delta = (d - self.day1).days
        return delta + 1 if delta >= 0 else delta

    def date_of_day(self, day: int) -> dt.date:
        """The calendar date of a study day (the inverse of `study_day`; day 0 is read as Day 1)."""
        return self.day1 + dt.timedelta(days=day - 1 if day >= 1 else day)


@dataclass(frozen=True, slots=True, order=True)
class ItemKey:
    """The unit of state, audit and lineage: one ItemData cell of one subject."""

    study_oid: str
    subject_key: str
    study_event_oid: str
    study_event_repeat_key: str | None
    form_oid: str
    item_group_oid: str
    item_group_repeat_key: str | None
    item_oid: str


class DiscrepancyKind(StrEnum):
    """Every kind from the CV01 protocol, plus the EDC-side ones."""

    UNMAPPED_CODE = "unmapped_code"
    UNKNOWN_UNIT = "unknown_unit"
    UNIT_NOT_CONVERTIBLE = "unit_not_convertible"
    COMPARATOR_VALUE = "comparator_value"
    OUT_OF_RANGE = "out_of_range"
    AMBIGUOUS_DATA = "ambiguous_data"
    MISSING_DATE = "missing_date"
    MISSING_VALUE = "missing_value"
    INVALID_SOURCE = "invalid_source"
    POSSIBLE_ADVERSE_EVENT = "possible_adverse_event"
    UNKNOWN_GENDER = "unknown_gender"
    ENTERED_IN_ERROR = "entered_in_error"
    PRIVACY_BLOCKED = "privacy_blocked"
    EDC_REJECTED = "edc_rejected"
    EDC_CONFLICT = "edc_conflict"
    REVIEW_REQUIRED = "review_required"  # held by a form's review-before-send policy (adjudicate)


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ItemValue:
    """A value the map produced for one eCRF item, with its lineage."""

    key: ItemKey
    value: str
    source: SourceRef
    rule: str  # the map rule that produced it, e.g. "F.VS/SYSBP/result"
    conversions: tuple[str, ...] = ()  # human-readable steps, e.g. "150 [lb_av] -> 68.0388555 kg (UCUM)"


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """Something that could not go through cleanly: a data manager resolves it."""

    kind: DiscrepancyKind
    message: str
    study_oid: str
    subject_key: str
    source: SourceRef | None = None
    item_oid: str | None = None
    study_event_oid: str | None = None
    form_oid: str | None = None
    item_group_repeat_key: str | None = None
    held_value: str | None = None  # the value that would have been sent, when there is one
    candidates: tuple[dict[str, Any], ...] = ()  # other readings: next candidate, tied readings, proposals
    severity: Severity = Severity.WARNING
    rule: str | None = None
    # the rest of the ItemKey, when the discrepancy is about one ItemData and knows it (review holds do)
    item_group_oid: str | None = None
    study_event_repeat_key: str | None = None

    @property
    def key(self) -> tuple[str, ...]:
        """Stable identity, so re-running the map re-finds the same discrepancy instead of a new one.
        A review hold is one per eCRF cell (its value and source are refreshed as they change), so its
        last part is the item group and event repeat instead of the source."""
        if self.kind is DiscrepancyKind.REVIEW_REQUIRED:
            anchor = f"@{self.item_group_oid or ''}|{self.study_event_repeat_key or ''}"
        else:
            anchor = self.source.identity if self.source else ""
        return (
            self.kind.value,
            self.study_oid,
            self.subject_key,
            self.study_event_oid or "",
            self.form_oid or "",
            self.item_group_repeat_key or "",
            self.item_oid or "",
            anchor,
        )


@dataclass(frozen=True, slots=True)
class NotSent:
    """A reading the map considered and did not send, with the reason (for lineage)."""

    reason: str
    source: SourceRef
    form_oid: str | None = None
    test_code: str | None = None
    study_event_oid: str | None = None
    detail: str | None = None


@dataclass(slots=True)
class MappingResult:
    items: list[ItemValue] = field(default_factory=list)
    not_sent: list[NotSent] = field(default_factory=list)
    discrepancies: list[Discrepancy] = field(default_factory=list)
    # identities of sources marked entered-in-error or deleted: the state diff freezes items sent from them
    retracted_sources: dict[str, SourceRef] = field(default_factory=dict)


class TransactionType(StrEnum):
    INSERT = "Insert"
    UPDATE = "Update"
    REMOVE = "Remove"
    UPSERT = "Upsert"
    CONTEXT = "Context"


@dataclass(frozen=True, slots=True)
class ItemChange:
    """One ItemData in an outgoing transaction."""

    item: ItemValue
    transaction_type: TransactionType
    previous_value: str | None = None
    reason_for_change: str | None = None


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Who and where for ODM AuditRecords: the esource system user at the subject's site."""

    user_oid: str
    timestamp: dt.datetime  # UTC


@dataclass(slots=True)
class SubjectTransaction:
    """What goes to the EDC for one subject in one unit of work."""

    study_oid: str
    metadata_version_oid: str
    subject_key: str
    site_oid: str
    subject_transaction_type: TransactionType | None  # Insert for a new subject, else None
    changes: list[ItemChange]
    sequence: int = 0  # per subject, for ordering and de-duplication at the connector


SYSTEM_USER_OID = "USR.ESOURCE"
